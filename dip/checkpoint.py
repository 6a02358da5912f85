"""Checkpoint files: atomic writes and RNG-state capture.

A checkpoint is one ``torch.save``'d dict. It is written to a temporary file in the destination
folder, fsync'ed, then ``os.replace``'d over the target, so a crash or an error mid-write leaves
the previous ``latest.pt`` untouched (``os.replace`` is atomic within one filesystem). Only rank 0
should call :func:`save_checkpoint`; the trainer gathers what it needs from the other ranks first.
"""
import contextlib
import os
import random
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

LATEST = "latest.pt"


def _fsync_dir(path: str):
    # the rename itself must reach the disk too, or a power cut could bring back the old entry
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success it is fsync'ed and renamed over
    ``path``, on any error it is removed. So ``path`` holds either the old or the new file, never a
    partial one. Every output file the package writes (checkpoint, .npz, PNG, JSON) goes through here."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; an output is an ordinary file
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str):
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)


def save_checkpoint(state: Dict[str, Any], out_dir: str, step: int, keep_numbered: bool = False) -> str:
    """Write ``state`` as ``<out_dir>/latest.pt`` (and ``step_<step>.pt`` when ``keep_numbered``).
    Returns the path of latest.pt."""
    latest = os.path.join(out_dir, LATEST)
    if keep_numbered:
        atomic_save(state, os.path.join(out_dir, f"step_{step:08d}.pt"))
    atomic_save(state, latest)
    return latest


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run folder (meaning its latest.pt)."""
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    path = resolve_checkpoint(path)
    # our own files hold numpy RNG states and plain Python objects besides tensors
    return torch.load(path, map_location=map_location, weights_only=False)


def capture_rng_state() -> Dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
