"""trainer.augment_device: the views made on a device are the CPU pipeline's views.

Run on the CPU device here (the same code runs on CUDA). The reference is
`trainer.augment`, itself checked against torchvision in tests/trainer/test_augment.py.

Tolerances: the crops are compared in 8-bit levels, at most one level apart in at most
0.1% of the values (the device path reproduces torch's fixed-point uint8 resize, whose
integer sums it computes in float32: a value within ~1e-5 of a rounding boundary may
round the other way; measured: no difference at all). The colour operations are then
compared as test_augment compares the CPU kernels with torchvision's, within 2e-5 (float
rounding of differently ordered sums). Whole views therefore match within 2e-5 except
where a crop value moved by a level, which the colour gains (at most 1.4 per jitter
operation) and the normalisation (1 / 0.225) turn into at most ~0.1.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DistributedSampler

from tests.factories import save_image, tiny_config
from trainer.augment import (
    IMAGE_MEAN,
    IMAGE_STD,
    MultiCropAugmentation,
    ViewParams,
    channels_last,
    sample_view_params,
)
from trainer.augment_device import (
    COLUMNS,
    DeviceMultiCrop,
    ImageBatch,
    _exact_float32_matmul,
    _weight_bits,
    augmentation_device,
    resize_crops,
    view_table,
)
from trainer.config import ConfigError, DataConfig, validate_config
from trainer.data import ImageFiles, TensorImages, make_train_loader
from trainer.engine import TrainingState
from trainer.loop import build_run, run_training

JITTER_RANGES = ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
LOW = torch.tensor([-m / s for m, s in zip(IMAGE_MEAN, IMAGE_STD, strict=True)]).view(3, 1, 1)
HIGH = torch.tensor([(1 - m) / s for m, s in zip(IMAGE_MEAN, IMAGE_STD, strict=True)]).view(3, 1, 1)
FLOAT_TOLERANCE = 2e-5
LEVEL_SHARE = 1e-3
"""Share of values allowed one 8-bit level apart in the crops (see the module docstring)."""
LEVEL_GAP = 0.1
"""Normalised difference a one-level crop difference can make after the colour gains."""
# A small recipe with every operation on: blur at DINO's probabilities, 64 / 24 px views.
CONFIG = DataConfig(global_crop_size=64, local_crop_size=24, num_local_crops=3, blur="on")


def random_images(count: int, height: int, width: int, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> Tensor:
    """Colour fields with structure at several scales, so resizing has real work to do."""
    generator = torch.Generator().manual_seed(seed)
    field = torch.zeros(count, 3, height, width)
    for cells in (3, 9):
        grid = torch.randn(count, 3, cells, cells, generator=generator)
        field += F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    field += 0.3 * torch.randn(count, 3, height, width, generator=generator)
    return (torch.sigmoid(field) * 255).round().to(torch.uint8)


def assert_views_match(ours: list[Tensor], reference: list[Tensor]) -> None:
    """Equal to float rounding, but for values whose crop moved by one level."""
    assert len(ours) == len(reference)
    for mine, theirs in zip(ours, reference, strict=True):
        assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
        gap = (mine - theirs).abs()
        assert float(gap.max()) <= LEVEL_GAP
        assert float((gap > FLOAT_TOLERANCE).float().mean()) <= LEVEL_SHARE


def cpu_views(
    config: DataConfig, images: list[Tensor], params: list[list[ViewParams]]
) -> list[Tensor]:
    """The CPU pipeline's renderers on given parameters, stacked per view slot."""
    augmentation = MultiCropAugmentation(config)
    per_image = []
    for image, views in zip(images, params, strict=True):
        source = channels_last(image)
        rendered = []
        for renderer, chosen in (
            (augmentation.global_views, views[: config.num_global_crops]),
            (augmentation.local_views, views[config.num_global_crops :]),
        ):
            if chosen:
                rendered += renderer.render(source, chosen).unbind(0)
        per_image.append(rendered)
    return [torch.stack(slot) for slot in zip(*per_image, strict=True)]


def rich_params(config: DataConfig, height: int, width: int, seed: int) -> list[ViewParams]:
    """Parameters of every view with every operation frequent (blur and solarise too)."""
    return sample_view_params(
        height,
        width,
        scale=(0.05, 1.0),
        blur_p=[0.6] * config.num_views,
        solarize_p=[0.5] * config.num_views,
        jitter_ranges=JITTER_RANGES,
        generator=torch.Generator().manual_seed(seed),
    )


# --- crops -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("side", "source"),
    [(16, (8, 8)), (24, (40, 30)), (64, (75, 100)), (96, (120, 160)), (32, (6, 90))],
)
def test_crops_are_the_cpu_pipelines_bytes(side: int, source: tuple[int, int]) -> None:
    """Downscaled, upscaled and extreme boxes, flipped or not, against torch's uint8 resize."""
    images = smooth_images(3, *source, seed=side)
    params = [rich_params(CONFIG, *source, seed=side + i) for i in range(3)]
    tables = torch.stack([view_table(p) for p in params])
    ours = resize_crops(images, tables, side)  # (3, V, 3, S, S)
    assert any(view.flip for views in params for view in views)
    values, differing = 0, 0
    for image, views, crops in zip(images, params, ours, strict=True):
        for view, crop in zip(views, crops, strict=True):
            top, left, height, width = view.box
            reference = F.interpolate(
                channels_last(image)[..., top : top + height, left : left + width],
                size=(side, side),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            )[0]
            if view.flip:
                reference = reference.flip(-1)
            gap = (crop - reference.float()).abs()
            assert float(gap.max()) <= 1.0
            values += gap.numel()
            differing += int((gap > 0).sum())
    assert differing <= LEVEL_SHARE * values


def test_weight_bits_follow_torchs_rule() -> None:
    """The closed form of `_weight_bits` against torch's loop, written out here."""

    def torchs_loop(peak: float) -> int:
        for bits in range(22):
            if int(0.5 + peak * (1 << (bits + 1))) >= 1 << 15:
                return bits
        return 22

    generator = torch.Generator().manual_seed(0)
    edges = [1.0, 0.5, 0.25, 2**-20, 2**-23, (2**15 - 0.5) / 2**15, (2**15 - 0.5) / 2**16]
    peaks = torch.cat(
        [torch.rand(20000, dtype=torch.float64, generator=generator), torch.tensor(edges)]
    )
    expected = torch.tensor([float(torchs_loop(float(peak))) for peak in peaks])
    assert torch.equal(_weight_bits(peaks), expected.to(torch.float64))


def test_resizing_on_cuda_turns_tf32_off_and_back() -> None:
    """TF32 would round the 16-bit weights: off within the resize, restored after (the
    flag is set and read without a GPU)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        with _exact_float32_matmul(torch.device("cuda")):
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
        with _exact_float32_matmul(torch.device("cpu")):
            assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


# --- whole views -------------------------------------------------------------------------------


def test_colour_operations_match_the_cpu_pipeline_on_the_same_crop() -> None:
    """Whole-image boxes at the view size: both resizes are the identity, so the colour
    operations (jitter in every order, grey, blur, solarise) meet at float rounding."""
    config = DataConfig(global_crop_size=24, local_crop_size=24, num_local_crops=6, blur="on")
    images = smooth_images(4, 24, 24, seed=1)
    params = [
        [
            ViewParams(**{**view.__dict__, "box": (0, 0, 24, 24)})
            for view in rich_params(config, 24, 24, seed=10 + i)
        ]
        for i in range(4)
    ]
    everything = [view for views in params for view in views]
    for feature in ("flip", "jitter", "grey", "blur_sigma", "solarize"):
        assert any(getattr(view, feature) for view in everything), feature
    assert len({view.order for view in everything if view.jitter}) > 10
    tables = torch.stack([view_table(p) for p in params])
    ours = DeviceMultiCrop(config).render(images, tables)
    reference = cpu_views(config, list(images), params)
    for mine, theirs in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, theirs, atol=FLOAT_TOLERANCE, rtol=0)


@pytest.mark.parametrize(("source", "seed"), [((75, 100), 0), ((8, 8), 1), ((120, 90), 2)])
def test_views_from_given_parameters_match_the_cpu_pipeline(
    source: tuple[int, int], seed: int
) -> None:
    images = smooth_images(4, *source, seed=seed)
    params = [rich_params(CONFIG, *source, seed=seed * 10 + i) for i in range(4)]
    tables = torch.stack([view_table(p) for p in params])
    ours = DeviceMultiCrop(CONFIG).render(images, tables)
    assert_views_match(ours, cpu_views(CONFIG, list(images), params))


def test_views_equal_the_cpu_pipeline_from_the_same_generator() -> None:
    """A generator in the same state: the same parameters, drawn image after image."""
    images = smooth_images(5, 60, 80, seed=3)
    ours = DeviceMultiCrop(CONFIG)(images, torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)
    augmentation = MultiCropAugmentation(CONFIG)
    per_image = [augmentation(image, generator=generator) for image in images]
    reference = [torch.stack(slot) for slot in zip(*per_image, strict=True)]
    assert_views_match(ours, reference)


def test_images_of_different_sizes() -> None:
    """A list of sizes (two images share one): each image gets its CPU views."""
    images = [
        smooth_images(1, 50, 70, seed=1)[0],
        smooth_images(1, 32, 32, seed=2)[0],
        smooth_images(1, 50, 70, seed=3)[0],
        smooth_images(1, 90, 40, seed=4)[0],
    ]
    augment = DeviceMultiCrop(CONFIG)
    ours = augment(images, torch.Generator().manual_seed(11))
    assert [tuple(v.shape) for v in ours] == [(4, 3, 64, 64)] * 2 + [(4, 3, 24, 24)] * 3
    generator = torch.Generator().manual_seed(11)
    augmentation = MultiCropAugmentation(CONFIG)
    per_image = [augmentation(image, generator=generator) for image in images]
    assert_views_match(ours, [torch.stack(slot) for slot in zip(*per_image, strict=True)])
    # The same as rendering each image alone with its table.
    tables = augment.sample([tuple(image.shape[1:]) for image in images])  # type: ignore[misc]
    together = augment.render(images, tables)
    for index, image in enumerate(images):
        alone = augment.render(image.unsqueeze(0), tables[index : index + 1])
        for mine, single in zip(together, alone, strict=True):
            torch.testing.assert_close(mine[index : index + 1], single, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("num_global", "num_local", "global_size", "local_size", "source"),
    [(2, 6, 32, 16, (32, 32)), (1, 0, 32, 16, (40, 24)), (2, 3, 64, 24, (8, 8))],
)
def test_views_count_sizes_order_and_normalisation(
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
    views = DeviceMultiCrop(config, "cpu")(random_images(3, *source))
    sizes = [global_size] * num_global + [local_size] * num_local
    assert [tuple(v.shape) for v in views] == [(3, 3, s, s) for s in sizes]
    for view in views:
        assert view.dtype == torch.float32 and view.device.type == "cpu"
        assert view.is_contiguous()
        assert torch.isfinite(view).all()
        assert (view >= LOW - 1e-5).all() and (view <= HIGH + 1e-5).all()


def test_views_are_reproducible_with_a_seeded_generator() -> None:
    augment = DeviceMultiCrop(CONFIG)
    images = random_images(3, 40, 48)
    first = augment(images, torch.Generator().manual_seed(3))
    again = augment(images, torch.Generator().manual_seed(3))
    other = augment(images, torch.Generator().manual_seed(4))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    torch.manual_seed(5)
    global_rng = augment(images)
    torch.manual_seed(5)
    assert all(torch.equal(a, b) for a, b in zip(global_rng, augment(images), strict=True))


# --- the distribution of the random choices ----------------------------------------------------


def test_view_tables_follow_the_recipe() -> None:
    """Per view slot: DINO's probabilities of flip, jitter, grey, blur and solarise."""
    config = DataConfig(global_crop_size=96, local_crop_size=32, num_local_crops=2)
    assert config.blur_enabled
    rounds = 1500
    tables = DeviceMultiCrop(config).sample([(60, 80)] * rounds, torch.Generator().manual_seed(0))
    assert tables.shape == (rounds, 4, len(COLUMNS)) and tables.dtype == torch.float64
    column = {name: tables[..., index] for index, name in enumerate(COLUMNS)}
    tolerance = 4 * math.sqrt(0.25 / rounds)  # four standard errors, at worst

    def rate(values: Tensor) -> float:
        return float(values.float().mean())

    for slot in range(4):
        assert rate(column["flip"][:, slot]) == pytest.approx(0.5, abs=tolerance)
        assert rate(column["jitter"][:, slot]) == pytest.approx(0.8, abs=tolerance)
        assert rate(column["grey"][:, slot]) == pytest.approx(0.2, abs=tolerance)
    for slot, (blur, solarize) in enumerate([(1.0, 0.0), (0.1, 0.2), (0.5, 0.0), (0.5, 0.0)]):
        assert rate(column["blur"][:, slot]) == pytest.approx(blur, abs=tolerance)
        assert rate(column["solarize"][:, slot]) == pytest.approx(solarize, abs=tolerance)
    sigma = column["sigma"][column["blur"] == 1]
    assert float(sigma.min()) >= 0.1 and float(sigma.max()) <= 2.0
    assert float(sigma.mean()) == pytest.approx(1.05, abs=0.05)
    assert (column["sigma"][column["blur"] == 0] == 0).all()
    for name, (low, high) in zip(
        ("brightness", "contrast", "saturation", "hue"), JITTER_RANGES, strict=True
    ):
        values = column[name]
        assert low <= float(values.min()) and float(values.max()) <= high
        assert float(values.mean()) == pytest.approx((low + high) / 2, abs=0.02)
    orders = [tuple(int(op) for op in row) for row in tables[..., 6:10].reshape(-1, 4)]
    assert set(orders) == set(itertools.permutations(range(4)))
    # Global crops: area 40-100% of the image; local: 5-40%.
    area = column["height"] * column["width"] / (60 * 80)
    assert float(area[:, :2].min()) >= 0.38 and float(area[:, :2].max()) <= 1.0
    assert float(area[:, 2:].min()) >= 0.04 and float(area[:, 2:].max()) <= 0.42


def test_grey_views_are_rendered_as_often_as_drawn() -> None:
    """In the rendered views (not only the tables) a fifth of the views are grey."""
    config = DataConfig(global_crop_size=8, local_crop_size=8, num_local_crops=4)
    augment = DeviceMultiCrop(config)
    images = random_images(200, 12, 12, seed=4)
    tables = augment.sample([(12, 12)] * 200, torch.Generator().manual_seed(1))
    views = augment.render(images, tables)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    for slot, view in enumerate(views):
        pixels = view * std + mean
        grey = (pixels - pixels[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-5
        assert torch.equal(grey, tables[:, slot, COLUMNS.index("grey")] == 1)
    rendered = torch.stack(
        [(v * std + mean - (v * std + mean)[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-5 for v in views]
    )
    assert float(rendered.float().mean()) == pytest.approx(0.2, abs=4 * math.sqrt(0.16 / 1200))


def test_a_flipped_view_is_the_mirror_of_the_unflipped_one() -> None:
    images = smooth_images(2, 40, 50, seed=6)
    augment = DeviceMultiCrop(CONFIG)
    tables = augment.sample([(40, 50)] * 2, torch.Generator().manual_seed(2))
    flip = COLUMNS.index("flip")
    unflipped, flipped = tables.clone(), tables.clone()
    unflipped[..., flip], flipped[..., flip] = 0.0, 1.0
    for plain, mirrored in zip(
        augment.render(images, unflipped), augment.render(images, flipped), strict=True
    ):
        torch.testing.assert_close(mirrored, plain.flip(-1), atol=FLOAT_TOLERANCE, rtol=0)


# --- refusals ----------------------------------------------------------------------------------


def test_rejects_other_images_and_tables() -> None:
    augment = DeviceMultiCrop(CONFIG)
    images = random_images(2, 20, 20)
    tables = augment.sample([(20, 20)] * 2)
    with pytest.raises(ValueError, match=r"uint8 \(B, 3, H, W\)"):
        augment.render(images.float(), tables)
    with pytest.raises(ValueError, match=r"uint8 \(3, H, W\) images, .* at position 1"):
        augment.render([images[0], images[1, :1]], tables)
    with pytest.raises(ValueError, match=r"shape \(2, 5, 18\)"):
        augment.render(images, tables[:, :3])
    outside = tables.clone()
    outside[0, 0, COLUMNS.index("left")] = 20.0
    with pytest.raises(ValueError, match="outside their 20x20 images"):
        augment.render(images, outside)
    unordered = tables.clone()
    unordered[1, 2, COLUMNS.index("order_1")] = 7.0
    with pytest.raises(ValueError, match="permutations"):
        augment.render(images, unordered)
    no_sigma = tables.clone()
    no_sigma[0, 0, COLUMNS.index("blur")] = 1.0
    no_sigma[0, 0, COLUMNS.index("sigma")] = 0.0
    with pytest.raises(ValueError, match="sigmas"):
        augment.render(images, no_sigma)
    with pytest.raises(ValueError, match="no images"):
        augment.render([], augment.sample([]))


# --- configuration -----------------------------------------------------------------------------


def test_cuda_augmentation_with_a_cpu_runtime_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.augment_device: 'cuda'.*runtime\.device"):
        validate_config({"data": {"augment_device": "cuda"}, "runtime": {"device": "cpu"}})
    assert validate_config({}).data.augment_device == "auto"
    for setting in ("auto", "cpu", "device"):
        validate_config({"data": {"augment_device": setting}, "runtime": {"device": "cpu"}})
    with pytest.raises(ConfigError, match="augment_device"):
        validate_config({"data": {"augment_device": "tpu"}})


def test_augmentation_device_resolution() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert augmentation_device("auto", cpu) is None
    assert augmentation_device("auto", cuda) == cuda
    assert augmentation_device("cpu", cuda) is None
    assert augmentation_device("device", cpu) == cpu
    assert augmentation_device("cuda", cuda) == cuda
    with pytest.raises(ValueError, match=r"data\.augment_device is 'cuda' but .* cpu"):
        augmentation_device("cuda", cpu)


# --- loader and training -----------------------------------------------------------------------

LOADER_CONFIG = DataConfig(batch_size=8, global_crop_size=16, local_crop_size=8, num_local_crops=2)


def test_the_device_loader_yields_images_whose_views_are_the_cpu_loaders() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 12, 12), dtype=torch.uint8, generator=generator)
    data = TensorImages(images, torch.arange(24) % 4)
    views_loader = make_train_loader(data, LOADER_CONFIG, seed=5)
    images_loader = make_train_loader(data, LOADER_CONFIG, seed=5, augment_on=torch.device("cpu"))
    augment = DeviceMultiCrop(LOADER_CONFIG)
    for loader in (views_loader, images_loader):
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(3)
    batches = list(zip(views_loader, images_loader, strict=True))
    assert len(batches) == 3
    for (views, labels), (batch, image_labels) in batches:
        assert isinstance(batch, ImageBatch) and len(batch) == 8
        assert isinstance(batch.images, Tensor) and batch.images.shape == (8, 3, 12, 12)
        assert batch.images.dtype == torch.uint8
        assert torch.equal(labels, image_labels)
        assert_views_match(augment.batch_views(batch), views)


def test_the_device_loader_keeps_images_of_different_sizes_in_a_list(tmp_path: Path) -> None:
    files = []
    for index, size in enumerate([(20, 30), (24, 24), (20, 30), (40, 18)]):
        path = tmp_path / f"{index}.png"
        save_image(random_images(1, *size, seed=index)[0], path)
        files.append(path)
    data = ImageFiles(files, [0, 1, 0, 1])
    config = LOADER_CONFIG.model_copy(update={"batch_size": 4})
    loader = make_train_loader(data, config, seed=0, augment_on=torch.device("cpu"))
    (batch, labels), *_ = list(loader)
    assert isinstance(batch.images, list) and len(batch.images) == 4
    assert sorted(tuple(image.shape) for image in batch.images) == sorted(
        [(3, 20, 30), (3, 24, 24), (3, 20, 30), (3, 40, 18)]
    )
    assert sorted(labels.tolist()) == [0, 0, 1, 1]
    views = DeviceMultiCrop(config).batch_views(batch)
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2


class EpochLosses:
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_log(self, state: TrainingState, metrics: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, state: TrainingState, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["epoch_loss"])


def test_training_with_views_made_on_the_training_device() -> None:
    """``augment_device: device`` on a CPU run: the loader yields images, the loop makes
    the views, and training follows the CPU pipeline's run to float rounding."""
    losses = {}
    for setting in ("cpu", "device"):
        config = tiny_config(
            data={"augment_device": setting, "max_samples": 96},
            schedule={"epochs": 2, "warmup_epochs": 1},
        )
        run = build_run(config)
        batch, _ = next(iter(run.train_loader))
        if setting == "device":
            assert isinstance(run.augment, DeviceMultiCrop) and isinstance(batch, ImageBatch)
        else:
            assert run.augment is None and isinstance(batch, list)
        hooks = EpochLosses()
        run_training(run, hooks, evaluates=False)
        assert run.state.step == 2 * run.schedules.steps_per_epoch
        losses[setting] = hooks.losses
    assert all(math.isfinite(loss) for loss in losses["device"])
    assert losses["device"] == pytest.approx(losses["cpu"], rel=1e-4)
