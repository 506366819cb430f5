"""Backbones from timm (offline), the projection head, multi-crop forward and the EMA teacher."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from trainer.config import BACKBONE_KWARGS, ModelConfig
from trainer.models import (
    STOCHASTIC_KWARGS,
    ProjectionHead,
    build_backbone,
    build_network,
    build_teacher,
    synchronise_batchnorm,
    unwrap,
    update_teacher,
)


@pytest.mark.parametrize("name", ["resnet18", "resnet10t"])
def test_small_image_resnet_keeps_resolution(name: str) -> None:
    backbone = build_backbone(ModelConfig(backbone=name, small_images=True), image_size=32)
    assert isinstance(backbone.maxpool, nn.Identity)
    features = backbone.forward_features(torch.randn(2, 3, 32, 32))
    # 3x3/1 stem, no pool: only the three stride-2 stages downsample, 32 -> 4.
    assert features.shape[-1] == 4
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, backbone.num_features)


def test_standard_resnet_stem_is_untouched_without_small_images() -> None:
    backbone = build_backbone(ModelConfig(backbone="resnet18", small_images=False), 64)
    assert backbone.conv1.kernel_size == (7, 7)
    assert not isinstance(backbone.maxpool, nn.Identity)


def test_small_vit_takes_global_and_local_crops() -> None:
    config = ModelConfig(
        backbone="vit_tiny_patch16_224", patch_size=4, backbone_kwargs={"depth": 2}
    )
    backbone = build_backbone(config, image_size=16)
    assert backbone.patch_embed.patch_size == (4, 4)
    assert backbone(torch.randn(3, 3, 16, 16)).shape == (3, 192)
    assert backbone(torch.randn(3, 3, 8, 8)).shape == (3, 192)


def test_backbone_state_dict_loads_into_fresh_timm_model() -> None:
    backbone = build_backbone(ModelConfig(backbone="resnet18", small_images=False), 32)
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=0)
    fresh.load_state_dict(backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    backbone.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), backbone(x))


def test_head_outputs_cosine_logits_with_fixed_gain() -> None:
    head = ProjectionHead(in_dim=16, num_clusters=10, hidden_dim=32, bottleneck_dim=8)
    logits = head(torch.randn(5, 16))
    assert logits.shape == (5, 10)
    # Unit-norm bottleneck times unit-norm prototypes: logits are cosines.
    assert logits.abs().max() <= 1 + 1e-5
    gain = head.prototypes.parametrizations.weight.original0
    assert not gain.requires_grad
    trainable = ProjectionHead(16, 10, 32, 8, norm_last_layer=False)
    assert trainable.prototypes.parametrizations.weight.original0.requires_grad


def test_multicrop_network_groups_views_by_resolution() -> None:
    config = ModelConfig(
        backbone="vit_tiny_patch16_224",
        patch_size=4,
        backbone_kwargs={"depth": 1},
        head_hidden_dim=32,
        head_bottleneck_dim=16,
    )
    network = build_network(config, num_clusters=7, image_size=16)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8)] * 3
    logits = network(views)
    assert logits.shape == (5, 4, 7)
    # Same input view -> same logits, whichever group it was computed in.
    network.eval()
    again = network(views)
    torch.testing.assert_close(again[2], again[3])
    torch.testing.assert_close(network([views[0]])[0], again[0], atol=1e-5, rtol=1e-5)


def _resnet_pair(**backbone_kwargs: float) -> tuple[nn.Module, nn.Module]:
    config = ModelConfig(
        backbone="test_resnet",
        backbone_kwargs=backbone_kwargs,
        head_hidden_dim=16,
        head_bottleneck_dim=8,
    )
    student = build_network(config, num_clusters=5, image_size=16)
    return student, build_teacher(config, student, num_clusters=5, image_size=16)


def test_teacher_is_frozen_and_follows_the_student_parameters_by_ema() -> None:
    student, teacher = _resnet_pair()
    assert all(not p.requires_grad for p in teacher.parameters())
    for t, s in zip(teacher.state_dict().values(), student.state_dict().values(), strict=True):
        torch.testing.assert_close(t, s)  # starts as the student
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    update_teacher(teacher, student, momentum=0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    update_teacher(teacher, student, momentum=0.0)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s)


def test_teacher_batchnorm_statistics_come_from_its_own_passes() -> None:
    """DINO: the EMA covers parameters; running statistics are the teacher's own."""
    student, teacher = _resnet_pair()
    student.train()
    teacher.train()
    global_views = [torch.randn(4, 3, 16, 16) + 3.0]  # teacher sees these
    local_views = [torch.randn(4, 3, 8, 8) - 3.0]  # the student's last pass sees these
    teacher_bn = next(m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d))
    student_bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    seen: list[torch.Tensor] = []
    teacher_bn.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    with torch.no_grad():
        teacher(global_views)
    student(global_views + local_views)
    update_teacher(teacher, student, momentum=0.5)
    # One update of a fresh BatchNorm (momentum 0.1, mean 0) with the global views only.
    expected = 0.1 * seen[0].mean(dim=(0, 2, 3))
    torch.testing.assert_close(teacher_bn.running_mean, expected)
    assert not torch.allclose(teacher_bn.running_mean, student_bn.running_mean)


@pytest.mark.parametrize("backbone", ["test_resnet", "vit_tiny_patch16_224"])
def test_teacher_never_drops_paths_even_when_the_student_does(backbone: str) -> None:
    config = ModelConfig(
        backbone=backbone,
        patch_size=4 if backbone.startswith("vit") else None,
        backbone_kwargs={"drop_path_rate": 0.5, "drop_rate": 0.5}
        | ({"depth": 2} if backbone.startswith("vit") else {}),
        head_hidden_dim=16,
        head_bottleneck_dim=8,
    )
    student = build_network(config, num_clusters=5, image_size=16)
    teacher = build_teacher(config, student, num_clusters=5, image_size=16)
    student.train()
    teacher.train()
    views = [torch.randn(8, 3, 16, 16)]
    with torch.no_grad():
        torch.testing.assert_close(teacher(views), teacher(views))
        if backbone.startswith("vit"):  # a BatchNorm-free student: only drop-path differs
            assert not torch.allclose(student(views), student(views))


def test_batchnorm_is_synchronised_only_across_several_gpus() -> None:
    student, _ = _resnet_pair()
    cpu = synchronise_batchnorm(student, torch.device("cpu"), world_size=2)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in cpu.modules())
    one_gpu = synchronise_batchnorm(student, torch.device("cuda"), world_size=1)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in one_gpu.modules())
    gpus = synchronise_batchnorm(student, torch.device("cuda"), world_size=2)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in gpus.modules())


def test_unwrap_returns_the_inner_module() -> None:
    inner = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper()) is inner
    assert unwrap(inner) is inner


def test_the_allowed_backbone_kwargs_are_timm_constructor_arguments() -> None:
    # Every key of the allow-list builds, on the family it belongs to.
    vit = ModelConfig(
        backbone="vit_tiny_patch16_224",
        patch_size=4,
        backbone_kwargs={
            "depth": 1,
            "embed_dim": 32,
            "num_heads": 2,
            "mlp_ratio": 2.0,
            "qkv_bias": False,
            "qk_norm": True,
            "class_token": True,
            "no_embed_class": True,
            "reg_tokens": 1,
            "pre_norm": True,
            "init_values": 1e-5,
            "img_size": 16,
            "dynamic_img_size": True,
            "dynamic_img_pad": False,
            "drop_rate": 0.1,
            "attn_drop_rate": 0.1,
            "proj_drop_rate": 0.1,
            "pos_drop_rate": 0.1,
            "patch_drop_rate": 0.1,
            "drop_path_rate": 0.1,
        },
    )
    assert build_backbone(vit, image_size=16)(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    resnet = ModelConfig(
        backbone="resnet14t",  # bottleneck blocks: cardinality > 1 is a ResNeXt
        backbone_kwargs={
            "cardinality": 2,
            "base_width": 32,
            "stem_width": 16,
            "stem_type": "deep",
            "avg_down": True,
            "zero_init_last": False,
            "drop_block_rate": 0.1,
        },
    )
    assert build_backbone(resnet, image_size=16)(torch.randn(2, 3, 16, 16)).ndim == 2
    covered = set(vit.backbone_kwargs) | set(resnet.backbone_kwargs) | {"patch_size"}
    assert covered == set(BACKBONE_KWARGS)
    assert set(STOCHASTIC_KWARGS) <= set(BACKBONE_KWARGS)


def test_unchecked_backbone_kwargs_never_reach_timm() -> None:
    # model_copy(update=...) skips validation: the builder checks the allow-list again.
    config = ModelConfig(backbone="resnet18").model_copy(
        update={"backbone_kwargs": {"checkpoint_path": "/etc/passwd"}}
    )
    with pytest.raises(ValueError, match="'checkpoint_path' is refused: it names a file"):
        build_backbone(config, image_size=32)
