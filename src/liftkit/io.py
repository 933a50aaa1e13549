"""Crash-safe file writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from liftkit.errors import LiftkitError

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "load_checkpoint", "save_checkpoint"]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over ``path``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        # A kill between mkstemp and replace must not leave the temp file behind or touch the target.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is synced.
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    # Our checkpoints hold RNG states and optimizer dicts, which weights_only loading cannot restore; they are
    # files this library wrote into the user's own output directory.
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, OSError... for a damaged file
        # torch's own message (a zip-reader or unpickling detail) does not tell the user what to do; the
        # traceback with it is one LIFTKIT_DEBUG=1 away
        raise LiftkitError(
            f"cannot resume: the checkpoint {path} is truncated or corrupt; remove it to start over or choose "
            "a new --out directory"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ValueError(f"{path} is not a liftkit checkpoint; use a new --out directory or remove the file")
    return state
