"""Networks: a timm backbone, the DINO projection head, and the student/teacher pair.

Backbones come from timm's registry by name and are always built with
``pretrained=False``: nothing is downloaded, which keeps runs working behind firewalls.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from trainer.config import ModelConfig, check_backbone_kwargs


def is_vit(config: ModelConfig) -> bool:
    """Whether the backbone is a Vision Transformer (patch size and image size apply)."""
    return config.backbone.startswith(("vit_", "deit", "eva", "beit"))


def backbone_kwargs(config: ModelConfig, image_size: int) -> dict[str, Any]:
    """The keyword arguments of ``timm.create_model`` for a config's backbone.

    The config's ``backbone_kwargs`` are checked against the allow-list again here (a
    `ModelConfig` copied with ``model_copy(update=...)`` skips validation), so nothing
    that names a file or loads weights ever reaches timm.
    """
    kwargs: dict[str, Any] = check_backbone_kwargs(config.backbone_kwargs)
    if is_vit(config):
        kwargs.setdefault("img_size", image_size)
        kwargs.setdefault("dynamic_img_size", True)
        if config.patch_size is not None:
            kwargs.setdefault("patch_size", config.patch_size)
        elif config.small_images:
            kwargs.setdefault("patch_size", 4)
    return kwargs


def build_backbone(config: ModelConfig, image_size: int) -> nn.Module:
    """A timm backbone that maps (B, 3, H, W) images to (B, D) features.

    With ``small_images`` the stem is adapted to small inputs such as 32x32: ResNets get
    a 3x3 stride-1 first convolution and no max-pool (the CIFAR variant, which keeps
    spatial resolution the 7x7/2 + pool stem would throw away), ViTs get ``patch_size``
    (default 4) and ``image_size`` with dynamic image sizes so local crops also fit.
    """
    backbone = timm.create_model(
        config.backbone, pretrained=False, num_classes=0, **backbone_kwargs(config, image_size)
    )
    if config.small_images and not is_vit(config):
        _small_image_stem(backbone)
    return backbone


def _small_image_stem(backbone: nn.Module) -> None:
    """Replace a ResNet-style stem by a 3x3, stride-1 convolution without max-pool."""
    conv1 = getattr(backbone, "conv1", None)
    if not hasattr(backbone, "maxpool") or conv1 is None:
        return  # not a ResNet-style stem; other families keep their own stem
    if isinstance(conv1, nn.Conv2d):
        backbone.conv1 = nn.Conv2d(
            conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
    else:  # deep stems (resnet*d, resnet*t): a Sequential whose first conv strides
        first = next(m for m in conv1.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    backbone.maxpool = nn.Identity()


class ProjectionHead(nn.Module):
    """DINO's head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    Args:
        in_dim: backbone feature width D.
        num_clusters: K, the number of prototypes (output logits).
        hidden_dim: width of the hidden MLP layers.
        bottleneck_dim: width of the normalised bottleneck.
        layers: linear layers of the MLP (1: a single projection to the bottleneck).
        norm_last_layer: fix the prototypes' weight-norm gain to 1, so the logits are
            cosine similarities in [-1, 1] (DINO's stabilising default).
    """

    def __init__(
        self,
        in_dim: int,
        num_clusters: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        layers: int = 3,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (width_in, width_out) in enumerate(itertools.pairwise(widths)):
            blocks.append(nn.Linear(width_in, width_out))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        self.apply(_init_linear)
        self.prototypes = weight_norm(nn.Linear(bottleneck_dim, num_clusters, bias=False))
        gain = self.prototypes.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, features: Tensor) -> Tensor:
        """(B, D) features -> (B, K) logits."""
        z = F.normalize(self.mlp(features), dim=-1, eps=1e-6)
        logits: Tensor = self.prototypes(z)
        return logits


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MultiCropNetwork(nn.Module):
    """Backbone + head applied to a list of views, one backbone pass per resolution.

    Views of the same size are concatenated so the backbone runs once per resolution
    (twice with global and local crops), the head once on everything.

    Two speed settings, both off after construction and set by
    `trainer.acceleration.accelerate` (neither changes the state_dict's keys):
    ``input_format`` is the memory format the backbone's input batches are given
    (``torch.channels_last`` for CNNs on CUDA, with the weights converted by
    `use_memory_format`), and ``compile_backend`` names the ``torch.compile`` backend
    of the backbone passes of `forward` (None: eager).
    """

    def __init__(self, backbone: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.input_format: torch.memory_format = torch.contiguous_format
        self.compile_backend: str | None = None

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Convert the 4-D weights to ``memory_format`` and give the backbone its inputs so.

        The parameters stay the same objects (their storage is replaced), so an optimiser
        built before still holds them.
        """
        self.to(memory_format=memory_format)
        self.input_format = memory_format

    def forward(self, views: Sequence[Tensor]) -> Tensor:
        """List of V tensors (B, 3, h_v, w_v) -> (V, B, K) logits."""
        encode = _encode if self.compile_backend is None else _compiled(self.compile_backend)
        features = []
        for _, group in itertools.groupby(views, key=lambda v: v.shape[-2:]):
            # contiguous() returns the batch itself when it already has the format.
            images = torch.cat(list(group)).contiguous(memory_format=self.input_format)
            features.append(encode(self.backbone, images))
        logits: Tensor = self.head(torch.cat(features))
        return logits.reshape(len(views), views[0].shape[0], -1)


def _encode(backbone: nn.Module, images: Tensor) -> Tensor:
    """One backbone pass: the function ``torch.compile`` compiles (see `_compiled`)."""
    features: Tensor = backbone(images)
    return features


@functools.cache
def _compiled(backend: str) -> Callable[[nn.Module, Tensor], Tensor]:
    """`_encode` compiled with ``backend``, one compiled function per backend.

    The function is compiled, not the module: ``torch.compile(module)`` wraps it in an
    ``OptimizedModule`` whose state_dict keys gain an ``_orig_mod.`` prefix, which would
    leak into checkpoints and the exported backbone, and a compiled module attribute
    survives ``copy.deepcopy`` pointing at the original. The backbone is an argument, so
    the student's and the teacher's passes share the cache (guarded by shapes, grad mode
    and train/eval). Static shapes: one graph per resolution, the fastest kernels for
    the two crop sizes a run uses.
    """
    compiled: Callable[[nn.Module, Tensor], Tensor] = torch.compile(
        _encode, backend=backend, dynamic=False
    )
    return compiled


def build_network(config: ModelConfig, num_clusters: int, image_size: int) -> MultiCropNetwork:
    """The student architecture of a config (the teacher is its EMA copy)."""
    backbone = build_backbone(config, image_size)
    width = backbone.num_features
    if not isinstance(width, int):
        raise TypeError(f"{config.backbone} does not report an integer num_features")
    head = ProjectionHead(
        in_dim=width,
        num_clusters=num_clusters,
        hidden_dim=config.head_hidden_dim,
        bottleneck_dim=config.head_bottleneck_dim,
        layers=config.head_layers,
        norm_last_layer=config.norm_last_layer,
    )
    return MultiCropNetwork(backbone, head)


STOCHASTIC_KWARGS = (
    "drop_rate",
    "drop_path_rate",
    "drop_block_rate",
    "attn_drop_rate",
    "proj_drop_rate",
    "pos_drop_rate",
    "patch_drop_rate",
)
"""timm keyword arguments that make a forward pass random (dropout and its kin)."""


def deterministic(config: ModelConfig) -> ModelConfig:
    """The same model with every dropout, drop-path and drop-block rate at zero.

    DINO's teacher is built without stochastic depth (``drop_path_rate`` is passed to
    the student only): its targets must be a deterministic function of the image.
    """
    kwargs = {
        key: value for key, value in config.backbone_kwargs.items() if key not in STOCHASTIC_KWARGS
    }
    return config.model_copy(update={"backbone_kwargs": kwargs})


def build_teacher(
    config: ModelConfig, student: MultiCropNetwork, num_clusters: int, image_size: int
) -> MultiCropNetwork:
    """The teacher: the student's architecture without randomness, with its weights.

    Built anew from `deterministic` ``config`` (not a deep copy, which would keep the
    student's drop-path layers), then loaded with the student's parameters and buffers,
    and frozen: it changes only through `update_teacher` and its own BatchNorm passes.
    """
    teacher = build_network(deterministic(config), num_clusters, image_size)
    teacher.load_state_dict(student.state_dict())
    teacher.to(next(student.parameters()).device)
    for parameter in teacher.parameters():
        parameter.requires_grad = False
    return teacher


def synchronise_batchnorm(
    network: MultiCropNetwork, device: torch.device, world_size: int
) -> MultiCropNetwork:
    """Convert BatchNorm layers to SyncBatchNorm on several GPUs, as DINO does.

    The teacher's and the student's batch statistics then cover the global batch. On
    the CPU, torch's SyncBatchNorm refuses to run (it needs CUDA-like devices), so CPU
    workers keep per-worker BatchNorm.
    """
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())
    if world_size > 1 and device.type == "cuda" and has_batchnorm:
        # Converts the layers in place (the top module is not a BatchNorm itself).
        nn.SyncBatchNorm.convert_sync_batchnorm(network)
    return network


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters only.

    ``student`` is the plain module (unwrap DDP first). Every rank applies the same
    update to identical weights, so the teacher stays identical across ranks without
    communication. Buffers are not copied: the teacher's BatchNorm running statistics
    come from its own forward passes on the global views (as in DINO), not from the
    student's last pass, which saw the local crops.
    """
    teacher_params: list[Tensor] = list(teacher.parameters())
    student_params: list[Tensor] = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, momentum)
    torch._foreach_add_(teacher_params, student_params, alpha=1 - momentum)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or the module itself)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def as_network(model: nn.Module) -> MultiCropNetwork:
    """The `MultiCropNetwork` of a student or teacher, DDP-wrapped or not."""
    network = unwrap(model)
    if not isinstance(network, MultiCropNetwork):
        raise TypeError(f"expected a MultiCropNetwork, got {type(network).__name__}")
    return network
