"""DINO's multi-crop views made on a torch device, batched over images and views.

`trainer.augment.MultiCropAugmentation` makes the views of one image at a time in a
DataLoader worker; on a GPU node that needs 10 to 20 cores per GPU. `DeviceMultiCrop`
makes the same views for a whole batch on the training device (CUDA on a GPU node, the
CPU in tests), with the same distributions and the same arithmetic:

- parameters: drawn on the CPU by the CPU pipeline's own sampler
  (`MultiCropAugmentation.sample`, i.e. `trainer.augment.sample_view_params`), image
  after image, so a generator in the same state draws the same views. They travel as a
  float64 *view table* per image (`view_table`: one row per view, columns `COLUMNS`),
  which the loader workers draw and send with the decoded images (`ImageBatch`).
- crop and resize: each RandomResizedCrop box is resized with the weights of torch's
  antialiased bicubic resize of uint8 images, the CPU pipeline's kernel (Keys' cubic,
  a = -0.5, its support widened by the downscale factor, as PIL), including its 16-bit
  fixed-point weights and its rounding to 8 bits after the horizontal and after the
  vertical pass. The crops are the CPU pipeline's byte for byte, except that a float32
  sum can move a value lying within ~1e-5 of a rounding boundary by one level. A
  separable resize is two matrix products: a box becomes an (S x W) and an (S x H)
  weight matrix, zero outside the box, and one batched matmul per pass serves all the
  views of a group of images of one size. ``F.interpolate`` per crop would be the same
  function but one or more kernel launches per view (thousands per batch, leaving a GPU
  waiting on Python); ``grid_sample`` (bilinear or bicubic) and ``roi_align`` (averaged
  bilinear samples) have no such antialiasing filter: on a textured 500x375 image
  ``grid_sample``'s crops differ from the CPU pipeline's by 1 to 6 levels on average and
  up to 45. The price of dense matrices: every view multiplies its image's full rows
  and columns, not only its box, 3 S (H W + S H) multiply-adds per view (0.9 G per
  500x375 image with 2 x 224 and 8 x 96 px views: tens of microseconds of a current
  GPU's float32 throughput; about 0.1 s on one CPU core).
- flip: the horizontal weight matrix reversed, at no cost.
- colour: the CPU pipeline's kernels (`trainer.augment.adjust_hue`, `mean_grey`,
  `rgb_to_grayscale`, `solarize_`) on float32 in [0, 1], with per-view factors as
  tensors: ColorJitter's per-view random order in four batched steps (at step k each
  view applies the k-th operation of its order; brightness, contrast and saturation are
  one blend), grey as a per-view mask, and the hue, blur and solarise passes on the
  views that draw them only (their indices come from the CPU copy of the table: no
  device synchronisation).
- blur: Gaussian with each view's sigma on `blur_kernel_size` taps, reflect padding,
  separable, as shifted multiply-adds (exact float32; a cuDNN convolution may use TF32).
- normalisation with `IMAGE_MEAN` / `IMAGE_STD`.

The views equal the CPU pipeline's to float rounding (tests/trainer/test_augment_device.py
checks them against it). Python loops remain over the groups of same-size images, over
chunks of a group (bounding the memory of the weight matrices), and over the blur taps
and the four jitter steps: never over images or views.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.augment import (
    BLUR_SIGMA,
    CONTRAST,
    HUE,
    IMAGE_MEAN,
    IMAGE_STD,
    SATURATION,
    SOLARIZE_THRESHOLD,
    MultiCropAugmentation,
    ViewParams,
    adjust_hue,
    blur_kernel_size,
    mean_grey,
    rgb_to_grayscale,
    solarize_,
)
from trainer.config import DataConfig

COLUMNS = (
    "top",
    "left",
    "height",
    "width",
    "flip",
    "jitter",
    "order_1",
    "order_2",
    "order_3",
    "order_4",
    "brightness",
    "contrast",
    "saturation",
    "hue",
    "grey",
    "blur",
    "sigma",
    "solarize",
)
"""The columns of a view table: a `ViewParams` as numbers (booleans 0 / 1; ``order_k``
the k-th operation id; ``sigma`` 0 when ``blur`` is 0)."""
_TOP, _LEFT, _HEIGHT, _WIDTH, _FLIP, _JITTER = range(6)
_ORDER = 6
"""First of the four order columns."""
_FACTORS = 10
"""First of the brightness, contrast, saturation and hue columns: op id k is column 10 + k."""
_GREY, _BLUR, _SIGMA, _SOLARIZE = range(14, 18)

# A chunk of images is resized at once when its weight matrices and intermediate images
# take at most about this many float32 values: 1 GiB on a GPU (fewer, larger kernels),
# 64 MiB on the CPU.
_CHUNK_VALUES = {"cuda": 2**28, "cpu": 2**24}
# torch's uint8 resize stores its weights as int16 with at most this many fraction bits.
_MAX_WEIGHT_BITS = 22

Images = Tensor | Sequence[Tensor]
"""uint8 images: one (B, 3, H, W) tensor, or B tensors (3, H_i, W_i) of any sizes."""


def view_table(params: Sequence[ViewParams]) -> Tensor:
    """The views' parameters as a float64 (V, len(COLUMNS)) table (exact: the boxes are
    integers, the factors and sigmas the sampler's float64 values)."""
    rows = [
        [
            *view.box,
            view.flip,
            view.jitter,
            *view.order,
            view.brightness,
            view.contrast,
            view.saturation,
            view.hue,
            view.grey,
            view.blur_sigma is not None,
            view.blur_sigma or 0.0,
            view.solarize,
        ]
        for view in params
    ]
    return torch.tensor(rows, dtype=torch.float64).reshape(len(params), len(COLUMNS))


@dataclass(frozen=True)
class ImageBatch:
    """What the training loader yields for augmentation on the device (with the labels).

    ``images`` are the decoded uint8 images, one tensor when they share a size, else a
    list; ``tables`` the float64 (B, V, len(COLUMNS)) view tables of their views.
    """

    images: Images
    tables: Tensor

    def __len__(self) -> int:
        return self.tables.shape[0]

    def pin_memory(self) -> ImageBatch:
        """Page-locked copies, so the copies to a GPU are asynchronous (the DataLoader's
        ``pin_memory`` calls this)."""
        images = self.images
        pinned = (
            images.pin_memory()
            if isinstance(images, Tensor)
            else [image.pin_memory() for image in images]
        )
        return ImageBatch(pinned, self.tables.pin_memory())


class DeviceMultiCrop:
    """DINO's multi-crop augmentation of a batch of images, on a device.

    Args:
        config: the data section, read as `MultiCropAugmentation` reads it.
        device: where the views are made (and returned).

    Calling it on uint8 images returns ``num_global_crops + num_local_crops`` float32
    normalised tensors, the global (B, 3, G, G) ones first, then the local (B, 3, L, L)
    ones: what ``train_step(views=...)`` takes. With a generator in a given state the
    views are those `MultiCropAugmentation` makes of the images one after another from a
    generator in the same state (to float rounding).
    """

    def __init__(self, config: DataConfig, device: torch.device | str = "cpu") -> None:
        self.recipe = MultiCropAugmentation(config)
        self.device = torch.device(device)
        self.num_views = config.num_views
        # (first view, views, side) of each kind.
        self.kinds = (
            (0, config.num_global_crops, config.global_crop_size),
            (config.num_global_crops, config.num_local_crops, config.local_crop_size),
        )
        std = torch.tensor(IMAGE_STD, device=self.device).view(1, 3, 1, 1)
        self._norm_scale = 1.0 / std
        self._norm_shift = -torch.tensor(IMAGE_MEAN, device=self.device).view(1, 3, 1, 1) / std
        self._chunk_values = _CHUNK_VALUES["cuda" if self.device.type == "cuda" else "cpu"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.recipe!r}, device={self.device})"

    def __call__(self, images: Images, generator: torch.Generator | None = None) -> list[Tensor]:
        """The views of ``images`` (uint8, on any device), random from ``generator``
        (default: torch's global generator)."""
        sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        return self.render(images, self.sample(sizes, generator))

    def sample(
        self, sizes: Sequence[tuple[int, int]], generator: torch.Generator | None = None
    ) -> Tensor:
        """View tables (B, V, len(COLUMNS)) for images of ``sizes`` (height, width),
        drawn on the CPU image after image, as the CPU pipeline draws them."""
        tables = [view_table(self.recipe.sample(h, w, generator)) for h, w in sizes]
        if not tables:
            return torch.empty(0, self.num_views, len(COLUMNS), dtype=torch.float64)
        return torch.stack(tables)

    def batch_views(self, batch: ImageBatch) -> list[Tensor]:
        """The views of a training loader's `ImageBatch` (the training loop's augment)."""
        return self.render(batch.images, batch.tables)

    def render(self, images: Images, tables: Tensor) -> list[Tensor]:
        """The views given by view tables.

        Args:
            images: uint8 images (see `Images`), on any device (pinned CPU memory makes
                their copy asynchronous).
            tables: float64 (B, V, len(COLUMNS)) on the CPU, one table per image.

        Returns:
            V float32 normalised tensors on ``self.device``: (B, 3, G, G) global views,
            then (B, 3, L, L) local views.
        """
        count = len(images)
        if tables.shape != (count, self.num_views, len(COLUMNS)):
            raise ValueError(
                f"expected view tables of shape ({count}, {self.num_views}, {len(COLUMNS)}) "
                f"for {count} images, got {tuple(tables.shape)}"
            )
        if count == 0:
            raise ValueError("no images to augment")
        tables = tables.to("cpu", torch.float64)
        _check_tables(tables)
        groups = _size_groups(images, self.device)
        for indices, group in groups:
            _check_boxes(tables[indices], group.shape[-2], group.shape[-1])
        views: list[Tensor] = []
        with _exact_float32_matmul(self.device):
            for first, kind_views, side in self.kinds:
                if kind_views == 0:
                    continue
                kind = tables[:, first : first + kind_views]  # (B, n, C)
                # View-major (n, B, ...), so each view slot is one contiguous (B, 3, S, S).
                crops = torch.empty(
                    (kind_views, count, 3, side, side), dtype=torch.float32, device=self.device
                )
                for indices, group in groups:
                    sizes = (len(indices), *group.shape[-2:], kind_views, side)
                    for part in _chunks(*sizes, budget=self._chunk_values):
                        chosen = indices[part]
                        resized = resize_crops(group[part], kind[chosen], side)
                        crops.index_copy_(1, chosen.to(self.device), resized.transpose(0, 1))
                batch = crops.view(kind_views * count, 3, side, side).mul_(1 / 255)
                rows = kind.transpose(0, 1).reshape(kind_views * count, len(COLUMNS))
                self._colour(batch, rows, side)
                normalised = torch.addcmul(self._norm_shift, batch, self._norm_scale)
                views += list(normalised.view(kind_views, count, 3, side, side).unbind(0))
        return views

    def _colour(self, batch: Tensor, rows: Tensor, side: int) -> None:
        """Jitter, grey, blur and solarise, in place, on (N, 3, S, S) views in [0, 1]
        with their (N, C) table rows (on the CPU)."""
        params = rows.to(self.device, non_blocking=True)
        self._jitter(batch, rows, params)
        if bool((rows[:, _GREY] > 0.5).any()):
            grey = params[:, _GREY].view(-1, 1, 1, 1) > 0.5
            batch.copy_(torch.where(grey, rgb_to_grayscale(batch), batch))
        blurred = _indices(rows[:, _BLUR] > 0.5)
        if len(blurred):
            index = blurred.to(self.device)
            sigma = params.index_select(0, index)[:, _SIGMA]
            batch.index_copy_(0, index, gaussian_blur(batch.index_select(0, index), sigma, side))
        solarized = _indices(rows[:, _SOLARIZE] > 0.5)
        if len(solarized):
            index = solarized.to(self.device)
            part = solarize_(batch.index_select(0, index), SOLARIZE_THRESHOLD)
            batch.index_copy_(0, index, part)

    def _jitter(self, batch: Tensor, rows: Tensor, params: Tensor) -> None:
        """ColorJitter in each view's order: at step k every jittered view applies the
        k-th operation of its order; brightness, contrast and saturation are the blend
        clamp(f x + (1 - f) ref), ref = 0, the mean grey level or the grey image, as in
        `trainer.augment.color_jitter`."""
        active = params[:, _JITTER] > 0.5
        active_cpu = rows[:, _JITTER] > 0.5
        factors = params[:, _FACTORS : _FACTORS + 4]
        for step in range(4):
            op_cpu = rows[:, _ORDER + step].to(torch.int64)
            op = params[:, _ORDER + step].to(torch.int64)
            blends = active & (op != HUE)
            factor = factors.gather(1, op.view(-1, 1)).view(-1)
            weight = torch.where(blends, 1.0 - factor, 0.0).float().view(-1, 1, 1, 1)
            blends_cpu = active_cpu & (op_cpu != HUE)
            if bool(blends_cpu.any()):
                ref = torch.zeros((), device=batch.device)
                if bool((blends_cpu & (op_cpu == CONTRAST)).any()):
                    uses_mean = (blends & (op == CONTRAST)).float().view(-1, 1, 1, 1)
                    ref = ref + mean_grey(batch) * uses_mean
                if bool((blends_cpu & (op_cpu == SATURATION)).any()):
                    uses_grey = (blends & (op == SATURATION)).float().view(-1, 1, 1, 1)
                    ref = ref + rgb_to_grayscale(batch) * uses_grey
                batch.lerp_(ref.expand_as(batch), weight)
                batch.clamp_(0.0, 1.0)
            hued = _indices(active_cpu & (op_cpu == HUE))
            if len(hued):
                index = hued.to(self.device)
                hue = factors.index_select(0, index)[:, HUE].float()
                batch.index_copy_(0, index, adjust_hue(batch.index_select(0, index), hue))


def resize_crops(images: Tensor, tables: Tensor, side: int) -> Tensor:
    """Crop, resize and flip the views of images of one size, as the CPU pipeline does.

    torch's antialiased bicubic resize of uint8 images (``F.interpolate`` on a uint8
    channels-last tensor, the CPU pipeline's kernel), done as two batched matrix products
    with the same 16-bit fixed-point weights and the same rounding after each pass.

    Args:
        images: uint8 (b, 3, H, W) on the device.
        tables: float64 (b, n, C) view tables (on any device; boxes inside the images).
        side: the views' side S.

    Returns:
        float32 (b, n, 3, S, S) crops with integer values in [0, 255].
    """
    b, n = tables.shape[:2]
    height, width = images.shape[-2:]
    table = tables.to(images.device, non_blocking=True).reshape(b * n, len(COLUMNS))
    rows_weights = resize_weights(table[:, _TOP], table[:, _HEIGHT], side, height)
    column_weights = resize_weights(table[:, _LEFT], table[:, _WIDTH], side, width)
    flip = table[:, _FLIP].view(-1, 1, 1) > 0.5
    column_weights = torch.where(flip, column_weights.flip(1), column_weights)
    pixels = images.float().view(b, 3 * height, width)
    # Horizontal pass, all views of an image at once: (b, 3H, W) @ (b, W, n S).
    across = column_weights.view(b, n * side, width).transpose(1, 2)
    rows = _round_to_levels(torch.bmm(pixels, across))  # (b, 3H, n S)
    # Vertical pass per view: (b n, S, H) @ (b n, H, 3 S).
    rows = rows.view(b, 3, height, n, side).permute(0, 3, 2, 1, 4).reshape(b * n, height, -1)
    out = _round_to_levels(torch.bmm(rows_weights, rows))  # (b n, S, 3 S)
    return out.view(b, n, side, 3, side).permute(0, 1, 3, 2, 4)


def resize_weights(start: Tensor, length: Tensor, out: int, size: int) -> Tensor:
    """Weights of torch's antialiased bicubic uint8 resize along one axis.

    Row i of view v resamples output pixel i of the box [start_v, start_v + length_v)
    of an axis of ``size`` pixels into ``out`` pixels; weights outside the box are 0.
    As torch (and PIL): scale = length / out; output i is centred at scale (i + 1/2);
    its taps lie within (centre - support, centre + support) of the box, support = 2
    max(scale, 1); a tap's weight is Keys' cubic (a = -0.5) of its distance times
    1 / max(scale, 1), normalised to sum 1; then quantised to int16 with the most
    fraction bits (at most 22) that keep the largest weight below 2^15, and returned as
    float32 multiples of 2^-bits (so a product with a uint8 value is exact).

    Args:
        start, length: float64 (N,) boxes on the axis (integers).
        out: output pixels.
        size: input pixels of the axis.

    Returns:
        float32 (N, out, size).
    """
    dtype, device = torch.float64, start.device
    scale = length / out
    widen = scale.clamp(min=1.0)
    centre = scale.view(-1, 1) * (torch.arange(out, dtype=dtype, device=device) + 0.5)
    low = (centre - 2.0 * widen.view(-1, 1) + 0.5).clamp(min=0.0).floor()
    high = torch.minimum((centre + 2.0 * widen.view(-1, 1) + 0.5).floor(), length.view(-1, 1))
    # Tap positions in box coordinates: (N, 1, size).
    tap = (torch.arange(size, dtype=dtype, device=device) - start.view(-1, 1)).unsqueeze(1)
    weights = _keys_cubic((tap - centre.unsqueeze(2) + 0.5) / widen.view(-1, 1, 1))
    inside = (tap >= low.unsqueeze(2)) & (tap < high.unsqueeze(2))
    weights = weights * inside
    weights = weights / weights.sum(dim=2, keepdim=True)
    unit = 2.0 ** _weight_bits(weights.amax(dim=(1, 2))).view(-1, 1, 1)
    scaled = weights * unit
    # int16 conversion of 0.5 + w 2^bits (or -0.5 + ... below 0), which truncates.
    quantised = torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc()
    return (quantised / unit).float()


def _keys_cubic(x: Tensor) -> Tensor:
    """Keys' bicubic convolution kernel with a = -0.5 (PIL's and torch's antialiased)."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _weight_bits(peak: Tensor) -> Tensor:
    """torch's fraction bits of the int16 weights: the fewest b < 22 with
    int(0.5 + peak 2^(b + 1)) >= 2^15, else 22 (one per view).

    The condition is monotone in b, so b is log2((2^15 - 1/2) / peak) - 1 rounded up,
    corrected by one where the float logarithm rounded across an integer.
    """

    def fits(bits: Tensor) -> Tensor:
        return torch.floor(0.5 + peak * torch.exp2(bits + 1)) >= 2**15

    guess = torch.ceil(torch.log2((2**15 - 0.5) / peak)) - 1
    bits = torch.where(fits(guess), guess, guess + 1)
    bits = torch.where(fits(bits - 1), bits - 1, bits)
    return bits.clamp(0.0, float(_MAX_WEIGHT_BITS))


def _round_to_levels(values: Tensor) -> Tensor:
    """floor(x + 1/2) clamped to [0, 255], in place: torch's uint8 rounding of a pass."""
    return values.add_(0.5).floor_().clamp_(0.0, 255.0)


def gaussian_blur(batch: Tensor, sigma: Tensor, side: int) -> Tensor:
    """Gaussian blur of (N, C, S, S) views, view i with ``sigma[i]``; a new tensor.

    The function of `trainer.augment.GaussianBlur` (torchvision's ``gaussian_blur``):
    ``blur_kernel_size(side)`` taps exp(-x^2 / (2 sigma^2)), normalised, reflect padding;
    separable, as shifted multiply-adds with a per-view weight for each tap.
    """
    taps = blur_kernel_size(side)
    half = taps // 2
    if half >= min(batch.shape[-2:]):
        raise ValueError(f"a {taps}-tap blur cannot reflect-pad {tuple(batch.shape[-2:])}")
    offsets = torch.arange(-half, half + 1, dtype=torch.float64, device=batch.device)
    kernels = torch.exp(-0.5 * (offsets / sigma.to(torch.float64).view(-1, 1)) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).float()  # (N, taps)
    weights = kernels.t().reshape(taps, -1, 1, 1, 1)
    padded = F.pad(batch, (half, half, half, half), mode="reflect")
    height, width = batch.shape[-2:]
    rows = _shifted_sum(padded, weights, width, dim=3)
    return _shifted_sum(rows, weights, height, dim=2)


def _shifted_sum(image: Tensor, weights: Tensor, length: int, dim: int) -> Tensor:
    """Sum over t of weights[t] * image shifted by t along ``dim``, ``length`` long."""
    out = image.narrow(dim, 0, length) * weights[0]
    for shift in range(1, weights.shape[0]):
        out.addcmul_(image.narrow(dim, shift, length), weights[shift])
    return out


def _indices(mask: Tensor) -> Tensor:
    """Positions of a CPU boolean mask, int64 on the CPU."""
    return mask.nonzero().view(-1)


def _size_groups(images: Images, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """(indices, uint8 (b, 3, H, W) on the device) per image size, in first-seen order."""
    if isinstance(images, Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                "expected uint8 (B, 3, H, W) images or a list of uint8 (3, H, W) images, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        return [(torch.arange(images.shape[0]), images.to(device, non_blocking=True))]
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected uint8 (3, H, W) images, got {image.dtype} {tuple(image.shape)} "
                f"at position {index}"
            )
        by_size.setdefault((image.shape[1], image.shape[2]), []).append(index)
    return [
        (
            torch.tensor(indices),
            torch.stack([images[i].to(device, non_blocking=True) for i in indices]),
        )
        for indices in by_size.values()
    ]


def _check_tables(tables: Tensor) -> None:
    """Refuse tables the kernels cannot render: flags not 0 / 1, an order that is not a
    permutation of the four operations, a blur without a positive sigma."""
    flags = tables[..., [_FLIP, _JITTER, _GREY, _BLUR, _SOLARIZE]]
    if not bool(((flags == 0) | (flags == 1)).all()):
        raise ValueError("view tables hold flags other than 0 and 1")
    orders = tables[..., _ORDER : _ORDER + 4]
    if not torch.equal(orders.sort(dim=-1).values, torch.arange(4.0).expand_as(orders)):
        raise ValueError("view tables hold jitter orders that are not permutations of 0..3")
    blurred = tables[..., _BLUR] == 1
    if not bool((tables[..., _SIGMA][blurred] >= BLUR_SIGMA[0] / 2).all()):
        raise ValueError(f"view tables hold blur sigmas below {BLUR_SIGMA[0] / 2}")


def _check_boxes(tables: Tensor, height: int, width: int) -> None:
    top, left = tables[..., _TOP], tables[..., _LEFT]
    box_height, box_width = tables[..., _HEIGHT], tables[..., _WIDTH]
    inside = (
        (top >= 0)
        & (left >= 0)
        & (box_height >= 1)
        & (box_width >= 1)
        & (top + box_height <= height)
        & (left + box_width <= width)
    )
    if not bool(inside.all()):
        raise ValueError(f"view tables hold crop boxes outside their {height}x{width} images")


def _chunks(
    images: int, height: int, width: int, views: int, side: int, *, budget: int
) -> Iterator[slice]:
    """Slices of a group of ``images`` that take about ``budget`` float32 values each."""
    # float64 weight matrices and their temporaries, the passes' float32 intermediates.
    per_image = views * side * (8 * (height + width) + 6 * height + 6 * side) + 3 * height * width
    step = max(1, budget // per_image)
    for first in range(0, images, step):
        yield slice(first, min(first + step, images))


@contextlib.contextmanager
def _exact_float32_matmul(device: torch.device) -> Iterator[None]:
    """CUDA float32 matrix products in full precision within the block (TF32, which a
    run may enable for its steps, would round the 16-bit resize weights to 10 bits and
    move many pixels by a level). CPU products are full precision unless oneDNN is told
    otherwise, which nothing here does.

    torch's backend-specific setting, read and restored: the legacy
    ``set_float32_matmul_precision`` refuses to run once the new one has been used."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def augmentation_device(setting: str, device: torch.device) -> torch.device | None:
    """Where the training loop makes the views for ``data.augment_device``.

    Args:
        setting: ``auto``, ``cpu``, ``cuda`` or ``device`` (`trainer.config.AugmentDevice`).
        device: the training device.

    Returns:
        The training device when the views are made there (`DeviceMultiCrop`), None when
        the loader workers make them (`MultiCropAugmentation`).

    Raises:
        ValueError: ``cuda`` while the training device is not a CUDA device.
    """
    if setting == "cpu":
        return None
    if setting == "device":
        return device
    if setting == "cuda":
        if device.type != "cuda":
            raise ValueError(
                f"data.augment_device is 'cuda' but the training device is {device.type} "
                "(runtime.device 'auto' found no GPU): set data.augment_device to auto or cpu"
            )
        return device
    if setting == "auto":
        return device if device.type == "cuda" else None
    raise ValueError(f"unknown data.augment_device {setting!r}; valid: auto, cpu, cuda, device")
