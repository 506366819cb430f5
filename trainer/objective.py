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
    if mode == "none":
        return _shifted_softmax(teacher_logits, teacher_temp, None)
    if mode == "prior":
        if prior is None:
            raise ValueError("mode 'prior' needs the cluster prior `prior` (K,)")
        return _shifted_softmax(
            teacher_logits, teacher_temp, prior_power * log_prior_floored(prior)
        )
    if mode == "center":
        if center is None:
            raise ValueError("mode 'center' needs the logit center `center` (K,)")
        return _shifted_softmax(
            teacher_logits, teacher_temp, center.detach().float() / teacher_temp
        )
    if mode == "sinkhorn":
        logits = teacher_logits.detach().float() / teacher_temp
        return _sinkhorn_knopp(logits, iterations=sinkhorn_iters, reduce=reduce)
    raise ValueError(f"unknown normalisation mode {mode!r}; valid modes: {', '.join(MODES)}")


CACHE_BYTES = 4 * 1024 * 1024
"""Float32 data the CPU paths here handle at a time: small enough to stay in the cache
across the several passes a chunk needs (at K = 65536 a single row is 256 KB)."""


def cache_rows(rows: int, row_elements: int, device: torch.device) -> list[slice]:
    """Slices of ``rows`` rows of ``row_elements`` float32 values each, a few at a time on
    the CPU, where memory traffic rather than arithmetic bounds these passes (each chunk
    is read from memory once and its temporaries stay in the cache; no temporary of the
    whole tensor is allocated and first touched); all at once on an accelerator, whose
    caching allocator and bandwidth make one pass the fastest."""
    if device.type != "cpu":
        return [slice(0, rows)]
    step = max(1, CACHE_BYTES // (4 * row_elements))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def _shifted_softmax(teacher_logits: Tensor, teacher_temp: float, shift: Tensor | None) -> Tensor:
    """softmax(t / tau_t - shift) over the last dimension, in float32."""
    shape = teacher_logits.shape
    flat = teacher_logits.detach().reshape(-1, shape[-1])
    out = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    for rows in cache_rows(flat.shape[0], flat.shape[1], flat.device):
        scaled = flat[rows].float() / teacher_temp
        if shift is not None:
            scaled -= shift
        out[rows] = F.softmax(scaled, dim=-1)
    return out.reshape(shape)


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


def _image_chunks(logits: Tensor) -> list[slice]:
    """Slices of the batch dimension of (V, B, K) logits: all views of a few images."""
    views, batch, clusters = logits.shape
    return cache_rows(batch, views * clusters, logits.device)


class _CrossViewLoss(torch.autograd.Function):
    """`cross_view_loss` with its closed-form gradient, keeping only log-normalisers.

    With w_j = sum_{i != j} q_i (the targets student view j is trained on), m_j = sum_k
    w_jk, x_j = s_j / tau_s and its log-normaliser l_j = logsumexp_k x_j, the loss is
    L = -sum_j (<w_j, x_j> - m_j l_j) / (pairs B), and its gradient with respect to s_j
    is (m_j softmax(x_j) - w_j) / (tau_s pairs B). So the forward keeps only l (as its
    two terms, the row maximum and the log-sum: two numbers per view and image) besides
    the logits, which the training step holds anyway, and the backward rebuilds
    softmax(x_j) = exp(x_j - max_j - logsum_j) from them: no tensor of the logits' size
    is kept between the two, and the only one made is the gradient.
    On the CPU both passes go a few images at a time (`_image_chunks`), so each reads the
    logits from memory once and its temporaries stay in the cache.
    """

    @staticmethod
    def forward(ctx: Any, student_logits: Tensor, targets: Tensor, student_temp: float) -> Tensor:
        teacher_views, batch = targets.shape[0], targets.shape[1]
        pairs = teacher_views * student_logits.shape[0] - teacher_views
        # At least float32 (bf16 logits under autocast), float64 stays float64.
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        targets = targets.to(dtype)
        summed = targets.sum(dim=0)  # (B, K): the targets of a local view
        # l_j = max_j + log sum_k exp(x_jk - max_j), its two terms kept apart: the
        # backward's x - max is then exact where it matters (the largest entries), as in
        # log_softmax, where x - l would round at the magnitude of x.
        peak = student_logits.new_empty(student_logits.shape[:2], dtype=dtype)
        log_sum = torch.empty_like(peak)
        total = torch.zeros((), dtype=dtype, device=student_logits.device)
        for images in _image_chunks(student_logits):
            scaled = student_logits[:, images].to(dtype) / student_temp  # (V_s, b, K)
            # sum_j <w_j, x_j> = <sum_i q_i, sum_j x_j> - sum_i <q_i, x_i>
            total += torch.dot(summed[images].reshape(-1), scaled.sum(dim=0).reshape(-1))
            total -= torch.dot(targets[:, images].reshape(-1), scaled[:teacher_views].reshape(-1))
            maxima = scaled.amax(dim=-1)
            peak[:, images] = maxima
            log_sum[:, images] = scaled.sub_(maxima[..., None]).exp_().sum(dim=-1).log_()
        # m_j per view and image: the whole target mass, less a teacher view's own.
        mass = summed.sum(dim=-1).expand(peak.shape).clone()  # (V_s, B)
        mass[:teacher_views] -= targets.sum(dim=-1)
        total -= torch.dot(mass.reshape(-1), (peak + log_sum).reshape(-1))
        scale = 1.0 / (pairs * batch)
        ctx.save_for_backward(student_logits, peak, log_sum, targets, summed, mass)
        ctx.scale, ctx.student_temp = scale, student_temp
        return -total * scale

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        student_logits, peak, log_sum, targets, summed, mass = ctx.saved_tensors
        teacher_views = targets.shape[0]
        factor = grad_output * (ctx.scale / ctx.student_temp)
        grad = torch.empty_like(student_logits)
        for images in _image_chunks(student_logits):
            scaled = student_logits[:, images].to(peak.dtype) / ctx.student_temp
            # m_j softmax(x_j) - w_j, with w_j = summed - q_j for the teacher views
            scaled -= peak[:, images, None]
            part = scaled.sub_(log_sum[:, images, None]).exp_()
            part *= mass[:, images, None]
            part -= summed[images]
            part[:teacher_views] += targets[:, images]
            part *= factor
            grad[:, images] = part
        return grad, None, None


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum(dim=dim)
