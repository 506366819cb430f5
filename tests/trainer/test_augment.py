"""trainer.augment: DINO's multi-crop recipe, checked against torchvision's own kernels."""

from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainer.augment import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    IMAGE_MEAN,
    IMAGE_STD,
    SATURATION,
    SOLARIZE_THRESHOLD,
    GaussianBlur,
    MultiCropAugmentation,
    ViewParams,
    ViewRenderer,
    adjust_hue,
    blur_kernel_size,
    channels_last,
    color_jitter,
    eval_transform,
    rgb_to_grayscale,
    sample_view_params,
    solarize_,
)
from trainer.config import DataConfig

JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
# Bounds of a normalised view: (0 - mean) / std .. (1 - mean) / std per channel.
LOW = torch.tensor([-m / s for m, s in zip(IMAGE_MEAN, IMAGE_STD, strict=True)])
HIGH = torch.tensor([(1 - m) / s for m, s in zip(IMAGE_MEAN, IMAGE_STD, strict=True)])


def random_image(height: int, width: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def rgb_batch(n: int, height: int, width: int, seed: int = 0) -> Tensor:
    """Float images in [0, 1] with grey pixels and max ties, the hue kernel's edge cases."""
    batch = torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))
    batch[:, :, :2] = 0.5  # grey: chroma 0
    batch[:, 0, 2:4] = batch[:, 1, 2:4]  # red == green
    batch[:, 2, 4:6] = batch[:, 1, 4:6]  # green == blue
    batch[:, :, 6, 0] = 0.0  # black
    batch[:, :, 6, 1] = 1.0  # white
    return batch


def reference_view(image: Tensor, view: ViewParams, size: int) -> Tensor:
    """One view from torchvision.transforms.v2.functional, step by step (DINO's order)."""
    top, left, height, width = view.box
    x = TF.resized_crop(
        image,
        top,
        left,
        height,
        width,
        [size, size],
        interpolation=v2.InterpolationMode.BICUBIC,
        antialias=True,
    )
    if view.flip:
        x = TF.horizontal_flip(x)
    x = TF.to_dtype(x, torch.float32, scale=True)
    if view.jitter:
        for op in view.order:
            if op == BRIGHTNESS:
                x = TF.adjust_brightness(x, view.brightness)
            elif op == CONTRAST:
                x = TF.adjust_contrast(x, view.contrast)
            elif op == SATURATION:
                x = TF.adjust_saturation(x, view.saturation)
            else:
                x = TF.adjust_hue(x, view.hue)
    if view.grey:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if view.blur_sigma is not None:
        k = blur_kernel_size(size)
        x = TF.gaussian_blur(x, [k, k], [view.blur_sigma, view.blur_sigma])
    if view.solarize:
        x = TF.solarize(x, SOLARIZE_THRESHOLD)
    return TF.normalize(x, list(IMAGE_MEAN), list(IMAGE_STD))


# --- the public transform -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_global", "num_local", "global_size", "local_size", "source"),
    [
        (2, 6, 32, 16, (32, 32)),
        (1, 0, 32, 16, (40, 24)),
        (2, 3, 64, 24, (8, 8)),  # digits-sized source: crops upscale
        (2, 8, 224, 96, (240, 320)),
    ],
)
def test_views_count_sizes_order(
    num_global: int,
    num_local: int,
    global_size: int,
    local_size: int,
    source: tuple[int, int],
) -> None:
    config = DataConfig(
        num_global_crops=num_global,
        num_local_crops=num_local,
        global_crop_size=global_size,
        local_crop_size=local_size,
    )
    views = MultiCropAugmentation(config)(random_image(*source))
    assert len(views) == config.num_views
    expected = [global_size] * num_global + [local_size] * num_local
    assert [tuple(v.shape) for v in views] == [(3, s, s) for s in expected]
    for view in views:
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()
        assert (view >= LOW.view(3, 1, 1) - 1e-5).all()
        assert (view <= HIGH.view(3, 1, 1) + 1e-5).all()


def test_views_are_reproducible_with_a_generator() -> None:
    augment = MultiCropAugmentation(DataConfig())
    image = random_image(48, 40)
    first = augment(image, generator=torch.Generator().manual_seed(3))
    again = augment(image, generator=torch.Generator().manual_seed(3))
    other = augment(image, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    torch.manual_seed(5)
    global_rng = augment(image)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(global_rng, augment(image), strict=True))


def test_views_differ_from_each_other() -> None:
    views = MultiCropAugmentation(DataConfig(num_local_crops=4))(random_image(32, 32))
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(views[2], views[3])


@pytest.mark.parametrize(
    "image",
    [
        torch.zeros(3, 8, 8),  # float
        torch.zeros(1, 8, 8, dtype=torch.uint8),  # one channel
        torch.zeros(8, 8, 3, dtype=torch.uint8),  # channels last
    ],
)
def test_rejects_other_images(image: Tensor) -> None:
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        MultiCropAugmentation(DataConfig())(image)
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\)"):
        eval_transform(DataConfig())(image)


def test_pickles_for_loader_workers() -> None:
    augment = MultiCropAugmentation(DataConfig())
    copy = pickle.loads(pickle.dumps(augment))
    image = random_image(32, 32)
    a = augment(image, generator=torch.Generator().manual_seed(0))
    b = copy(image, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("side", "taps"), [(224, 23), (96, 9), (32, 3), (16, 3), (4, 3)])
def test_blur_kernel_is_about_a_tenth_of_the_crop(side: int, taps: int) -> None:
    assert blur_kernel_size(side) == taps


# --- the same function as torchvision, view by view -----------------------------------------


@pytest.mark.parametrize(("size", "source"), [(32, (75, 100)), (96, (120, 160)), (16, (8, 8))])
def test_rendered_views_match_torchvision(size: int, source: tuple[int, int]) -> None:
    image = random_image(*source, seed=size)
    count = 24
    renderer = ViewRenderer(
        size,
        scale=(0.05, 1.0),
        blur_p=[0.6] * count,
        solarize_p=[0.4] * count,
        jitter_ranges=JITTER_RANGES,
    )
    params = sample_view_params(
        *source,
        scale=(0.05, 1.0),
        blur_p=[0.6] * count,
        solarize_p=[0.4] * count,
        jitter_ranges=JITTER_RANGES,
        generator=torch.Generator().manual_seed(size),
    )
    for feature in ("flip", "jitter", "grey", "blur_sigma", "solarize"):
        assert any(getattr(p, feature) for p in params), feature
    ours = renderer.render(channels_last(image), params)
    reference = torch.stack([reference_view(image, view, size) for view in params])
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def test_color_jitter_batches_views_with_different_orders() -> None:
    batch = rgb_batch(24, 12, 10, seed=1)
    params = []
    for index, order in enumerate(itertools.permutations(range(4))):
        params.append(
            ViewParams(
                box=(0, 0, 12, 10),
                flip=False,
                jitter=index % 5 != 0,
                order=(order[0], order[1], order[2], order[3]),
                brightness=0.6 + 0.8 * ((index * 7) % 24) / 23,
                contrast=0.6 + 0.8 * ((index * 5) % 24) / 23,
                saturation=0.8 + 0.4 * ((index * 11) % 24) / 23,
                hue=-0.1 + 0.2 * index / 23,
                grey=False,
                blur_sigma=None,
                solarize=False,
            )
        )
    expected = []
    for image, view in zip(batch, params, strict=True):
        x = image
        if view.jitter:
            jitter = v2.ColorJitter()
            x = jitter.transform(
                x,
                {
                    "fn_idx": torch.tensor(view.order),
                    "brightness_factor": view.brightness,
                    "contrast_factor": view.contrast,
                    "saturation_factor": view.saturation,
                    "hue_factor": view.hue,
                },
            )
        expected.append(x)
    ours = batch.clone()
    color_jitter(ours, params)
    torch.testing.assert_close(ours, torch.stack(expected), atol=2e-6, rtol=0)


@pytest.mark.parametrize("factor", [-0.5, -0.1, 0.0, 0.03, 0.25, 0.5])
def test_adjust_hue_matches_torchvision(factor: float) -> None:
    batch = rgb_batch(3, 20, 17)
    ours = adjust_hue(batch, torch.full((3,), factor))
    reference = torch.stack([TF.adjust_hue(image, factor) for image in batch])
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)


def test_adjust_hue_one_factor_per_image() -> None:
    batch = rgb_batch(4, 9, 9, seed=2)
    factors = torch.tensor([-0.4, 0.0, 0.1, 0.5])
    reference = torch.stack(
        [TF.adjust_hue(x, float(f)) for x, f in zip(batch, factors, strict=True)]
    )
    torch.testing.assert_close(adjust_hue(batch, factors), reference, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
    ("kernel_size", "shape", "sigmas"),
    [
        (23, (1, 3, 40, 30), [2.0]),
        (23, (2, 3, 24, 36), [0.1, 1.3]),
        (9, (4, 3, 16, 16), [0.1, 0.7, 1.5, 2.0]),
        (3, (3, 3, 5, 7), [0.3, 1.0, 2.0]),
    ],
)
def test_gaussian_blur_matches_torchvision(
    kernel_size: int, shape: tuple[int, int, int, int], sigmas: list[float]
) -> None:
    batch = torch.rand(shape, generator=torch.Generator().manual_seed(kernel_size))
    ours = GaussianBlur(kernel_size)(batch, sigmas)
    reference = torch.stack(
        [
            TF.gaussian_blur(image, [kernel_size, kernel_size], [s, s])
            for image, s in zip(batch, sigmas, strict=True)
        ]
    )
    torch.testing.assert_close(ours, reference, atol=3e-6, rtol=0)


def test_gaussian_blur_rejects_too_small_images() -> None:
    with pytest.raises(ValueError, match="cannot reflect-pad"):
        GaussianBlur(23)(torch.rand(1, 3, 8, 8), [1.0])
    with pytest.raises(ValueError, match="odd"):
        GaussianBlur(4)


def test_solarize_matches_torchvision() -> None:
    batch = torch.rand(2, 3, 16, 16)
    batch[0, 0, 0, :3] = torch.tensor([SOLARIZE_THRESHOLD, 0.0, 1.0])
    reference = TF.solarize(batch, SOLARIZE_THRESHOLD)
    assert torch.equal(solarize_(batch.clone(), SOLARIZE_THRESHOLD), reference)


def test_grayscale_matches_torchvision() -> None:
    batch = torch.rand(2, 3, 8, 8)
    reference = torch.stack([TF.rgb_to_grayscale(x, num_output_channels=1) for x in batch])
    torch.testing.assert_close(rgb_to_grayscale(batch), reference, atol=1e-7, rtol=0)


# --- the distribution of the random choices -------------------------------------------------


def test_view_parameters_follow_the_recipe() -> None:
    """Frequencies of DINO's probabilities, jitter ranges, uniform orders, crop boxes."""
    blur_p = [1.0, 0.1, 0.5, 0.5]
    solarize_p = [0.0, 0.2, 0.0, 0.0]
    generator = torch.Generator().manual_seed(0)
    rounds = 1500
    views: list[list[ViewParams]] = [[] for _ in blur_p]
    for _ in range(rounds):
        params = sample_view_params(
            60,
            80,
            scale=(0.05, 0.4),
            blur_p=blur_p,
            solarize_p=solarize_p,
            jitter_ranges=JITTER_RANGES,
            generator=generator,
        )
        for slot, view in enumerate(params):
            views[slot].append(view)

    def rate(values: list[bool]) -> float:
        return sum(values) / len(values)

    tolerance = 4 * math.sqrt(0.25 / rounds)  # four standard errors, at worst
    everything = [view for slot in views for view in slot]
    assert rate([v.flip for v in everything]) == pytest.approx(0.5, abs=tolerance)
    assert rate([v.jitter for v in everything]) == pytest.approx(0.8, abs=tolerance)
    assert rate([v.grey for v in everything]) == pytest.approx(0.2, abs=tolerance)
    for slot, (blur, solarize) in enumerate(zip(blur_p, solarize_p, strict=True)):
        blurred = [v.blur_sigma is not None for v in views[slot]]
        assert rate(blurred) == pytest.approx(blur, abs=tolerance)
        assert rate([v.solarize for v in views[slot]]) == pytest.approx(solarize, abs=tolerance)
    sigmas = [v.blur_sigma for v in everything if v.blur_sigma is not None]
    assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0
    assert sum(sigmas) / len(sigmas) == pytest.approx(1.05, abs=0.05)
    for name, (low, high) in zip(
        ("brightness", "contrast", "saturation", "hue"), JITTER_RANGES, strict=True
    ):
        values = [getattr(v, name) for v in everything]
        assert low <= min(values) and max(values) <= high
        assert sum(values) / len(values) == pytest.approx((low + high) / 2, abs=0.02)
    orders = [v.order for v in everything]
    assert set(orders) == set(itertools.permutations(range(4)))
    counts = [orders.count(p) for p in set(orders)]
    assert max(counts) - min(counts) < 0.5 * len(orders) / 24
    assert {HUE, BRIGHTNESS, CONTRAST, SATURATION} == set(orders[0])


def test_crop_boxes_match_random_resized_crop() -> None:
    """Area and aspect statistics of our boxes and of v2.RandomResizedCrop.make_params."""
    height, width, scale = 60, 80, (0.05, 0.4)
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(16, scale=scale)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    theirs = [crop.make_params([image]) for _ in range(3000)]
    ours = [
        view.box
        for _ in range(300)
        for view in sample_view_params(
            height,
            width,
            scale=scale,
            blur_p=[0.0] * 10,
            solarize_p=[0.0] * 10,
            jitter_ranges=JITTER_RANGES,
        )
    ]
    for top, left, h, w in ours:
        assert 0 <= top <= height - h and 0 <= left <= width - w
    ours_area = [h * w / (height * width) for _, _, h, w in ours]
    their_area = [p["height"] * p["width"] / (height * width) for p in theirs]
    assert sum(ours_area) / len(ours) == pytest.approx(sum(their_area) / len(theirs), abs=0.01)
    ours_log_ratio = [math.log(w / h) for _, _, h, w in ours]
    their_log_ratio = [math.log(p["width"] / p["height"]) for p in theirs]
    assert sum(ours_log_ratio) / len(ours) == pytest.approx(
        sum(their_log_ratio) / len(theirs), abs=0.02
    )
    ours_top = [top / (height - h) for top, _, h, _ in ours if h < height]
    assert sum(ours_top) / len(ours_top) == pytest.approx(0.5, abs=0.03)


def test_crop_falls_back_to_the_centre_for_extreme_images() -> None:
    # 4 x 200: no box with aspect 3/4..4/3 and area >= 40% fits, as in torchvision.
    params = sample_view_params(
        4,
        200,
        scale=(0.4, 1.0),
        blur_p=[0.0],
        solarize_p=[0.0],
        jitter_ranges=JITTER_RANGES,
        generator=torch.Generator().manual_seed(0),
    )
    assert params[0].box == (0, (200 - 5) // 2, 4, 5)


# --- evaluation transform -------------------------------------------------------------------


def test_eval_transform_is_deterministic_and_sized() -> None:
    transform = eval_transform(DataConfig(global_crop_size=32))
    image = random_image(32, 32)
    out = transform(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = TF.normalize(TF.to_dtype(image, torch.float32, scale=True), IMAGE_MEAN, IMAGE_STD)
    torch.testing.assert_close(out, expected)  # a 32 px image is only normalised
    assert torch.equal(transform(image), out)
    wide = transform(random_image(40, 90))
    small = transform(random_image(8, 8))
    assert wide.shape == small.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("blur", "global_size", "expected"),
    [
        ("auto", 32, False),
        ("auto", 64, False),
        ("auto", 96, True),
        ("on", 32, True),
        ("off", 224, False),
    ],
)
def test_blur_follows_dino_above_small_crops_and_solo_learn_at_them(
    blur: str, global_size: int, expected: bool
) -> None:
    config = DataConfig(blur=blur, global_crop_size=global_size, local_crop_size=16)
    assert config.blur_enabled is expected
    augment = MultiCropAugmentation(config)
    dino = (1.0, 0.1) if expected else (0.0, 0.0)
    assert augment.global_views.blur_p == dino
    assert augment.local_views.blur_p == ((0.5 if expected else 0.0),) * config.num_local_crops
