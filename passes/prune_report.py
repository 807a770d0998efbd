"""The prune pass's report: <stem>.json (everything the pass decided) and <stem>.md (what each layer lost).

    | structure | group | before | after | removed |
    | heads     | model.layers.0.self_attn | 8 | 6 | head 2, head 5 |
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rewrite.report import atomic_write


def render_prune_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Prune report ({report['method']}, scope {report['scope']})", "",
             "Targets: " + ", ".join(f"{k} = {v!r}" for k, v in report["targets"].items()) + ".  ",
             f"Parameters: {report['params_before']} -> {report['params_after']} "
             f"({report['params_after'] / max(report['params_before'], 1):.1%}); "
             f"shape constants rewritten: {report['constants_rewritten']}.", "",
             "| structure | group | before | after | removed |", "|---|---|---:|---:|---|"]
    for row in report["groups"]:
        removed = ", ".join(row["removed"]) or "-"
        if row.get("note"):
            removed += f" ({row['note']})"
        lines.append(f"| {row['structure']} | {row['group']} | {row['units_before']} | {row['units_after']} | "
                     f"{removed} |")
    return "\n".join(lines) + "\n"


def write_prune_report(report: dict[str, Any], directory: str | Path, stem: str = "prune") -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{stem}.json", directory / f"{stem}.md"]
    atomic_write(written[0], json.dumps(report, indent=2) + "\n")
    atomic_write(written[1], render_prune_markdown(report))
    return written
