"""The prune pass's report: <stem>.json (everything the pass decided), <stem>.md (what each layer lost) and
<stem>.png (the same as a picture: per structure, the units each layer kept and lost; LoRA ranks kept and removed).

    | structure | group | before | after | removed |
    | heads     | model.layers.0.self_attn | 8 | 6 | head 2, head 5 |
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rewrite.report import atomic_write, pyplot, save_figure


def render_prune_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Prune report ({report['method']}, scope {report['scope']})", "",
             "Targets: " + ", ".join(f"{k} = {v!r}" for k, v in report["targets"].items()) + ".  ",
             f"Parameters: {report['params_before']} -> {report['params_after']} "
             f"({report['params_after'] / max(report['params_before'], 1):.1%}); "
             f"shape constants rewritten: {report['constants_rewritten']}.", ""]
    info = report.get("scorer") or {}
    if "steps" in info:
        lines += [f"The scorer trained the adapters for {info['steps']} steps ({info['train_seconds']} s, of which "
                  f"{info['scoring_seconds']} s scoring); final loss {info['loss_final']:.4g}.", ""]
    if report["groups"]:
        lines += ["| structure | group | before | after | removed |", "|---|---|---:|---:|---|"]
        for row in report["groups"]:
            removed = ", ".join(row["removed"]) or "-"
            if row.get("note"):
                removed += f" ({row['note']})"
            lines.append(f"| {row['structure']} | {row['group']} | {row['units_before']} | {row['units_after']} | "
                         f"{removed} |")
    if report.get("adapters"):
        lines += ["", "| adapter | module score | rank before | rank after | removed components |",
                  "|---|---:|---:|---:|---|"]
        for row in report["adapters"]:
            removed = "dropped" if row.get("dropped") else ", ".join(map(str, row["removed_ranks"])) or "-"
            lines.append(f"| {row['adapter']} | {row['module_score']:.4g} | {row['rank_before']} | "
                         f"{row['rank_after']} | {removed} |")
    return "\n".join(lines) + "\n"


def _layer(name: str) -> str:
    """The layer a group or adapter belongs to: its first number ("model.layers.3.mlp" -> "3"), else its name."""
    match = re.search(r"\.(\d+)(\.|$)", name)
    return match.group(1) if match else name


def render_prune_picture(report: dict[str, Any], path: str | Path) -> Path | None:
    """One panel per structure (and one for LoRA ranks): per layer, a bar of what it kept and, stacked, what the
    pass removed."""
    plt = pyplot()
    panels: dict[str, dict[str, list[int]]] = {}  # panel -> layer -> [kept, removed]
    for row in report["groups"]:
        cell = panels.setdefault(row["structure"], {}).setdefault(_layer(row["group"]), [0, 0])
        cell[0] += row["units_after"]
        cell[1] += row["units_before"] - row["units_after"]
    for row in report.get("adapters") or []:
        cell = panels.setdefault("LoRA ranks", {}).setdefault(_layer(row["adapter"]), [0, 0])
        cell[0] += row["rank_after"]
        cell[1] += row["rank_before"] - row["rank_after"]
    if plt is None or not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(4.0, 0.45 * max(len(v) for v in panels.values()) + 2.5),
                                                      2.3 * len(panels)), squeeze=False)
    for ax, (title, layers) in zip(axes[:, 0], panels.items()):
        names = list(layers)
        kept = [layers[n][0] for n in names]
        gone = [layers[n][1] for n in names]
        ax.bar(names, kept, color="#4c72b0", label="kept")
        ax.bar(names, gone, bottom=kept, color="#dd5555", label="removed")
        ax.set_title(f"{title}: {sum(gone)} of {sum(kept) + sum(gone)} removed", fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"prune ({report['method']}, scope {report['scope']})", fontsize=10)
    return save_figure(plt, fig, path)


def write_prune_report(report: dict[str, Any], directory: str | Path, stem: str = "prune") -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = [directory / f"{stem}.json", directory / f"{stem}.md"]
    atomic_write(written[0], json.dumps(report, indent=2, default=float) + "\n")
    atomic_write(written[1], render_prune_markdown(report))
    picture = render_prune_picture(report, directory / f"{stem}.png")
    return written + ([picture] if picture else [])
