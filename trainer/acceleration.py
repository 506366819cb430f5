"""The speed settings of a run, decided in one place from its config and device.

On CUDA a run uses channels_last for convolutional backbones, the fused AdamW kernel,
pinned host memory for the loaders' batches, and (with ``runtime.compile``)
``torch.compile`` of the backbone passes. On the CPU every setting but
``runtime.compile`` stays off, so CPU results are those of the plain code (the
multi-tensor AdamW path the CPU gets instead of the fused kernel gives bit-identical
updates). bf16 autocast is `trainer.engine.autocast`'s (``runtime.precision``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from trainer.config import TrainConfig
from trainer.models import MultiCropNetwork, is_vit

COMPILE_BACKEND = "inductor"
"""What ``runtime.compile`` compiles with (torch's default backend: Triton on CUDA,
C++/OpenMP on the CPU, which needs a C++ compiler)."""


def channels_last_wanted(config: TrainConfig, device: torch.device) -> bool:
    """channels_last (NHWC) for convolutional backbones on CUDA.

    cuDNN's convolutions and BatchNorm run on NHWC tensors without transposing them
    around every tensor-core kernel. A ViT's only convolution is its patch embedding,
    so it keeps the default format; the CPU keeps it too (oneDNN's gain there is small
    and not worth different numerics from the plain code).
    """
    return device.type == "cuda" and not is_vit(config.model)


def fused_optimizer_wanted(parameters: Iterable[nn.Parameter]) -> bool:
    """Whether every parameter is on CUDA, where AdamW's fused kernel applies."""
    devices = {parameter.device.type for parameter in parameters}
    return devices == {"cuda"}


def pin_memory_wanted(device: torch.device) -> bool:
    """Pinned (page-locked) loader batches, so copies to a CUDA device are asynchronous."""
    return device.type == "cuda"


def accelerate(network: MultiCropNetwork, config: TrainConfig, device: torch.device) -> None:
    """Apply the config's and the device's settings to a student or teacher network.

    Call it on the plain network (before a DistributedDataParallel wrap) after its
    weights are in place; neither setting changes the state_dict's keys, so
    checkpoints and exported backbones are the same with and without them.
    """
    if channels_last_wanted(config, device):
        network.use_memory_format(torch.channels_last)
    if config.runtime.compile:
        network.compile_backend = COMPILE_BACKEND


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")
"""Optimiser options that choose a kernel for this device, not a hyperparameter."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping this device's kernel and layout.

    torch restores every option of the saved parameter groups, ``fused`` and ``foreach``
    included: a checkpoint of a CPU run would take the fused kernel away from a CUDA
    run, one of a CUDA run would impose it on the CPU. The optimiser keeps its own.
    Then each moment gets its parameter's memory layout (`match_parameter_layout`).
    """
    groups = [
        group | {key: current[key] for key in IMPLEMENTATION_KEYS if key in current}
        for group, current in zip(saved["param_groups"], optimizer.param_groups, strict=False)
    ]  # a different number of groups: load_state_dict says so
    optimizer.load_state_dict(saved | {"param_groups": groups})
    match_parameter_layout(optimizer)


def match_parameter_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (AdamW's moments) its parameter's layout.

    A checkpoint written with another memory layout (a CPU run resumed on CUDA, where CNN
    weights are channels_last) loads the moments with their own strides. The fused
    AdamW kernel pairs elements by memory position and would silently mix them up (the
    multi-tensor path checks and falls back), so the moments are laid out like their
    parameter.
    """
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.shape == parameter.shape
                    and value.stride() != parameter.stride()
                ):
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)
