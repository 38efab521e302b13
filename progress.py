"""Progress of long jobs, reported to a callback that the caller draws: library functions never print.

A job calls ``progress(stage, done, total)``: ``stage`` says in a few words what it is
doing ("analog accuracy, mdm mapping, tile 128"), and ``done`` of ``total`` steps of that
stage are finished. A stage is reported with ``done = 0`` when it starts and reaches
``done = total`` when it ends; stages are told apart by their text, so a job may run one
inside another (mappings outside, image batches inside). ``dpfl.cli`` draws each as a
progress bar with an ETA, or as one plain line when its output is not a terminal.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import TypeVar

Progress = Callable[[str, int, int], None]
Item = TypeVar("Item")


def no_progress(stage: str, done: int, total: int) -> None:
    """The default callback: report nothing."""


def tracked(items: Collection[Item], stage: str, progress: Progress) -> Iterator[Item]:
    """``items`` one by one, each reported as a finished step of ``stage`` once the caller moves on."""
    progress(stage, 0, len(items))
    for done, item in enumerate(items, 1):
        yield item
        progress(stage, done, len(items))
