"""The spec reference (docs/reference/), generated from the typed options themselves, so it cannot drift:
every `spec.toml` table, every pass (its docstring: formula and rules; its keys), every adapter kind (its
docstring and its own `options`). `rewrite docs -o DIR` writes it; a test checks the committed copy is current.
"""
from __future__ import annotations

import inspect
import re
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from rewrite.adapters import KINDS
from rewrite.options import CaptureOptions, DataOptions, ExportOptions, InputSpec, ModelOptions, Reserve, TritonOptions
from rewrite.passes import REGISTRY

SECTIONS = {"[model]": ModelOptions, "[capture]": CaptureOptions, "[[capture.inputs]]": InputSpec,
            "[data]": DataOptions, "[export]": ExportOptions, "[export] reserve = { ... }": Reserve,
            "[export] triton = { ... }": TritonOptions}


def _type_name(annotation: Any) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    text = re.sub(r"typing\.|rewrite\.[\w.]+\.|<class '([^']+)'>", lambda m: m.group(1) or "", text)
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)
    return text.replace("NoneType", "None")


def _default(field) -> str:
    if field.default is PydanticUndefined:
        return "(required)" if field.default_factory is None else f"`{field.default_factory()!r}`"
    return f"`{field.default!r}`"


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """The trailing `# ...` comment of each field's line in the class bodies (the code's own explanation)."""
    found: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls.__module__.startswith("pydantic"):
            continue
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        for match in re.finditer(r"^    (\w+):[^#\n]*#\s*(.+)$", source, re.M):
            # a tool directive (`type: ignore[...]`, `noqa: ...`) explains nothing; what follows it may
            comment = re.sub(r"^(type:\s*ignore(\[[^\]]*\])?|noqa(:\s*[\w,]+)?)\s*(#\s*)?", "", match.group(2))
            if comment.strip():
                found[match.group(1)] = comment.strip()
    return found


def options_table(model: type[BaseModel], skip: tuple[str, ...] = ()) -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    comments = _comments(model)
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        meaning = (field.description or comments.get(name, "")).replace("|", "\\|")
        rows.append(f"| `{name}` | `{_type_name(field.annotation)}` | {_default(field)} | {meaning} |")
    return "\n".join(rows) if len(rows) > 2 else "(no keys)"


def _doc(obj: Any) -> str:
    return inspect.cleandoc(obj.__doc__ or "")


def _module_doc(cls: type) -> str:
    return _doc(sys.modules[cls.__module__])


def spec_page() -> str:
    parts = ["# spec.toml reference", "",
             "Generated from the typed options (`rewrite docs`); every key is checked strictly: unknown keys, wrong "
             "types and NaN / Inf are errors that name the TOML line.", ""]
    for title, model in SECTIONS.items():
        parts += [f"## {title}", "", _doc(model) if model.__doc__ else "", "", options_table(model), ""]
    parts += ["## [[pass]]", "", "Each `[[pass]]` table has `name` and the keys of that pass:", ""]
    parts += [f"- [`{name}`](passes/{name}.md)" for name in REGISTRY]
    parts += ["", "## Adapter kinds (`insert` `kind = ...`)", ""]
    parts += [f"- [`{kind}`](kinds/{kind}.md)" for kind in KINDS]
    return "\n".join(parts).rstrip() + "\n"


def pass_page(name: str) -> str:
    cls = REGISTRY[name]
    return "\n".join([f"# pass `{name}`", "", "```", _module_doc(cls), "```", "", "## keys", "",
                      options_table(cls.Options), ""])


def _switching(cls) -> str:
    if cls.low_rank:
        return "yes, low-rank: ort-adapters (per run), bank and custom-op (per row)"
    if cls.factored:
        return ("yes, as exact factors at the update's numerical rank: ort-adapters (per run), bank and custom-op "
                "(per row)")
    if cls.rowwise:
        return "yes, row vectors: bank and custom-op (per row, gathered from a bank), ort-adapters (per run)"
    if cls.parted:
        return "yes, as low-rank factors and / or row vectors (`unmerged_parts`): ort-adapters, bank and custom-op"
    return "no (merge it, or keep it inline in a merged export)"


def kind_page(kind: str) -> str:
    cls = KINDS[kind]
    facts = [f"- sites: {', '.join(cls.ops)}", f"- joins the base op by: {cls.join}",
             f"- insert settings it reads: {', '.join(cls.settings) or 'none'}", f"- inits: {', '.join(cls.inits)}",
             f"- mergeable: {'yes' if cls.mergeable else 'no'}", f"- rank allocation: {'yes' if cls.resizable else 'no'}",
             f"- switchable unmerged: {_switching(cls)}",
             f"- PEFT: {cls.peft_format.peft_type if cls.peft_format else 'no PEFT form'}"]
    return "\n".join([f"# adapter kind `{kind}`", "", "```", _module_doc(cls), "```", "", *facts, "",
                      "## options (`insert` `options = { ... }`)", "", options_table(cls.Options), ""])


def reference() -> dict[str, str]:
    """{relative path: Markdown} of the whole reference."""
    pages = {"spec.md": spec_page()}
    pages.update({f"passes/{name}.md": pass_page(name) for name in REGISTRY})
    pages.update({f"kinds/{kind}.md": kind_page(kind) for kind in KINDS})
    return pages


def write_reference(directory: Path) -> list[Path]:
    written = []
    for relative, text in reference().items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written

