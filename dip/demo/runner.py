"""Runs every (photo, seed) of a demo, in worker processes when there are several cores and runs, and
writes its figure and results file."""
import contextlib
import os
import queue as queue_module
import time
from dataclasses import fields, replace
from typing import List, Optional, Tuple

import torch
from tqdm.auto import tqdm

import dip_kernels

from ..checkpoint import write_json
from .config import MODELS, DemoConfig, device_of
from .experiment import run_one
from .figure import make_curves, make_figure
from .metrics import source_name
from .report import METRICS_DOC, judge, summarize

_progress_queue = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_setup(threads: int, head_backend: str, queue=None):
    """A worker process's torch threads, head backend and progress queue (None: no progress messages)."""
    torch.set_num_threads(threads)
    dip_kernels.set_backend(head_backend, op="patch_detailer")
    global _progress_queue
    _progress_queue = queue


@contextlib.contextmanager
def _head_backend(name: str):
    """The head op's backend set to ``name`` for the block, the process's own choice restored after it."""
    old = dip_kernels.get_backend("patch_detailer")
    dip_kernels.set_backend(name, op="patch_detailer")
    try:
        yield
    finally:
        dip_kernels.set_backend(old, op="patch_detailer")


@contextlib.contextmanager
def in_process_settings(threads: int, head_backend: str):
    """worker_setup's threads and head backend for runs in this process, restored afterwards (the caller's
    process, a test's included, keeps its own)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _head_backend(head_backend):
            yield
    finally:
        torch.set_num_threads(old_threads)


def _worker_run(cfg: DemoConfig, index: int, source: str, seed: int) -> dict:
    last = [0.0]

    def on_step(name, step, loss):
        now = time.monotonic()
        if step == cfg.steps or now - last[0] > 0.5:  # a message per half second is plenty for a bar
            last[0] = now
            _progress_queue.put((index, name, step, loss))
    return run_one(cfg, source, seed, on_step if _progress_queue is not None else None)


class _Bars:
    """One progress bar per run: the model being trained, its step and its loss."""

    def __init__(self, cfg: DemoConfig, runs: List[Tuple[str, int]]):
        self.steps = cfg.steps
        self.bars = None
        if cfg.progress:
            self.bars = [tqdm(total=len(MODELS) * cfg.steps, desc=f"{source_name(src)} seed {seed}", position=i,
                              dynamic_ncols=True, leave=True) for i, (src, seed) in enumerate(runs)]

    def update(self, index: int, name: str, step: int, loss: float):
        if self.bars is None:
            return
        offset = [n for _, _, n in MODELS].index(name) * self.steps
        bar = self.bars[index]
        bar.update(offset + step - bar.n)
        bar.set_postfix_str(f"{name} step {step}/{self.steps} loss {loss:.4f}", refresh=False)

    def close(self):
        for bar in self.bars or []:
            bar.close()

    def drain(self, queue, timeout: float):
        try:
            message = queue.get(timeout=timeout) if timeout else queue.get_nowait()
            while True:
                self.update(*message)
                message = queue.get_nowait()
        except queue_module.Empty:
            pass


def _in_process(cfg: DemoConfig, runs, threads: int, bars: _Bars) -> List[dict]:
    with in_process_settings(threads, cfg.resolved_head_backend()):
        return [run_one(cfg, src, seed, lambda name, step, loss, i=i: bars.update(i, name, step, loss))
                for i, (src, seed) in enumerate(runs)]


def _in_workers(cfg: DemoConfig, runs, jobs: int, threads: int, bars: _Bars) -> List[dict]:
    # spawned workers start a fresh interpreter with this process's environment (PYTHONPATH included)
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Manager().Queue()
    with ctx.Pool(jobs, initializer=worker_setup, initargs=(threads, cfg.resolved_head_backend(), queue)) as pool:
        pending = [pool.apply_async(_worker_run, (replace(cfg, progress=False), i, src, seed))
                   for i, (src, seed) in enumerate(runs)]
        while not all(p.ready() for p in pending):
            bars.drain(queue, timeout=0.5)
        bars.drain(queue, timeout=0)
        return [p.get() for p in pending]


def run_all(cfg: DemoConfig) -> Tuple[List[dict], int, int]:
    """Every (photo, seed) run, in parallel worker processes when there are several cores and runs.
    Returns (runs in (photo, seed) order, worker processes, threads per worker)."""
    runs = [(src, seed) for src in cfg.sources() for seed in cfg.seeds]
    cores = usable_cores()
    jobs = min(cfg.jobs or cores, len(runs))
    if device_of(cfg.device).type == "cuda":
        jobs = 1  # one GPU: the runs take turns on it
    threads = cfg.threads or max(1, cores // jobs)
    bars = _Bars(cfg, runs)
    try:
        if jobs == 1:
            return _in_process(cfg, runs, threads, bars), jobs, threads
        return _in_workers(cfg, runs, jobs, threads, bars), jobs, threads
    finally:
        bars.close()


def head_implementation(cfg: DemoConfig) -> str:
    """The implementation that ran the head op: the backend resolved for the run's device."""
    with _head_backend(cfg.resolved_head_backend()):
        return dip_kernels.backends.resolve("patch_detailer", device_of(cfg.device))


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return None


def cpu_model() -> str:
    """The processor's name (Linux), which the CPU times depend on."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return names[0] if names else "unknown"
    except OSError:
        return "unknown"


def _saved_runs(runs: List[dict]) -> List[dict]:
    """The runs without their tensors (the target and the samples live in the figure)."""
    saved = [{k: v for k, v in run.items() if k != "target"} for run in runs]
    for run in saved:
        run["models"] = {key: {k: v for k, v in entry.items() if k != "samples"} for key, entry in run["models"].items()}
    return saved


def config_dict(cfg: DemoConfig) -> dict:
    config = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "progress", "jobs", "threads")}
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}
    config["t_mean"] = cfg.training_t_mean()
    return config


def run_demo(cfg: DemoConfig) -> dict:
    """Trains both models on every (photo, seed), writes demo.png, curves.png and demo.json into
    cfg.out, and returns the JSON dict."""
    cfg.validate()
    wall0, cpu0, load0 = time.perf_counter(), time.process_time(), _load_average()
    runs, jobs, threads = run_all(cfg)
    for run in runs:
        run["verdict"] = judge(run)
    report = {"config": config_dict(cfg), "metrics_doc": METRICS_DOC, "head_backend": head_implementation(cfg),
              "torch": torch.__version__, "runs": _saved_runs(runs), "summary": summarize(runs),
              # the pictures' names, next to demo.json
              "figure": os.path.basename(make_figure(runs, os.path.join(cfg.out, "demo.png"))),
              "curves": os.path.basename(make_curves(runs, os.path.join(cfg.out, "curves.png")))}
    report["timing"] = {"wall_seconds": time.perf_counter() - wall0,
                        "cpu_seconds": time.process_time() - cpu0 + (sum(r["cpu_seconds"] for r in runs)
                                                                     if jobs > 1 else 0.0),
                        "jobs": jobs, "threads": threads, "cores": usable_cores(), "cpu_model": cpu_model(),
                        # what else ran weighs on the times: the 1-minute load average before and after
                        "load_average": [load0, _load_average()]}
    write_json(os.path.join(cfg.out, "demo.json"), report)
    return report
