"""How the commands print: a console that never cuts a table or wraps a command for a log
or a pipe, and the progress of the library's long jobs (:mod:`dpfl.progress`).

In a terminal every running stage is a rich progress bar (what is being done, steps
done of all, time spent and left); a finished stage's bar goes away. When stdout is
not a terminal (a log file, CI, a pipe) nothing is redrawn: each stage is one plain
line when it starts, with the time since the command began.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Columns of a console that is not a terminal: rich would lay tables out in 80 and cut
# the cells (layer names) that do not fit; a log has no width to respect.
LOG_WIDTH = 400


def make_console() -> Console:
    """The console of a command: the terminal's width, or :data:`LOG_WIDTH` when stdout is not a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH)


class ProgressDisplay:
    """A :data:`dpfl.progress.Progress` callback that draws on ``console``; use it as a context manager."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.started = time.monotonic()
        self._tasks: dict[str, int] = {}
        self._bars = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn(), console=console, transient=True,
        ) if console.is_terminal else None  # fmt: skip

    def __enter__(self) -> ProgressDisplay:
        if self._bars is not None:
            self._bars.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._bars is not None:
            self._bars.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._bars is None:
            if stage not in self._tasks:
                self._tasks[stage] = 0
                steps = f"{total} step{'' if total == 1 else 's'}"
                self.console.print(f"[{time.monotonic() - self.started:6.0f} s] {stage} ({steps})",
                                   markup=False, highlight=False, soft_wrap=True)  # fmt: skip
            if done >= total:
                del self._tasks[stage]
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._bars.add_task(stage, total=total)
        self._bars.update(self._tasks[stage], completed=done, total=total)
        if done >= total:
            self._bars.remove_task(self._tasks.pop(stage))
