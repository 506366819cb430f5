"""Cost of one step of the objective: statistics update + teacher targets + loss + backward.

Compares our implementation (`trainer.statistics.ClusterStatistics`,
`trainer.objective.teacher_targets`, `trainer.objective.cross_view_loss`) in the modes
``prior`` and ``center`` with a reference DINO loss written here from the published
formulas (DINOLoss.forward + update_center of DINO's main_dino.py: a loop over the view
pairs). Both run in the same process on the same inputs, in alternating rounds (the order
rotates every round); the median time of each is reported with the ratio
ours / reference (target: <= 1.0), and the median of the per-round ratios.

Default sizes are DINO's ViT setting: K = 65536 prototypes, batch 256, 2 global + 8 local
views, i.e. student logits (10, 256, K) with requires_grad and teacher logits (2, 256, K).

    .venv/bin/python benchmarks/objective.py                # full size (about 2 min on 2 cores)
    .venv/bin/python benchmarks/objective.py --quick        # small smoke run (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.objective import cross_view_loss, teacher_targets
from trainer.statistics import ClusterStatistics

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "objective.json"


def factorised_autograd_loss(student: Tensor, targets: Tensor, student_temp: float) -> Tensor:
    """`cross_view_loss`'s factorisation, differentiated by autograd (before the closed form)."""
    teacher_views, batch = targets.shape[0], targets.shape[1]
    pairs = teacher_views * student.shape[0] - teacher_views
    log_p = F.log_softmax(student.float() / student_temp, dim=-1)
    all_pairs = (targets.sum(dim=0) * log_p.sum(dim=0)).sum()
    return -(all_pairs - (targets * log_p[:teacher_views]).sum()) / (pairs * batch)


class ReferenceDINOLoss:
    """DINO's loss from its published formulas (main_dino.py, DINOLoss), one process.

    Inputs are flat as in DINO: student (V_s * B, K), teacher (V_t * B, K), views first.
    """

    def __init__(
        self,
        num_clusters: int,
        num_crops: int,
        num_global: int,
        student_temp: float,
        center_momentum: float,
    ) -> None:
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.num_crops = num_crops
        self.num_global = num_global
        self.center = torch.zeros(1, num_clusters)

    def forward(
        self, student_output: Tensor, teacher_output: Tensor, teacher_temp: float
    ) -> Tensor:
        student_out = (student_output / self.student_temp).chunk(self.num_crops)
        teacher_out = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)
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
        batch_center = batch_center / len(teacher_output)  # world_size = 1
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-clusters", type=int, default=None, help="K (65536; quick: 4096)")
    parser.add_argument("--batch-size", type=int, default=None, help="images (256; quick: 32)")
    parser.add_argument("--global-views", type=int, default=2, help="V_t (teacher views)")
    parser.add_argument("--local-views", type=int, default=8, help="extra student views")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (7; quick: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per variant")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all CPU cores)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run (K=4096, B=32, 3 rounds)"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON result file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = (4096, 32, 3) if args.quick else (65536, 256, 7)
    for name, default in zip(("num_clusters", "batch_size", "rounds"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = _parse_args(argv)
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    k, b = args.num_clusters, args.batch_size
    v_t, v_s = args.global_views, args.global_views + args.local_views
    student_temp, teacher_temp, momentum = 0.1, 0.04, 0.9

    # Head outputs of DINO's order of magnitude (weight-normalised prototypes: |s| <~ 1).
    student = (0.3 * torch.randn(v_s, b, k)).requires_grad_()
    teacher = 0.3 * torch.randn(v_t, b, k)

    reference = ReferenceDINOLoss(k, v_s, v_t, student_temp, momentum)
    stats = {mode: ClusterStatistics(k, momentum) for mode in ("prior", "center")}

    def run_reference() -> Tensor:
        loss = reference.forward(
            student.reshape(v_s * b, k), teacher.reshape(v_t * b, k), teacher_temp
        )
        loss.backward()
        return loss

    def run_prior() -> Tensor:
        # DESIGN order "current": update the prior with this batch, then the targets.
        stats["prior"].update(teacher.reshape(-1, k), teacher_temp)
        targets = teacher_targets(
            teacher, mode="prior", teacher_temp=teacher_temp, prior=stats["prior"].prior
        )
        loss = cross_view_loss(student, targets, student_temp=student_temp)
        loss.backward()
        return loss

    def run_prior_autograd() -> Tensor:
        # As run_prior, with the factorised loss differentiated by autograd (the loss as
        # it was before its closed-form gradient): what the custom backward saves.
        stats["prior"].update(teacher.reshape(-1, k), teacher_temp)
        targets = teacher_targets(
            teacher, mode="prior", teacher_temp=teacher_temp, prior=stats["prior"].prior
        )
        loss = factorised_autograd_loss(student, targets, student_temp)
        loss.backward()
        return loss

    def run_center() -> Tensor:
        # DINO's order ("previous"): targets from the last step's center, then update.
        targets = teacher_targets(
            teacher, mode="center", teacher_temp=teacher_temp, center=stats["center"].center
        )
        stats["center"].update(teacher.reshape(-1, k), teacher_temp)
        loss = cross_view_loss(student, targets, student_temp=student_temp)
        loss.backward()
        return loss

    variants: dict[str, Callable[[], Tensor]] = {
        "reference_dino": run_reference,
        "prior": run_prior,
        "center": run_center,
        "prior_autograd": run_prior_autograd,
    }

    # Same state, same inputs: our `center` step must give DINO's loss and center.
    student.grad = None
    loss_ref = run_reference().item()
    assert student.grad is not None
    grad_ref = student.grad.clone()
    grad_ref_scale = grad_ref.abs().max().item()
    student.grad = None
    loss_center = run_center().item()
    assert student.grad is not None
    grad_diff = (student.grad - grad_ref).abs().max().item()
    center_diff = (stats["center"].center - reference.center.squeeze(0)).abs().max().item()
    student.grad = None
    del grad_ref
    if abs(loss_ref - loss_center) > 1e-4 * max(1.0, abs(loss_ref)):
        raise AssertionError(f"center mode loss {loss_center} != DINO reference {loss_ref}")
    if grad_diff > 1e-5 * grad_ref_scale:
        raise AssertionError(f"center mode gradient differs from DINO's by {grad_diff}")

    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(args.warmup + args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            student.grad = None
            gc.collect()
            start = time.perf_counter()
            variants[name]()
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)
    student.grad = None

    medians = {name: statistics.median(values) for name, values in times.items()}
    ours = ("prior", "center", "prior_autograd")
    ratios = {mode: medians[mode] / medians["reference_dino"] for mode in ours}
    # Within one round the variants run back to back, so a per-round ratio cancels most of
    # the drift of a shared machine; its median is the second, more robust estimate.
    paired = {
        mode: statistics.median(
            ours / ref for ours, ref in zip(times[mode], times["reference_dino"], strict=True)
        )
        for mode in ours
    }
    result: dict[str, object] = {
        "benchmark": "objective: statistics update + targets + cross-view loss, forward+backward",
        "command": " ".join(
            ["python", "benchmarks/objective.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "sizes": {
            "num_clusters": k,
            "batch_size": b,
            "teacher_views": v_t,
            "student_views": v_s,
            "student_logits": [v_s, b, k],
            "teacher_logits": [v_t, b, k],
        },
        "rounds": args.rounds,
        "warmup_rounds": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "median_s": medians,
        "times_s": times,
        "ratio_ours_over_reference": ratios,
        "median_per_round_ratio": paired,
        "check_center_vs_reference": {
            "loss_reference": loss_ref,
            "loss_center": loss_center,
            "abs_loss_diff": abs(loss_ref - loss_center),
            "max_abs_grad_diff": grad_diff,
            "max_abs_center_diff": center_diff,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    print(f"threads={torch.get_num_threads()} student={tuple(student.shape)} rounds={args.rounds}")
    for name, median in medians.items():
        print(f"  {name:15s} median {median * 1e3:9.1f} ms")
    for mode, ratio in ratios.items():
        print(
            f"  ratio {mode}/reference = {ratio:.3f} "
            f"(median of per-round ratios {paired[mode]:.3f})"
        )
    print(
        f"  center vs reference: |dloss|={abs(loss_ref - loss_center):.2e} "
        f"max|dgrad|={grad_diff:.2e} max|dcenter|={center_diff:.2e}"
    )
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
