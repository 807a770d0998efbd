"""Rank-allocation reports: JSON for machines, Markdown for people, PNG heatmaps.

Written by the `allocate` pass (and by training-time allocators) as `<stem>.json`, `<stem>.md`,
`<stem>.png` (rank by layer x module type) and, when a training history is present, `<stem>_history.png`
(budget and per-site ranks over steps). `rewrite report allocation.json -o DIR` re-renders the Markdown and
the pictures from the JSON alone.

JSON layout (format "rewrite-allocation", version 1):

    adapter, scorer {name, unit, settings}, budget {metric, unit, value, spent, minimum, request},
    solver {method, exact, value, upper_bound, gap, shadow_price, notes, nonconcave_sites},
    sites [{site, layer, module, op, d_in, d_out, rank, rank_before, min_rank, max_rank, params, flops,
            bytes, latency_ms?, cost, share, value, value_max, captured, update_kept?}],
    totals {sites, kept, dropped [names], params, flops, bytes, params_before, update_kept?},
    sensitivity {"-10%": {budget, value, ranks} | null, "+10%": ...},
    history [{step, budget, ranks {site: r}, ...}]     (training-time allocators; empty for one-shot)

`update_kept` (one-shot allocation): the share of the adapter's update energy ||s A B||_F^2 that the new
ranks keep, per site and over all sites; null for an adapter without an update (freshly inserted).

`render_history(history, path)` is the hook for training-time allocators: one dict per recorded step
with at least `step`, `budget` (the rank / parameter budget at that step) and `ranks` (site -> rank).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from rewrite.errors import RewriteError
from rewrite.modes import as_created

FORMAT, VERSION = "rewrite-allocation", 1
_LAYER = re.compile(r"(?:^|\.)(\d+)\.(.+)$")


class ReportError(RewriteError):
    """A report file that cannot be read."""


def site_layer(name: str) -> tuple[int | None, str]:
    """('model.layers.3.self_attn.q_proj') -> (3, 'self_attn.q_proj'); no layer index -> (None, name)."""
    match = _LAYER.search(name.split("@")[0])
    if not match:
        return None, name
    return int(match.group(1)), match.group(2)


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length >= 2")

    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(list(a)), ranks(list(b))
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def new_report(**fields: Any) -> dict[str, Any]:
    report = {"format": FORMAT, "version": VERSION, "history": []}
    report.update(fields)
    return report


# ---------------------------------------------------------------------------------------------- files


def atomic_write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data.encode() if isinstance(data, str) else data)
    as_created(tmp)
    os.replace(tmp, path)


def write_report(report: dict[str, Any], directory: str | Path, stem: str = "allocation", *,
                 plot: bool = True) -> list[Path]:
    """Write <stem>.json and <stem>.md (and the PNGs with `plot`); returns the paths written."""
    directory = Path(directory)
    written = []
    path = directory / f"{stem}.json"
    atomic_write(path, json.dumps(report, indent=2, default=_json_default) + "\n")
    written.append(path)
    written += render_all(report, directory, stem, plot=plot)
    return written


def render_all(report: dict[str, Any], directory: str | Path, stem: str, *, plot: bool = True) -> list[Path]:
    directory = Path(directory)
    path = directory / f"{stem}.md"
    atomic_write(path, render_markdown(report, images=plot, stem=stem))
    written = [path]
    if plot:
        heat = render_heatmap(report, directory / f"{stem}.png")
        if heat:
            written.append(heat)
        if report.get("history"):
            hist = render_history(report["history"], directory / f"{stem}_history.png")
            if hist:
                written.append(hist)
    return written


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{path}: report file not found")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ReportError(f"{path}: not a JSON report: {err}") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        raise ReportError(f"{path}: not a rank-allocation report (expected \"format\": \"{FORMAT}\")")
    if report.get("version") != VERSION:
        raise ReportError(f"{path}: report version {report.get('version')!r}; this rewrite reads version {VERSION}")
    return report


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------- markdown


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if not math.isfinite(x):
            return str(x)
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.3g}"
        return f"{x:,.4g}"
    return str(x)


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def render_markdown(report: dict[str, Any], *, images: bool = True, stem: str = "allocation") -> str:
    scorer, budget, solver = report.get("scorer", {}), report.get("budget", {}), report.get("solver", {})
    totals, sites = report.get("totals", {}), report.get("sites", [])
    lines = [f"# Rank allocation: adapter `{report.get('adapter', '?')}`", ""]
    settings = ", ".join(f"{k} = {v}" for k, v in (scorer.get("settings") or {}).items()
                         if not isinstance(v, (dict, list)))
    lines.append(f"- **Scorer**: `{scorer.get('name', '?')}` (value unit: {scorer.get('unit', '?')})"
                 + (f"; {settings}" if settings else ""))
    unit = budget.get("unit", "")
    spent, value = budget.get("spent"), budget.get("value")
    share = f" ({100 * spent / value:.1f}% of the budget)" if spent is not None and value else ""
    lines.append(f"- **Budget**: {_num(value)} {unit} ({budget.get('metric', '?')}; requested as "
                 f"`{budget.get('request', '')}`); spent {_num(spent)}{share}; minimum {_num(budget.get('minimum'))}")
    if solver:
        proof = "optimal" if solver.get("exact") else f"within {_num(solver.get('gap'))} of the upper bound"
        lines.append(f"- **Solver**: {solver.get('method', '?')}, {proof}; value {_num(solver.get('value'))}, upper "
                     f"bound {_num(solver.get('upper_bound'))}, value per unit of {budget.get('metric', 'budget')} at the "
                     f"cut {_num(solver.get('shadow_price'))}")
        for note in solver.get("notes", []):
            lines.append(f"  - {note}")
    if totals:
        dropped = totals.get("dropped") or []
        lines.append(f"- **Sites**: {totals.get('sites', len(sites))}, kept {totals.get('kept', '?')}, dropped "
                     f"(rank 0) {len(dropped)}" + (f": {', '.join(f'`{d}`' for d in dropped[:12])}"
                                                   f"{' ...' if len(dropped) > 12 else ''}" if dropped else ""))
        lines.append(f"- **Totals**: {_num(totals.get('params'))} parameters (before: "
                     f"{_num(totals.get('params_before'))}), {_num(totals.get('flops'))} FLOPs/token, "
                     f"{_num(totals.get('bytes'))} bytes/forward")
        if totals.get("update_kept") is not None:
            lines.append(f"- **Update kept**: {_percent(totals['update_kept'])} of the adapter's update energy "
                         "||s A B||_F^2 (SVD truncation to the new ranks)")
    sens = report.get("sensitivity") or {}
    for key, entry in sens.items():
        if entry:
            moved = sum(1 for s in sites if entry["ranks"].get(s["site"]) != s["rank"])
            lines.append(f"- **Budget {key}**: value {_num(entry['value'])}, {moved} site(s) change rank")
        else:
            lines.append(f"- **Budget {key}**: infeasible")
    lines.append("")
    if images and sites:
        lines += [f"![rank by layer and module]({stem}.png)", ""]
    if images and report.get("history"):
        lines += [f"![budget and ranks over training]({stem}_history.png)", ""]
    if sites:
        has_latency = any(s.get("latency_ms") is not None for s in sites)
        has_update = any(s.get("update_kept") is not None for s in sites)
        head = ["layer", "module", "rank", "before", "params", "FLOPs/token"] + (["ms"] if has_latency else []) + [
            "score", "captured", "share of budget"] + (["update kept"] if has_update else [])
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for s in sites:
            row = [_num(s.get("layer")), f"`{s.get('module')}`", str(s.get("rank")), str(s.get("rank_before", "-")),
                   _num(s.get("params")), _num(s.get("flops"))]
            if has_latency:
                row.append(_num(s.get("latency_ms")))
            captured = s.get("captured")
            row += [_num(s.get("value")), "-" if captured is None else f"{100 * captured:.0f}%",
                    "-" if s.get("share") is None else f"{100 * s['share']:.1f}%"]
            if has_update:
                row.append(_percent(s.get("update_kept")))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("score: the scorer's value v(r) at the chosen rank; captured: v(r) / v(max rank); share: this "
                     "site's cost / the budget" + ("; update kept: the share of the site's ||s A B||_F^2 its rank "
                                                   "keeps." if has_update else "."))
    history = report.get("history") or []
    if history:
        last = history[-1]
        lines += ["", f"Training history: {len(history)} records, steps {history[0].get('step')}..{last.get('step')}, "
                      f"final budget {_num(last.get('budget'))}."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- pictures


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only), or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a dependency; stay useful without it
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def rank_grid(sites: list[dict[str, Any]]) -> tuple[list[str], list[str], list[list[float]]]:
    """(row labels = layers, column labels = module types, ranks; NaN where a layer has no such module)."""
    layers: list[Any] = []
    modules: list[str] = []
    cells: dict[tuple[Any, str], float] = {}
    for s in sites:
        layer, module = s.get("layer"), s.get("module") or s.get("site")
        if layer not in layers:
            layers.append(layer)
        if module not in modules:
            modules.append(module)
        cells[(layer, module)] = float(s.get("rank", 0))
    numbered = sorted((x for x in layers if x is not None))
    order = numbered + ([None] if None in layers else [])
    grid = [[cells.get((layer, m), math.nan) for m in modules] for layer in order]
    return [("-" if x is None else str(x)) for x in order], modules, grid


def render_heatmap(report: dict[str, Any], path: str | Path) -> Path | None:
    """Rank by layer (rows) x module type (columns); empty cells are blank, rank 0 is a dropped site."""
    sites = report.get("sites") or []
    plt = pyplot()
    if not sites or plt is None:
        return None
    import numpy as np

    rows, cols, grid = rank_grid(sites)
    data = np.array(grid, dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(cols) + 2.5), max(2.5, 0.35 * len(rows) + 1.8)))
    masked = np.ma.masked_invalid(data)
    image = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    if data.size <= 400:
        for (i, j), v in np.ndenumerate(data):
            if not math.isnan(v):
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * np.nanmax(data) else "black")
    scorer = (report.get("scorer") or {}).get("name", "")
    budget = report.get("budget") or {}
    ax.set_title(f"rank per site ({scorer}, {budget.get('metric', '')} budget {_num(budget.get('value'))})",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="rank")
    return save_figure(plt, fig, path)


def save_figure(plt, fig, path: str | Path) -> Path:
    """Write the figure as PNG atomically: a symlink at `path` is replaced, never written through."""
    fig.tight_layout()
    path, png = Path(path), io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, png.getvalue())
    return path


def render_history(history: list[dict[str, Any]], path: str | Path) -> Path | None:
    """Training-time allocators: budget (and the total rank in use) over steps, and each site's rank over
    steps as a heatmap (sites x recorded steps). Each record: {step, budget, ranks: {site: rank}, ...}."""
    plt = pyplot()
    if not history or plt is None:
        return None
    import numpy as np

    steps = [h.get("step", i) for i, h in enumerate(history)]
    budgets = [h.get("budget") for h in history]
    site_names: list[str] = []
    for h in history:
        for name in (h.get("ranks") or {}):
            if name not in site_names:
                site_names.append(name)
    ranks = np.array([[float((h.get("ranks") or {}).get(n, math.nan)) for h in history] for n in site_names])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 3 + 0.18 * max(len(site_names), 8)),
                                      gridspec_kw={"height_ratios": [1, 2]})
    if any(b is not None for b in budgets):
        top.plot(steps, [math.nan if b is None else b for b in budgets], label="budget", color="tab:red")
    if site_names:
        top.plot(steps, np.nansum(ranks, axis=0), label="total rank in use", color="tab:blue", linestyle="--")
    top.set_xlabel("step")
    top.legend(fontsize=8)
    top.set_title("budget over training", fontsize=9)
    if site_names:
        image = bottom.imshow(np.ma.masked_invalid(ranks), aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                              extent=(steps[0] - 0.5, steps[-1] + 0.5, len(site_names) - 0.5, -0.5))
        bottom.set_yticks(range(len(site_names)), site_names, fontsize=6)
        bottom.set_xlabel("step")
        bottom.set_title("rank per site", fontsize=9)
        fig.colorbar(image, ax=bottom, label="rank")
    return save_figure(plt, fig, path)


def rerender(json_path: str | Path, out_dir: str | Path | None = None, *, plot: bool = True) -> list[Path]:
    """`rewrite report`: Markdown and pictures from a JSON report (into its own directory by default)."""
    json_path = Path(json_path)
    report = load_report(json_path)
    directory = Path(out_dir) if out_dir is not None else json_path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ReportError(f"output directory {directory} exists and is not a directory") from None
    except OSError as err:
        raise ReportError(f"output directory {directory}: cannot create it: {err.strerror or err}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ReportError(f"output directory {directory} is not writable")
    return render_all(report, directory, json_path.stem, plot=plot)


__all__ = ["FORMAT", "VERSION", "ReportError", "load_report", "new_report", "rank_grid", "render_all",
           "render_heatmap", "render_history", "render_markdown", "rerender", "site_layer", "spearman", "write_report"]
