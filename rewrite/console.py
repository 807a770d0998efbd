"""The CLI's live display on stderr: a line for the current stage and a bar per running task (training steps,
probing, calibration batches) with its fields (loss) and ETA; finished stages are logged above it. The
display is transient: nothing of it stays in the terminal or reaches a file or pipe (rich draws nothing when
stderr is not a terminal)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, \
    TimeRemainingColumn


class LiveProgress:
    """A `rewrite.progress.Reporter` on a rich `Progress`; use as a context manager."""

    def __init__(self, console: Console, first_step: str = "loading the model"):
        self.console = console
        self.first_step = first_step
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                 console=console, transient=True)
        self.stage: TaskID | None = None

    def __enter__(self) -> LiveProgress:
        if self.console.is_terminal:  # elsewhere rich would still end the display with a blank line
            self.progress.start()
        self.stage = self.progress.add_task(self.first_step, total=None, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def done(self, name: str, seconds: float, next_step: str) -> None:
        """Log a finished stage above the display and say what runs now."""
        self.console.log(f"[green]done[/] {name} ({seconds:.2f} s)")
        self.progress.update(self.stage, description=next_step)

    def start(self, description: str, total: int | None) -> TaskID:
        return self.progress.add_task(description, total=total, info="")

    def advance(self, handle: TaskID, fields: dict[str, Any]) -> None:
        self.progress.update(handle, advance=1, info="  ".join(f"{k}={v}" for k, v in fields.items()))

    def finish(self, handle: TaskID) -> None:
        self.progress.remove_task(handle)
