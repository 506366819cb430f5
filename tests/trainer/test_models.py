"""Backbones from timm (offline), the projection head, multi-crop forward and the EMA teacher."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from trainer.config import ModelConfig
from trainer.models import (
    ProjectionHead,
    build_backbone,
    build_network,
    make_teacher,
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


def test_teacher_is_frozen_and_follows_student_by_ema() -> None:
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    teacher = make_teacher(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(8, 3))  # moves the BatchNorm running statistics
    update_teacher(teacher, student, momentum=0.9)
    for old, new, s in zip(before, teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    torch.testing.assert_close(teacher[1].running_mean, student[1].running_mean)
    update_teacher(teacher, student, momentum=0.0)
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        torch.testing.assert_close(t, s)


def test_unwrap_returns_the_inner_module() -> None:
    inner = nn.Linear(2, 2)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

    assert unwrap(Wrapper()) is inner
    assert unwrap(inner) is inner
