"""Errors a user can act on.

Every error raised for bad input is a `RewriteError`: the CLI prints its message (no traceback) and exits
with code 2. The message names the file, the TOML key or line, what was expected and what nearly matched.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class RewriteError(Exception):
    """Bad input or an impossible request; `str(err)` is the whole user-facing message."""

    exit_code = 2


class SpecError(RewriteError):
    """The spec file is malformed or names something that does not exist."""


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


class DeploymentError(RewriteError):
    """A deployment directory is broken: manifest.json, or a model or adapter file it names."""


class RuntimeUseError(RewriteError):
    """A serving call that cannot be answered as asked (unknown adapter, empty slot, ids that do not fit)."""


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
