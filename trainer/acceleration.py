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
