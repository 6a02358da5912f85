"""The run folder: the unit dip-train never destroys silently.

A run folder holds ``latest.pt`` (and ``step_XXXXXXXX.pt``), ``metrics.jsonl`` and ``samples/``.
:class:`RunFolder` is the trainer's handle on it:

- it checks that the folder can be written before any work is done;
- it holds an exclusive ``fcntl.flock`` on ``.dip-train.lock`` for the life of the run, so a second
  process cannot train into the same folder; the OS drops the lock when the process dies, so a
  ``kill -9`` never leaves a stale lock behind;
- under that lock it removes the temporaries a killed run left (:data:`dip.checkpoint.TEMP_PATTERN`);
- :meth:`RunFolder.start` decides how a run may start there: a folder that holds a run is refused
  unless ``resume`` (continue it) or ``overwrite`` (replace it) is given.

:class:`MetricsLog` writes ``metrics.jsonl``, and :func:`config_changes` compares the run config a
checkpoint was written under with the one a resumed run asks for.
"""
import fcntl
import json
import os
import re
import signal
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from . import checkpoint as ckpt
from .errors import OutputWriteError, RunFolderError

LOCK_NAME = ".dip-train.lock"
METRICS_NAME = "metrics.jsonl"
SAMPLES_DIR = "samples"
NUMBERED_CHECKPOINT = ckpt.NUMBERED  # step_XXXXXXXX.pt files and sharded step_XXXXXXXX.dcp folders
SAMPLE_GRID = re.compile(r"^step_\d{8}\.png$")
# the fault-injection tests set this to "<point>:<step>" to SIGKILL the trainer at that point
KILL_AT_ENV = "DIP_TEST_KILL_AT"


def kill_point(point: str, step: int):
    """Signal this process if DIP_TEST_KILL_AT is ``point:step[:SIGNAL[:RANK]]`` (fault-injection
    tests; SIGKILL unless SIGNAL names another, every rank unless RANK names one): "step" after an
    optimizer step, "accumulate" after a micro-batch's backward, "metrics" after its metrics line,
    "checkpoint" once the new checkpoint's temporary file is written but not yet renamed over
    latest.pt, "grid" / "fid" at the start of a sample grid / an FID measurement."""
    wanted = os.environ.get(KILL_AT_ENV, "").split(":")
    if wanted[:2] != [point, str(step)]:
        return
    if len(wanted) > 3 and wanted[3] != os.environ.get("RANK", "0"):
        return
    os.kill(os.getpid(), getattr(signal, "SIG" + wanted[2]) if len(wanted) > 2 else signal.SIGKILL)


class RunFolder:
    """An exclusively locked run folder (see the module docstring). Use :meth:`acquire`."""

    def __init__(self, path: str):
        self.path = path
        self.removed_temporaries: List[str] = []
        self._lock_fd: Optional[int] = None

    @classmethod
    def acquire(cls, path: str) -> "RunFolder":
        """Create ``path`` if needed, check it is writable, lock it and clean stale temporaries.
        Raises RunFolderError when it is not writable or another process holds the lock."""
        folder = cls(path)
        folder._check_writable()
        folder._lock()
        for sub in (path, os.path.join(path, SAMPLES_DIR)):
            folder.removed_temporaries += ckpt.remove_stale_temporaries(sub)
        return folder

    def _check_writable(self):
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise RunFolderError(f"--out {self.path} exists and is not a folder")
        try:
            os.makedirs(self.path, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe" + ckpt.TEMP_MARKER, suffix=".tmp", dir=self.path)
            os.close(fd)
            os.unlink(probe)
        except OSError as err:
            raise RunFolderError(f"--out {self.path} is not writable: {err.strerror or err}") from err

    def _lock(self):
        lock_path = os.path.join(self.path, LOCK_NAME)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.path} is in use by another dip-train (pid {holder}); "
                                 "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    @property
    def lock_fd(self) -> Optional[int]:
        """The descriptor that holds the lock (a forked data-loader worker closes its copy)."""
        return self._lock_fd

    def release(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    # -- what the folder holds
    def run_files(self) -> List[str]:
        """What a previous run left here: checkpoints, metrics.jsonl, samples/ (names, sorted)."""
        held = [name for name in sorted(os.listdir(self.path))
                if name in (ckpt.LATEST, METRICS_NAME) or NUMBERED_CHECKPOINT.match(name)]
        samples = os.path.join(self.path, SAMPLES_DIR)
        if os.path.isdir(samples) and any(SAMPLE_GRID.match(n) for n in os.listdir(samples)):
            held.append(SAMPLES_DIR + "/")
        return held

    def start(self, resume: Optional[str], overwrite: bool) -> Optional[str]:
        """The checkpoint to resume from (None: a new run), or RunFolderError when starting here
        would destroy or mix runs. ``resume`` is None, "auto" (this folder's latest.pt; a new or empty
        folder starts a new run) or a checkpoint path."""
        if resume and overwrite:
            raise RunFolderError("--resume and --overwrite contradict each other: choose one")
        held = self.run_files()
        listing = ", ".join(held)
        if not resume:
            if held and not overwrite:
                raise RunFolderError(f"{self.path} holds a run ({listing}); pass --resume to continue it "
                                     "or --overwrite to replace it")
            return None
        if resume == "auto":
            latest = os.path.join(self.path, ckpt.LATEST)
            if os.path.isfile(latest):
                return latest
            if any(ckpt.is_sharded_checkpoint(os.path.join(self.path, name)) for name in held):
                return self.path  # the newest of its sharded checkpoints that verifies
            if any(NUMBERED_CHECKPOINT.match(name) for name in held):
                raise RunFolderError(f"--resume: {self.path} holds a run ({listing}) but no {ckpt.LATEST} to "
                                     "resume from; pass --resume CHECKPOINT, or --overwrite to start again")
            # a run that ended before its first checkpoint (preemption, bad data) left only its log
            # and grids: nothing to continue, so the requeued command starts it again
            return None
        whole_run = ckpt.holds_only_sharded(resume)  # resumed from its newest sharded checkpoint that verifies
        path = resume if whole_run or ckpt.is_sharded_checkpoint(resume) else ckpt.resolve_checkpoint(resume)
        run_of_path = path if whole_run else os.path.dirname(os.path.normpath(path))
        if held and os.path.realpath(run_of_path) != os.path.realpath(self.path):
            raise RunFolderError(f"{self.path} holds a run ({listing}); resuming {path} of another folder into it "
                                 "would mix two runs: choose a new --out")
        return path

    def clear_previous_run(self):
        """Remove what a previous run left here (for ``overwrite``, once the new run is set up)."""
        for name in self.run_files():
            if name != SAMPLES_DIR + "/":
                ckpt.remove_checkpoint(os.path.join(self.path, name))
        samples = os.path.join(self.path, SAMPLES_DIR)
        if os.path.isdir(samples):
            for name in os.listdir(samples):
                if SAMPLE_GRID.match(name):
                    os.unlink(os.path.join(samples, name))


# ----------------------------------------------------------------------------- metrics.jsonl
class MetricsLog:
    """``metrics.jsonl``: one standard-JSON object per line (NaN and infinity written as null),
    each line written whole by one ``write`` and fsync'ed, so a kill leaves at most one torn last
    line. Opening it for a run resumed at step ``k`` keeps only the whole lines of steps <= k, which
    drops a torn line and the steps the resumed run will log again."""

    def __init__(self, path: str, resume_step: int = 0):
        self.path = path
        self.dropped = 0
        if os.path.exists(path):
            kept, self.dropped = _lines_up_to(path, resume_step)
            if self.dropped:
                with ckpt.atomic_write(path, "wb") as f:
                    f.write(b"".join(kept))
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as err:
            raise OutputWriteError(f"could not open {path} for writing: {err.strerror or err}") from err

    def append(self, record: Dict[str, Any]):
        line = (json.dumps(ckpt.json_safe(record), allow_nan=False) + "\n").encode()
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # a full disk; the torn line is dropped at the next resume
                raise OSError(28, "short write (disk full?)")
            os.fsync(self._fd)
        except OSError as err:
            raise OutputWriteError(f"could not append to {self.path}: {err.strerror or err}") from err

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _lines_up_to(path: str, step: int) -> Tuple[List[bytes], int]:
    """(the newline-terminated lines of ``path`` that hold a JSON object with "step" <= ``step``,
    how many other lines there were)."""
    with open(path, "rb") as f:
        chunks = f.read().split(b"\n")
    kept, dropped = [], 0
    for i, chunk in enumerate(chunks):
        if not chunk.strip():
            continue
        whole = i < len(chunks) - 1  # the text after the last newline is a torn line
        try:
            record = json.loads(chunk) if whole else None
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(chunk + b"\n")
        else:
            dropped += 1
    return kept, dropped


# ----------------------------------------------------------------------------- resume checks
# run settings a checkpoint cannot continue under: with another model, objective, image size,
# global batch or seed, its weights, optimizer moments and data position would mean something else
INCOMPATIBLE = ("model", "objective", "image_size", "global_batch", "seed", "repa", "repa_depth", "repa_encoder",
                "repa_input_size", "repa_proj_hidden")
# where a run is kept and how it was started are no part of the run
IGNORED = ("out", "resume", "overwrite", "progress", "model_overrides", "stop_signals")  # model_overrides: see model_config


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def config_changes(saved: Dict[str, Any], new: Dict[str, Any]) -> Tuple[List[str], List[str]]:
    """(refused, allowed): ``"name old -> new"`` for each setting that differs between the state a
    checkpoint was written under and the one a resumed run asks for. Both are dicts with the keys
    ``config`` (TrainConfig fields), ``model_config`` (DiPConfig fields) and ``classes`` (the data's
    class names); a key missing on either side (older checkpoints) is not compared."""
    refused, allowed = [], []
    old_cfg, new_cfg = saved.get("config") or {}, new.get("config") or {}
    for name in sorted(set(old_cfg) & set(new_cfg)):
        if name in IGNORED or _normalise(old_cfg[name]) == _normalise(new_cfg[name]):
            continue
        change = f"{name} {_short(old_cfg[name])} -> {_short(new_cfg[name])}"
        (refused if name in INCOMPATIBLE else allowed).append(change)
    old_model, new_model = saved.get("model_config") or {}, new.get("model_config") or {}
    for name in sorted(set(old_model) & set(new_model)):
        if old_model[name] != new_model[name]:
            refused.append(f"model.{name} {_short(old_model[name])} -> {_short(new_model[name])}")
    old_classes, new_classes = saved.get("classes"), new.get("classes")
    if old_classes is not None and new_classes is not None and list(old_classes) != list(new_classes):
        differ = sorted(set(old_classes) ^ set(new_classes))
        detail = f", e.g. {differ[0]!r}" if differ else " (another order)"
        refused.append(f"data classes {len(old_classes)} -> {len(new_classes)}{detail}")
    return refused, allowed


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value
