"""Progress of long steps (training, probing, calibration, export), shown by whoever runs the compiler.

Library code announces a task and advances it; a front-end (the CLI's rich progress bars) installs a `Reporter`
with `reporting(...)`. Without one, nothing is shown and a task costs one function call per step:

    with task("train 'default'", total=steps) as advance:
        for step in ...:
            advance(loss=float(loss))          # one step; fields (loss, ...) are shown beside the bar
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

Advance = Callable[..., None]
T = TypeVar("T")


class Reporter(Protocol):
    def start(self, description: str, total: int | None) -> Any: ...

    def advance(self, handle: Any, fields: dict[str, Any]) -> None: ...

    def finish(self, handle: Any) -> None: ...


_reporter: Reporter | None = None


@contextlib.contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Show the tasks started inside this block with `reporter` (None: show nothing)."""
    global _reporter
    previous, _reporter = _reporter, reporter
    try:
        yield
    finally:
        _reporter = previous


def _ignore(**fields: Any) -> None:
    return None


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Advance]:
    """A task of `total` steps (None: unknown); the yielded function advances it by one step."""
    reporter = _reporter
    if reporter is None:
        yield _ignore
        return
    handle = reporter.start(description, total)

    def advance(**fields: Any) -> None:
        reporter.advance(handle, fields)

    try:
        yield advance
    finally:
        reporter.finish(handle)


def tracked(items: Iterable[T], description: str, total: int | None = None,
            fields: Callable[[], dict[str, Any]] = dict) -> Iterator[T]:
    """`items`, advancing the task once the loop body has finished with each one (`fields()` read then)."""
    with task(description, total) as advance:
        for item in items:
            yield item
            advance(**fields())
