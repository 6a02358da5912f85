"""Compile, on a machine without a GPU, every Triton kernel a workload would launch on one: a warm
Triton cache and a report of each binary's registers, spills and shared memory against the target.

    python -m dip_kernels.precompile --model DiP-XL/16 --dtype bf16 --arch sm_90 \\
        --cache-dir build/triton-cache --out bench/results/precompile_sm90

1. The workload (a DiP model's training step and sampling calls) runs on fake tensors; every
   ``torch.ops.dip.*`` call it makes is recorded with its inputs' shapes, strides and dtypes. Under
   bf16 the model runs under CPU autocast, which casts exactly as CUDA autocast does for the layers
   DiP uses (nn.Linear), so the ops see the dtypes a GPU run gives them.
2. Each recorded call runs the Triton backend's own host code on meta tensors with launches
   recorded instead of run (dip_kernels.triton.launch): the kernels, grids and arguments come from
   the wrappers themselves.
3. Each launch becomes one specialisation per autotune config, deduplicated with Triton's own
   argument binder (so two launches that Triton would compile once are compiled once).
4. A process pool compiles them through Triton's own ``JITFunction.run(warmup=True)`` path with a
   compile-only driver that reports the target GPU: the cache entries are the ones a GPU run of the
   same triton build looks up (the key hashes the kernel source, the triton build and the target,
   not paths). ptxas's own log gives registers, spills and stack; Triton's metadata the shared memory.

The report fails (exit code 1) on a compile error, shared memory or registers over the target's
limit, a grid over CUDA's limits, or spills in a kernel of the bf16 workload (the hot path: budget
``SPILL_BUDGET_BYTES``).
"""
import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch

from . import backends

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), what Triton
# checks a kernel's shared memory against at its first launch.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
REGISTERS_PER_BLOCK = 65536
GRID_LIMIT = (2 ** 31 - 1, 65535, 65535)
# ptxas spill bytes allowed in the kernels of the bf16 workload (training and sampling hot path)
SPILL_BUDGET_BYTES = 0
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WARP_SIZE = 32
_PTXAS_LOG_DIR = "dip_kernels_ptxas"  # beside Triton's own entries in the cache directory
MANIFEST = "dip_kernels_precompile.json"  # what filled the cache directory (the triton build above all)


# ---------------------------------------------------------------- 1. the op calls of a workload
@dataclass(frozen=True)
class TensorSpec:
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int
    dtype: str

    @staticmethod
    def of(t):
        return TensorSpec(tuple(t.shape), tuple(t.stride()), t.storage_offset(), str(t.dtype).replace("torch.", ""))

    def meta(self):
        """A meta tensor with this layout (its storage offset too: it decides pointer alignment)."""
        size = self.storage_offset + 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride) if s > 0)
        base = torch.empty(size, dtype=getattr(torch, self.dtype), device="meta")
        return base.as_strided(self.shape, self.stride, self.storage_offset)


@dataclass(frozen=True)
class OpCall:
    op: str      # custom op name, e.g. "attention_backward"
    args: tuple  # TensorSpec, tuples of TensorSpec (tensor lists), or plain values


def _spec(value):
    if isinstance(value, torch.Tensor):
        return TensorSpec.of(value)
    if isinstance(value, (list, tuple)):
        return tuple(_spec(v) for v in value)
    return value


def _unspec(value):
    if isinstance(value, TensorSpec):
        return value.meta()
    if isinstance(value, tuple):
        return [_unspec(v) for v in value]
    return value


def trace_op_calls(workload):
    """The dip op calls ``workload()`` makes, in order, run on fake tensors (no memory, no compute).
    The workload creates its tensors itself (inside the fake mode)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "dip":
                calls.append(OpCall(func._opname, _spec(tuple(args) + tuple((kwargs or {}).values()))))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(), _Record():
        workload()
    return calls


def model_workloads(model, image_sizes, dtypes, train_batches, sample_batches):
    """(label, workload) pairs for a DiP model: a training step (forward and backward) per train
    batch and a sampling forward (no grad; guided, so 2B images) per sample batch, per dtype and
    image size. ``image_sizes`` empty: 16 patches a side (256 px at patch 16, 512 at patch 32)."""
    from dip.models import build_model  # the model configs live in dip; only this tool needs them here

    def step(dtype, batch, train, size):
        def run():
            net = build_model(model)
            x = torch.randn(batch, net.in_channels, size or 16 * net.patch_size, size or 16 * net.patch_size)
            t, y = torch.rand(batch), torch.randint(0, net.num_classes, (batch,))
            autocast = (torch.autocast("cpu", dtype=DTYPES[dtype]) if dtype != "fp32" else contextlib.nullcontext())
            with torch.set_grad_enabled(train), autocast:
                out = net(x, t, y)
            if train:
                out.float().square().mean().backward()
        return run

    jobs = []
    for dtype in dtypes:
        for size in image_sizes or [None]:
            at = f" {size}px" if size else ""
            jobs += [(f"{model} {dtype} train B={b}{at}", step(dtype, b, True, size)) for b in train_batches]
            jobs += [(f"{model} {dtype} sample B={b}{at}", step(dtype, 2 * b, False, size)) for b in sample_batches]
    return jobs


def workload_dtype(label):
    """The precision of a model_workloads label ("DiP-XL/16 bf16 train B=32" -> "bf16")."""
    return label.split()[1]


# ---------------------------------------------------------------- 2. the launches behind them
def triton_launches(call):
    """The Triton launches the triton backend's host code makes for ``call`` (on meta tensors), or
    the reason the triton backend declines these inputs."""
    from .triton import launch

    args = [_unspec(a) for a in call.args]
    family = backends.op_family(call.op)
    if not backends.has_backend(family, "triton"):
        return [], f"{family} has no triton backend"
    forward_inputs = args[1:] if call.op.endswith("_backward") else args
    # the meta tensors stand for CUDA ones: what the kernels decline on a GPU
    problem = backends.declines(call.op, "triton", forward_inputs, device_type="cuda")
    if problem:
        return [], problem
    with launch.recording() as launches:
        backends.backend_function(call.op, "triton")(*args)
    return launches, None


# ---------------------------------------------------------------- 3. specialisations
@dataclass(frozen=True)
class Pointer:
    """A tensor argument as a KernelSpec keeps it (picklable): its dtype and its byte offset from an
    aligned allocation, which is all Triton specialises a pointer on."""
    dtype: str
    offset: int


@dataclass
class KernelSpec:
    module: str
    name: str                 # the @triton.jit function, a global of ``module``
    args: tuple               # Pointer, int, float
    meta: Dict[str, Any]      # constexprs and options (num_warps, num_stages, ...)
    config: str               # the autotune config, "" for a kernel that is not autotuned
    grids: List[tuple] = field(default_factory=list)
    ops: List[str] = field(default_factory=list)
    workloads: List[str] = field(default_factory=list)

    @property
    def label(self):
        return f"{self.name}[{self.config}]" if self.config else self.name


def _pointer_or_value(value):
    if isinstance(value, torch.Tensor):
        return Pointer(str(value.dtype).replace("torch.", ""), value.storage_offset() * value.element_size())
    return value


class _Tensorlike:
    """What Triton's argument binder reads from a tensor (its dtype and data_ptr), for a Pointer."""

    def __init__(self, p):
        self.dtype, self._ptr = getattr(torch, p.dtype), p.offset

    def data_ptr(self):
        return self._ptr


def _runtime_args(args):
    return [_Tensorlike(a) if isinstance(a, Pointer) else a for a in args]


def _config_label(cfg):
    opts = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
    return f"{opts} warps={cfg.num_warps} stages={cfg.num_stages}"


def kernel_specs(launches_by_workload, arch=90):
    """One KernelSpec per distinct Triton specialisation (per autotune config) of the launches."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from .triton.launch import autotune_configs, jit_function

    backend = make_backend(GPUTarget("cuda", arch, WARP_SIZE))
    binders, specs = {}, {}
    for workload, op, launch in launches_by_workload:
        fn = jit_function(launch.kernel)
        args = tuple(_pointer_or_value(a) for a in launch.args)
        configs = autotune_configs(launch.kernel) or [None]
        for cfg, grid in zip(configs, launch.grids * len(configs) if len(launch.grids) == 1 else launch.grids):
            meta = dict(launch.meta, **(cfg.all_kwargs() if cfg is not None else {}))
            meta = _apply_heuristics(launch.kernel, fn, args, meta)
            if fn not in binders:
                binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
            _, specialization, options = binders[fn](*_runtime_args(args), **meta)
            key = (fn.module, fn.__name__, str(specialization), str(sorted(options.items())))
            spec = specs.get(key)
            if spec is None:
                spec = specs[key] = KernelSpec(fn.module, fn.__name__, args, meta,
                                               _config_label(cfg) if cfg is not None else "")
            if grid not in spec.grids:
                spec.grids.append(grid)
            if op not in spec.ops:
                spec.ops.append(op)
            if workload not in spec.workloads:
                spec.workloads.append(workload)
    return list(specs.values())


def _apply_heuristics(kernel, fn, args, meta):
    """The values triton.heuristics wrappers would add, computed as they do."""
    import triton
    named = dict(zip(fn.arg_names, args), **meta)
    while not isinstance(kernel, triton.runtime.JITFunction):
        if isinstance(kernel, triton.runtime.Heuristics):
            for name, rule in kernel.values.items():
                named[name] = meta[name] = rule(named)
        kernel = kernel.fn
    return meta


# ---------------------------------------------------------------- 4. compile (worker processes)
class CompileOnlyDriver:
    """What JITFunction.run(warmup=True) asks of the active driver: the target, a device, a stream."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, WARP_SIZE)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log):
    """(registers, stack bytes, spill store bytes, spill load bytes) from ptxas -v output, or None."""
    used, stack = _PTXAS_USED.search(log), _PTXAS_STACK.search(log)
    if not used or not stack:
        return None
    return (int(used.group(1)), *map(int, stack.groups()))


def _error_summary(exc):
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    location = lines[0] if lines and lines[0].startswith("at ") else ""
    message = lines[-1] if lines else type(exc).__name__
    return f"{type(exc).__name__}: {message}" + (f" ({location.rstrip(':')})" if location else "")


def compile_one(spec, arch, cache_dir):
    """Compile ``spec`` for sm_<arch> into ``cache_dir`` (a hit if it is there). Returns a dict."""
    from triton import knobs
    from triton.runtime.driver import driver

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output goes to stdout, which we keep
    fn = getattr(importlib.import_module(spec.module), spec.name)
    driver.set_active(CompileOnlyDriver(arch))
    fn.device_caches.clear()  # the binder and target are cached per device: here per arch
    out, start = io.StringIO(), time.time()
    result = dict(kernel=spec.name, config=spec.config, arch=f"sm_{arch}", ops=spec.ops, workloads=spec.workloads,
                  grids=spec.grids)
    try:
        with contextlib.redirect_stdout(out):
            kernel = fn.run(*_runtime_args(spec.args), grid=None, warmup=True, **spec.meta)
    except Exception as exc:  # noqa: BLE001 - every compile failure is a result to report
        result.update(status="error", error=_error_summary(exc), seconds=round(time.time() - start, 2))
        return result
    log = out.getvalue()
    log_path = os.path.join(cache_dir, _PTXAS_LOG_DIR, f"{kernel.hash}.log")
    cached = parse_ptxas_log(log) is None
    if not cached:
        _write(log_path, log)
    elif os.path.exists(log_path):
        log = open(log_path).read()
    usage = parse_ptxas_log(log)
    regs, stack, spill_stores, spill_loads = usage if usage else (None,) * 4
    result.update(status="compiled", cached=cached, seconds=round(time.time() - start, 2), hash=kernel.hash,
                  registers=regs, stack_bytes=stack, spill_store_bytes=spill_stores, spill_load_bytes=spill_loads,
                  shared_bytes=kernel.metadata.shared, num_warps=kernel.metadata.num_warps)
    return result


def _worker_init(cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(specs, archs, cache_dir, jobs, progress=True):
    """Compile every spec for every arch in a process pool; results in (spec, arch) order."""
    tasks = [(spec, arch) for arch in archs for spec in specs]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
    results = [None] * len(tasks)
    bar = _progress(len(tasks), progress)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                initargs=(cache_dir,)) as pool:
        futures = {pool.submit(compile_one, spec, arch, cache_dir): i for i, (spec, arch) in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    bar.close()
    return results


def _progress(total, enabled):
    from tqdm import tqdm
    return tqdm(total=total, desc="compiling", unit="binary", disable=not enabled, file=sys.stderr)


# ---------------------------------------------------------------- 5. the report
def check(results):
    """The problems a GPU run would hit (one line each): compile errors, resources over the
    target's limits, spills in the bf16 workload's kernels beyond SPILL_BUDGET_BYTES."""
    problems = []
    for r in results:
        where = f"{r['kernel']}[{r['config']}] {r['arch']}" if r["config"] else f"{r['kernel']} {r['arch']}"
        if r["status"] != "compiled":
            problems.append(f"{where}: {r['error']}")
            continue
        arch = int(r["arch"][3:])
        if r["shared_bytes"] > SHARED_MEMORY_LIMIT[arch]:
            problems.append(f"{where}: {r['shared_bytes']} B shared memory > {SHARED_MEMORY_LIMIT[arch]} B")
        if r["registers"] is not None and r["registers"] * r["num_warps"] * WARP_SIZE > REGISTERS_PER_BLOCK:
            problems.append(f"{where}: {r['registers']} registers x {r['num_warps'] * WARP_SIZE} threads "
                            f"> {REGISTERS_PER_BLOCK}")
        for grid in r["grids"]:
            if any(g > limit for g, limit in zip(grid, GRID_LIMIT)):
                problems.append(f"{where}: grid {grid} over CUDA's limits {GRID_LIMIT}")
        hot = any(workload_dtype(w) == "bf16" for w in r["workloads"])
        if hot and r["spill_store_bytes"] is not None and r["spill_store_bytes"] > SPILL_BUDGET_BYTES:
            problems.append(f"{where}: {r['spill_store_bytes']} B of spill stores in a bf16 hot-path kernel "
                            f"(budget {SPILL_BUDGET_BYTES} B)")
    return problems


def environment():
    import triton
    from triton.runtime.cache import triton_key
    return dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version(),
                triton_build=hashlib.sha256(triton_key().encode()).hexdigest()[:16])


def _dtypes(result):
    return "+".join(sorted({workload_dtype(w) for w in result["workloads"]}))


def summarize(results):
    """Per (kernel, arch, workload dtypes): binaries, errors and the worst registers / spills / shared memory."""
    rows = {}
    for r in results:
        key = (r["kernel"], r["arch"], _dtypes(r))
        row = rows.setdefault(key, dict(kernel=r["kernel"], arch=r["arch"], dtypes=key[2], binaries=0, compiled=0,
                                        errors=0, registers=0, spill_store_bytes=0, stack_bytes=0, shared_bytes=0))
        row["binaries"] += 1
        if r["status"] != "compiled":
            row["errors"] += 1
            continue
        row["compiled"] += 1
        for k in ("registers", "spill_store_bytes", "stack_bytes", "shared_bytes"):
            row[k] = max(row[k], r[k] or 0)
    return sorted(rows.values(), key=lambda row: (row["arch"] != "sm_90", row["arch"], row["dtypes"], row["kernel"]))


def _directory_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def write_archive(cache_dir, path):
    """The cache directory as one .tar.xz (Triton's text stages compress about 15x), written atomically."""
    import tarfile
    from dip.checkpoint import atomic_write  # the package's one atomic writer
    with atomic_write(path, "wb") as f, tarfile.open(fileobj=f, mode="w:xz") as tar:
        for name in sorted(os.listdir(cache_dir)):
            tar.add(os.path.join(cache_dir, name), arcname=name)
    return os.path.getsize(path)


def _limit(arch):
    return SHARED_MEMORY_LIMIT[int(arch[3:])]


def markdown(report):
    """The report as markdown: the header, one row per kernel (worst binary), the problems, every binary."""
    env = report["environment"]
    archive = (f"; as `{os.path.basename(report['archive'])}` {report['archive_bytes'] / 2 ** 20:.1f} MiB"
               if report.get("archive") else "")
    lines = [f"# Triton precompile: {', '.join(report['models'])}, {', '.join(report['dtypes'])}, "
             f"{', '.join(report['archs'])}",
             "",
             f"Generated by `python -m dip_kernels.precompile {' '.join(report['argv'])}` with triton "
             f"{env['triton']} (build {env['triton_build']}), torch {env['torch']}, Python {env['python']}: "
             f"{len(report['results'])} binaries ({report['compiled']} compiled, {report['cached']} found in the "
             f"cache) in {report['seconds']:.0f} s with {report['jobs']} processes. Cache "
             f"{report['cache_bytes'] / 2 ** 20:.1f} MiB on disk{archive}.",
             "",
             "Worst binary per kernel: registers, spill stores, stack and shared memory (bytes per thread / block).",
             "",
             "| kernel | arch | workload | binaries | errors | registers | spill stores | stack | shared memory "
             "| limit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summarize(report["results"]):
        lines.append(f"| {row['kernel']} | {row['arch']} | {row['dtypes']} | {row['binaries']} | {row['errors']} "
                     f"| {row['registers']} | {row['spill_store_bytes']} | {row['stack_bytes']} | "
                     f"{row['shared_bytes']} | {_limit(row['arch'])} |")
    if report.get("not_triton"):
        lines += ["", "Op calls the Triton backend declines (another backend runs them):", ""]
        lines += [f"- {line}" for line in report["not_triton"]]
    lines += ["", "## Problems", ""] + ([f"- {p}" for p in report["problems"]] or ["none"])
    lines += ["", "## Every binary", "",
              "| kernel | config | arch | workload | status | registers | spill stores | shared memory | ops |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if r["status"] == "compiled":
            cells = f"compiled | {r['registers']} | {r['spill_store_bytes']} | {r['shared_bytes']}"
        else:
            cells = f"{r['error'].replace('|', '/')} | | |"
        lines.append(f"| {r['kernel']} | {r['config']} | {r['arch']} | {_dtypes(r)} | {cells} "
                     f"| {', '.join(r['ops'])} |")
    return "\n".join(lines) + "\n"


def compare_markdown(before, after):
    """Before/after per kernel (worst binary of each) from two reports' results."""
    index = {(r["kernel"], r["arch"], r["dtypes"]): r for r in summarize(before["results"])}
    lines = [f"# Triton kernels before and after: {', '.join(after['models'])}, "
             f"triton {after['environment']['triton']}",
             "",
             f"Before: {before['environment']['triton']} run `{' '.join(before['argv'])}`; after: "
             f"`{' '.join(after['argv'])}`. A cell is the worst binary of the kernel: registers / spill stores "
             "(bytes per thread) / shared memory (bytes per block); errors counts binaries that did not compile.",
             "",
             "| kernel | arch | workload | binaries before | errors before | before | binaries after | errors after "
             "| after |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(row):
        return f"{row['registers']} / {row['spill_store_bytes']} / {row['shared_bytes']}" if row["compiled"] else "-"
    for row in summarize(after["results"]):
        old = index.pop((row["kernel"], row["arch"], row["dtypes"]), None)
        old_cells = f"{old['binaries']} | {old['errors']} | {cell(old)}" if old else "- | - | -"
        lines.append(f"| {row['kernel']} | {row['arch']} | {row['dtypes']} | {old_cells} | {row['binaries']} "
                     f"| {row['errors']} | {cell(row)} |")
    compared = {(row["arch"], row["dtypes"]) for row in summarize(after["results"])}
    for old in index.values():
        if (old["arch"], old["dtypes"]) in compared:
            lines.append(f"| {old['kernel']} | {old['arch']} | {old['dtypes']} | {old['binaries']} | {old['errors']} "
                         f"| {cell(old)} | - | - | not launched |")
    return "\n".join(lines) + "\n"


def readme_summary(report):
    """The README's paragraph on the precompiled cache, from a report (tests check they agree)."""
    rows = summarize(report["results"])
    arch = report["archs"][0]
    worst_smem = max(row["shared_bytes"] for row in rows)
    return (f"{', '.join(report['models'])} in {', '.join(report['dtypes'])} (a training step and guided "
            f"sampling) launches {len(report['results'])} Triton binaries for {arch} with triton "
            f"{report['environment']['triton']}: {sum(r['status'] == 'compiled' for r in report['results'])} "
            f"compile, the largest spill is {max(row['spill_store_bytes'] for row in rows)} B and the largest "
            f"shared memory {worst_smem} B of {_limit(arch)} B. The cache is "
            f"{report['cache_bytes'] / 2 ** 20:.1f} MiB on disk and {report['archive_bytes'] / 2 ** 20:.1f} MiB "
            f"as a .tar.xz; compiling it took {report['seconds']:.0f} s with {report['jobs']} processes on a "
            f"CPU without a GPU.")


# ---------------------------------------------------------------- command line
def _arch(value):
    m = re.fullmatch(r"sm_?(\d+)a?", value)
    if not m or int(m.group(1)) not in SHARED_MEMORY_LIMIT:
        raise argparse.ArgumentTypeError(f"arch must be one of {[f'sm_{a}' for a in SHARED_MEMORY_LIMIT]}, "
                                         f"got {value!r}")
    return int(m.group(1))


def _batches(value):
    try:
        out = [int(v) for v in value.split(",") if v]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive batch sizes separated by commas, got {value!r}")
    return out


def _model(value):
    from dip.models import CONFIGS
    if value not in CONFIGS:
        raise argparse.ArgumentTypeError(f"model must be one of {sorted(CONFIGS)}, got {value!r}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dip_kernels.precompile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", type=_model, help="a dip.models config, repeatable (default DiP-XL/16)")
    p.add_argument("--image-size", type=int, action="append", default=[],
                   help="image side in pixels, repeatable (default: 16 patches a side, 256 px at patch 16)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="workload precision, repeatable (default bf16): bf16/fp16 run the model under autocast")
    p.add_argument("--arch", action="append", type=_arch, help="target, repeatable: sm_90 (default), sm_80, ...")
    p.add_argument("--train-batch", type=_batches, default=[32], help="training batches, e.g. 32 (default)")
    p.add_argument("--sample-batch", type=_batches, default=[1, 64],
                   help="sampling batches (each runs guided, as 2B images; default 1,64)")
    p.add_argument("--no-train", action="store_true", help="sampling workloads only")
    p.add_argument("--cache-dir", default=os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache"),
                   help="the Triton cache directory to fill (default $TRITON_CACHE_DIR or ~/.triton/cache)")
    p.add_argument("--archive", help="also write the cache directory as this .tar.xz (to carry it elsewhere)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    p.add_argument("--out", help="write OUT.json and OUT.md (the report)")
    p.add_argument("--compare", metavar="BEFORE_JSON", help="with --out: also write OUT_vs_before.md")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--check-cache", metavar="DIR",
                   help="only say whether the cache in DIR was built by this triton build (its entries apply)")
    args = p.parse_args(argv)
    args.model = args.model or ["DiP-XL/16"]
    args.dtype = args.dtype or ["bf16"]
    args.arch = args.arch or [90]
    if any(size < 1 for size in args.image_size) or args.jobs < 1:
        p.error("--image-size and --jobs must be positive")
    if args.compare and not args.out:
        p.error("--compare needs --out")
    return args


def run(args, argv=()):
    """Trace, specialise, compile and check; returns the report (a dict)."""
    if backends.triton_interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it, the interpreter compiles nothing")
    start = time.time()
    launches, declined = [], set()
    for model in args.model:
        for label, workload in model_workloads(model, args.image_size, args.dtype,
                                               [] if args.no_train else args.train_batch, args.sample_batch):
            for call in dict.fromkeys(trace_op_calls(workload)):
                found, why = triton_launches(call)
                if why:
                    declined.add(f"{call.op} ({model} {workload_dtype(label)}): {why}")
                launches += [(label, call.op, launch) for launch in found]
    specs = kernel_specs(launches)
    os.makedirs(args.cache_dir, exist_ok=True)
    results = compile_all(specs, args.arch, os.path.abspath(args.cache_dir), args.jobs, progress=not args.quiet)
    report = dict(models=args.model, image_sizes=args.image_size, dtypes=args.dtype,
                  archs=[f"sm_{a}" for a in args.arch], train_batches=[] if args.no_train else args.train_batch,
                  sample_batches=args.sample_batch, argv=list(argv), environment=environment(), jobs=args.jobs,
                  seconds=round(time.time() - start, 1), cache_bytes=_directory_bytes(args.cache_dir),
                  compiled=sum(r["status"] == "compiled" and not r["cached"] for r in results),
                  cached=sum(r["status"] == "compiled" and r["cached"] for r in results),
                  not_triton=sorted(declined), results=results)
    record_run(args.cache_dir, report)
    if args.archive:
        report.update(archive=args.archive, archive_bytes=write_archive(args.cache_dir, args.archive))
    report["problems"] = check(results)
    return report


def _manifest(cache_dir):
    """The runs the manifest lists; none when there is none or it is not one this version reads."""
    try:
        with open(os.path.join(cache_dir, MANIFEST)) as f:
            runs = json.load(f).get("runs")
    except (OSError, ValueError, AttributeError):
        return []
    return runs if isinstance(runs, list) else []


def record_run(cache_dir, report):
    """Add this run (what it compiled, with which triton build) to the cache directory's manifest."""
    run_ = {k: report[k] for k in ("models", "dtypes", "archs", "image_sizes", "argv", "environment")}
    runs = [r for r in _manifest(cache_dir) if r != run_] + [run_]
    _write(os.path.join(cache_dir, MANIFEST), json.dumps({"runs": runs}, indent=1) + "\n")


def check_cache(cache_dir):
    """Whether the precompiled cache in ``cache_dir`` applies to the triton installed here, one line
    per precompile run that filled it."""
    runs, here = _manifest(cache_dir), environment()
    if not runs:
        return f"{cache_dir} holds no {MANIFEST}: not filled by dip_kernels.precompile"
    lines = []
    for r in runs:
        env = r["environment"]
        verdict = ("applies here" if env["triton_build"] == here["triton_build"] else
                   f"does not apply here (triton {here['triton']}, build {here['triton_build']}): those kernels "
                   "compile on this machine")
        lines.append(f"{', '.join(r['models'])} {', '.join(r['dtypes'])} {', '.join(r['archs'])}, compiled with "
                     f"triton {env['triton']} (build {env['triton_build']}): {verdict}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.check_cache:
        print(check_cache(args.check_cache))
        return 0
    report = run(args, argv)
    for row in summarize(report["results"]):
        print(f"{row['kernel']:28s} {row['arch']} {row['dtypes']:9s} {row['binaries']:3d} binaries {row['errors']:2d} "
              f"errors  registers <= {row['registers']:3d}  spills <= {row['spill_store_bytes']:6d} B  "
              f"shared <= {row['shared_bytes']:6d} B")
    print(f"{len(report['results'])} binaries in {report['seconds']:.0f} s ({report['cached']} found in the cache); "
          f"cache {args.cache_dir}: {report['cache_bytes'] / 2 ** 20:.1f} MiB"
          + (f"; archive {args.archive}: {report['archive_bytes'] / 2 ** 20:.1f} MiB" if args.archive else ""))
    for line in report["not_triton"]:
        print("not triton:", line)
    for p in report["problems"]:
        print("PROBLEM", p)
    if args.out:
        _write(args.out + ".json", json.dumps(report, indent=1) + "\n")
        _write(args.out + ".md", markdown(report))
        if args.compare:
            with open(args.compare) as f:
                _write(args.out + "_vs_before.md", compare_markdown(json.load(f), report))
    return 1 if report["problems"] else 0


def _write(path, text):
    from dip.checkpoint import atomic_write  # the package's one atomic writer
    with atomic_write(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
