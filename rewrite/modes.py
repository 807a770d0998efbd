"""File modes of what the product writes: what the user's umask gives, as for any file they create.

`tempfile` makes its files 0600 and its directories 0700 (private by design), and safetensors writes 0600;
everything written that way (OUT itself, saved adapters, reports) gets its public mode back here, so a server
running as another user can read the output.
"""
from __future__ import annotations

import os
from pathlib import Path


def _umask() -> int:
    # os.umask can only be read by setting it: for an instant the process umask is 0o077 (stricter, never looser)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def as_created(path: Path | str) -> None:
    """chmod `path` to the mode a plain open() / mkdir() would have given it under the current umask."""
    os.chmod(path, (0o777 if Path(path).is_dir() else 0o666) & ~_umask())
