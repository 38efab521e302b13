"""How the commands print: a console that never cuts a table or wraps a command for a log
or a pipe, and the progress of the library's long jobs (:mod:`dpfl.progress`).

In a terminal every running stage is a rich progress bar (what is being done, steps
done of all, time spent and left); a finished stage's bar goes away. When stdout is
not a terminal (a log file, CI, a pipe) nothing is redrawn: each stage is one plain
line when it starts, with the time since the command began, and a line with its steps
done when one finishes a minute or more after that stage's last line (a deployment's
sweep runs for minutes between stage starts; a log should still show it moving).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Columns of a console that is not a terminal: rich would lay tables out in 80 and cut
# the cells (layer names) that do not fit; a log has no width to respect.
LOG_WIDTH = 400

# Seconds between two plain lines of one running stage, in a log.
LOG_INTERVAL = 60.0


def make_console() -> Console:
    """The console of a command: the terminal's width, or :data:`LOG_WIDTH` when stdout is not a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=LOG_WIDTH)


class ProgressDisplay:
    """A :data:`dpfl.progress.Progress` callback that draws on ``console``; use it as a context manager."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console = console
        self.clock = clock
        self.started = clock()
        self._tasks: dict[str, TaskID] = {}  # a running stage's bar, in a terminal
        self._logged: dict[str, float] = {}  # when a running stage's last line was printed, in a log
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
            now = self.clock()
            if stage not in self._logged:
                self._logged[stage] = now
                self._log_line(now, f"{stage} ({total} step{'' if total == 1 else 's'})")
            elif done < total and now - self._logged[stage] >= LOG_INTERVAL:
                self._logged[stage] = now
                self._log_line(now, f"{stage}: {done}/{total}")
            if done >= total:
                del self._logged[stage]
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._bars.add_task(stage, total=total)
        self._bars.update(self._tasks[stage], completed=done, total=total)
        if done >= total:
            self._bars.remove_task(self._tasks.pop(stage))

    def _log_line(self, now: float, text: str) -> None:
        self.console.print(f"[{now - self.started:6.0f} s] {text}", markup=False, highlight=False, soft_wrap=True)
