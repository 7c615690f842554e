"""The keys of a config dataclass, with their defaults and docstrings, for ``dialogrl COMMAND --help``.

Field docstrings (a string literal under the field, as every config here writes them) are not kept by Python at
run time, and neither argparse nor the dataclasses module reads them, so they are read here from the class's source
with ``ast``. Imports no torch.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Any

from dialogrl.config import annotation_name


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (whitespace collapsed), from ``cls`` and its dataclass bases; a field without one is
    left out."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's docstring wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (e.g. built in a REPL): no docs, still the keys
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:], strict=False):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def describe_config(cls: type, width: int = 100) -> str:
    """One entry per key: ``name (type) = default`` and its docstring, wrapped and indented."""
    docs = field_docs(cls)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: show the keys without their types
        hints = {}
    entries = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        default = _default_of(field)
        shown = "required" if default is dataclasses.MISSING else f"= {_short(default)}"
        kind = annotation_name(hints.get(field.name, field.type))
        entries.append(f"  {field.name} ({kind}) {shown}")
        if field.name in docs:
            entries.append(textwrap.fill(docs[field.name], width=width, initial_indent=" " * 6,
                                         subsequent_indent=" " * 6, break_on_hyphens=False))
    return "\n".join(entries)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
