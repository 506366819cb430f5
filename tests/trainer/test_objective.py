"""The objective against references written from the published formulas.

- `center` mode + `ClusterStatistics` in the "previous" order against DINO's DINOLoss
  (main_dino.py: forward, then update_center), step by step;
- `prior` mode against softmax(t / tau_t - a log pi), and its effect on a skewed teacher;
- `sinkhorn` against DINOv2's sinkhorn_knopp_teacher, its equipartition, and its `reduce`
  hook on a batch split over two (thread-simulated) workers;
- `cross_view_loss` against a naive loop over view pairs, and the errors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import NormalisationMode
from trainer.objective import MODES, cross_view_loss, entropy, teacher_targets
from trainer.statistics import ClusterStatistics

STUDENT_TEMP = 0.1
CENTER_MOMENTUM = 0.9


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class DinoLossReference:
    """DINO's loss as published (main_dino.py, DINOLoss), single process.

    Flat layout as in DINO: student (V_s * B, K) and teacher (V_t * B, K), views first.
    The targets use the center of the *previous* step; the center is updated afterwards
    with the batch mean over all teacher views.
    """

    def __init__(self, num_clusters: int, num_crops: int, num_global: int) -> None:
        self.num_crops = num_crops
        self.num_global = num_global
        self.center = torch.zeros(1, num_clusters)

    def __call__(self, student_output: Tensor, teacher_output: Tensor, temp: float) -> Tensor:
        student_out = (student_output / STUDENT_TEMP).chunk(self.num_crops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1)
        teacher_chunks = teacher_out.detach().chunk(self.num_global)
        total_loss = torch.zeros(())
        n_loss_terms = 0
        for iq, q in enumerate(teacher_chunks):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss = total_loss + loss.mean()
                n_loss_terms += 1
        total_loss = total_loss / n_loss_terms
        self.update_center(teacher_output)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        batch_center = batch_center / len(teacher_output)
        self.center = self.center * CENTER_MOMENTUM + batch_center * (1 - CENTER_MOMENTUM)


def dinov2_sinkhorn(teacher_output: Tensor, teacher_temp: float, iterations: int) -> Tensor:
    """DINOv2's SinkhornKnoppTeacher.sinkhorn_knopp_teacher, world size 1."""
    teacher_output = teacher_output.double()
    q = torch.exp(teacher_output / teacher_temp).t()
    batch = q.shape[1]
    num_clusters = q.shape[0]
    q /= torch.sum(q)
    for _ in range(iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= num_clusters
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def pair_loop_loss(student_logits: Tensor, targets: Tensor, student_temp: float) -> Tensor:
    """Naive float64 mean of H(targets_i, softmax(student_j / tau_s)) over pairs i != j."""
    log_p = F.log_softmax(student_logits.double() / student_temp, dim=-1)
    terms = [
        -(targets[i].double() * log_p[j]).sum(dim=-1).mean()
        for i in range(targets.shape[0])
        for j in range(student_logits.shape[0])
        if i != j
    ]
    return torch.stack(terms).mean()


def thread_all_reduce(world_size: int) -> list[Callable[[Tensor], Tensor]]:
    """One in-place sum-over-workers function per simulated worker (threads + barrier).

    Like ``dist.all_reduce``: every worker calls it with its tensor in the same order,
    blocks until all have, and gets the sum written into its tensor.
    """
    barrier = threading.Barrier(world_size, timeout=30)
    slots: list[Tensor | None] = [None] * world_size

    def for_rank(rank: int) -> Callable[[Tensor], Tensor]:
        def reduce(tensor: Tensor) -> Tensor:
            slots[rank] = tensor.clone()
            barrier.wait()
            total = torch.stack([slot for slot in slots if slot is not None]).sum(dim=0)
            barrier.wait()  # everyone has read the slots before they are overwritten
            return tensor.copy_(total)

        return reduce

    return [for_rank(rank) for rank in range(world_size)]


def run_workers(
    world_size: int, fn: Callable[[int, Callable[[Tensor], Tensor]], Tensor]
) -> list[Tensor]:
    """Run ``fn(rank, reduce)`` on ``world_size`` threads sharing one simulated all-reduce."""
    reduces = thread_all_reduce(world_size)
    results: list[Tensor | None] = [None] * world_size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank, reduces[rank])
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    assert all(result is not None for result in results)
    return [result for result in results if result is not None]


# --- center mode = DINO --------------------------------------------------------------------


@pytest.mark.parametrize("num_clusters", [3, 256])
@pytest.mark.parametrize("student_views", [2, 6])
@pytest.mark.parametrize("teacher_views", [2, 1])
@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_center_mode_reproduces_dino_loss_and_center(
    batch_size: int, teacher_views: int, student_views: int, num_clusters: int
) -> None:
    generator = torch.Generator().manual_seed(batch_size * 1000 + student_views * 10 + num_clusters)
    reference = DinoLossReference(num_clusters, student_views, teacher_views)
    stats = ClusterStatistics(num_clusters, momentum=CENTER_MOMENTUM)
    # A teacher-temperature warm-up, so the step and the temperature both change.
    for step, teacher_temp in enumerate([0.04, 0.055, 0.07]):
        student = 2 * torch.randn(student_views, batch_size, num_clusters, generator=generator)
        teacher = 2 * torch.randn(teacher_views, batch_size, num_clusters, generator=generator)
        teacher += torch.linspace(-1, 1, num_clusters)  # a drift for the center to follow

        student_ref = student.clone().requires_grad_()
        loss_ref = reference(
            student_ref.reshape(-1, num_clusters), teacher.reshape(-1, num_clusters), teacher_temp
        )
        loss_ref.backward()

        # "previous" order: targets from the statistics before this step's update().
        targets = teacher_targets(
            teacher, mode="center", teacher_temp=teacher_temp, center=stats.center
        )
        stats.update(teacher.reshape(-1, num_clusters), teacher_temp)
        student_ours = student.clone().requires_grad_()
        loss = cross_view_loss(student_ours, targets, student_temp=STUDENT_TEMP)
        loss.backward()

        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        torch.testing.assert_close(stats.center, reference.center.squeeze(0), rtol=1e-6, atol=1e-6)
        assert student_ours.grad is not None and student_ref.grad is not None
        # Float precision relative to the largest gradient: with B = 1 and tau_s = 0.1 the
        # entries reach 10; a few float32 ulps of that bound any entry's rounding.
        scale = float(student_ref.grad.abs().max())
        torch.testing.assert_close(
            student_ours.grad, student_ref.grad, rtol=1e-4, atol=1e-6 * scale
        )
    assert stats.center.abs().sum() > 0  # the center really moved


def test_center_mode_equals_shifted_softmax() -> None:
    teacher = torch.randn(2, 5, 11)
    center = torch.randn(11)
    targets = teacher_targets(teacher, mode="center", teacher_temp=0.07, center=center)
    expected = torch.softmax((teacher.double() - center.double()) / 0.07, dim=-1)
    torch.testing.assert_close(targets.double(), expected, rtol=1e-5, atol=1e-7)


# --- prior mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("prior_power", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(9, 32), (2, 4, 5)])
def test_prior_mode_is_softmax_minus_power_log_prior(
    prior_power: float, shape: tuple[int, ...]
) -> None:
    generator = torch.Generator().manual_seed(7)
    teacher = 3 * torch.randn(*shape, generator=generator)
    prior = torch.softmax(2 * torch.randn(shape[-1], generator=generator), dim=0)
    targets = teacher_targets(
        teacher, mode="prior", teacher_temp=0.1, prior=prior, prior_power=prior_power
    )
    expected = torch.softmax(teacher.double() / 0.1 - prior_power * prior.double().log(), dim=-1)
    assert targets.shape == teacher.shape and targets.dtype == torch.float32
    torch.testing.assert_close(targets.double(), expected, rtol=1e-5, atol=1e-7)
    if prior_power == 0.0:
        none = teacher_targets(teacher, mode="none", teacher_temp=0.1)
        torch.testing.assert_close(targets, none)


def test_prior_mode_with_uniform_prior_equals_none() -> None:
    teacher = 4 * torch.randn(3, 16, 40)
    uniform = torch.full((40,), 1 / 40)
    prior = teacher_targets(teacher, mode="prior", teacher_temp=0.04, prior=uniform)
    none = teacher_targets(teacher, mode="none", teacher_temp=0.04)
    torch.testing.assert_close(prior, none, rtol=1e-5, atol=1e-7)
    # float32 logits / tau_t up to ~400: relative error ~ 400 * 2^-24 in the exponent.
    expected = torch.softmax(teacher.double() / 0.04, dim=-1)
    torch.testing.assert_close(none.double(), expected, rtol=1e-4, atol=1e-6)


def test_prior_mode_flattens_a_skewed_batch_marginal() -> None:
    num_clusters, teacher_temp = 16, 0.5
    generator = torch.Generator().manual_seed(3)
    teacher = torch.randn(256, num_clusters, generator=generator)
    teacher[:, 0] += 2.0  # cluster 0 dominates the raw teacher
    stats = ClusterStatistics(num_clusters, momentum=0.0)
    stats.update(teacher, teacher_temp)  # momentum 0: pi is this batch's marginal

    def kl_to_uniform(targets: Tensor) -> float:
        return math.log(num_clusters) - entropy(targets.mean(dim=0)).item()

    none = teacher_targets(teacher, mode="none", teacher_temp=teacher_temp)
    prior = teacher_targets(teacher, mode="prior", teacher_temp=teacher_temp, prior=stats.prior)
    assert none.mean(dim=0)[0] > 0.3  # the skew is real
    assert kl_to_uniform(none) > 0.3
    assert kl_to_uniform(prior) < 0.25 * kl_to_uniform(none)
    assert prior.mean(dim=0)[0] < 0.5 * none.mean(dim=0)[0]
    # Per sample, prior normalisation keeps each row a distribution.
    torch.testing.assert_close(prior.sum(dim=-1), torch.ones(256))


def test_prior_mode_tolerates_a_zero_prior_entry() -> None:
    prior = torch.tensor([0.5, 0.5, 0.0])
    targets = teacher_targets(torch.randn(4, 3), mode="prior", teacher_temp=0.1, prior=prior)
    assert torch.isfinite(targets).all()
    torch.testing.assert_close(targets.sum(dim=-1), torch.ones(4))


# --- sinkhorn ------------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_matches_dinov2_reference(iterations: int) -> None:
    teacher = torch.randn(48, 20, generator=torch.Generator().manual_seed(iterations))
    targets = teacher_targets(teacher, mode="sinkhorn", teacher_temp=0.1, sinkhorn_iters=iterations)
    expected = dinov2_sinkhorn(teacher, 0.1, iterations)
    assert targets.dtype == torch.float32
    torch.testing.assert_close(targets.double(), expected, rtol=1e-5, atol=1e-7)


def test_sinkhorn_targets_are_near_equipartitioned() -> None:
    batch, num_clusters, teacher_temp = 128, 16, 0.5
    teacher = torch.randn(batch, num_clusters, generator=torch.Generator().manual_seed(1))
    teacher[:, 0] += 2.0  # skewed, so equipartition has work to do
    none = teacher_targets(teacher, mode="none", teacher_temp=teacher_temp)
    targets = teacher_targets(teacher, mode="sinkhorn", teacher_temp=teacher_temp)
    even = batch / num_clusters

    torch.testing.assert_close(targets.sum(dim=1), torch.ones(batch))  # rows: distributions
    assert (targets >= 0).all()
    deviation = (targets.sum(dim=0) - even).abs().max().item()
    assert deviation < 0.25 * even  # 3 iterations: near uniform
    assert deviation < 0.1 * (none.sum(dim=0) - even).abs().max().item()
    converged = teacher_targets(
        teacher, mode="sinkhorn", teacher_temp=teacher_temp, sinkhorn_iters=30
    )
    torch.testing.assert_close(
        converged.sum(dim=0), torch.full((num_clusters,), even), rtol=1e-4, atol=0
    )


def test_sinkhorn_treats_leading_dimensions_as_one_batch() -> None:
    teacher = torch.randn(2, 10, 6)
    targets = teacher_targets(teacher, mode="sinkhorn", teacher_temp=0.2)
    flat = teacher_targets(teacher.reshape(20, 6), mode="sinkhorn", teacher_temp=0.2)
    assert targets.shape == (2, 10, 6)
    torch.testing.assert_close(targets.reshape(20, 6), flat)


@pytest.mark.parametrize("split", [(8, 8), (5, 11)])
def test_sinkhorn_with_reduce_over_halves_equals_whole_batch(split: tuple[int, int]) -> None:
    teacher = torch.randn(sum(split), 12, generator=torch.Generator().manual_seed(sum(split)))
    whole = teacher_targets(teacher, mode="sinkhorn", teacher_temp=0.1, sinkhorn_iters=3)
    halves = teacher.split(list(split))

    def worker(rank: int, reduce: Callable[[Tensor], Tensor]) -> Tensor:
        return teacher_targets(
            halves[rank], mode="sinkhorn", teacher_temp=0.1, sinkhorn_iters=3, reduce=reduce
        )

    parts = run_workers(2, worker)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-7)
    # Without the reduce, each half would be equipartitioned on its own: different targets.
    alone = teacher_targets(halves[0], mode="sinkhorn", teacher_temp=0.1)
    assert not torch.allclose(alone, parts[0], rtol=1e-3, atol=1e-5)


def test_sinkhorn_overflow_is_an_error() -> None:
    teacher = torch.tensor([[1000.0, 0.0], [0.0, 1.0]])
    with pytest.raises(FloatingPointError, match="overflow"):
        teacher_targets(teacher, mode="sinkhorn", teacher_temp=0.04)


# --- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_only_the_student_gets_gradients(mode: NormalisationMode) -> None:
    num_clusters = 8
    teacher = torch.randn(2, 4, num_clusters, requires_grad=True)
    student = torch.randn(5, 4, num_clusters, requires_grad=True)
    prior = torch.softmax(torch.randn(num_clusters), dim=0).requires_grad_()
    center = torch.randn(num_clusters, requires_grad=True)
    targets = teacher_targets(
        teacher,
        mode=mode,
        teacher_temp=0.1,
        prior=prior,
        center=center,
    )
    assert targets.grad_fn is None and not targets.requires_grad
    loss = cross_view_loss(student, targets, student_temp=STUDENT_TEMP)
    loss.backward()
    assert teacher.grad is None and prior.grad is None and center.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


# --- cross_view_loss -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("teacher_views", "student_views"), [(1, 2), (1, 5), (2, 2), (2, 8), (3, 4)]
)
@pytest.mark.parametrize("batch_size", [1, 6])
def test_cross_view_loss_matches_pair_loop(
    teacher_views: int, student_views: int, batch_size: int
) -> None:
    generator = torch.Generator().manual_seed(teacher_views * 10 + student_views)
    num_clusters = 17
    student = 3 * torch.randn(student_views, batch_size, num_clusters, generator=generator)
    student.requires_grad_()
    targets = torch.softmax(
        4 * torch.randn(teacher_views, batch_size, num_clusters, generator=generator), dim=-1
    )
    loss = cross_view_loss(student, targets, student_temp=0.2)
    student_ref = student.detach().double().requires_grad_()
    expected = pair_loop_loss(student_ref, targets, 0.2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    assert student.grad is not None and student_ref.grad is not None
    torch.testing.assert_close(student.grad.double(), student_ref.grad, rtol=1e-4, atol=1e-7)


def factorised_autograd_loss(
    student: torch.Tensor, targets: torch.Tensor, temp: float
) -> torch.Tensor:
    """The factorised loss differentiated by autograd (before the closed-form gradient)."""
    teacher_views, batch = targets.shape[0], targets.shape[1]
    pairs = teacher_views * student.shape[0] - teacher_views
    log_p = torch.log_softmax(student / temp, dim=-1)
    all_pairs = (targets.sum(dim=0) * log_p.sum(dim=0)).sum()
    return -(all_pairs - (targets * log_p[:teacher_views]).sum()) / (pairs * batch)


@pytest.mark.parametrize(("teacher_views", "student_views"), [(1, 2), (2, 2), (2, 10), (3, 3)])
def test_the_closed_form_gradient_equals_autograds_in_double_precision(
    teacher_views: int, student_views: int
) -> None:
    generator = torch.Generator().manual_seed(teacher_views * 100 + student_views)
    student = 3 * torch.randn(student_views, 5, 33, generator=generator, dtype=torch.float64)
    # Sinkhorn's targets need not sum to exactly 1 per image: the gradient must not assume it.
    targets = torch.rand(teacher_views, 5, 33, generator=generator, dtype=torch.float64)
    ours = student.clone().requires_grad_()
    autograd = student.clone().requires_grad_()
    loss = cross_view_loss(ours, targets, student_temp=0.1)
    expected = factorised_autograd_loss(autograd, targets, 0.1)
    (2.5 * loss).backward()  # a non-unit upstream gradient
    (2.5 * expected).backward()
    assert ours.grad is not None and autograd.grad is not None
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ours.grad, autograd.grad, rtol=1e-6, atol=1e-9)


def test_the_gradient_comes_back_in_the_logits_dtype_and_targets_are_constants() -> None:
    student = torch.randn(4, 3, 8, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.softmax(torch.randn(2, 3, 8), dim=-1)
    cross_view_loss(student, targets, student_temp=0.1).backward()
    assert student.grad is not None and student.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="targets must be constants"):
        cross_view_loss(student, targets.requires_grad_(), student_temp=0.1)


def test_cross_view_loss_is_cross_entropy_kl_plus_entropy() -> None:
    # One pair: the loss is H(q, p) = KL(q || p) + H(q).
    student = torch.randn(2, 3, 10)
    targets = torch.softmax(torch.randn(1, 3, 10), dim=-1)
    loss = cross_view_loss(student, targets, student_temp=0.5)
    p = torch.softmax(student[1] / 0.5, dim=-1)
    kl = (targets[0] * (targets[0].log() - p.log())).sum(dim=-1)
    torch.testing.assert_close(loss, (kl + entropy(targets[0])).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("student_shape", "target_shape"),
    [
        ((4, 3, 10), (2, 5, 10)),  # batch differs
        ((4, 3, 10), (2, 3, 11)),  # K differs
        ((2, 3, 10), (3, 3, 10)),  # more teacher than student views
    ],
)
def test_cross_view_loss_rejects_mismatched_shapes(
    student_shape: tuple[int, ...], target_shape: tuple[int, ...]
) -> None:
    targets = torch.softmax(torch.randn(target_shape), dim=-1)
    with pytest.raises(ValueError, match="must be"):
        cross_view_loss(torch.randn(student_shape), targets, student_temp=0.1)


def test_cross_view_loss_needs_a_pair() -> None:
    targets = torch.softmax(torch.randn(1, 3, 10), dim=-1)
    with pytest.raises(ValueError, match="at least one pair"):
        cross_view_loss(torch.randn(1, 3, 10), targets, student_temp=0.1)


# --- errors --------------------------------------------------------------------------------


def test_unknown_mode_lists_the_valid_modes() -> None:
    with pytest.raises(ValueError, match="unknown normalisation mode 'dino'") as error:
        teacher_targets(torch.randn(2, 4), mode="dino", teacher_temp=0.1)  # type: ignore[arg-type]
    for mode in ("prior", "center", "sinkhorn", "none"):
        assert mode in str(error.value)


def test_prior_mode_needs_a_prior() -> None:
    with pytest.raises(ValueError, match="prior"):
        teacher_targets(torch.randn(2, 4), mode="prior", teacher_temp=0.1)


def test_center_mode_needs_a_center() -> None:
    with pytest.raises(ValueError, match="center"):
        teacher_targets(torch.randn(2, 4), mode="center", teacher_temp=0.1)


@pytest.mark.parametrize("teacher_temp", [0.0, -0.1])
def test_teacher_temperature_must_be_positive(teacher_temp: float) -> None:
    with pytest.raises(ValueError, match="teacher_temp"):
        teacher_targets(torch.randn(2, 4), mode="none", teacher_temp=teacher_temp)
