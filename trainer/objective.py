"""The KL clustering objective as pure functions (no I/O, no torch.distributed).

Notation of docs/design.md section 1: teacher logits t and student logits s over K clusters,
teacher temperature tau_t, student temperature tau_s, cluster prior pi, center c.

- `teacher_targets` turns teacher logits into the target distribution Q of one mode:
  ``prior``    Q = softmax(t / tau_t - a log pi)    (inverse-prior normalisation)
  ``center``   Q = softmax((t - c) / tau_t)         (its Jensen approximation: DINO)
  ``sinkhorn`` Sinkhorn-Knopp equipartition         (SwAV / DINOv2)
  ``none``     Q = softmax(t / tau_t)               (control; it collapses)
- `cross_view_loss` is the cross-entropy H(Q_i, P_s_j) = KL(Q_i || P_s_j) + H(Q_i)
  averaged over every pair of teacher view i and student view j with i != j.

The distributed parts (all-reducing pi, c or Sinkhorn's sums) are passed in: the
statistics arrive as tensors and Sinkhorn takes an optional ``reduce`` function, so every
function here stays a pure function of its inputs and runs in one CPU process.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.config import NormalisationMode

Reduce = Callable[[Tensor], Tensor]
"""A sum over workers (an all-reduce); the identity in one process."""

MODES: tuple[NormalisationMode, ...] = ("prior", "center", "sinkhorn", "none")


def teacher_targets(
    teacher_logits: Tensor,
    *,
    mode: NormalisationMode,
    teacher_temp: float,
    prior: Tensor | None = None,
    center: Tensor | None = None,
    prior_power: float = 1.0,
    sinkhorn_iters: int = 3,
    reduce: Reduce | None = None,
) -> Tensor:
    """Teacher target distributions Q(y|x) for one normalisation mode.

    Args:
        teacher_logits: (B, K) teacher logits (any leading shape (..., K) works; Sinkhorn
            treats all leading dimensions as one batch). Gradients never flow through.
        mode: one of ``prior``, ``center``, ``sinkhorn``, ``none``.
        teacher_temp: tau_t > 0.
        prior: (K,) cluster prior pi as probabilities; required by ``prior``.
        center: (K,) center c in logit units; required by ``center``.
        prior_power: the exponent a in softmax(t / tau_t - a log pi), in [0, 1].
        sinkhorn_iters: Sinkhorn-Knopp iterations.
        reduce: sum over workers applied to Sinkhorn's global sums (None: one process).

    Returns:
        (B, K) float32 probabilities, each row summing to one.
    """
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    logits = teacher_logits.detach().float() / teacher_temp
    if mode == "none":
        return F.softmax(logits, dim=-1)
    if mode == "prior":
        if prior is None:
            raise ValueError("mode 'prior' needs the cluster prior `prior` (K,)")
        return F.softmax(logits - prior_power * log_prior_floored(prior), dim=-1)
    if mode == "center":
        if center is None:
            raise ValueError("mode 'center' needs the logit center `center` (K,)")
        return F.softmax(logits - center.detach().float() / teacher_temp, dim=-1)
    if mode == "sinkhorn":
        return _sinkhorn_knopp(logits, iterations=sinkhorn_iters, reduce=reduce)
    raise ValueError(f"unknown normalisation mode {mode!r}; valid modes: {', '.join(MODES)}")


PRIOR_FLOOR = 1e-6
"""log pi is floored at PRIOR_FLOOR / K: a cluster the prior has never seen gets a
large but bounded boost (log(1e6) ~ 13.8 nats), not the ~87 nats of float32's smallest
number, which would put all of Q's mass on that one empty cluster."""


def log_prior_floored(prior: Tensor) -> Tensor:
    """log(max(pi, PRIOR_FLOOR / K)) in float32, detached."""
    floor = PRIOR_FLOOR / prior.shape[-1]
    return torch.log(prior.detach().float().clamp_min(floor))


def _sinkhorn_knopp(scaled_logits: Tensor, *, iterations: int, reduce: Reduce | None) -> Tensor:
    """Equipartition of the global batch over clusters, as in SwAV and DINOv2.

    Works in float64: a per-worker shift for numerical safety would not cancel across
    workers, and float64's range covers logits / tau_t up to about 700.
    """
    reduce = reduce or _identity
    shape = scaled_logits.shape
    q = torch.exp(scaled_logits.reshape(-1, shape[-1]).double()).t()  # (K, B)
    # Every rank must learn of an overflow on any rank, or the others would wait forever
    # in the next all-reduce: so the check itself is reduced.
    overflowed = reduce((~torch.isfinite(q)).any().to(q.dtype).reshape(1))
    if overflowed.item() > 0:
        raise FloatingPointError(
            "sinkhorn: exp(teacher_logits / teacher_temp) overflowed; logits are too large "
            "for this temperature"
        )
    num_clusters = q.shape[0]
    batch = reduce(torch.tensor(float(q.shape[1]), dtype=q.dtype, device=q.device))
    q /= reduce(q.sum())
    for _ in range(iterations):
        q /= reduce(q.sum(dim=1, keepdim=True))  # every cluster gets 1/K of the mass
        q /= num_clusters
        q /= q.sum(dim=0, keepdim=True)  # every sample gets 1/B of the mass
        q /= batch
    q *= batch
    return q.t().float().reshape(shape)


def _identity(x: Tensor) -> Tensor:
    return x


def cross_view_loss(student_logits: Tensor, targets: Tensor, *, student_temp: float) -> Tensor:
    """Mean cross-entropy H(Q_i, P_s_j) over all pairs (teacher view i, student view j != i).

    The student views are ordered with the V_t global (teacher) views first, so teacher
    view i and student view i are the same crop and that pair is skipped. Instead of
    looping over V_t * V_s pairs, the sum over pairs factorises:
    sum_{i != j} <q_i, log p_j> = <sum_i q_i, sum_j log p_j> - sum_i <q_i, log p_i>,
    which costs O((V_t + V_s) B K) instead of O(V_t V_s B K).

    Args:
        student_logits: (V_s, B, K) student logits.
        targets: (V_t, B, K) teacher target probabilities, V_t <= V_s.
        student_temp: tau_s > 0.

    Returns:
        Scalar loss, averaged over the batch and the V_t * V_s - V_t pairs.
    """
    student_views, batch, _ = student_logits.shape
    teacher_views = targets.shape[0]
    if targets.shape[1:] != student_logits.shape[1:] or teacher_views > student_views:
        raise ValueError(
            f"targets {tuple(targets.shape)} must be (V_t, B, K) with V_t <= V_s for student "
            f"logits {tuple(student_logits.shape)}"
        )
    pairs = teacher_views * student_views - teacher_views
    if pairs == 0:
        raise ValueError("cross_view_loss needs at least one pair of different views")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    targets = targets.float()
    all_pairs = (targets.sum(dim=0) * log_p.sum(dim=0)).sum()
    same_view = (targets * log_p[:teacher_views]).sum()
    return -(all_pairs - same_view) / (pairs * batch)


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=dim)
