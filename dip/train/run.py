"""A training run: the run folder, the data, resume, checkpoints, sample grids and FID around a
``Trainer``; ``train(cfg)`` is what ``dip-train`` calls, on one process or under torchrun.

Data order is a pure function of ``(seed, epoch)`` (dip.data.ResumableBatchSampler) and a
checkpoint holds every RNG state, so a resumed run repeats an uninterrupted one exactly.
The run folder is locked and never silently replaced, a resume must match the checkpoint's run
settings, and nothing non-finite is ever saved: see dip.run_folder and dip.checkpoint. Under FSDP2
every rank writes its own shard of each checkpoint (dip.sharded_checkpoint) but the last, and a
sharded checkpoint resumes on any number of processes.
"""
import contextlib
import dataclasses
import functools
import os
import random
import signal
import time
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .. import checkpoint as ckpt
from .. import official
from .. import sample as sampling
from .. import sharded_checkpoint as sharded
from ..data import CountReadFailures, ImageFolderDataset, ResumableBatchSampler, advance_position, collate
from ..distributed import DistEnv, agree, broadcast, gather_objects, leave_process_group, setup_distributed
from ..errors import CheckpointError, TrainingDiverged
from ..evaluate import TrainingFID
from ..models import DiPConfig, build_model, canonical_model_config
from ..run_folder import METRICS_NAME, SAMPLES_DIR, MetricsLog, RunFolder, config_changes, kill_point
from .config import TrainConfig
from .preemption import StopRequest
from .trainer import Trainer


def train(cfg: TrainConfig, dataset=None, on_step: Optional[Callable[[int, Dict[str, float]], None]] = None
          ) -> Dict[str, Any]:
    """Train per ``cfg``. ``dataset`` replaces the image folder (any dataset of (image, label) with a
    ``num_classes`` attribute that accepts ``(index, flip)`` items). ``on_step(step, info)`` is called
    after every optimizer step (step counts from 1). Returns the final step, last logged loss, the
    path of the latest checkpoint and the number of unreadable images skipped.

    The run folder ``cfg.out`` is locked for the whole run and never silently destroyed (see
    dip.run_folder). Raises TrainingDiverged when the loss or gradient norm is not finite (beyond
    ``cfg.skip_nonfinite`` skipped steps); the last checkpoint is then left as it was."""
    cfg.validate()
    stop = StopRequest(cfg.stop_signals.split(",")).install()
    try:
        return _train_in_process_group(cfg, stop, dataset, on_step)
    finally:
        stop.uninstall()


def _train_in_process_group(cfg: TrainConfig, stop: StopRequest, dataset, on_step) -> Dict[str, Any]:
    env = setup_distributed(cfg.device)
    finished = False
    try:
        with contextlib.ExitStack() as cleanup:
            opened = agree(env, lambda: _open_run_folder(cfg), main_only=True)
            folder, resume_path = opened if env.is_main else (None, None)
            if folder is not None:
                cleanup.callback(folder.release)
            resume_path = broadcast(resume_path, env)
            result = Run(cfg, env, folder, resume_path, dataset, stop).train(cleanup, on_step)
            finished = True
            return result
    finally:
        leave_process_group(env, finished)


def _open_run_folder(cfg) -> Tuple[RunFolder, Optional[str]]:
    """(the locked run folder, the checkpoint to resume from or None) on the main rank."""
    folder = RunFolder.acquire(cfg.out)
    try:
        return folder, folder.start(cfg.resume, cfg.overwrite)
    except BaseException:
        folder.release()
        raise


def build_dataset(cfg: TrainConfig):
    if not cfg.data:
        raise ValueError("no training data: set data to an image folder")
    return ImageFolderDataset(cfg.data, cfg.image_size, random_flip=cfg.random_flip)


def model_config_of(cfg: TrainConfig, overrides) -> Dict[str, Any]:
    # built on the meta device: the config without the cost of allocating and initialising weights
    with torch.device("meta"):
        return dataclasses.asdict(build_model(cfg.model, **overrides).config)


def run_identity(cfg: TrainConfig, model_config, dataset) -> Dict[str, Any]:
    """What config_changes compares between a checkpoint and a resumed run."""
    classes = getattr(dataset, "classes", None)
    return {"config": dataclasses.asdict(cfg), "model_config": model_config,
            "classes": list(classes) if classes is not None else None}


def verify_sharded_together(env: DistEnv) -> Callable[[str], Dict[str, Any]]:
    """ckpt.verify_sharded_checkpoint with every rank reading its share of the files; a refusal on
    any rank is every rank's (all ranks call it for the same folders, in the same order)."""
    def verify(path: str) -> Dict[str, Any]:
        state, refusal = None, None
        try:
            state = ckpt.verify_sharded_checkpoint(path, (env.rank, env.world_size))
        except CheckpointError as err:
            refusal = str(err)
        refusals = [r for r in gather_objects(refusal, env) if r]
        if refusals:
            raise CheckpointError(refusals[0])
        return state
    return verify


def load_resume_state(path, cfg, model_config, dataset, env: DistEnv) -> Dict[str, Any]:
    """The checkpoint at ``path``, refused (CheckpointError, one line) when the run it was written
    under cannot be continued with ``cfg``; the allowed changes are printed on the main rank."""
    is_main, verify_sharded = env.is_main, verify_sharded_together(env)
    run_folder = os.path.dirname(path) if os.path.basename(path) == ckpt.LATEST else \
        path if os.path.isdir(path) and not ckpt.is_sharded_checkpoint(path) else None
    if run_folder is not None:  # a run folder's newest checkpoint: an older one if it does not verify
        state, used, refusals = ckpt.load_newest_good(run_folder, verify_sharded=verify_sharded)
        if refusals and is_main:
            print(f"resume: {'; '.join(refusals)}; resuming from {used}, the newest that verifies", flush=True)
        path = used
    else:
        state = verify_sharded(path) if ckpt.is_sharded_checkpoint(path) else ckpt.load_checkpoint(path)
    parts = ("optimizer_param_groups",) if "sharded" in state else ("model", "ema", "optimizer")
    for key in ("step", "data") + parts:
        if key not in state:
            raise CheckpointError(f"{path} is not a checkpoint dip-train can resume (it has no {key!r}); "
                                  "to start a new run from its weights, use --init-from")
    adopt_run_settings(cfg, state.get("config") or {}, is_main)
    # a run saved with an earlier name of its head
    state = {**state, "model_config": canonical_model_config(state.get("model_config"))}
    refused, allowed = config_changes(state, run_identity(cfg, model_config, dataset))
    if refused:
        raise CheckpointError(f"cannot resume {path} with another run's settings: {'; '.join(refused)} "
                              "(start a new run: another --out, or --overwrite)")
    if allowed and is_main:
        print(f"resume: changed settings: {'; '.join(allowed)}", flush=True)
    return {**state, "loaded_from": path}


# read before the checkpoint is (where the run is, its data, device and launch), or what a checkpoint
# cannot change: never taken from the checkpoint
NOT_ADOPTED = ("out", "resume", "overwrite", "progress", "data", "device", "init_from", "stop_signals", "model",
               "model_overrides")


def adopt_run_settings(cfg: TrainConfig, saved: Dict[str, Any], is_main: bool):
    """Give ``cfg`` the resumed run's own values of the settings the user did not set (cfg.given,
    from load_config; a TrainConfig built in code counts as all set), so that a requeued command
    line without --ckpt-interval or --steps does not replace the run's with the defaults."""
    given = getattr(cfg, "given", None)
    if given is None:
        return
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    adopted = []
    for name, value in saved.items():
        if name in fields and name not in given and name not in NOT_ADOPTED and value != getattr(cfg, name):
            setattr(cfg, name, tuple(value) if isinstance(getattr(cfg, name), tuple) else value)
            adopted.append(name)
    if adopted and is_main:
        print(f"resume: kept the run's own {', '.join(sorted(adopted))} (not given on the command line)", flush=True)


def init_weights(cfg: TrainConfig, resume_path: Optional[str]):
    """For init_from: (the weights a new run starts from, or None when a resume continues the run;
    the number of classes of those weights, which the model keeps on resuming too)."""
    if not cfg.init_from:
        return None, None
    if resume_path:
        return None, int(_resumed_model_config(resume_path)["num_classes"])
    init = official.read_init_weights(cfg.init_from)
    return init, init.num_classes


def _resumed_model_config(resume_path: str) -> Dict[str, Any]:
    if not os.path.isdir(resume_path):
        return official.read_checkpoint(resume_path).state["model_config"]
    # sharded checkpoints (a run folder's, or one): each one's dip-state.pt names the run's model
    found = [resume_path] if ckpt.is_sharded_checkpoint(resume_path) else \
        [p for p in ckpt.numbered_checkpoints(resume_path) if ckpt.is_sharded_checkpoint(p)]
    return ckpt.load_checkpoint(os.path.join(found[0], ckpt.SHARDED_STATE))["model_config"]


def prepare(cfg: TrainConfig, resume_path: Optional[str], dataset, env: DistEnv):
    """(dataset, its number of classes, the model overrides, the resume state or None, the init
    weights or None): everything read before the model is built."""
    data = dataset if dataset is not None else build_dataset(cfg)
    n_classes = int(getattr(data, "num_classes", 1))
    init, init_classes = init_weights(cfg, resume_path)
    overrides = dict(cfg.model_overrides)
    if init_classes is not None:
        overrides.setdefault("num_classes", init_classes)  # the weights' classes, not the data's
    overrides.setdefault("num_classes", n_classes)
    if overrides["num_classes"] < n_classes:
        raise ValueError(f"the data has {n_classes} classes but the model num_classes={overrides['num_classes']}")
    model_config = model_config_of(cfg, overrides)
    if cfg.image_size % model_config["patch_size"]:
        raise ValueError(f"--image-size {cfg.image_size} must be a multiple of {cfg.model}'s patch size "
                         f"{model_config['patch_size']}")
    state = load_resume_state(resume_path, cfg, model_config, data, env) if resume_path else None
    return data, n_classes, overrides, state, init


def build_run_model(cfg: TrainConfig, overrides, init, env: DistEnv) -> torch.nn.Module:
    """The model, initialised identically on every rank; then per-rank RNG streams."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, **overrides).to(env.device)
    if init is not None:
        init.load_into(model, f"the model of this run ({cfg.model})")
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    torch.manual_seed(cfg.seed + env.rank)
    np.random.seed((cfg.seed + env.rank) % 2 ** 32)
    random.seed(cfg.seed + env.rank)
    return model


def ema_model(model_config, ema_state, device) -> torch.nn.Module:
    # its random initialisation must not move the run's RNG, which a resumed run restores
    with torch.random.fork_rng(devices=[]):
        model = build_model(DiPConfig(**model_config))
    model = model.to(device)
    model.load_state_dict(ema_state)
    return model.eval()


class Run:
    """The state of a run around its Trainer: data position, checkpoints, metrics, progress."""

    def __init__(self, cfg: TrainConfig, env: DistEnv, folder: Optional[RunFolder], resume_path: Optional[str],
                 dataset=None, stop: Optional[StopRequest] = None):
        self.cfg, self.env, self.folder, self.resume_path = cfg, env, folder, resume_path
        self.stop = stop or StopRequest(())
        self.saved_step = None  # the step of the last checkpoint this process wrote or took part in
        self.saved_at = time.monotonic()  # when it was written (or the run started), for ckpt_minutes
        self.writer = ckpt.BackgroundWriter()  # at most one write in flight; async_save: behind the training
        if env.is_main and folder.removed_temporaries:
            print(f"removed {len(folder.removed_temporaries)} temporary files a killed run left in {cfg.out}",
                  flush=True)
        # every rank scans the data and reads the checkpoint; an error on one stops them all
        self.dataset, self.num_classes, overrides, state, init = agree(
            env, lambda: prepare(cfg, resume_path, dataset, env))
        model = build_run_model(cfg, overrides, init, env)
        # (cfg as a resumed run left it) under FSDP2 every rank writes its shard of each checkpoint
        # (dip.sharded_checkpoint); behind the training, the writes' collectives have a process group of their own
        self.sharded = cfg.parallel == "fsdp" and env.distributed
        self.checkpoint_group = dist.new_group(backend="gloo") if self.sharded and cfg.async_save else None
        self.trainer = Trainer(cfg, model, env)
        if init is not None:
            self._report_init(init)
        self.start_step, self.epoch, self.index = 0, 0, 0
        self.unreadable = 0   # unreadable images met in the batches this rank consumed (rank 0: plus the checkpoint's)
        self.latest = resume_path
        self.trainer.kept = _kept(self.latest)
        if state is not None:
            self._restore(state)
        elif resume_path is None and cfg.resume and env.is_main:
            print(f"--resume: {cfg.out} holds no checkpoint yet; starting a new run", flush=True)
        self.identity = run_identity(cfg, dataclasses.asdict(model.config), self.dataset)

    def _report_init(self, init):
        if init.ema is not None:
            self.trainer.ema.load_full_state_dict(init.ema)
        if self.env.is_main:
            print(f"initialised from {init.path}, {init.description}"
                  f"{' (EMA from its EMA weights)' if init.ema is not None else ''}", flush=True)

    def _restore(self, state: Dict[str, Any]):
        env, dataset = self.env, self.dataset
        self.resume_path = state["loaded_from"]
        if "sharded" in state:  # written in shards, read in this run's: any number of processes
            self.trainer.load_sharded_state(state)
        else:
            self.trainer.load_full_state(state, self.resume_path)
        self.start_step = int(state["step"])
        if self.start_step > self.cfg.steps:
            raise CheckpointError(f"--steps {self.cfg.steps} is below the step of {self.resume_path} "
                                  f"({self.start_step}); pass a larger --steps to train further")
        self.epoch, self.index = int(state["data"]["epoch"]), int(state["data"]["index"])
        if env.is_main:
            self.unreadable = int(state.get("unreadable_images", 0))
        if state["data"].get("dataset_size") not in (None, len(dataset)):
            warnings.warn(f"the dataset had {state['data']['dataset_size']} images when the checkpoint was "
                          f"written and has {len(dataset)} now; data order will differ", RuntimeWarning)
            self.index = min(self.index, len(dataset) - 1)
        rng = state.get("rng") or []
        if len(rng) == env.world_size:
            ckpt.restore_rng_state(rng[env.rank])
        if env.is_main:
            print(f"resumed from {self.resume_path} at step {self.start_step}", flush=True)

    def loader(self) -> DataLoader:
        cfg, env = self.cfg, self.env
        sampler = ResumableBatchSampler(len(self.dataset), cfg.global_batch, env.rank, env.world_size, seed=cfg.seed,
                                        epoch=self.epoch, index=self.index, shuffle=True)
        return DataLoader(CountReadFailures(self.dataset), batch_sampler=sampler, collate_fn=collate,
                          num_workers=cfg.num_workers, pin_memory=env.device.type == "cuda",
                          persistent_workers=cfg.num_workers > 0,
                          worker_init_fn=functools.partial(_init_worker, self.stop.signals,
                                                           _lock_identity(self.folder)),
                          prefetch_factor=2 if cfg.num_workers > 0 else None)

    # -- outputs
    def _run_state(self, step: int) -> Dict[str, Any]:
        """What a checkpoint holds besides the weights and moments (a collective: every rank's RNG)."""
        cfg, env = self.cfg, self.env
        gathered = gather_objects((ckpt.capture_rng_state(), self.unreadable), env)
        return {
            "step": step,
            "data": {"epoch": self.epoch, "index": self.index, "seed": cfg.seed,
                     "dataset_size": len(self.dataset), "global_batch": cfg.global_batch},
            "unreadable_images": sum(g[1] for g in gathered),
            "rng": [g[0] for g in gathered],
            "config": dataclasses.asdict(cfg),
            "model_config": self.identity["model_config"],
            "classes": self.identity["classes"],
            "num_classes": self.num_classes,
            "world_size": env.world_size,
            "nonfinite_skipped": self.trainer.nonfinite_skipped,
        }

    def _nonfinite(self, step: int, bad) -> TrainingDiverged:
        return TrainingDiverged(f"step {step}: the weights hold NaN or infinity ({bad[0]}); nothing was saved, "
                                f"{_kept(self.latest)}")

    def save(self, step: int) -> str:
        """A checkpoint of ``step`` (every rank takes part). Under FSDP2 every rank writes its shard
        (dip.sharded_checkpoint), except at the last step: then, as under DDP and on one process,
        rank 0 writes the whole state as one file, which dip-sample reads."""
        cfg, env, trainer = self.cfg, self.env, self.trainer
        if self.sharded:
            agree(env, self.writer.wait)  # the write in flight first, its error on every rank
            if step != cfg.steps:
                return self._save_sharded(step)
        run_state = self._run_state(step)
        state = trainer.full_state()

        def write():
            bad = ckpt.nonfinite_tensors(state["model"]) + ckpt.nonfinite_tensors(state["ema"])
            if bad:
                raise self._nonfinite(step, bad)
            state.update(run_state)
            snapshot = ckpt.cpu_snapshot(state) if cfg.async_save else state
            self.writer.submit(lambda: ckpt.save_checkpoint(
                snapshot, cfg.out, step, keep_numbered=cfg.keep_numbered_ckpts, keep_last=cfg.keep_last,
                milestone_every=cfg.milestone_every, before_rename=lambda: kill_point("checkpoint", step)))
            if not cfg.async_save:
                self.writer.wait()

        agree(env, write, main_only=True)
        return self._saved(step, os.path.join(cfg.out, ckpt.LATEST))

    def _save_sharded(self, step: int) -> str:
        cfg, env = self.cfg, self.env
        tensors, param_groups = self.trainer.sharded_state()
        bad = sharded.nonfinite_shards(tensors["model"]) + sharded.nonfinite_shards(tensors["ema"])
        found = [names[0] for names in gather_objects(bad[:1], env) if names]
        if found:  # on every rank alike
            raise self._nonfinite(step, found)
        run_state = {**self._run_state(step), "optimizer_param_groups": param_groups}
        tmp = broadcast(agree(env, lambda: sharded.make_temporary_folder(cfg.out, step), main_only=True), env)
        keep = {"keep_numbered": cfg.keep_numbered_ckpts, "keep_last": cfg.keep_last,
                "milestone_every": cfg.milestone_every}
        group = self.checkpoint_group
        written = sharded.start_writing(tensors, tmp, group, background=cfg.async_save)

        def finish():
            sharded.wait_for_writing(written, tmp)
            sharded.finish_save(tmp, run_state, cfg.out, step, env, keep, group,
                                before_rename=lambda: kill_point("checkpoint", step))

        self.writer.submit(finish)
        if not cfg.async_save:
            agree(env, self.writer.wait)
        return self._saved(step, os.path.join(cfg.out, f"step_{step:08d}{ckpt.SHARDED_SUFFIX}"))

    def _saved(self, step: int, path: str) -> str:
        self.saved_step, self.saved_at = step, time.monotonic()
        self.latest = path
        self.trainer.kept = _kept(self.latest)
        return self.latest

    def finish_saves(self):
        """Wait for the checkpoint write in flight (async_save), its error on every rank."""
        agree(self.env, self.writer.wait, main_only=not self.sharded)

    def _save_time_due(self) -> bool:
        return bool(self.cfg.ckpt_minutes) and time.monotonic() - self.saved_at >= 60 * self.cfg.ckpt_minutes

    def sample_grid(self, step: int) -> Optional[str]:
        cfg, env = self.cfg, self.env
        ema_state = self.trainer.ema.full_state_dict(self.trainer.model, env.is_main)

        def draw():
            if self.stop.requested:  # a stop signal came: the checkpoint matters, the grid does not
                return None
            kill_point("grid", step)
            model = ema_model(self.identity["model_config"], ema_state, env.device)
            n = min(16, max(4, self.num_classes))
            labels = torch.arange(n) % self.num_classes
            images = sampling.sample(model, labels, cfg.image_size, steps=cfg.sample_steps,
                                     cfg_scale=cfg.sample_cfg_scale, seed=cfg.seed, method="euler",
                                     device=env.device, progress=False)
            return sampling.save_grid(images, os.path.join(cfg.out, SAMPLES_DIR, f"step_{step:08d}.png"))

        return agree(env, draw, main_only=True)

    def training_fid(self) -> TrainingFID:
        """The FID meter of ``cfg.fid_*`` (network and reference statistics loaded once, here)."""
        cfg = self.cfg
        return TrainingFID(cfg.fid_ref, cfg.fid_samples, self.num_classes, cfg.image_size, steps=cfg.sample_steps,
                           cfg_scale=cfg.sample_cfg_scale, method="euler" if cfg.objective == "flow" else "ddim",
                           seed=cfg.seed, extractor=cfg.fid_extractor or None, device=self.env.device,
                           progress=cfg.progress)

    def fid(self, meter: TrainingFID, step: int) -> Optional[float]:
        ema_state = self.trainer.ema.full_state_dict(self.trainer.model, self.env.is_main)

        def measure():
            if self.stop.requested:  # a stop signal came: the checkpoint matters, the FID does not
                return None
            kill_point("fid", step)
            return meter(ema_model(self.identity["model_config"], ema_state, self.env.device))
        return agree(self.env, measure, main_only=True)

    # -- the loop
    def train(self, cleanup: contextlib.ExitStack, on_step=None) -> Dict[str, Any]:
        cfg, env = self.cfg, self.env
        if self.start_step == cfg.steps:  # a requeued job of a run that is done: nothing to do, nothing written
            return {"step": self.start_step, "loss": None, "checkpoint": self.resume_path, "unreadable_images": 0,
                    "model": self.trainer.model if not env.distributed else None, "stopped_by": None,
                    "already_finished": True}
        # on the main rank, before any step, so a bad reference or missing network fails at once
        with torch.random.fork_rng(devices=[]):  # set up once per process: a resumed run must not draw more
            fid_meter = agree(env, self.training_fid, main_only=True) if cfg.fid_interval else None
        log = RunLog(self, cleanup)
        self.trainer.train_model.train()
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not move the run's RNG either
            data_iter = iter(self.loader())
        step, stopped_by = self.start_step, None
        for step in range(self.start_step + 1, cfg.steps + 1):
            images, labels, failed_reads = next(data_iter)
            self.unreadable += failed_reads
            result = self.trainer.train_step(step, images.to(env.device, non_blocking=True),
                                             labels.to(env.device, non_blocking=True))
            log.step_done(result)
            self.epoch, self.index = advance_position(self.epoch, self.index, len(self.dataset), cfg.global_batch)
            kill_point("step", step)
            info = log.log(step, result) if step % cfg.log_interval == 0 or step == cfg.steps else {}
            log.advance()
            # every rank stops after this same step, with it saved
            stop, time_due = self.stop.agreed(env, env.is_main and self._save_time_due())
            if step % cfg.ckpt_interval == 0 or step == cfg.steps or time_due or stop:
                self.save(step)
                stop = stop or self.stop.agreed(env)[0]  # a signal during the save: it is this step's
            if stop:
                stopped_by = self.stop.received or "a stop signal to another rank"
                break
            if cfg.sample_interval and step % cfg.sample_interval == 0:
                self.sample_grid(step)
            if cfg.fid_interval and step % cfg.fid_interval == 0:
                log.fid(step, info, lambda: self.fid(fid_meter, step))
            if on_step is not None:
                on_step(step, info)
        self.finish_saves()
        failures = sum(gather_objects(self.unreadable, env))
        if failures and env.is_main:
            warnings.warn(f"{failures} unreadable images were skipped during training", RuntimeWarning)
        return {"step": step, "loss": log.last_loss, "checkpoint": self.latest, "unreadable_images": failures,
                "model": self.trainer.model if not env.distributed else None,
                "stopped_by": stopped_by}


class RunLog:
    """The loss average, ``metrics.jsonl`` and the progress bar of a run (files on the main rank)."""

    def __init__(self, run: Run, cleanup: contextlib.ExitStack):
        cfg, env = run.cfg, run.env
        self.run = run
        device = env.device
        self.loss_sum, self.loss_count = torch.zeros((), device=device), 0
        self.last_loss = float("nan")
        self.t_start = self.t_last = time.perf_counter()
        self.images_since = 0
        self.metrics, self.bar, self.postfix = None, None, {}
        if not env.is_main:
            return
        if cfg.overwrite:
            run.folder.clear_previous_run()  # only now: a run that failed to set up has replaced nothing
        self.metrics = MetricsLog(os.path.join(cfg.out, METRICS_NAME), resume_step=run.start_step)
        cleanup.callback(self.metrics.close)
        if self.metrics.dropped:
            print(f"{METRICS_NAME}: dropped {self.metrics.dropped} lines after step {run.start_step} "
                  "(logged again from here) or torn by a kill", flush=True)
        if cfg.progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=cfg.steps, initial=run.start_step, desc="train", dynamic_ncols=True)
            cleanup.callback(self.bar.close)

    def step_done(self, result):
        if result.applied:
            self.loss_sum += result.loss
            self.loss_count += 1
        self.images_since += self.run.cfg.global_batch

    def log(self, step: int, result) -> Dict[str, Any]:
        run, env = self.run, self.run.env
        device = env.device
        mean = self.loss_sum / self.loss_count if self.loss_count else torch.full((), float("nan"), device=device)
        stats = torch.stack([mean, torch.tensor(float(run.unreadable), device=device)])
        if env.distributed:
            dist.all_reduce(stats)  # SUM: gloo has no AVG
            stats[0] /= env.world_size
        now = time.perf_counter()
        self.last_loss = float(stats[0])
        info = {"step": step, "loss": self.last_loss, "lr": result.lr,
                "img_per_s": self.images_since / max(now - self.t_last, 1e-9), "grad_norm": float(result.grad_norm),
                "time": now - self.t_start, "epoch": run.epoch, "unreadable_images": int(stats[1]),
                "skipped_steps": run.trainer.nonfinite_skipped}
        if self.metrics is not None:
            self.metrics.append(info)
            kill_point("metrics", step)
        if self.bar is not None:
            self.postfix.update(loss=f"{self.last_loss:.4f}", img_s=f"{info['img_per_s']:.1f}")
            self.bar.set_postfix(self.postfix)
        self.loss_sum.zero_()
        self.loss_count, self.images_since, self.t_last = 0, 0, now
        return info

    def advance(self):
        if self.bar is not None:
            self.bar.update(1)

    def fid(self, step: int, info: Dict[str, Any], measure: Callable[[], Optional[float]]):
        t_fid = time.perf_counter()
        value = measure()
        if value is None:  # skipped for a stop signal
            return
        if self.metrics is not None:
            info["fid"] = value
            self.metrics.append({"step": step, "fid": value, "fid_samples": self.run.cfg.fid_samples,
                                 "fid_seconds": time.perf_counter() - t_fid})
        if self.bar is not None:
            self.postfix["fid"] = f"{value:.2f}"
            self.bar.set_postfix(self.postfix)
        self.t_last += time.perf_counter() - t_fid  # img_per_s counts training time only


def _lock_identity(folder: Optional[RunFolder]) -> Optional[Tuple[int, int, int]]:
    if folder is None or folder.lock_fd is None:
        return None
    info = os.fstat(folder.lock_fd)
    return folder.lock_fd, info.st_dev, info.st_ino


def _init_worker(stop_signals, lock: Optional[Tuple[int, int, int]], worker_id: int):
    """A data-loader worker: the trainer stops it after its checkpoint, so it ignores the stop
    signals; and it lets go of the run folder's lock, which a worker orphaned by a kill -9 of the
    trainer would otherwise hold until it noticed (seconds), refusing the requeued run."""
    for sig in stop_signals:
        signal.signal(sig, signal.SIG_IGN)
    if lock is None:
        return
    fd, device, inode = lock
    try:
        info = os.fstat(fd)
    except OSError:  # not inherited (a spawned worker)
        return
    if (info.st_dev, info.st_ino) == (device, inode):
        os.close(fd)


def _kept(latest: Optional[str]) -> str:
    return f"{latest} is left as it was" if latest else "no checkpoint was written yet"
