"""Cluster statistics: the prior pi (probabilities) and the center c (logits).

Both are exponential moving averages over steps of a *global* batch quantity: the
teacher's cluster marginal E_x[softmax(t / tau_t)] for pi and the mean teacher logit for
c, summed over every teacher view and every worker. They are buffers, so they sit in
checkpoints with the model, and they change only through the explicit `update()` call,
which all-reduces when a process group exists and works without one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.objective import cache_rows


def distributed_ready() -> bool:
    """True when collectives can run (a process group is initialised)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over workers (in place, also returned); identity in one process."""
    if distributed_ready():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@dataclass(frozen=True)
class BatchStatistics:
    """What one update measured on the global batch (all workers, all teacher views)."""

    prior: Tensor
    """(K,) the batch cluster marginal E_x[P_t(y|x)]."""
    center: Tensor
    """(K,) the batch mean teacher logit."""
    teacher_entropy: Tensor
    """() E_x[H(P_t(.|x))], the mean entropy of the raw teacher."""
    count: Tensor
    """() teacher outputs in the global batch (images x teacher views x workers)."""
    logit_square: Tensor
    """() E_x[||t(x)||^2], the mean squared norm of the teacher logits (for the spread)."""

    @property
    def logit_spread(self) -> Tensor:
        """sqrt(mean_k Var_x[t_k(x)]): how much the teacher's logits differ between images.

        Temperature-free (cosine logits lie in [-1, 1]) and an unbiased-in-the-limit
        spread whatever the batch size: 0 exactly when every image gets the same logits,
        the collapse that no temperature or prior can undo.
        """
        variance = (self.logit_square - self.center.square().sum()) / self.center.numel()
        return variance.clamp_min(0).sqrt()


class ClusterStatistics(nn.Module):
    """EMA estimates of the cluster prior pi and the logit center c.

    Args:
        num_clusters: K.
        momentum: m in pi <- m pi + (1 - m) pi_batch (0: the batch marginal itself).
    """

    prior: Tensor
    center: Tensor

    def __init__(self, num_clusters: int, momentum: float) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.register_buffer("prior", torch.full((num_clusters,), 1.0 / num_clusters))
        self.register_buffer("center", torch.zeros(num_clusters))

    @torch.no_grad()
    def measure(self, teacher_logits: Tensor, teacher_temp: float) -> BatchStatistics:
        """Global-batch statistics of ``teacher_logits`` (N, K), in one all-reduce."""
        k = self.prior.numel()
        logits = teacher_logits.detach().reshape(-1, k)
        # One flat buffer, so a step costs a single collective of 2K + 3 floats:
        # sum_x P_t, sum_x t, sum_x H(P_t(.|x)), sum_x |t|^2 and the count.
        sums = torch.zeros(2 * k + 3, dtype=torch.float32, device=logits.device)
        prob_sum, logit_sum = sums[:k], sums[k : 2 * k]
        # A few rows at a time (`cache_rows`): every measure of a chunk comes from one
        # read of it, and log P_t replaces the scaled logits in place, so the entropies
        # are one dot product, sum_x H(P_t(.|x)) = -<P_t, log P_t>.
        for rows in cache_rows(logits.shape[0], k, logits.device):
            chunk = logits[rows].float()
            logit_sum += chunk.sum(dim=0)
            sums[2 * k + 1] += torch.dot(chunk.reshape(-1), chunk.reshape(-1))
            log_probs = chunk / teacher_temp
            log_probs -= torch.logsumexp(log_probs, dim=-1, keepdim=True)
            probs = log_probs.exp()
            prob_sum += probs.sum(dim=0)
            sums[2 * k] -= torch.dot(probs.reshape(-1), log_probs.reshape(-1))
        sums[-1] = float(logits.shape[0])
        all_reduce_sum(sums)
        count = sums[-1]
        return BatchStatistics(
            prior=sums[:k] / count,
            center=sums[k : 2 * k] / count,
            teacher_entropy=sums[2 * k] / count,
            count=count,
            logit_square=sums[2 * k + 1] / count,
        )

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, teacher_temp: float) -> BatchStatistics:
        """Fold this global batch into pi and c; returns what it measured.

        Args:
            teacher_logits: (N, K) local teacher logits of every teacher view.
            teacher_temp: tau_t used for the raw teacher P_t = softmax(t / tau_t).
        """
        batch = self.measure(teacher_logits, teacher_temp)
        self.prior.mul_(self.momentum).add_(batch.prior.to(self.prior), alpha=1 - self.momentum)
        self.center.mul_(self.momentum).add_(batch.center.to(self.center), alpha=1 - self.momentum)
        return batch
