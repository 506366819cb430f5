"""Multi-crop views: DINO's augmentation recipe on uint8 image tensors.

`MultiCropAugmentation` turns one image into the views of docs/design.md section 1.1: the
global (teacher) views first, then the smaller local crops. The recipe and its
probabilities are DINO's (``DataAugmentationDINO`` in main_dino.py):

=========  ==================  ====  ======  ====  ====  ========
view       crop (area scale)   flip  jitter  grey  blur  solarise
=========  ==================  ====  ======  ====  ====  ========
global 1   global_crop_scale   0.5   0.8     0.2   1.0   -
global 2   global_crop_scale   0.5   0.8     0.2   0.1   0.2
local      local_crop_scale    0.5   0.8     0.2   0.5   -
=========  ==================  ====  ======  ====  ====  ========

- crop: RandomResizedCrop (aspect ratio 3/4..4/3), bicubic, antialiased, on uint8.
- jitter: ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1), its four
  operations in a random order per view.
- grey: RandomGrayscale (ITU-R 601 luma, replicated to 3 channels).
- blur: isotropic Gaussian, sigma uniform in [0.1, 2.0], reflect padding, on an odd
  kernel of about 10% of the crop side, at least 3 (`blur_kernel_size`: 23 taps for
  224 px, 9 for 96 px, 3 for 32 px). DINO's PIL blur has a radius but no kernel size;
  10% is the usual choice of tensor ports (23 px at 224 px).
- solarise: invert values >= 128/255, as PIL's ``ImageOps.solarize(threshold=128)``.
- then ImageNet mean / std normalisation.

Why it is not one ``v2.Compose`` per view: on one CPU core that plain port of the recipe
runs at 0.3x (224 px crops) to 0.5x (32 px crops) the speed of DINO's PIL pipeline
(benchmarks/augmentation.py, docs/benchmarks.md): its
Gaussian blur is a dense 2-D convolution (23 x 23 taps at 224 px, tens of ms per view),
its hue kernel goes through ``torch.where`` and ``gather`` passes that cost more than
PIL's uint8 HSV round trip, and per-call overhead dominates on small local crops. So:

- the random parameters of all views of an image are drawn in one call
  (`sample_view_params`, the same distributions as the v2 transforms' ``make_params``);
- the crops use torchvision's uint8 bicubic antialiased resize (``F.interpolate``, the
  kernel behind ``v2.functional.resized_crop``) and ``v2.functional.horizontal_flip``;
- the colour operations run on float32 in [0, 1], converted once per view, on batches of
  same-size views (as many as fit a core's L2 cache), with kernels that compute the same
  functions as ``torchvision.transforms.v2.functional`` (``adjust_brightness``,
  ``adjust_contrast``, ``adjust_saturation``, ``adjust_hue``, ``rgb_to_grayscale``,
  ``gaussian_blur``, ``solarize``) in fewer, branch-free passes.

tests/trainer/test_augment.py checks each kernel, and whole views rendered from given
parameters, against torchvision's functional ops, and the parameter sampler's
frequencies against the recipe's probabilities.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.config import DataConfig

IMAGE_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet (RGB, values in [0, 1]), used to normalise every view."""
IMAGE_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet (RGB, values in [0, 1])."""

FLIP_P = 0.5
JITTER_P = 0.8
JITTER_STRENGTH = (0.4, 0.4, 0.2, 0.1)
"""ColorJitter's brightness, contrast, saturation and hue arguments."""
GRAYSCALE_P = 0.2
BLUR_SIGMA = (0.1, 2.0)
GLOBAL_BLUR_P = (1.0, 0.1)
"""Blur probability of global view 1 and of global view 2."""
GLOBAL_SOLARIZE_P = (0.0, 0.2)
"""Solarisation probability of global view 1 and of global view 2."""
LOCAL_BLUR_P = 0.5
SOLARIZE_THRESHOLD = 128 / 255
CROP_RATIO = (3 / 4, 4 / 3)
"""Aspect-ratio range of RandomResizedCrop (torchvision's default, which DINO keeps)."""

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
"""ColorJitter's operation ids (the values of its ``fn_idx`` permutation)."""

# ITU-R 601-2 luma weights, exactly those of torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# Views are coloured in batches of at most this many float32 values (1 MiB), so one
# batch and its temporaries stay in a core's L2 cache: one 224 px global view at a time,
# eight 96 px local views together.
_BATCH_VALUES = 2**18
# RandomResizedCrop's tries before it falls back to a central crop.
_CROP_TRIES = 10
# Columns of the per-view uniform draws of `sample_view_params`.
_TRY_COLUMNS = 4 * _CROP_TRIES
_FLIP, _JITTER, _GREY, _BLUR, _SIGMA, _SOLARIZE = range(_TRY_COLUMNS, _TRY_COLUMNS + 6)
_FACTORS = _TRY_COLUMNS + 6
_ORDER = _FACTORS + 4
_DRAWS = _ORDER + 4


def blur_kernel_size(side: int) -> int:
    """The odd Gaussian kernel size for a crop of ``side`` pixels: about 10%, at least 3."""
    return max(3, 2 * int(side * 0.05) + 1)


@dataclass(frozen=True)
class ViewParams:
    """The random choices that make one view (what v2's ``make_params`` would draw)."""

    box: tuple[int, int, int, int]
    """Crop ``(top, left, height, width)`` in the source image."""
    flip: bool
    jitter: bool
    """Whether ColorJitter applies (then with the four factors below, in ``order``)."""
    order: tuple[int, int, int, int]
    """Permutation of `BRIGHTNESS`, `CONTRAST`, `SATURATION`, `HUE`."""
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grey: bool
    blur_sigma: float | None
    """None: no blur."""
    solarize: bool


class MultiCropAugmentation:
    """DINO's multi-crop augmentation: global views first, then local views.

    Args:
        config: the data section; uses ``global_crop_size``, ``local_crop_size``,
            ``num_global_crops``, ``num_local_crops``, ``global_crop_scale``,
            ``local_crop_scale`` and ``blur`` (`DataConfig.blur_enabled`).

    Calling it on a uint8 (3, H, W) image of any size returns
    ``num_global_crops + num_local_crops`` float32 views normalised with `IMAGE_MEAN` /
    `IMAGE_STD`: the global ones (3, G, G) first, then the local ones (3, L, L). The
    randomness comes from torch's global generator, so ``torch.manual_seed`` (or a
    DataLoader worker's seed) makes it reproducible.
    """

    def __init__(self, config: DataConfig) -> None:
        self.num_global_crops = config.num_global_crops
        self.num_local_crops = config.num_local_crops
        # The jitter ranges are read from torchvision's own ColorJitter, so they are
        # exactly the ones v2.ColorJitter(0.4, 0.4, 0.2, 0.1) samples from.
        jitter = v2.ColorJitter(*JITTER_STRENGTH)
        ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
        if any(r is None for r in ranges):
            raise ValueError(f"every jitter strength must be > 0, got {JITTER_STRENGTH}")
        self.jitter_ranges: tuple[tuple[float, float], ...] = tuple(
            r for r in ranges if r is not None
        )
        blur = 1.0 if config.blur_enabled else 0.0  # scales DINO's probabilities
        self.global_views = ViewRenderer(
            config.global_crop_size,
            scale=config.global_crop_scale,
            blur_p=tuple(blur * p for p in GLOBAL_BLUR_P[: config.num_global_crops]),
            solarize_p=GLOBAL_SOLARIZE_P[: config.num_global_crops],
            jitter_ranges=self.jitter_ranges,
        )
        self.local_views = ViewRenderer(
            config.local_crop_size,
            scale=config.local_crop_scale,
            blur_p=(blur * LOCAL_BLUR_P,) * config.num_local_crops,
            solarize_p=(0.0,) * config.num_local_crops,
            jitter_ranges=self.jitter_ranges,
        )

    def __call__(self, image: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Views of one image.

        Args:
            image: uint8 (3, H, W).
            generator: source of the randomness (default: torch's global generator).

        Returns:
            ``num_global_crops`` float32 (3, G, G) views, then ``num_local_crops``
            float32 (3, L, L) views, all normalised.
        """
        _check_image(image)
        source = channels_last(image)
        return self.global_views(source, generator) + self.local_views(source, generator)

    def sample(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> list[ViewParams]:
        """The parameters of the views of a ``height`` x ``width`` image, global ones first.

        The same draws, from the same generator state, as calling this augmentation on
        such an image (`trainer.augment_device` renders them on a device).
        """
        return self.global_views.sample(height, width, generator) + self.local_views.sample(
            height, width, generator
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global={self.num_global_crops}x"
            f"{self.global_views.size}px, local={self.num_local_crops}x"
            f"{self.local_views.size}px)"
        )


def channels_last(image: Tensor) -> Tensor:
    """uint8 (3, H, W) -> (1, 3, H, W) in channels-last memory.

    torch's native uint8 bicubic antialiased resize works on channels-last images;
    converting the source once saves a copy in every view's resize.
    """
    return image.unsqueeze(0).contiguous(memory_format=torch.channels_last)


class ViewRenderer:
    """Samples and renders the views of one kind (global or local) of an image.

    Args:
        size: side of the views.
        scale: RandomResizedCrop's area range.
        blur_p: blur probability of each view (its length is the number of views).
        solarize_p: solarisation probability of each view.
        jitter_ranges: (low, high) of the brightness, contrast, saturation and hue
            factors.
    """

    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float],
        blur_p: Sequence[float],
        solarize_p: Sequence[float],
        jitter_ranges: Sequence[tuple[float, float]],
    ) -> None:
        if len(blur_p) != len(solarize_p):
            raise ValueError("blur_p and solarize_p need one probability per view")
        self.size = size
        self.scale = scale
        self.blur_p = tuple(blur_p)
        self.solarize_p = tuple(solarize_p)
        self.jitter_ranges = tuple(jitter_ranges)
        self.blur = GaussianBlur(blur_kernel_size(size))
        self.batch = max(1, _BATCH_VALUES // (3 * size * size))
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        # (x - mean) / std as one fused multiply-add: x * (1 / std) + (-mean / std).
        self._norm_scale = 1.0 / std
        self._norm_shift = -torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1) / std

    @property
    def count(self) -> int:
        """Views per image."""
        return len(self.blur_p)

    def __call__(self, source: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        """Normalised float32 (3, size, size) views of a channels-last source image."""
        if not self.count:
            return []
        params = self.sample(source.shape[-2], source.shape[-1], generator)
        views: list[Tensor] = []
        for start in range(0, len(params), self.batch):
            views += self.render(source, params[start : start + self.batch]).unbind(0)
        return views

    def sample(
        self, height: int, width: int, generator: torch.Generator | None = None
    ) -> list[ViewParams]:
        """Random parameters of this kind's views of a ``height`` x ``width`` image."""
        if not self.count:
            return []  # draws nothing: the generator's state is left as it is
        return sample_view_params(
            height,
            width,
            scale=self.scale,
            blur_p=self.blur_p,
            solarize_p=self.solarize_p,
            jitter_ranges=self.jitter_ranges,
            generator=generator,
        )

    def render(self, source: Tensor, params: Sequence[ViewParams]) -> Tensor:
        """The views given by ``params``, as a normalised float32 (N, 3, size, size) batch.

        Args:
            source: uint8 (1, 3, H, W), preferably channels-last (see `channels_last`).
            params: one `ViewParams` per view.
        """
        crops = torch.empty((len(params), 3, self.size, self.size), dtype=torch.uint8)
        for index, view in enumerate(params):
            top, left, height, width = view.box
            crop = F.interpolate(
                source[..., top : top + height, left : left + width],
                size=(self.size, self.size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )
            # DINO's order (crop, flip, then colour), flipping one byte per value.
            crops[index] = TF.horizontal_flip(crop[0]) if view.flip else crop[0]
        batch = crops.mul(1 / 255)  # the one uint8 -> float32 conversion
        color_jitter(batch, params)
        for index, view in enumerate(params):
            if view.grey:
                batch[index] = rgb_to_grayscale(batch[index : index + 1])[0]
        blurred = [(i, view.blur_sigma) for i, view in enumerate(params) if view.blur_sigma]
        if blurred:
            indices, sigmas = zip(*blurred, strict=True)
            _apply_to(batch, list(indices), lambda views: self.blur(views, sigmas))
        for index, view in enumerate(params):
            if view.solarize:
                solarize_(batch[index], SOLARIZE_THRESHOLD)
        return torch.addcmul(self._norm_shift, batch, self._norm_scale)


def sample_view_params(
    height: int,
    width: int,
    *,
    scale: Sequence[float],
    blur_p: Sequence[float],
    solarize_p: Sequence[float],
    jitter_ranges: Sequence[tuple[float, float]],
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> list[ViewParams]:
    """Random parameters of ``len(blur_p)`` views of a ``height`` x ``width`` image.

    The distributions are those of the v2 transforms' ``make_params``: the crop box of
    ``RandomResizedCrop`` (up to 10 tries of an area fraction uniform in ``scale`` and a
    log-uniform aspect ratio, the first that fits, else the central crop clipped to the
    ratio range; offsets uniform), flip and grey with their probabilities, ColorJitter
    (with probability `JITTER_P`) with a uniformly random order of its four operations and
    factors uniform in ``jitter_ranges``, blur with sigma uniform in `BLUR_SIGMA`. Every
    uniform number of every view comes from one call to torch's generator; the rest is
    arithmetic on Python floats, which costs less than per-view tensor calls.
    """
    count = len(blur_p)
    draws: list[list[float]] = torch.rand(
        count, _DRAWS, dtype=torch.float64, generator=generator
    ).tolist()
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    params = []
    for view, u in enumerate(draws):
        box = _central_box(height, width, ratio)
        for t in range(_CROP_TRIES):
            area_u, ratio_u, top_u, left_u = u[4 * t : 4 * t + 4]
            target_area = area * (scale[0] + (scale[1] - scale[0]) * area_u)
            aspect = math.exp(log_low + (log_high - log_low) * ratio_u)
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = min(int(top_u * (height - h + 1)), height - h)
                left = min(int(left_u * (width - w + 1)), width - w)
                box = (top, left, h, w)
                break
        factors = [
            low + (high - low) * f
            for (low, high), f in zip(jitter_ranges, u[_FACTORS : _FACTORS + 4], strict=True)
        ]
        # A uniformly random permutation: the ranks of four i.i.d. uniforms.
        order = sorted(range(4), key=lambda op: u[_ORDER + op])
        blur = u[_BLUR] < blur_p[view]
        params.append(
            ViewParams(
                box=box,
                flip=u[_FLIP] < FLIP_P,
                jitter=u[_JITTER] < JITTER_P,
                order=(order[0], order[1], order[2], order[3]),
                brightness=factors[BRIGHTNESS],
                contrast=factors[CONTRAST],
                saturation=factors[SATURATION],
                hue=factors[HUE],
                grey=u[_GREY] < GRAYSCALE_P,
                blur_sigma=BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * u[_SIGMA]
                if blur
                else None,
                solarize=u[_SOLARIZE] < solarize_p[view],
            )
        )
    return params


def _central_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback: the whole image, clipped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return ((height - h) // 2, (width - w) // 2, h, w)


def color_jitter(batch: Tensor, params: Sequence[ViewParams]) -> None:
    """ColorJitter, in place, on the views whose ``params.jitter`` is set.

    Each view applies its four operations in its own ``order``; at step k every view
    applies the k-th operation of its order, so four batched steps serve all the views.
    Brightness, contrast and saturation are one blend, clamp(f x + (1 - f) ref) with
    ref = 0, the mean grey level, or the grey image, so at each step all views that blend
    share the same passes, whatever operation each of them does.

    Args:
        batch: (N, 3, H, W) float in [0, 1], one view per ``params`` entry.
        params: the views' parameters.
    """
    for step in range(4):
        blends: list[tuple[int, int, float]] = []  # (view, operation, factor)
        hue_views: list[int] = []
        hue_factors: list[float] = []
        for index, view in enumerate(params):
            if not view.jitter:
                continue
            op = view.order[step]
            if op == HUE:
                hue_views.append(index)
                hue_factors.append(view.hue)
            else:
                blends.append((index, op, (view.brightness, view.contrast, view.saturation)[op]))
        if len(blends) == 1:
            index, op, factor = blends[0]
            _blend_one(batch[index : index + 1], op, factor)
        elif blends:
            _blend_many(batch, blends)
        if hue_views:
            factors = torch.tensor(hue_factors)
            _apply_to(batch, hue_views, functools.partial(adjust_hue, hue_factor=factors))


def _blend_one(image: Tensor, op: int, factor: float) -> None:
    """One view's brightness, contrast or saturation, in place, with a Python factor."""
    if op == BRIGHTNESS:
        image.mul_(factor)
    elif op == CONTRAST:
        image.lerp_(mean_grey(image), 1.0 - factor)  # x + w (ref - x) = f x + (1 - f) ref
    else:
        image.lerp_(rgb_to_grayscale(image), 1.0 - factor)
    image.clamp_(0.0, 1.0)


def _blend_many(batch: Tensor, blends: list[tuple[int, int, float]]) -> None:
    """Brightness, contrast or saturation, per view, in place, in three batched passes."""
    n = batch.shape[0]
    # Rows: 1 - f (0 leaves a view unchanged), "ref is the grey image", "ref is the mean".
    rows = [[0.0] * n for _ in range(3)]
    for index, op, factor in blends:
        rows[0][index] = 1.0 - factor
        rows[1][index] = float(op == SATURATION)
        rows[2][index] = float(op == CONTRAST)
    weight, uses_grey, uses_mean = torch.tensor(rows).view(3, n, 1, 1, 1)
    ops = {op for _, op, _ in blends}
    if ops == {BRIGHTNESS}:
        batch.mul_(1.0 - weight)
    else:
        ref = mean_grey(batch) * uses_mean
        if SATURATION in ops:
            ref = ref + rgb_to_grayscale(batch) * uses_grey
        batch.lerp_(ref, weight)
    batch.clamp_(0.0, 1.0)


def _apply_to(batch: Tensor, indices: list[int], fn: Callable[[Tensor], Tensor]) -> None:
    """``batch[indices] = fn(batch[indices])``, without copies when it is every view."""
    if len(indices) == batch.shape[0]:
        batch.copy_(fn(batch))
        return
    index = torch.tensor(indices)
    batch.index_copy_(0, index, fn(batch.index_select(0, index)))


def mean_grey(batch: Tensor) -> Tensor:
    """(N, 1, 1, 1) mean luma of float RGB images (ColorJitter's contrast reference),
    from the channel means: one reduction instead of a grey image and its mean."""
    luma = torch.tensor(_LUMA, dtype=batch.dtype, device=batch.device)
    return (batch.mean(dim=(2, 3)) * luma).sum(dim=1).view(-1, 1, 1, 1)


def rgb_to_grayscale(batch: Tensor) -> Tensor:
    """Luma of float RGB images replicated to 3 channels, as torchvision's.

    Args:
        batch: (N, 3, H, W) float.

    Returns:
        (N, 1, H, W) grey levels; broadcast it (or ``expand``) for three channels.
    """
    r, g, b = batch.unbind(dim=1)
    return r.mul(_LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(1)


# Hue -> channel fraction: R = clamp(|h - 3| - 1), G = clamp(2 - |h - 2|),
# B = clamp(2 - |h - 4|), for h = 6 x hue in [0, 6): (centre, sign, offset) per channel.
_HUE_RAMPS = ((3.0, 1.0, -1.0), (2.0, -1.0, 2.0), (4.0, -1.0, 2.0))


def adjust_hue(batch: Tensor, hue_factor: Tensor) -> Tensor:
    """Rotate the hue of float RGB images in [0, 1], one factor per image.

    The same function as torchvision's ``adjust_hue`` (RGB -> HSV, h += factor mod 1,
    HSV -> RGB, red then green winning ties for the maximum, as PIL), computed without
    ``where``, ``remainder`` or ``gather``, which cost 10-40x an arithmetic pass on CPU:
    the maximum's channel comes from ``sign(max - c)`` (exactly 0 or 1), the wrap from
    ``floor``, and HSV -> RGB is the closed form min + chroma * ramp_c(h) (value and
    saturation, hence max and min, are unchanged by a hue rotation).

    Args:
        batch: (N, 3, H, W) float in [0, 1].
        hue_factor: (N,) shifts in [-0.5, 0.5], in turns of the colour wheel.

    Returns:
        (N, 3, H, W) the hue-rotated images (a new tensor).
    """
    r, g, b = batch.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    not_r = torch.sign(maxc - r)  # 0 where red holds the maximum, else 1
    on_b = not_r * torch.sign(maxc - g)  # 1 where neither red nor green does
    # 6 x hue, by sector: (g - b) / c if red is max, 2 + (b - r) / c if green, else 4 + ...
    hue = (g - b).mul_(1.0 - not_r)
    hue.addcmul_(not_r - on_b, (b - r).add_(chroma, alpha=2.0))
    hue.addcmul_(on_b, (r - g).add_(chroma, alpha=4.0))
    # Grey pixels (chroma 0) have a zero numerator: 0 / tiny = 0, never NaN.
    hue.div_(chroma.clamp(min=torch.finfo(batch.dtype).tiny))
    hue.add_((6.0 * hue_factor).view(-1, 1, 1).to(batch.dtype))
    hue.sub_(torch.floor(hue * (1 / 6)), alpha=6.0)  # wrap into [0, 6)
    out = torch.empty_like(batch)
    for channel, (centre, sign, offset) in enumerate(_HUE_RAMPS):
        ramp = (hue - centre).abs_()
        ramp = (ramp.neg_() if sign < 0 else ramp).add_(offset).clamp_(0.0, 1.0)
        torch.addcmul(minc, chroma, ramp, out=out[:, channel])
    return out


def solarize_(image: Tensor, threshold: float) -> Tensor:
    """Invert, in place, float values >= ``threshold`` (images in [0, 1]), as PIL.

    ``torch.where`` costs ~10 arithmetic passes here, so the mask is
    clamp(sign(x - t) + 1, 0, 1) (exactly 1 where x >= t, else 0) and x += mask (1 - 2x).
    """
    mask = torch.sign(image - threshold).add_(1.0).clamp_(0.0, 1.0)
    return image.addcmul_(mask, image.mul(-2.0).add_(1.0))


class GaussianBlur:
    """Isotropic Gaussian blur with reflect padding, one sigma per image.

    The same function as torchvision's ``gaussian_blur`` (kernel exp(-x^2 / (2 sigma^2))
    on ``kernel_size`` taps, normalised, reflect padding) but separable: two passes of
    shifted multiply-adds instead of a dense 2-D convolution. Taps whose weight is below
    1e-8 of the centre one are skipped: they change no float32 output by more than its
    rounding, and for small sigmas they are most of the kernel.

    Args:
        kernel_size: odd number of taps.
    """

    def __init__(self, kernel_size: int) -> None:
        if kernel_size % 2 != 1 or kernel_size < 1:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        self.kernel_size = kernel_size

    def kernel(self, sigma: float) -> list[float]:
        """The normalised 1-D kernel of ``kernel_size`` taps (torchvision's)."""
        half = self.kernel_size // 2
        weights = [math.exp(-0.5 * (x / sigma) ** 2) for x in range(-half, half + 1)]
        total = sum(weights)
        return [w / total for w in weights]

    def __call__(self, batch: Tensor, sigma: Sequence[float]) -> Tensor:
        """Blur image i of ``batch`` (N, C, H, W) float with sigma[i]; a new tensor."""
        half = self.kernel_size // 2
        height, width = batch.shape[-2:]
        if half >= min(height, width):
            raise ValueError(f"a {self.kernel_size}-tap blur cannot reflect-pad {height}x{width}")
        # Drop negligible taps to exact zeros (float32 denormals would slow every pass).
        kernels = [[w if w >= 1e-8 * max(k) else 0.0 for w in k] for k in map(self.kernel, sigma)]
        # Taps beyond 6.07 sigma weigh < 1e-8 of the centre: exp(-6.07^2 / 2) = 1e-8.
        reach = min(half, math.ceil(6.07 * max(sigma)))
        taps = [[k[half + offset] for k in kernels] for offset in range(-reach, reach + 1)]
        padded = F.pad(batch, (reach, reach, reach, reach), mode="reflect")
        rows = self._pass(padded, taps, width, dim=3)
        return self._pass(rows, taps, height, dim=2)

    @staticmethod
    def _pass(image: Tensor, taps: list[list[float]], length: int, dim: int) -> Tensor:
        """Sum over t of taps[t] * image shifted by t along ``dim``, ``length`` long."""
        # One image: Python-float weights; several: an (N, 1, 1, 1) weight per tap.
        columns = torch.tensor(taps).view(len(taps), -1, 1, 1, 1) if len(taps[0]) > 1 else None
        out = image.narrow(dim, 0, length) * (taps[0][0] if columns is None else columns[0])
        for shift in range(1, len(taps)):
            window = image.narrow(dim, shift, length)
            if columns is None:
                out.add_(window, alpha=taps[shift][0])
            else:
                out.addcmul_(window, columns[shift])
        return out


def _check_image(image: Tensor) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"expected a uint8 (3, H, W) image tensor, got {image.dtype} {tuple(image.shape)}"
        )


class _EvalTransform:
    """Deterministic view: shorter side -> S (bicubic, antialiased), centre S x S crop."""

    def __init__(self, size: int) -> None:
        self.size = size
        std = torch.tensor(IMAGE_STD).view(3, 1, 1)
        self._scale = 1.0 / std
        self._shift = -torch.tensor(IMAGE_MEAN).view(3, 1, 1) / std

    def __call__(self, image: Tensor) -> Tensor:
        _check_image(image)
        image = TF.resize(
            image, [self.size], interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
        image = TF.center_crop(image, [self.size, self.size])
        return torch.addcmul(self._shift, image.mul(1 / 255), self._scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def eval_transform(config: DataConfig) -> Callable[[Tensor], Tensor]:
    """The evaluation transform: uint8 (3, H, W) -> float32 normalised (3, S, S).

    S is ``config.global_crop_size``; no randomness. The shorter side is resized to S
    (bicubic, antialiased, aspect ratio kept) and the centre S x S square is kept, so a
    square image is simply resized (and a 32 px image is unchanged for S = 32).
    """
    return _EvalTransform(config.global_crop_size)
