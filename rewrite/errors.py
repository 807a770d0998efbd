"""Errors a user can act on.

Every error raised for bad input is a `RewriteError`: the CLI prints its message (no traceback) and exits
with code 2. The message names the file, the TOML key or line, what was expected and what nearly matched.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


class RewriteError(Exception):
    """Bad input or an impossible request; `str(err)` is the whole user-facing message."""

    exit_code = 2


class SpecError(RewriteError):
    """The spec is at fault: a key, a selector, a pass option or an output path written in spec.toml."""


class ModelLoadError(RewriteError):
    """The MODEL argument cannot be loaded (missing, unknown format, untrusted pickle)."""


class AdapterFileError(RewriteError):
    """An adapter directory or file does not fit the model (PEFT keys, shapes, config)."""


class CaptureError(RewriteError):
    """The model could not be captured as a graph."""


class PassError(RewriteError):
    """A pass failed; the message says which pass and which ran before it."""


class VerifyError(RewriteError):
    """A pass that promises equivalence changed the outputs on the example inputs."""


class DataError(RewriteError):
    """Calibration or training data is at fault: its tensors, batches or labels, or what the model makes of them
    (an output it lacks, a shape that does not fit, a loss that diverges)."""


class ExportError(RewriteError):
    """The graph cannot be exported as asked, or the export disagrees with torch (`--check`)."""


class OutputError(RewriteError):
    """The output directory cannot take the result: not a directory, not writable, a mount point, or not a rewrite
    output (never replaced)."""


class DeploymentError(RewriteError):
    """A deployment directory is broken: manifest.json, or a model or adapter file it names."""


class RuntimeUseError(RewriteError):
    """A serving call that cannot be answered as asked (unknown adapter, empty slot, ids that do not fit)."""


class AdapterSlotError(AdapterFileError, RuntimeUseError):
    """An adapter added while serving needs a slot the export did not keep: a site without one, or a rank above the
    site's bank rank. Both an `AdapterFileError` (the adapter does not fit) and a `RuntimeUseError` (the call cannot
    be answered as asked); the message names the site, the rank and what the export reserved."""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """`text` without terminal colour codes (torch colours some of its messages)."""
    return _ANSI.sub("", text)


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message (terminal colours removed), with the next one when it ends
    in a colon (it only announces what follows: torch's "The following inconsistencies were found:"), or its type
    name when the message is empty."""
    lines = [line.strip() for line in plain(str(err)).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else type(err).__name__


def describe(err: BaseException) -> str:
    """`Type: first line` of an exception, or just `Type` when it has no message."""
    line = first_line(err)
    return type(err).__name__ if line == type(err).__name__ else f"{type(err).__name__}: {line}"


def innermost(err: BaseException) -> BaseException:
    """The exception at the end of the `raise ... from` chain (libraries wrap the one that says what failed)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def nearest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates closest to `word`, best first (for 'did you mean' hints)."""
    pool = list(dict.fromkeys(candidates))
    hits = difflib.get_close_matches(word, pool, n=n, cutoff=0.5)
    stem = word.strip("*?[]^$.").split(".")[-1]
    if len(hits) < n and stem:
        # compare last dotted parts too, so a short PEFT-style name ('q_prj') finds 'model.layers.0.self_attn.q_proj'
        tails: dict[str, list[str]] = {}
        for c in pool:
            tails.setdefault(c.rpartition(".")[2], []).append(c)
        for tail in difflib.get_close_matches(stem, list(tails), n=n, cutoff=0.6):
            hits += [c for c in tails[tail] if c not in hits]
    if len(hits) < n and stem:
        hits += [c for c in pool if stem in c and c not in hits]
    return hits[:n]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    hits = nearest(word, candidates)
    return f" Did you mean: {', '.join(repr(h) for h in hits)}?" if hits else ""
