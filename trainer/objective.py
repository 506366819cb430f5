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
from typing import Any

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
    which costs O((V_t + V_s) B K) instead of O(V_t V_s B K). The gradient is computed in
    closed form (`_CrossViewLoss`), without autograd's intermediate tensors.

    Args:
        student_logits: (V_s, B, K) student logits.
        targets: (V_t, B, K) teacher target probabilities, V_t <= V_s; constants (the
            teacher gets no gradient).
        student_temp: tau_s > 0.

    Returns:
        Scalar loss, averaged over the batch and the V_t * V_s - V_t pairs.
    """
    student_views, _, _ = student_logits.shape
    teacher_views = targets.shape[0]
    if targets.shape[1:] != student_logits.shape[1:] or teacher_views > student_views:
        raise ValueError(
            f"targets {tuple(targets.shape)} must be (V_t, B, K) with V_t <= V_s for student "
            f"logits {tuple(student_logits.shape)}"
        )
    if teacher_views * student_views - teacher_views == 0:
        raise ValueError("cross_view_loss needs at least one pair of different views")
    if targets.requires_grad:
        raise ValueError("targets must be constants (detach the teacher's side)")
    loss: Tensor = _CrossViewLoss.apply(student_logits, targets, student_temp)
    return loss


class _CrossViewLoss(torch.autograd.Function):
    """`cross_view_loss` with its closed-form gradient.

    With w_j = sum_{i != j} q_i (the targets student view j is trained on), the loss is
    L = -sum_j <w_j, log p_j> / (pairs B), and its gradient with respect to the student
    logits s_j is (p_j * sum_k w_jk - w_j) / (tau_s pairs B). Autograd would keep the
    scaled logits and log p, and run log-softmax's backward and the broadcast sums'; here
    the forward keeps only log p, and the backward turns p = exp(log p) into the gradient
    in place: one tensor of the logits' size.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: Tensor, targets: Tensor, student_temp: float) -> Tensor:
        teacher_views, batch = targets.shape[0], targets.shape[1]
        pairs = teacher_views * student_logits.shape[0] - teacher_views
        # At least float32 (bf16 logits under autocast), float64 stays float64.
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        log_p = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)
        targets = targets.to(dtype)
        summed = targets.sum(dim=0)
        all_pairs = (summed * log_p.sum(dim=0)).sum()
        # A dot product: no temporary of the teacher views' size (K up to 65536).
        same_view = torch.dot(targets.reshape(-1), log_p[:teacher_views].reshape(-1))
        scale = 1.0 / (pairs * batch)
        ctx.save_for_backward(log_p, targets, summed)
        ctx.scale, ctx.student_temp, ctx.dtype = scale, student_temp, student_logits.dtype
        return -(all_pairs - same_view) * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        log_p, targets, summed = ctx.saved_tensors
        teacher_views = targets.shape[0]
        mass = summed.sum(dim=-1, keepdim=True)  # sum_k w_jk for the local views
        grad = torch.exp(log_p)  # p_j, a tensor of its own: log_p stays as saved
        grad[:teacher_views] *= mass - targets.sum(dim=-1, keepdim=True)
        grad[teacher_views:] *= mass
        grad -= summed
        grad[:teacher_views] += targets
        grad *= grad_output * (ctx.scale / ctx.student_temp)
        return grad.to(ctx.dtype), None, None


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=dim)
