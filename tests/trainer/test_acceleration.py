"""The GPU speed settings: off on the CPU, and none of them changes what a run computes.

channels_last, the multi-tensor AdamW and ``runtime.compile`` are forced on the CPU here
(their CUDA decisions are pure functions, checked with a CUDA device object), and each
is compared with the plain code on the same tiny run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tests.factories import tiny_config
from trainer.acceleration import (
    COMPILE_BACKEND,
    channels_last_wanted,
    fused_optimizer_wanted,
    pin_memory_wanted,
)
from trainer.checkpoint import load_payload, restore_state, save_checkpoint, state_payload
from trainer.config import TrainConfig
from trainer.data import make_eval_loader, make_train_loader, prefetch_factor
from trainer.engine import parameter_groups, train_step
from trainer.loop import Run, backbone_of, build_run
from trainer.models import MultiCropNetwork, as_network

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
NHWC = torch.channels_last


def resnet_config(**runtime: object) -> TrainConfig:
    """A tiny ResNet-18 run with the CIFAR stem (convolutions and BatchNorm)."""
    return tiny_config(
        model={
            "backbone": "resnet18",
            "small_images": True,
            "patch_size": None,
            "backbone_kwargs": {},
        },
        data={"batch_size": 4, "max_samples": 32, "global_crop_size": 12, "local_crop_size": 8},
        runtime=dict(runtime),
    )


def steps(run: Run, count: int) -> list[float]:
    """Train ``count`` steps on the loader's first batches; the losses."""
    losses = []
    for step, (views, _) in zip(range(count), run.train_loader, strict=False):
        result = train_step(
            run.state, views, run.schedules.at(step + 5), run.config, precision="fp32"
        )
        losses.append(float(result.loss))
    return losses


def parameters_of(run: Run) -> list[Tensor]:
    return [*as_network(run.state.student).parameters(), *run.state.teacher.parameters()]


def test_the_gpu_settings_are_decided_for_cuda_only() -> None:
    vit, resnet = tiny_config(), resnet_config()
    assert channels_last_wanted(resnet, CUDA)
    assert not channels_last_wanted(resnet, CPU)
    assert not channels_last_wanted(vit, CUDA)  # a ViT's one convolution is its patch embed
    assert pin_memory_wanted(CUDA) and not pin_memory_wanted(CPU)
    assert not fused_optimizer_wanted(nn.Linear(2, 2).parameters())
    assert not fused_optimizer_wanted(nn.Linear(2, 2, device="meta").parameters())


def test_a_cpu_run_uses_none_of_them() -> None:
    run = build_run(resnet_config())
    for network in (as_network(run.state.student), as_network(run.state.teacher)):
        assert network.input_format == torch.contiguous_format
        assert network.compile_backend is None
        assert all(p.is_contiguous() for p in network.parameters())
    defaults = run.state.optimizer.defaults
    assert not defaults["fused"] and defaults["foreach"] is True
    assert not run.train_loader.pin_memory


def test_the_multi_tensor_adamw_updates_equal_the_per_tensor_loop() -> None:
    config = resnet_config()
    multi, single = build_run(config), build_run(config)
    assert multi.state.optimizer.defaults["foreach"] is True
    single.state.optimizer = torch.optim.AdamW(
        parameter_groups(single.state.student), lr=0.0, foreach=False
    )
    assert steps(multi, 2) == steps(single, 2)
    for a, b in zip(parameters_of(multi), parameters_of(single), strict=True):
        assert torch.equal(a, b)


def test_channels_last_changes_no_result_on_the_cpu() -> None:
    config = resnet_config()
    plain, nhwc = build_run(config), build_run(config)
    seen: list[bool] = []
    for network in (as_network(nhwc.state.student), nhwc.state.teacher):
        assert isinstance(network, MultiCropNetwork)
        network.use_memory_format(torch.channels_last)
        network.backbone.register_forward_pre_hook(
            lambda _, inputs: seen.append(
                inputs[0].is_contiguous(memory_format=torch.channels_last)
            )
        )
    conv = as_network(nhwc.state.student).backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # The optimiser built before the conversion still holds the converted parameters.
    held = {id(p) for group in nhwc.state.optimizer.param_groups for p in group["params"]}
    assert id(conv) in held

    torch.testing.assert_close(steps(nhwc, 2), steps(plain, 2), rtol=1e-4, atol=1e-5)
    assert seen and all(seen)
    for a, b in zip(parameters_of(nhwc), parameters_of(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert nhwc.state.student.state_dict().keys() == plain.state.student.state_dict().keys()


def test_a_checkpoint_of_another_layout_resumes_right_under_the_fused_optimizer() -> None:
    # A CPU run's checkpoint (contiguous moments) resumed where the weights are
    # channels_last with the fused AdamW of CUDA (which the CPU has too): the fused
    # kernel pairs elements by memory position, so the moments must be re-laid.
    config = resnet_config()
    source = build_run(config)
    steps(source, 1)
    payload = state_payload(source.state)
    plain, nhwc = build_run(config), build_run(config)
    for run in (plain, nhwc):
        groups = parameter_groups(run.state.student)
        run.state.optimizer = torch.optim.AdamW(groups, lr=0.0, fused=True)
    for network in (as_network(nhwc.state.student), as_network(nhwc.state.teacher)):
        network.use_memory_format(NHWC)
    restore_state(plain.state, copy.deepcopy(payload))  # as read from disk: nothing shared
    restore_state(nhwc.state, copy.deepcopy(payload))
    for run in (plain, nhwc):  # the checkpoint's foreach=True does not replace the kernel
        assert all(
            group["fused"] and not group["foreach"] for group in run.state.optimizer.param_groups
        )
    conv = as_network(nhwc.state.student).backbone.conv1.weight
    for moment in nhwc.state.optimizer.state[conv].values():
        if moment.ndim == 4:
            assert moment.is_contiguous(memory_format=NHWC)

    torch.testing.assert_close(steps(nhwc, 2), steps(plain, 2), rtol=1e-4, atol=1e-5)
    # The moments too: early in the warm-up the learning rate is too small for mixed-up
    # moments to show much in the weights.
    for a, b in zip(parameters_of(nhwc), parameters_of(plain), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        for key, moment in nhwc.state.optimizer.state.get(a, {}).items():
            expected = plain.state.optimizer.state[b][key]
            torch.testing.assert_close(moment, expected, rtol=1e-4, atol=1e-7)


def test_the_loaders_pin_memory_when_asked_and_prefetch_with_workers() -> None:
    config = tiny_config(data={"loader_workers": 2})
    run = build_run(config)
    train = make_train_loader(run.splits.train, config.data, seed=0, pin_memory=True)
    evaluation = make_eval_loader(run.splits.holdout, config.data, pin_memory=True)
    for loader in (train, evaluation):
        assert loader.pin_memory
        assert loader.persistent_workers
        assert loader.prefetch_factor == 4
    assert [prefetch_factor(n) for n in (0, 1, 2, 3, 4, 16)] == [None, 8, 4, 3, 2, 2]
    assert not make_eval_loader(run.splits.holdout, tiny_config().data).pin_memory


@pytest.mark.slow  # inductor's first C++ build costs ~25 s of gcc, then two graphs
def test_a_compiled_run_trains_and_its_checkpoint_loads_into_an_uncompiled_one(
    tmp_path: Path,
) -> None:
    # No local crops: two graphs (student, teacher) keep the C++ compilation short.
    compiled_config = tiny_config(data={"num_local_crops": 0}, runtime={"compile": True})
    plain_config = compiled_config.model_copy(
        update={"runtime": compiled_config.runtime.model_copy(update={"compile": False})}
    )
    compiled, plain = build_run(compiled_config), build_run(plain_config)
    for network in (as_network(compiled.state.student), as_network(compiled.state.teacher)):
        assert network.compile_backend == COMPILE_BACKEND
    torch._dynamo.reset()
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]

    compiled_losses = steps(compiled, 2)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before  # really compiled
    torch.testing.assert_close(compiled_losses, steps(plain, 2), rtol=1e-4, atol=1e-4)

    # The same keys with and without compile, no `_orig_mod.` anywhere.
    save_checkpoint(tmp_path / "epoch_0001", compiled.state, compiled_config)
    payload = load_payload(tmp_path / "epoch_0001")
    fresh = build_run(plain_config)
    for part in ("student", "teacher"):
        assert payload[part].keys() == plain.state.student.state_dict().keys()
        assert not any("_orig_mod" in key for key in payload[part])
    assert backbone_of(compiled).state_dict().keys() == backbone_of(plain).state_dict().keys()
    restore_state(fresh.state, payload)
    images = next(iter(fresh.train_loader))[0][0]
    with torch.no_grad():
        torch.testing.assert_close(
            backbone_of(fresh)(images), backbone_of(compiled)(images), rtol=0, atol=0
        )
        torch.testing.assert_close(
            fresh.state.teacher([images]), compiled.state.teacher([images]), rtol=1e-4, atol=1e-4
        )
