"""Output files: atomic writes, checkpoints with a checksum, standard JSON, RNG-state capture.

Every file the package writes goes through :func:`atomic_write`: a temporary file in the
destination folder (``.<name>.dip-XXXXXXXX.tmp``, see :data:`TEMP_PATTERN`), fsync'ed, then
``os.replace``'d over the target, so a crash, a full disk or an error mid-write leaves the previous
file untouched (``os.replace`` is atomic within one filesystem). A failed write raises
:class:`dip.errors.OutputWriteError` (one line at the command line).

A checkpoint is one ``torch.save``'d dict with a ``"checksum"`` entry: the sha256 of everything else
in it (every tensor's dtype, shape and bytes, every other value's type and repr, in a fixed order).
:func:`load_checkpoint` recomputes it, so a flipped or truncated byte gives a
:class:`dip.errors.CheckpointError` instead of weights that silently train to NaN. Only rank 0 should
call :func:`save_checkpoint`; the trainer gathers what it needs from the other ranks first.

A sharded checkpoint (FSDP2, see dip.sharded_checkpoint) is a folder ``step_XXXXXXXX.dcp``: the
torch.distributed.checkpoint files (one ``.distcp`` shard per rank and ``.metadata``) and
``dip-state.pt``, a checkpoint dict as above with the run's other state and the sha256 of every
file of the folder, written last. :func:`verify_sharded_checkpoint` checks them all. The numbered
checkpoints of a run folder (``step_XXXXXXXX.pt`` files and ``.dcp`` folders) rotate together, and
``latest.pt``, when there is one, is always the newest.
"""
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import CheckpointError, OutputWriteError
from .models import DiPConfig, build_model, state_dict_mismatches

LATEST = "latest.pt"
SHARDED_SUFFIX = ".dcp"  # a sharded checkpoint is the folder step_XXXXXXXX.dcp
SHARDED_STATE = "dip-state.pt"  # in it: the run's state and the files' checksums
CHECKSUM_KEY = "checksum"
# the temporary files atomic_write makes (and a killed process leaves behind); the marker keeps
# the cleanup at the next start away from anybody else's temporaries
TEMP_MARKER = ".dip-"
TEMP_PATTERN = re.compile(r"^\..+" + re.escape(TEMP_MARKER) + r"[a-z0-9_]{8}\.tmp$")  # mkstemp's 8 characters
# what atomic_save's temporaries of checkpoints were called before the marker
LEGACY_TEMP_PATTERN = re.compile(r"^\.(latest\.pt|step_\d{8}\.pt)\.[a-z0-9_]{8}\.tmp$")


def fsync_dir(path: str):
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


class _WriteErrorRecorder:
    """A file object that remembers an OSError raised by ``write``: torch.save turns it into an
    opaque RuntimeError ("unexpected pos 64 vs 0"), and this lets atomic_write report the real cause."""

    def __init__(self, f):
        self._f = f
        self.error: Optional[OSError] = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _write_failed(path: str, err: OSError) -> OutputWriteError:
    reason = err.strerror or str(err)
    kept = "it was left as it was" if os.path.exists(path) else "nothing was written"
    return OutputWriteError(f"could not write {path}: {reason}; {kept}")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Open a temporary file beside ``path`` for writing; on success it is fsync'ed and renamed over
    ``path``, on any error it is removed. So ``path`` holds either the old or the new file, never a
    partial one. Every output file the package writes (checkpoint, .npz, PNG, JSON) goes through here.
    A write, flush, fsync or rename that fails (ENOSPC, EACCES, ...) raises OutputWriteError; so does
    any OSError raised inside the block, which is taken to come from writing the file."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + TEMP_MARKER, suffix=".tmp", dir=folder)
    except OSError as err:
        raise _write_failed(path, err) from err
    recorder = None
    try:
        with os.fdopen(fd, mode) as f:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; an output is an ordinary file
            recorder = _WriteErrorRecorder(f)
            yield recorder
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OutputWriteError):
            raise
        # a failed write, flush, fsync or rename: OSError itself, or whatever the writer (torch.save
        # raises RuntimeError) made of the OSError that write() raised
        cause = err if isinstance(err, OSError) else (recorder.error if recorder is not None else None)
        if cause is not None:
            raise _write_failed(path, cause) from err
        raise
    fsync_dir(folder)


def check_output(path: str, flag: str, overwrite: bool):
    """Refuse, before any work, an output ``path`` that exists (unless ``overwrite``), is a folder, or
    cannot be written (a probe file is made beside it and removed). One-line errors name ``flag``."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag} {path} is a folder; name the file to write")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{flag} {path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    parent = folder
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{flag} {path} cannot be written: {parent} is a file, not a folder")
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe" + TEMP_MARKER, suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputWriteError(f"{flag} {path} cannot be written: {err.strerror or err}") from None


def atomic_save(obj: Any, path: str, before_rename: Optional[Callable[[], None]] = None):
    """``torch.save(obj, path)`` through :func:`atomic_write`; ``before_rename()`` runs once the
    temporary file holds the whole payload (the fault-injection tests kill the process there)."""
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
        if before_rename is not None:
            f.flush()
            before_rename()


def remove_stale_temporaries(folder: str, outputs: Optional[List[str]] = None) -> list:
    """Remove the temporary files a killed atomic_write left in ``folder`` (ours only: they match
    TEMP_PATTERN or LEGACY_TEMP_PATTERN; with ``outputs``, only those of these file names). The
    caller must make sure no live process of ours writes there (the run lock, or the same output
    about to be written). Returns the names removed."""
    prefixes = tuple("." + name + TEMP_MARKER for name in outputs) if outputs is not None else ("",)
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        ours = TEMP_PATTERN.match(name) or (outputs is None and LEGACY_TEMP_PATTERN.match(name))
        if ours and name.startswith(prefixes):
            path = os.path.join(folder, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):  # a sharded checkpoint's folder
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed


# ----------------------------------------------------------------------------- standard JSON
def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN / infinite float replaced by None, so it serialises as standard JSON
    (json.dumps writes NaN and Infinity, which strict parsers reject)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(path: str, obj: Any):
    """``obj`` as standard JSON (non-finite numbers as null) through :func:`atomic_write`."""
    with atomic_write(path, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
        f.write("\n")


# ----------------------------------------------------------------------------- checksum
def _feed(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, np.ndarray):
        h.update(f"ndarray {obj.dtype.str} {obj.shape};".encode())
        h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _feed(h, value)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"{type(obj).__name__} {obj!r};".encode())
    else:  # a repr with an address in it would never match again: what we save must not hold one
        raise TypeError(f"cannot checksum a {type(obj).__name__} in a checkpoint")


def state_checksum(state: Dict[str, Any]) -> str:
    """The sha256 (hex) of a checkpoint dict, its own ``"checksum"`` entry left out."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != CHECKSUM_KEY})
    return h.hexdigest()


def with_checksum(state: Dict[str, Any]) -> Dict[str, Any]:
    """A copy of the checkpoint dict ``state`` with its ``"checksum"`` entry (see the module docstring)."""
    return {**state, CHECKSUM_KEY: {"sha256": state_checksum(state)}}


def write_checkpoint(state: Dict[str, Any], path: str, before_rename: Optional[Callable[[], None]] = None):
    """``state`` with its checksum, written atomically to ``path`` (``before_rename``: see atomic_save)."""
    atomic_save(with_checksum(state), path, before_rename)


NUMBERED = re.compile(r"^step_(\d{8})\.(pt|dcp)$")


def numbered_checkpoints(folder: str) -> List[str]:
    """The numbered checkpoints in ``folder`` (``step_XXXXXXXX.pt`` files and sharded
    ``step_XXXXXXXX.dcp`` folders), newest step first."""
    try:
        names = [n for n in os.listdir(folder) if NUMBERED.match(n)]
    except FileNotFoundError:
        return []
    return [os.path.join(folder, n) for n in sorted(names, reverse=True)]


def checkpoint_step(path: str) -> int:
    """The step of a numbered checkpoint, from its name."""
    return int(NUMBERED.match(os.path.basename(path)).group(1))


def is_sharded_checkpoint(path: str) -> bool:
    name = os.path.basename(os.path.normpath(path))
    return os.path.isdir(path) and NUMBERED.match(name) is not None and name.endswith(SHARDED_SUFFIX)


def holds_only_sharded(folder: str) -> bool:
    """Whether ``folder`` is a run folder with sharded checkpoints and no latest.pt."""
    return os.path.isdir(folder) and not os.path.exists(os.path.join(folder, LATEST)) \
        and any(map(is_sharded_checkpoint, numbered_checkpoints(folder)))


def _link_or_copy(src: str, dst: str):
    """``dst`` becomes the same file as ``src`` (a hard link: no second write), atomically."""
    tmp = os.path.join(os.path.dirname(dst), "." + os.path.basename(dst) + TEMP_MARKER + "link0000.tmp")
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:  # a filesystem without hard links
        with open(src, "rb") as f_in, atomic_write(dst, "wb") as f_out:
            while chunk := f_in.read(1 << 24):
                f_out.write(chunk)


def remove_checkpoint(path: str):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def rotate(out_dir: str, step: int, keep_last: int, milestone_every: int):
    """Remove the numbered checkpoints beyond the ``keep_last`` newest (the one of ``step``, just
    written, counts as one), milestones (steps that ``milestone_every`` divides) excepted. Only
    checkpoints older than ``step`` go, so the last good checkpoint is never removed."""
    older = [p for p in numbered_checkpoints(out_dir) if checkpoint_step(p) < step
             and not (milestone_every and checkpoint_step(p) % milestone_every == 0)]
    for path in older[max(keep_last, 1) - 1:]:
        remove_checkpoint(path)


def save_checkpoint(state: Dict[str, Any], out_dir: str, step: int, keep_numbered: bool = False,
                    before_rename: Optional[Callable[[], None]] = None, keep_last: int = 1,
                    milestone_every: int = 0) -> str:
    """Write ``state`` with its checksum as ``<out_dir>/latest.pt``; also as ``step_<step>.pt`` (a
    hard link to it) when older checkpoints are kept: all of them (``keep_numbered``), the
    ``keep_last`` newest (latest.pt's step included), and every ``milestone_every``-th step. The
    numbered ones beyond that are removed once the new one is written. Returns latest.pt's path.
    ``before_rename``: see atomic_save."""
    latest = os.path.join(out_dir, LATEST)
    atomic_save(with_checksum(state), latest, before_rename)
    milestone = bool(milestone_every) and step % milestone_every == 0
    if keep_numbered or keep_last > 1 or milestone:
        _link_or_copy(latest, os.path.join(out_dir, f"step_{step:08d}.pt"))
    if not keep_numbered:
        rotate(out_dir, step, keep_last, milestone_every)
    return latest


def _numbered_twin(out_dir: str, latest: str) -> Optional[str]:
    for path in numbered_checkpoints(out_dir):
        if path.endswith(".pt") and os.path.samefile(path, latest):
            return path
    return None


def keep_latest_as_numbered(out_dir: str):
    """Before a sharded checkpoint is written: make sure ``latest.pt`` (a single file, from a run on
    another number of processes or from before sharding) is also a numbered checkpoint, so that
    :func:`retire_latest` can drop the name latest.pt once the newer sharded one is in place. A
    latest.pt that does not load is left for resume to refuse."""
    latest = os.path.join(out_dir, LATEST)
    if not os.path.isfile(latest) or _numbered_twin(out_dir, latest):
        return
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            step = int(torch.load(latest, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # unreadable or not ours: resume refuses it and falls back, saying so
        return
    _link_or_copy(latest, os.path.join(out_dir, f"step_{step:08d}.pt"))


def retire_latest(out_dir: str):
    """Once a sharded checkpoint is in place, ``latest.pt`` is no longer the newest: it goes, its
    numbered twin (see keep_latest_as_numbered) stays in the rotation."""
    latest = os.path.join(out_dir, LATEST)
    if os.path.isfile(latest) and _numbered_twin(out_dir, latest):
        os.unlink(latest)
        fsync_dir(out_dir)


def load_newest_good(folder: str, map_location="cpu", verify_sharded: Optional[Callable[[str], Dict[str, Any]]] = None
                     ) -> Tuple[Dict[str, Any], str, List[str]]:
    """(state, path, the refusals of newer ones) of the newest checkpoint in ``folder`` that loads
    and verifies: latest.pt, else the numbered ones from the newest (a sharded one's state is its
    dip-state.pt, checked by ``verify_sharded``, default :func:`verify_sharded_checkpoint`).
    CheckpointError when none does (the message is the newest's)."""
    refusals: List[str] = []
    for path in [os.path.join(folder, LATEST)] + numbered_checkpoints(folder):
        if not os.path.exists(path):
            continue
        try:
            if is_sharded_checkpoint(path):
                return (verify_sharded or verify_sharded_checkpoint)(path), path, refusals
            return load_checkpoint(path, map_location), path, refusals
        except CheckpointError as err:
            refusals.append(str(err))
    raise CheckpointError(refusals[0] if refusals else f"{folder} holds no checkpoint")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def verify_sharded_checkpoint(path: str, part: Tuple[int, int] = (0, 1)) -> Dict[str, Any]:
    """The state in a sharded checkpoint folder's dip-state.pt (with ``"sharded"``: the folder),
    after checking its checksum and that the folder holds exactly the files it lists, each with its
    sha256 (``part=(i, n)``: only every n-th file from the i-th, so that n processes share the
    reading). CheckpointError (one line) for a folder that is incomplete or corrupt."""
    state_path = os.path.join(path, SHARDED_STATE)
    if not os.path.isfile(state_path):
        raise CheckpointError(f"{path} is incomplete: it has no {SHARDED_STATE} (its save did not finish)")
    state = load_checkpoint(state_path)
    files = state.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{state_path} lists no files: it is not a sharded dip-train checkpoint")
    present = sorted(set(os.listdir(path)) - {SHARDED_STATE})
    if present != sorted(files):
        missing = sorted(set(files) - set(present)) or sorted(set(present) - set(files))
        raise CheckpointError(f"{path} is incomplete or foreign: its files differ from the list in "
                              f"{SHARDED_STATE} (e.g. {missing[0]})")
    for name, digest in sorted(files.items())[part[0]::part[1]]:
        if file_sha256(os.path.join(path, name)) != digest:
            raise CheckpointError(f"{path} is corrupt: the sha256 of {name} does not match (flipped or lost "
                                  "bytes); use an older checkpoint")
    return {**state, "sharded": path}


def cpu_snapshot(obj: Any) -> Any:
    """A copy of ``obj`` with every tensor copied to new CPU memory: what a background write may
    read while training goes on updating the live tensors."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs one checkpoint write at a time on a thread. :meth:`submit` first waits for the write in
    flight (at most one), :meth:`wait` waits for it; both raise the error it ended with."""

    def __init__(self):
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def _run(self, write: Callable[[], Any]):
        try:
            write()
        except BaseException as err:  # raised again in the training thread by wait()
            self._error = err

    def submit(self, write: Callable[[], Any]):
        self.wait()
        self._thread = threading.Thread(target=self._run, args=(write,), name="dip-checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run folder (meaning its latest.pt). A sharded checkpoint, or a run
    folder that holds only sharded ones, is refused with the dip-convert line that makes a file of it."""
    if is_sharded_checkpoint(path) or holds_only_sharded(path):
        raise CheckpointError(f"{path} holds sharded (FSDP2) checkpoints, not a single file; make one with "
                              f"dip-convert {path} OUT.pt")
    if os.path.isdir(path):
        path = os.path.join(path, LATEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    return path


def _numpy_array_globals() -> list:
    # checkpoints of dip-train before the numpy RNG state was stored as a tensor hold one numpy
    # array; rebuilding an array from its bytes runs nothing of the file's
    core = getattr(np, "_core", None) or np.core
    reconstruct = core.multiarray._reconstruct
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def _refused_global(err: Exception) -> Optional[str]:
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return found.group(1) if found else None


def load_weights_only(path: str, map_location="cpu") -> Any:
    """What ``torch.save`` wrote to ``path``, read with ``torch.load(weights_only=True)``: tensors and
    plain values only, so a crafted file cannot run code while it loads. A file that holds any other
    pickled object is refused (CheckpointError, one line naming it), as is an unreadable one."""
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as err:  # whatever the bytes make torch.load / pickle raise, the file is at fault
        refused = _refused_global(err)
        if refused:
            raise CheckpointError(f"{path} was refused: it holds a pickled {refused}, which is not plain data and "
                                  "could run code when loaded; dip loads only tensors and plain values") from None
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, empty or not a torch file?): "
                              f"{detail}") from None


def verify_checkpoint(state: Any, path: str) -> Dict[str, Any]:
    """``state`` (a loaded file) without its checksum entry, the checksum verified when it has one
    (dip-train writes one; other files, and ours from before the checksum, are taken as they are)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict")
    state = dict(state)
    expected = state.pop(CHECKSUM_KEY, None)
    if isinstance(expected, dict) and "sha256" in expected:
        try:
            actual = state_checksum(state)
        except TypeError as err:  # a damaged pickle can make objects a checkpoint never holds
            raise CheckpointError(f"{path} is corrupt: {err}") from None
        if actual != expected["sha256"]:
            raise CheckpointError(f"{path} is corrupt: its sha256 checksum does not match its contents "
                                  "(flipped or lost bytes); use an older checkpoint")
    elif "model_config" in state:
        warnings.warn(f"{path} has no checksum (written before dip-train stored one); it is not verified",
                      RuntimeWarning)
    return state


def load_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """A checkpoint dict (a file, or a run folder meaning its latest.pt) read by
    :func:`load_weights_only` and verified by :func:`verify_checkpoint`. An unreadable, truncated,
    empty, corrupt or code-carrying file raises CheckpointError."""
    path = resolve_checkpoint(path)
    return verify_checkpoint(load_weights_only(path, map_location), path)


def load_state_dict_checked(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], path: str):
    """``module.load_state_dict(state_dict)``, a mismatch reported as one CheckpointError line
    (load_state_dict's own message is a multi-line list of every key)."""
    missing, unexpected, shapes = state_dict_mismatches(module.state_dict(), state_dict)
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("different shape", shapes)):
        if keys:
            problems.append(f"{len(keys)} {what} (e.g. {keys[0]})")
    if problems:
        raise CheckpointError(f"{path} does not fit this model: {', '.join(problems)}")
    module.load_state_dict(state_dict)


def nonfinite_tensors(state_dict: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold NaN or infinity."""
    return [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def model_from_state(state: Dict[str, Any], path: str, use_ema: bool = True, device="cpu"):
    """The model (in eval mode) of a loaded dip-train checkpoint dict; its EMA weights unless
    ``use_ema`` is False or it has none."""
    if "model_config" not in state or "model" not in state:
        raise ValueError(f"{path!r} is not a dip-train checkpoint (no model_config / model)")
    try:
        config = DiPConfig(**state["model_config"])
    except TypeError as err:
        raise CheckpointError(f"{path!r} holds a model config this DiP does not know: {err}") from None
    model = build_model(config)
    load_state_dict_checked(model, state["ema"] if use_ema and state.get("ema") is not None else state["model"], path)
    return model.to(device).eval()


def load_model_from_checkpoint(path: str, use_ema: bool = True, device="cpu"):
    """(model in eval mode, checkpoint dict) from a dip-train checkpoint file or run folder."""
    state = load_checkpoint(path)
    return model_from_state(state, path, use_ema, device), state


def capture_rng_state() -> Dict[str, Any]:
    """Every RNG state of this process as tensors and plain values (so a checkpoint loads with
    ``weights_only=True``)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_rng_state(saved) -> tuple:
    if isinstance(saved, dict):
        return (saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["pos"], saved["has_gauss"],
                saved["cached_gaussian"])
    return tuple(saved)  # np.random.get_state() itself, as checkpoints before the tensor form hold it


def restore_rng_state(state: Optional[Dict[str, Any]]):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_rng_state(state["numpy"]))
    random.setstate(_as_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _as_tuples(value):
    # random.setstate wants the tuples random.getstate() gave
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value
