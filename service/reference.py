"""The configuration reference in the README, generated from the pydantic models.

``python -m service.reference --write README.md`` rewrites the block between the
``<!-- config-reference:start -->`` and ``<!-- config-reference:end -->`` markers; a test
fails when the README's block differs from what the models say, so it cannot drift.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from service.settings import Settings
from trainer.config import TrainConfig
from tuning.config import SweepConfig

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def type_name(annotation: Any) -> str:
    """A short, readable name of a field's type."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin is typing.Annotated:
        return type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(arg) for arg in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(arg) for arg in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "null"
    return str(getattr(annotation, "__name__", annotation))


def default_of(field: FieldInfo) -> str:
    """The default as it would be written in a config (required fields say so)."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            return ""
        # A computed default (e.g. this interpreter's path) differs between machines.
        return f"`{value!r}`" if value in ({}, [], ()) else "computed"
    return f"`{field.default!r}`" if field.default is not None else "`None`"


def constraints_of(field: FieldInfo) -> str:
    """Bounds such as ``> 0`` or ``< 1`` from the field's metadata."""
    signs = {
        "gt": ">",
        "ge": ">=",
        "lt": "<",
        "le": "<=",
        "min_length": "len >=",
        "max_length": "len <=",
    }
    found = []
    for item in field.metadata:
        for name, sign in signs.items():
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def sections(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """The model and every nested model section, depth first, with dotted prefixes."""
    yield prefix, model
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from sections(annotation, f"{prefix}{name}.")


def table(model: type[BaseModel], prefix: str, env_prefix: str = "") -> list[str]:
    """One markdown table of a model's own (non-section) fields."""
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            continue
        shown = f"{env_prefix}{name.upper()}" if env_prefix else f"{prefix}{name}"
        kind = type_name(annotation)
        bounds = constraints_of(field)
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{shown}` | {kind}{f' ({bounds})' if bounds else ''} | {default_of(field)} "
            f"| {description} |"
        )
    return rows


def model_reference(model: type[BaseModel], title: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Headings and tables for a model and its sections (``skip``: prefixes to leave out)."""
    lines: list[str] = []
    for prefix, section in sections(model):
        if any(prefix.startswith(skipped) for skipped in skip):
            continue
        heading = f"`{prefix.rstrip('.')}`" if prefix else "top level"
        doc = (section.__doc__ or "").strip().split("\n")[0]
        lines += ["", f"#### {title}: {heading}", "", doc, "", *table(section, prefix)]
    return lines


def render() -> str:
    """The whole reference block (between the markers, markers excluded)."""
    lines = [
        "",
        "_Generated from the pydantic models by `python -m service.reference --write "
        "README.md`; a test keeps it in sync._",
    ]
    lines += model_reference(TrainConfig, "TrainConfig")
    lines += model_reference(SweepConfig, "SweepConfig", skip=("base.",))
    lines += [
        "",
        "#### Service settings (environment variables)",
        "",
        (Settings.__doc__ or "").strip().split("\n")[0],
        "",
        *table(Settings, "", env_prefix="KLSSL_"),
        "",
    ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with the block between the markers replaced by ``block``."""
    if START not in text or END not in text:
        raise ValueError(f"the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{block}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", type=Path, help="rewrite the block in this file")
    args = parser.parse_args(argv)
    block = render()
    if args.write is None:
        sys.stdout.write(block)
        return 0
    args.write.write_text(replace_block(args.write.read_text(), block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
