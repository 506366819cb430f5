"""The allow-list of ``model.backbone_kwargs``: architecture arguments only, bounded.

timm's ``create_model`` takes keyword arguments that load files or weights
(``checkpoint_path``, ``pretrained_cfg_overlay``, ...). A config may only shape the
architecture: every key here has its type and bounds; anything naming a file or weights,
or an argument klssl sets itself, is refused with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.bounds import MAX_IMAGE_SIZE


@dataclass(frozen=True)
class KwargSpec:
    """One allowed key of ``model.backbone_kwargs``: its type and its bounds (inclusive).

    ``below_high`` excludes ``high`` itself (rates < 1); ``choices`` lists a string's values.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    below_high: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        """``int 1-256``, ``float 0 to < 1``, ``bool`` or ``'' | 'deep'``: for the docs."""
        if self.choices:
            return " | ".join(repr(choice) for choice in self.choices)
        if self.low is None or self.high is None:
            return self.kind.__name__
        high = f"< {self.high:g}" if self.below_high else f"{self.high:g}"
        return f"{self.kind.__name__} {self.low:g} to {high}"

    def check(self, value: Any) -> tuple[Any, str | None]:
        """``(value, None)`` with the value in its type, or ``(value, reason)``."""
        if self.kind is bool:
            if isinstance(value, bool):
                return value, None
            return value, f"expects true or false, got {value!r}"
        if self.kind is str:
            if value in self.choices:
                return value, None
            return value, f"expects one of {self.describe()}, got {value!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value, f"expects a number, got {value!r}"
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                return value, f"expects an integer, got {value!r}"
            value = int(value)
        else:
            value = float(value)
        if not math.isfinite(value):
            return value, f"expects a finite number, got {value!r}"
        assert self.low is not None and self.high is not None
        above = value >= self.high if self.below_high else value > self.high
        if value < self.low or above:
            return value, f"expects {self.describe()}, got {value!r}"
        return value, None


def _int(low: int, high: int) -> KwargSpec:
    return KwargSpec(int, low, high)


RATE = KwargSpec(float, 0, 1, below_high=True)
FLAG = KwargSpec(bool)

BACKBONE_KWARGS: dict[str, KwargSpec] = {
    # Transformers (timm's VisionTransformer and its kin: DeiT, EVA, BEiT).
    "depth": _int(1, 256),
    "embed_dim": _int(1, 16_384),
    "num_heads": _int(1, 256),
    "mlp_ratio": KwargSpec(float, 0.125, 64),
    "patch_size": _int(1, MAX_IMAGE_SIZE),
    "img_size": _int(1, MAX_IMAGE_SIZE),
    "dynamic_img_size": FLAG,
    "dynamic_img_pad": FLAG,
    "qkv_bias": FLAG,
    "qk_norm": FLAG,
    "class_token": FLAG,
    "no_embed_class": FLAG,
    "reg_tokens": _int(0, 64),
    "pre_norm": FLAG,
    "init_values": KwargSpec(float, 0, 10),
    # ResNets and their kin.
    "cardinality": _int(1, 1024),
    "base_width": _int(1, 4096),
    "stem_width": _int(1, 4096),
    "stem_type": KwargSpec(str, choices=("", "deep", "deep_tiered")),
    "avg_down": FLAG,
    "zero_init_last": FLAG,
    # Regularisation: the student's only (trainer.models.STOCHASTIC_KWARGS).
    "drop_rate": RATE,
    "drop_path_rate": RATE,
    "drop_block_rate": RATE,
    "attn_drop_rate": RATE,
    "proj_drop_rate": RATE,
    "pos_drop_rate": RATE,
    "patch_drop_rate": RATE,
}
"""The ``model.backbone_kwargs`` keys klssl passes to ``timm.create_model``: arguments
that shape the architecture (common to timm's transformer and ResNet constructors), each
with its type and bounds. Anything else is refused, above all every argument that names
a file or loads weights (``pretrained``, ``checkpoint_path``, ``pretrained_cfg``, ...)."""

MAX_BACKBONE_KWARGS = len(BACKBONE_KWARGS)
MAX_KWARG_KEY_LENGTH = 64
"""Characters of a ``model.backbone_kwargs`` key."""

FILE_OR_WEIGHTS_WORDS = (
    "pretrained",
    "checkpoint",
    "weights",
    "path",
    "file",
    "url",
    "dir",
    "hub",
    "cfg",
    "cache",
    "load",
)
"""A key holding any of these names (or may name) a file or weights: always refused."""

KLSSL_OWNED_KWARGS: dict[str, str] = {
    "num_classes": "klssl builds the backbone headless (num_classes=0): the head is its own",
    "in_chans": "klssl's views are RGB images (3 input channels)",
    "global_pool": "klssl needs the backbone's pooled (B, D) features",
    "features_only": "klssl needs the backbone's pooled (B, D) features",
    "out_indices": "klssl needs the backbone's pooled (B, D) features",
}
"""Keys that klssl sets itself or that break what it needs, with the reason."""


def _shown_key(key: str) -> str:
    return repr(key) if len(key) <= 48 else repr(key[:48]) + "..."


def check_backbone_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``kwargs`` with every value in its type, or `ValueError` naming every bad key.

    Only `BACKBONE_KWARGS` keys with values in their bounds pass; a key that names a
    file or could load weights is refused with that reason.
    """
    checked: dict[str, Any] = {}
    problems: list[str] = []
    for key, value in kwargs.items():
        shown = _shown_key(key)
        lowered = key.lower()
        if len(key) > MAX_KWARG_KEY_LENGTH:
            problems.append(
                f"key {shown} of {len(key)} characters is longer than {MAX_KWARG_KEY_LENGTH}"
            )
        elif key in BACKBONE_KWARGS:
            checked[key], reason = BACKBONE_KWARGS[key].check(value)
            if reason is not None:
                problems.append(f"{key} {reason}")
        elif any(word in lowered for word in FILE_OR_WEIGHTS_WORDS):
            problems.append(
                f"key {shown} is refused: it names a file or loads weights, and every "
                "backbone is built from its architecture alone (pretrained=False)"
            )
        elif key in KLSSL_OWNED_KWARGS:
            problems.append(f"key {shown} is refused: {KLSSL_OWNED_KWARGS[key]}")
        else:
            problems.append(
                f"key {shown} is not an allowed architecture argument; allowed: "
                + ", ".join(BACKBONE_KWARGS)
            )
    if problems:
        raise ValueError("; ".join(problems))
    return checked
