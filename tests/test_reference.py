"""docs/reference/ is generated from the typed options (`rewrite docs`); the committed copy must be current, and
it must describe every spec table, pass and adapter kind the code registers."""
from __future__ import annotations

from pathlib import Path

from rewrite.adapters import KINDS
from rewrite.passes import REGISTRY
from rewrite.reference import reference

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"


def test_committed_reference_is_current():
    pages = reference()
    stale = [p for p, text in pages.items() if not (DOCS / p).is_file() or (DOCS / p).read_text() != text]
    extra = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if str(p.relative_to(DOCS)) not in pages)
    assert not stale and not extra, f"run `rewrite docs` (stale: {stale}, no longer generated: {extra})"


def test_reference_covers_every_key():
    pages = reference()
    for name, cls in REGISTRY.items():
        assert all(f"| `{key}` |" in pages[f"passes/{name}.md"] for key in cls.Options.model_fields)
    for kind, cls in KINDS.items():
        assert all(f"| `{key}` |" in pages[f"kinds/{kind}.md"] for key in cls.Options.model_fields)
    assert "## [data]" in pages["spec.md"]
    assert all(f"`{key}`" in pages["spec.md"] for key in ("loss", "reserve", "trust_pickle"))
