"""dpfl's own files: ``torch.save`` payloads tagged with a format, written atomically."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dpfl.errors import UsageError


def cache_dir() -> Path:
    """Where dpfl keeps what it computes once per machine (pretrained weights, parsed data):
    ``DPFL_CACHE_DIR``, else ``$XDG_CACHE_HOME/dpfl``, else ``~/.cache/dpfl``."""
    if "DPFL_CACHE_DIR" in os.environ:
        return Path(os.environ["DPFL_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "dpfl"


def write_atomically(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, make it durable, then rename it to ``path``.

    A crash at any point leaves either the old file or the new one, never half a
    file: the data are fsynced before the rename, and the folder after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with tmp.open("rb+") as written:
            os.fsync(written.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def save_tagged(path: str | Path, file_format: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` under the tag ``file_format``; a save cut short never leaves half a file."""
    write_atomically(path, lambda tmp: torch.save({"format": file_format, **payload}, tmp))


def load_tagged(path: str | Path, file_format: str, kind: str) -> dict[str, Any]:
    """The payload of a ``file_format`` file; anything else is a one-line error naming ``kind``."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{kind} {str(path)!r} is a folder; give the {kind} file itself")
    if not path.is_file():
        raise UsageError(f"{kind} {str(path)!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's to fix
        # torch's own message would advise loading with weights_only=False: never for a file one cannot read.
        raise UsageError(
            f"{kind} {str(path)!r} is not a dpfl {kind}, or is cut short or damaged (torch.load: {err.__class__.__name__})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != file_format:
        raise UsageError(f"{kind} {str(path)!r} is not a dpfl {kind} ({file_format})")
    return payload

