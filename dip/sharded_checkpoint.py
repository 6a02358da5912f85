"""FSDP2 checkpoints in shards: each rank writes its own part through torch.distributed.checkpoint.

A sharded checkpoint is the folder ``<run>/step_XXXXXXXX.dcp`` (its files: see dip.checkpoint).
:func:`save_sharded` writes it the way every dip-train output is written: rank 0 makes a temporary
folder beside it (``.step_XXXXXXXX.dcp.dip-XXXXXXXX.tmp``); every rank writes its shards of the
model, optimizer moments and EMA into it with ``dcp.save`` (``dcp.async_save`` behind the training
with ``async_save``) and hashes the files it wrote; rank 0 then writes ``dip-state.pt`` (the run's
other state, in plain values and tensors, and the sha256 of every file) and renames the folder into
place. Only then do older checkpoints rotate away. No rank ever holds the whole model.

:func:`load_tensors` reads a checkpoint into whatever sharding the loading run has (FSDP2 on another
number of processes, DDP, or one process): DCP reshards. DCP itself would unpickle ``.metadata``
and read non-tensor items with ``torch.load(weights_only=False)``, either of which runs what a
crafted file asks; here the metadata goes through an unpickler that rebuilds DCP's own metadata
classes only, and a non-tensor item is refused (dip-train's sharded checkpoints hold tensors only).
"""
import os
import pickle
import shutil
import tempfile
import warnings
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta

from . import checkpoint as ckpt
from .distributed import DistEnv, local_shard
from .errors import CheckpointError, OutputWriteError
from .models import DiPConfig, build_model

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# what DCP pickles into .metadata: its own plain record classes, torch.Size and the names of dtypes
# and layouts; rebuilding any of these calls no function of the file's choosing
METADATA_GLOBALS = {(_DCP_METADATA, name) for name in (
    "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
    "StorageMeta", "MetadataIndex", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format))
        if (module, name) in METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it holds a pickled {module}.{name}")


class SafeMetadataReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` rebuilt by :class:`_MetadataUnpickler`."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        path = os.path.join(str(self.path), ".metadata")
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as err:
            self.refusal = CheckpointError(f"{path} was refused: {err}; a sharded dip-train checkpoint holds "
                                           "only torch.distributed.checkpoint's metadata")
            raise self.refusal from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """DCP's planner, refusing a non-tensor item (DCP would ``torch.load`` it with weights_only=False)."""

    def load_bytes(self, read_item, value):
        self.refusal = CheckpointError(f"{read_item.dest_index.fqn} in the checkpoint is not a tensor; a sharded "
                                       "dip-train checkpoint holds tensors only")
        raise self.refusal


def load_tensors(tensors: Dict[str, Any], path: str):
    """Read the checkpoint folder ``path`` into ``tensors`` in place (every rank calls this with its
    own shards as DTensors, or whole tensors; without a process group, one process reads all)."""
    distributed = dist.is_available() and dist.is_initialized()
    reader, planner = SafeMetadataReader(path), TensorsOnlyPlanner()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*load in a single process", category=UserWarning)
            dcp.load(tensors, storage_reader=reader, planner=planner, no_dist=not distributed)
    except (Exception, CheckpointException) as err:  # whatever the files make DCP raise, they are at fault
        refusal = getattr(reader, "refusal", None) or getattr(planner, "refusal", None)
        if refusal is not None:  # DCP passes an exception on as text, in its own
            raise refusal from None
        lines = str(err).strip().splitlines()
        raise CheckpointError(f"{path} could not be read into this run's model: "
                              f"{lines[-1] if lines else type(err).__name__}") from None


def nonfinite_shards(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the tensors whose local shard on this rank holds NaN or infinity."""
    return ckpt.nonfinite_tensors({k: local_shard(v) for k, v in tensors.items()})


def make_temporary_folder(out_dir: str, step: int) -> str:
    """The temporary folder (rank 0 makes it) that the checkpoint of ``step`` is written into."""
    prefix = f".step_{step:08d}{ckpt.SHARDED_SUFFIX}{ckpt.TEMP_MARKER}"
    tmp = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=out_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    return tmp


def _written_by(folder: str, rank: int) -> Dict[str, str]:
    """The sha256 of the files of ``folder`` that ``rank`` wrote (DCP names them ``__<rank>_<n>.distcp``;
    rank 0, the coordinator, also wrote ``.metadata``)."""
    names = [n for n in os.listdir(folder) if n.startswith(f"__{rank}_") and n.endswith(".distcp")]
    if rank == 0:
        names.append(".metadata")
    return {name: ckpt.file_sha256(os.path.join(folder, name)) for name in names}


def _commit(tmp: str, state: Dict[str, Any], out_dir: str, step: int, keep: Dict[str, Any],
            before_rename: Optional[Callable[[], None]]) -> str:
    """Rank 0: dip-state.pt into the written folder, the folder renamed into place, older ones rotated."""
    ckpt.write_checkpoint(state, os.path.join(tmp, ckpt.SHARDED_STATE))
    if before_rename is not None:
        before_rename()
    ckpt.keep_latest_as_numbered(out_dir)
    final = os.path.join(out_dir, f"step_{step:08d}{ckpt.SHARDED_SUFFIX}")
    replaced = None
    if os.path.exists(final):  # the same step saved before (a run resumed from an older checkpoint)
        replaced = make_temporary_folder(out_dir, step)
        os.replace(final, os.path.join(replaced, "old"))
    os.replace(tmp, final)
    ckpt.fsync_dir(out_dir)
    if replaced is not None:
        shutil.rmtree(replaced)
    ckpt.retire_latest(out_dir)
    if not keep["keep_numbered"]:
        ckpt.rotate(out_dir, step, keep["keep_last"], keep["milestone_every"])
    return final


def finish_save(tmp: str, state: Dict[str, Any], out_dir: str, step: int, env: DistEnv, keep: Dict[str, Any],
                group=None, before_rename: Optional[Callable[[], None]] = None) -> Optional[str]:
    """After every rank's ``dcp.save`` into ``tmp``: each hashes its files, rank 0 gathers the sums
    (over ``group``: the checkpoint's own process group when this runs behind the training) and
    commits. Returns the checkpoint's path on rank 0."""
    digests = _written_by(tmp, env.rank)
    if env.distributed:
        parts: List[Any] = [None] * env.world_size
        dist.all_gather_object(parts, digests, group=group)
    else:
        parts = [digests]
    if not env.is_main:
        return None
    files = {name: digest for part in parts for name, digest in part.items()}
    return _commit(tmp, {**state, "files": files}, out_dir, step, keep, before_rename)


def _write_failed(err: BaseException, tmp: str) -> OutputWriteError:
    # DCP raises every rank's failure, as text, on every rank: its last line names the cause
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return OutputWriteError(f"could not write the checkpoint {tmp}: {lines[-1] if lines else type(err).__name__}; "
                            "the previous checkpoints were left as they were")


def start_writing(tensors: Dict[str, Any], tmp: str, group=None, background: bool = False) -> Optional[Future]:
    """Every rank's shards of ``tensors`` into ``tmp``; ``background``: copied to host memory first
    and written by ``dcp.async_save`` (returns its future), so training goes on meanwhile."""
    try:
        if background:
            return dcp.async_save(tensors, checkpoint_id=tmp, process_group=group)
        dcp.save(tensors, checkpoint_id=tmp, process_group=group)
    except (OSError, CheckpointException) as err:
        raise _write_failed(err, tmp) from None
    return None


def wait_for_writing(written: Optional[Future], tmp: str):
    """The end of a background write that start_writing began (its failure as OutputWriteError)."""
    if written is None:
        return
    try:
        written.result()
    except (OSError, CheckpointException) as err:
        raise _write_failed(err, tmp) from None


# ----------------------------------------------------------------------------- one file for sampling
def newest_sharded(source: str) -> Dict[str, Any]:
    """The state (dip-state.pt) of the sharded checkpoint ``source``, or of the newest one that
    verifies in the run folder ``source``."""
    if ckpt.is_sharded_checkpoint(source):
        return ckpt.verify_sharded_checkpoint(source)
    state, path, _ = ckpt.load_newest_good(source)
    if "sharded" not in state:
        raise ValueError(f"{path} is already a single-file dip-train checkpoint; use it as it is")
    return state


def export_single_file(source: str, dst: str, overwrite: bool = False) -> Dict[str, Any]:
    """Write the model and EMA weights of the sharded checkpoint (or run folder) ``source`` as one
    dip-train checkpoint file ``dst``, which dip-sample and dip-train --init-from read. Read on
    this one process, whatever the number of processes that wrote it. Returns the dict written."""
    ckpt.check_output(dst, "OUTPUT", overwrite)
    state = newest_sharded(source)
    try:
        config = DiPConfig(**state["model_config"])
    except TypeError as err:
        raise CheckpointError(f"{state['sharded']} holds a model config this DiP does not know: {err}") from None
    with torch.random.fork_rng(devices=[]):
        model = build_model(config)
    ema = {name: p.detach().float().clone() for name, p in model.named_parameters()}
    tensors = {"model": model.state_dict(), "ema": ema}
    load_tensors(tensors, state["sharded"])
    bad = ckpt.nonfinite_tensors(tensors["model"]) + ckpt.nonfinite_tensors(ema)
    if bad:
        raise CheckpointError(f"{state['sharded']} holds NaN or infinity ({bad[0]}); nothing was written")
    out = {"model": tensors["model"], "ema": {k: ema.get(k, v) for k, v in tensors["model"].items()},
           **{k: state[k] for k in ("model_config", "config", "classes", "num_classes", "step") if k in state},
           "exported_from": os.path.abspath(state["sharded"])}
    ckpt.write_checkpoint(out, dst)
    return out
