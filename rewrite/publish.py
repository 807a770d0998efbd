"""Publishing OUT as a unit: the whole result is built in a sibling temporary directory, then swapped in.

Beside OUT, in its parent directory, a run uses two names of its own:

    .OUT.tmp-<id>   the result while it is built (locked by the live run); after a swap, the previous result
    .OUT.old-<id>   the previous result between the two renames of the portable swap

The swap exchanges `.OUT.tmp-<id>` and OUT in one step (Linux `renameat2(RENAME_EXCHANGE)`), so OUT is at
every instant the complete previous result or the complete new one. Where the kernel or filesystem cannot
exchange, two renames do it (OUT -> `.OUT.old-<id>`, then the result -> OUT); a kill between them leaves no
OUT but the complete previous result at `.OUT.old-<id>`, and the next run puts it back first.

Each run, before any work, removes what killed runs left under those two names (a directory whose lock no
live run holds; never a file or a link), and refuses an OUT that is not a directory, not writable, a mount
point (it cannot be swapped), or not empty and not a rewrite output (a `manifest.json` of format
"rewrite-manifest"; a caller may give its own rule, `refusal`): only directories rewrite wrote are ever
replaced. Swaps and clean-ups hold a lock on the parent directory, so runs publishing beside each other never
interleave them.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Self

from rewrite.errors import OutputError
from rewrite.formats.manifest import FORMAT, MANIFEST
from rewrite.modes import as_created

Refusal = Callable[[Path], str | None]  # why an existing output directory may not be replaced; None: it may
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries `a` and `b` in one step; False (nothing changed) where the system cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def is_rewrite_output(directory: Path) -> bool:
    """An empty directory, or one holding a regular `manifest.json` that rewrite wrote."""
    with os.scandir(directory) as entries:
        if not any(entries):
            return True
    manifest = directory / MANIFEST
    if manifest.is_symlink() or not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def rewrite_output_refusal(directory: Path) -> str | None:
    """Why an existing OUT may not be replaced (None: it may): only a directory rewrite wrote, or an empty one."""
    if is_rewrite_output(directory):
        return None
    return (f"exists, is not empty and holds no {MANIFEST} written by rewrite; it is never replaced: choose a new or "
            "empty directory")


def check_destination(out: Path, shown: str, refusal: Refusal = rewrite_output_refusal) -> Path:
    """Refuse, before any work, an OUT that cannot take the result (`refusal`: why an existing directory may not be
    replaced, None when it may); returns OUT with links resolved."""
    blocker = next((p for p in (out, *out.parents) if os.path.lexists(p) and not p.is_dir()), None)
    if blocker is not None:
        raise OutputError(f"output directory {shown!r}: {blocker} exists and is not a directory")
    out = out.resolve()
    if os.path.ismount(out):
        raise OutputError(f"output directory {shown!r} is a mount point, which cannot be replaced as a unit; use a "
                          "folder inside it as the output directory")
    if out.is_dir():
        if not os.access(out, os.R_OK | os.W_OK | os.X_OK):
            raise OutputError(f"output directory {shown!r} is not readable and writable")
        why = refusal(out)
        if why is not None:
            raise OutputError(f"output directory {shown!r} {why}")
    return out


def _try_lock(path: Path) -> int | None:
    """A descriptor holding the lock of directory `path`, or None: held by a live run, or not a directory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the lock of `directory`, waiting for it (a filesystem without locks is used unlocked)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def recover(out: Path) -> None:
    """With the parent locked: put back a previous result a killed swap left aside, then remove every temporary
    directory of OUT that no live run holds."""
    old, tmp = f".{out.name}.old-", f".{out.name}.tmp-"
    for entry in sorted(e for e in os.listdir(out.parent) if e.startswith((old, tmp))):  # .old- entries first
        path = out.parent / entry
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            if entry.startswith(old) and not os.path.lexists(out):
                os.rename(path, out)
            else:
                shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def swap(tmp: Path, out: Path) -> Path | None:
    """Make `tmp` OUT in one step; returns where the previous result now is (None when there was none)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return None
    if exchange(tmp, out):
        return tmp
    old = tmp.with_name(f".{out.name}.old-{tmp.name.rpartition('.tmp-')[2]}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    return old


def _make_parents(directory: Path, shown: str) -> list[Path]:
    """Create `directory` and its missing parents; returns those created, deepest first."""
    made: list[Path] = []
    for path in reversed([p for p in (directory, *directory.parents) if not os.path.lexists(p)]):
        try:
            path.mkdir()
        except OSError as err:
            _remove_empty(made)
            raise OutputError(f"output directory {shown!r}: cannot create {path}: {err.strerror or err}") from None
        made.insert(0, path)
    return made


def _remove_empty(directories: list[Path]) -> None:
    """Remove the directories (deepest first) that are still empty."""
    for path in directories:
        with suppress(OSError):
            path.rmdir()


class Staging:
    """`with Staging(out, shown) as staging:` build into `staging.tmp`, then `staging.publish()`. Leaving the block
    without publishing removes the temporary directory and any parent folder it created. `refusal` says why an
    existing OUT may not be replaced (default: it is not a rewrite output)."""

    def __init__(self, out: Path, shown: str, refusal: Refusal = rewrite_output_refusal):
        self.shown = shown
        self.out = check_destination(Path(out).absolute(), shown, refusal)
        self.tmp: Path | None = None
        self._created: list[Path] = []
        self._lock: int | None = None

    def __enter__(self) -> Self:
        self._created = _make_parents(self.out.parent, self.shown)
        try:
            with _locked(self.out.parent):
                self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
                as_created(self.tmp)  # it becomes OUT
                self._lock = _try_lock(self.tmp)
                recover(self.out)
        except OSError as err:
            self.__exit__(OSError, err, None)
            raise OutputError(f"output directory {self.shown!r}: cannot write in {self.out.parent}: "
                              f"{err.strerror or err}") from None
        return self

    def publish(self) -> list[str]:
        """Swap the result in for OUT; returns its top-level names. The previous result is removed (or, if that
        fails, by the next run)."""
        names = sorted(os.listdir(self.tmp))
        try:
            with _locked(self.out.parent):
                previous = swap(self.tmp, self.out)
                self.tmp = None
                if previous is not None:
                    shutil.rmtree(previous)
        except OSError as err:
            if self.tmp is not None:
                raise OutputError(f"output directory {self.shown!r}: cannot put the result in place: "
                                  f"{err.strerror or err}") from None
        return names

    def __exit__(self, kind, value, traceback) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if kind is not None:
            _remove_empty(self._created)
