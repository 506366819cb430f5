"""Cluster statistics: the EMA formulas of docs/design.md, checkpoints, and a real gloo group.

The distributed tests start two processes (torch.multiprocessing, spawn) in a gloo group
on 127.0.0.1, give each rank a different local batch, and compare what every rank ends up
with against one process that sees the concatenated global batch.
"""

from __future__ import annotations

import io
import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor

from trainer.objective import entropy, teacher_targets
from trainer.statistics import ClusterStatistics, all_reduce_sum, distributed_ready

NUM_CLUSTERS = 24
TEACHER_VIEWS = 2
TEACHER_TEMP = 0.07
MOMENTUM = 0.8
STEPS = 3
WORLD_SIZE = 2
LOCAL_BATCH = (5, 3)  # different local batch sizes per rank: the count is all-reduced too


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def ema(previous: Tensor, batch: Tensor, momentum: float) -> Tensor:
    """pi <- m pi + (1 - m) pi_batch (and the same for c), from docs/design.md section 1.4."""
    return momentum * previous + (1 - momentum) * batch


def marginal(teacher_logits: Tensor, teacher_temp: float) -> Tensor:
    """pi_batch = E_x[softmax(t / tau_t)] over every row, float64."""
    return torch.softmax(teacher_logits.double() / teacher_temp, dim=-1).mean(dim=0)


# --- one process ---------------------------------------------------------------------------


def test_initial_prior_is_uniform_and_center_zero() -> None:
    stats = ClusterStatistics(7, momentum=0.9)
    torch.testing.assert_close(stats.prior, torch.full((7,), 1 / 7))
    assert stats.prior.sum().item() == pytest.approx(1.0)
    assert torch.equal(stats.center, torch.zeros(7))
    assert math.exp(entropy(stats.prior).item()) == pytest.approx(7)  # K effective clusters


def test_momentum_zero_prior_is_the_batch_marginal() -> None:
    teacher = 3 * torch.randn(40, 9)
    teacher[:, 2] += 2  # not uniform, so a leftover of the initial prior would show
    stats = ClusterStatistics(9, momentum=0.0)
    for _ in range(2):  # the second step must forget the first entirely
        batch = stats.update(teacher, 0.1)
        assert torch.equal(stats.prior, batch.prior)
        assert torch.equal(stats.center, batch.center)
        torch.testing.assert_close(stats.prior.double(), marginal(teacher, 0.1))
        torch.testing.assert_close(stats.center, teacher.mean(dim=0))
        teacher = teacher.roll(1, dims=1)
    assert stats.prior.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_update_follows_the_ema_formulas_over_steps() -> None:
    stats = ClusterStatistics(NUM_CLUSTERS, momentum=MOMENTUM)
    prior = torch.full((NUM_CLUSTERS,), 1 / NUM_CLUSTERS, dtype=torch.float64)
    center = torch.zeros(NUM_CLUSTERS, dtype=torch.float64)
    for step in range(4):
        teacher = 2 * torch.randn(TEACHER_VIEWS * 6, NUM_CLUSTERS) + step
        temp = 0.04 + 0.01 * step
        stats.update(teacher, temp)
        prior = ema(prior, marginal(teacher, temp), MOMENTUM)
        center = ema(center, teacher.double().mean(dim=0), MOMENTUM)
        torch.testing.assert_close(stats.prior.double(), prior, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(stats.center.double(), center, rtol=1e-5, atol=1e-6)
        assert stats.prior.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_batch_statistics_report_the_global_batch() -> None:
    teacher = 2 * torch.randn(TEACHER_VIEWS, 6, NUM_CLUSTERS)  # (V_t, B, K) flattened inside
    stats = ClusterStatistics(NUM_CLUSTERS, momentum=0.5)
    batch = stats.update(teacher, TEACHER_TEMP)
    flat = teacher.reshape(-1, NUM_CLUSTERS)
    probs = F.softmax(flat.double() / TEACHER_TEMP, dim=-1)
    assert batch.count.item() == TEACHER_VIEWS * 6
    # float32 statistics against a float64 reference: float32's precision.
    torch.testing.assert_close(batch.prior.double(), probs.mean(dim=0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(batch.center.double(), flat.double().mean(dim=0))
    expected_entropy = -(probs * probs.clamp_min(1e-300).log()).sum(dim=-1).mean()
    torch.testing.assert_close(
        batch.teacher_entropy.double(), expected_entropy, rtol=1e-4, atol=1e-6
    )


def test_update_is_not_differentiable_and_leaves_the_input_alone() -> None:
    teacher = torch.randn(8, 5, requires_grad=True)
    before = teacher.detach().clone()
    stats = ClusterStatistics(5, momentum=0.9)
    batch = stats.update(teacher, 0.1)
    assert not stats.prior.requires_grad and not batch.prior.requires_grad
    assert torch.equal(teacher.detach(), before)


def test_buffers_are_checkpointed_and_load_back() -> None:
    stats = ClusterStatistics(NUM_CLUSTERS, momentum=MOMENTUM)
    for _ in range(3):
        stats.update(torch.randn(10, NUM_CLUSTERS), TEACHER_TEMP)
    state = stats.state_dict()
    assert set(state) == {"prior", "center"}

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = ClusterStatistics(NUM_CLUSTERS, momentum=MOMENTUM)
    assert not torch.equal(restored.prior, stats.prior)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.prior, stats.prior)
    assert torch.equal(restored.center, stats.center)

    # Resumed and uninterrupted runs continue identically.
    teacher = torch.randn(10, NUM_CLUSTERS)
    stats.update(teacher, TEACHER_TEMP)
    restored.update(teacher, TEACHER_TEMP)
    assert torch.equal(restored.prior, stats.prior)
    assert torch.equal(restored.center, stats.center)


def test_buffers_live_inside_a_parent_module_state_dict() -> None:
    model = torch.nn.Module()
    model.statistics = ClusterStatistics(4, momentum=0.9)
    assert {"statistics.prior", "statistics.center"} <= set(model.state_dict())


def test_update_works_without_a_process_group() -> None:
    assert not distributed_ready()
    tensor = torch.arange(4.0)
    assert all_reduce_sum(tensor) is tensor
    assert torch.equal(tensor, torch.arange(4.0))
    stats = ClusterStatistics(6, momentum=0.0)
    batch = stats.update(torch.randn(3, 6), 0.1)
    assert batch.count.item() == 3


@pytest.mark.parametrize(
    ("num_clusters", "momentum", "field"),
    [(1, 0.5, "num_clusters"), (4, 1.0, "momentum"), (4, -0.1, "momentum")],
)
def test_invalid_arguments_are_rejected(num_clusters: int, momentum: float, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ClusterStatistics(num_clusters, momentum=momentum)


# --- a real two-process gloo group ---------------------------------------------------------


def local_teacher_logits(rank: int, step: int) -> Tensor:
    """Rank ``rank``'s (V_t * B_rank, K) teacher logits at ``step``; different per rank."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    logits = 3 * torch.randn(TEACHER_VIEWS * LOCAL_BATCH[rank], NUM_CLUSTERS, generator=generator)
    logits[:, rank] += 2.0  # each rank prefers another cluster
    return logits


def global_teacher_logits(step: int) -> Tensor:
    return torch.cat([local_teacher_logits(rank, step) for rank in range(WORLD_SIZE)])


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        assert distributed_ready()
        stats = ClusterStatistics(NUM_CLUSTERS, momentum=MOMENTUM)
        steps = []
        for step in range(STEPS):
            batch = stats.update(local_teacher_logits(rank, step), TEACHER_TEMP)
            steps.append(
                {
                    "prior": stats.prior.clone(),
                    "center": stats.center.clone(),
                    "count": batch.count.clone(),
                    "teacher_entropy": batch.teacher_entropy.clone(),
                }
            )
        sinkhorn = teacher_targets(
            local_teacher_logits(rank, 0),
            mode="sinkhorn",
            teacher_temp=0.5,
            sinkhorn_iters=3,
            reduce=all_reduce_sum,
        )
        torch.save({"steps": steps, "sinkhorn": sinkhorn}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """Run `_worker` on two gloo ranks once; returns each rank's saved results."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    out_dir = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_gloo_ranks_agree_with_one_process_on_the_global_batch(
    gloo_results: list[dict[str, list[dict[str, Tensor]]]],
) -> None:
    single = ClusterStatistics(NUM_CLUSTERS, momentum=MOMENTUM)
    for step in range(STEPS):
        batch = single.update(global_teacher_logits(step), TEACHER_TEMP)
        rank0, rank1 = (result["steps"][step] for result in gloo_results)
        # Every rank holds the same statistics (one all-reduce, same arithmetic) ...
        assert torch.equal(rank0["prior"], rank1["prior"])
        assert torch.equal(rank0["center"], rank1["center"])
        # ... which are those of one process that sees the concatenated global batch.
        for rank_result in (rank0, rank1):
            torch.testing.assert_close(rank_result["prior"], single.prior, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(rank_result["center"], single.center, rtol=1e-5, atol=1e-6)
            assert rank_result["count"].item() == TEACHER_VIEWS * sum(LOCAL_BATCH)
            torch.testing.assert_close(
                rank_result["teacher_entropy"], batch.teacher_entropy, rtol=1e-5, atol=1e-6
            )
    # The prior really reflects both ranks: each rank's preferred cluster is above uniform.
    assert (single.prior[:WORLD_SIZE] > 1 / NUM_CLUSTERS).all()


def test_gloo_sinkhorn_equals_one_process_sinkhorn_of_the_global_batch(
    gloo_results: list[dict[str, Tensor]],
) -> None:
    whole = teacher_targets(
        global_teacher_logits(0), mode="sinkhorn", teacher_temp=0.5, sinkhorn_iters=3
    )
    expected = whole.split([TEACHER_VIEWS * size for size in LOCAL_BATCH])
    for rank in range(WORLD_SIZE):
        torch.testing.assert_close(
            gloo_results[rank]["sinkhorn"], expected[rank], rtol=1e-5, atol=1e-7
        )
    # Each rank alone would equipartition differently: the all-reduce matters.
    alone = teacher_targets(
        local_teacher_logits(0, 0), mode="sinkhorn", teacher_temp=0.5, sinkhorn_iters=3
    )
    assert not torch.allclose(alone, expected[0], rtol=1e-3, atol=1e-5)
