"""Markdown reference of every configuration key, generated from the typed config models.

``render()`` walks :class:`bimors.config.Config` through pydantic's ``model_fields`` and writes one
table per section (dotted key, type, default, description), so the reference cannot drift from
the code. Defaults are those of the section as it sits in the whole config (``featurize.decode``
is a ``StageConfig`` with its own batch size, not the class default). Secret fields never show a
value.

The README carries a copy between two markers; keep it current with::

    python -m bimors.config_reference --write README.md   # regenerate
    python -m bimors.config_reference --check README.md   # exit 1 if stale (the tests do this)
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence, Union

import annotated_types
from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REGENERATE = "python -m bimors.config_reference --write README.md"

_SECRET_TYPES = (SecretStr, SecretBytes)


# --------------------------------------------------------------------------------------------
# walking the models


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field that is a nested section (``X`` or ``X | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def _default_of(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


class SectionInfo(typing.NamedTuple):
    name: str  # dotted; "" for the top level
    model: type[BaseModel]
    description: str | None  # the description of the field that holds this section, if any
    leaves: list[tuple[str, FieldInfo, Any]]  # (dotted key, field, default)


def sections(
    model: type[BaseModel], instance: BaseModel | None = None, prefix: str = "", description: str | None = None
) -> Iterator[SectionInfo]:
    """Every section, depth first, a section before its subsections. ``instance`` supplies the
    defaults (the section as it is built inside its parent); without one the class defaults."""
    leaves: list[tuple[str, FieldInfo, Any]] = []
    nested: list[tuple[str, type[BaseModel], BaseModel | None, str | None]] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(instance, name) if instance is not None else _default_of(field)
        sub = _section_class(field.annotation)
        if sub is not None and (value is None or isinstance(value, BaseModel)):
            nested.append((key, sub, value, field.description))
        else:
            leaves.append((key, field, value))
    yield SectionInfo(prefix.rstrip("."), model, description, leaves)
    for key, sub, value, text in nested:
        yield from sections(sub, value, f"{key}.", text)


def _is_secret(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, _SECRET_TYPES):
        return True
    return any(_is_secret(arg) for arg in typing.get_args(annotation))


# --------------------------------------------------------------------------------------------
# formatting


def type_name(annotation: Any) -> str:
    """A compact, readable spelling of a type annotation."""
    if annotation is type(None) or annotation is None:
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"tuple[{type_name(args[0])}, ...]"
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


_BOUNDS = ((annotated_types.Gt, "gt", ">"), (annotated_types.Ge, "ge", ">="),
           (annotated_types.Lt, "lt", "<"), (annotated_types.Le, "le", "<="))


def _constraints(field: FieldInfo) -> list[str]:
    out = []
    for item in field.metadata:
        for kind, attr, symbol in _BOUNDS:
            if isinstance(item, kind):
                out.append(f"{symbol} {getattr(item, attr)}")
        if isinstance(item, annotated_types.MinLen):
            out.append(f"min length {item.min_length}")
        if isinstance(item, annotated_types.MaxLen):
            out.append(f"max length {item.max_length}")
    return out


def _field_type(field: FieldInfo) -> str:
    text = type_name(field.annotation)
    bounds = _constraints(field)
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def format_default(field: FieldInfo, value: Any) -> str:
    """The default as it would be written in YAML flow style; secrets are never shown."""
    if _is_secret(field.annotation) or isinstance(value, _SECRET_TYPES):
        return "null" if value is None else "(secret, not shown)"
    try:
        return json.dumps(_jsonable(value), ensure_ascii=False)
    except TypeError:
        return str(value)


def _paragraph(text: str | None) -> str:
    """One line of Markdown from a docstring or description (RST ``code`` -> `code`)."""
    if not text:
        return ""
    text = " ".join(inspect.cleandoc(text).split())
    return re.sub(r"``(.+?)``", r"`\1`", text)


def _cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
    return f"`{_cell(text)}`"


def render(model: type[BaseModel] | None = None, instance: BaseModel | None = None) -> str:
    """The configuration reference as Markdown, one table per section that has keys.

    ``model`` defaults to :class:`bimors.config.Config`; ``instance`` (defaults to ``model()``)
    supplies the defaults, so nested sections show the values their parent gives them."""
    if model is None:
        from bimors.config import Config

        model = Config
    if instance is None:
        instance = model()
    parts = [
        f"<!-- generated from the typed config models by `{REGENERATE}`; do not edit by hand -->",
        "",
    ]
    for name, section, description, leaves in sections(model, instance):
        if not leaves:
            continue
        parts.append(f"### `{name}`" if name else "### top level")
        parts.append("")
        for text in (description, section.__dict__.get("__doc__")):
            if _paragraph(text):
                parts += [_paragraph(text), ""]
        parts.append("| key | type | default | description |")
        parts.append("|---|---|---|---|")
        for key, field, value in leaves:
            row = [_code(key), _code(_field_type(field)), _code(format_default(field, value)),
                   _cell(_paragraph(field.description))]
            parts.append("| " + " | ".join(row) + " |")
        parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# the README block


class MarkerError(RuntimeError):
    """The target file has no (or malformed) reference markers."""


def _block_span(text: str, path: str) -> tuple[int, int]:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise MarkerError(f"{path}: needs exactly one {START} followed by one {END}")
    return start + len(START), end


def extract(text: str, path: str = "README.md") -> str:
    """The reference currently between the markers (surrounding blank lines dropped)."""
    lo, hi = _block_span(text, path)
    return text[lo:hi].strip("\n") + "\n"


def replace(text: str, reference: str, path: str = "README.md") -> str:
    lo, hi = _block_span(text, path)
    return text[:lo] + "\n" + reference.strip("\n") + "\n" + text[hi:]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bimors.config_reference",
        description="Print the configuration reference generated from bimors.config, or keep a "
        f"Markdown file's copy (between {START} and {END}) current.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", metavar="FILE", help="replace the reference between the markers in FILE")
    mode.add_argument("--check", metavar="FILE", help="exit 1 if FILE's reference differs from the models")
    args = parser.parse_args(argv)
    reference = render()
    target = args.write or args.check
    if target is None:
        sys.stdout.write(reference)
        return 0
    try:
        text = Path(target).read_text(encoding="utf-8")
        if args.write:
            updated = replace(text, reference, target)
            if updated != text:
                Path(target).write_text(updated, encoding="utf-8")
            print(f"{target}: configuration reference {'updated' if updated != text else 'already current'}")
            return 0
        if extract(text, target) != reference:
            print(
                f"{target}: the configuration reference is stale (bimors/config.py changed); "
                f"regenerate it with `python -m bimors.config_reference --write {target}`",
                file=sys.stderr,
            )
            return 1
        print(f"{target}: configuration reference is current")
        return 0
    except (OSError, MarkerError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
