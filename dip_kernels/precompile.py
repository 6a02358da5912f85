"""Compile, on a machine without a GPU, every Triton kernel a workload would launch on one: a warm
Triton cache and a report of each binary's registers, spills and shared memory against the target.

This module is the kernel-level machinery and knows no model: a workload is a labelled function
that calls dip ops on tensors it makes itself. dip/precompile.py builds DiP's workloads (a training
step and sampling calls) and is the command line, ``python -m dip.precompile``.

1. The workload runs on fake tensors; every ``torch.ops.dip.*`` call it makes is recorded with its
   inputs' shapes, strides and dtypes (``trace_op_calls``).
2. Each recorded call runs the Triton backend's own host code on meta tensors with launches
   recorded instead of run (dip_kernels.triton.launch): the kernels, grids and arguments come from
   the wrappers themselves (``triton_launches``).
3. Each launch becomes one specialisation per autotune config, deduplicated with Triton's own
   argument binder (so two launches that Triton would compile once are compiled once;
   ``kernel_specs``).
4. A process pool compiles them through Triton's own ``JITFunction.run(warmup=True)`` path with a
   compile-only driver that reports the target GPU (``compile_all``): the cache entries are the
   ones a GPU run of the same triton build looks up (the key hashes the kernel source, the triton
   build and the target, not paths). ptxas's own log gives registers, spills and stack; Triton's
   metadata the shared memory.

``check`` lists what a GPU's first run would hit (the command exits 1 on any): a compile error,
shared memory or registers over the target's limit, a grid over CUDA's limits, or spills in a
kernel of a bf16 workload (the hot path: budget ``SPILL_BUDGET_BYTES``). A workload's label starts
with its name and its precision ("DiP-XL/16 bf16 train B=32"; ``workload_dtype``).

Files are written through the caller's atomic writer (``writer``: a context manager
``writer(path, mode)`` that yields a file and renames it into place), so this module writes no file
by a way of its own.
"""
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
import tarfile
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
import triton  # this tool compiles Triton kernels: it needs triton, like dip_kernels/triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.cache import triton_key
from triton.runtime.driver import driver
from triton.runtime.jit import create_function_from_signature

from . import backends
from .triton.launch import autotune_configs, jit_function, recording

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), what Triton
# checks a kernel's shared memory against at its first launch.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
REGISTERS_PER_BLOCK = 65536
GRID_LIMIT = (2 ** 31 - 1, 65535, 65535)
# ptxas spill bytes allowed in the kernels of the bf16 workload (training and sampling hot path)
SPILL_BUDGET_BYTES = 0
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
    calls = []

    class _Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "dip":
                calls.append(OpCall(func._opname, _spec(tuple(args) + tuple((kwargs or {}).values()))))
            return func(*args, **(kwargs or {}))

    with FakeTensorMode(), _Record():
        workload()
    return calls


def workload_dtype(label):
    """The precision of a workload label, its second word ("DiP-XL/16 bf16 train B=32" -> "bf16")."""
    return label.split()[1]


# ---------------------------------------------------------------- 2. the launches behind them
def triton_launches(call):
    """The Triton launches the triton backend's host code makes for ``call`` (on meta tensors), or
    the reason the triton backend declines these inputs."""
    args = [_unspec(a) for a in call.args]
    family = backends.op_family(call.op)
    if not backends.has_backend(family, "triton"):
        return [], f"{family} has no triton backend"
    forward_inputs = args[1:] if call.op.endswith("_backward") else args
    # the meta tensors stand for CUDA ones: what the kernels decline on a GPU
    problem = backends.declines(call.op, "triton", forward_inputs, device_type="cuda")
    if problem:
        return [], problem
    with recording() as launches:
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


def compile_one(spec, arch, cache_dir, writer):
    """Compile ``spec`` for sm_<arch> into ``cache_dir`` (a hit if it is there). Returns a dict."""
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
        write_text(log_path, log, writer)
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


def compile_all(specs, archs, cache_dir, jobs, writer, progress=True):
    """Compile every spec for every arch in a process pool; results in (spec, arch) order."""
    tasks = [(spec, arch) for arch in archs for spec in specs]
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch threads
    results = [None] * len(tasks)
    bar = _progress(len(tasks), progress)
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                initargs=(cache_dir,)) as pool:
        futures = {pool.submit(compile_one, spec, arch, cache_dir, writer): i for i, (spec, arch) in enumerate(tasks)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
    bar.close()
    return results


def _progress(total, enabled):
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


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def write_archive(cache_dir, path, writer):
    """The cache directory as one .tar.xz (Triton's text stages compress about 15x), written through
    ``writer`` (atomically)."""
    with writer(path, "wb") as f, tarfile.open(fileobj=f, mode="w:xz") as tar:
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
             f"Generated by `python -m dip.precompile {' '.join(report['argv'])}` with triton "
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


# ---------------------------------------------------------------- the whole run and the cache's manifest
def _manifest(cache_dir):
    """The runs the manifest lists; none when there is none or it is not one this version reads."""
    try:
        with open(os.path.join(cache_dir, MANIFEST)) as f:
            runs = json.load(f).get("runs")
    except (OSError, ValueError, AttributeError):
        return []
    return runs if isinstance(runs, list) else []


def record_run(cache_dir, report, writer):
    """Add this run (what it compiled, with which triton build) to the cache directory's manifest."""
    run_ = {k: report[k] for k in ("models", "dtypes", "archs", "image_sizes", "argv", "environment")}
    runs = [r for r in _manifest(cache_dir) if r != run_] + [run_]
    write_text(os.path.join(cache_dir, MANIFEST), json.dumps({"runs": runs}, indent=1) + "\n", writer)


def check_cache(cache_dir):
    """Whether the precompiled cache in ``cache_dir`` applies to the triton installed here, one line
    per precompile run that filled it."""
    runs, here = _manifest(cache_dir), environment()
    if not runs:
        return f"{cache_dir} holds no {MANIFEST}: not filled by dip.precompile"
    lines = []
    for r in runs:
        env = r["environment"]
        verdict = ("applies here" if env["triton_build"] == here["triton_build"] else
                   f"does not apply here (triton {here['triton']}, build {here['triton_build']}): those kernels "
                   "compile on this machine")
        lines.append(f"{', '.join(r['models'])} {', '.join(r['dtypes'])} {', '.join(r['archs'])}, compiled with "
                     f"triton {env['triton']} (build {env['triton_build']}): {verdict}")
    return "\n".join(lines)


def compile_workloads(workloads, archs, cache_dir, jobs, writer, progress=True):
    """Trace ``workloads`` ((label, function) pairs), specialise their Triton launches and compile
    them for every arch (ints: 90 for sm_90) into ``cache_dir``. Returns (results, the op calls the
    Triton backend declines: one line each, with why)."""
    if backends.triton_interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 is set: unset it, the interpreter compiles nothing")
    launches, declined = [], set()
    for label, workload in workloads:
        for call in dict.fromkeys(trace_op_calls(workload)):
            found, why = triton_launches(call)
            if why:
                declined.add(f"{call.op} ({' '.join(label.split()[:2])}): {why}")
            launches += [(label, call.op, launch) for launch in found]
    specs = kernel_specs(launches)
    os.makedirs(cache_dir, exist_ok=True)
    results = compile_all(specs, archs, os.path.abspath(cache_dir), jobs, writer, progress=progress)
    return results, sorted(declined)


def summary_lines(report, cache_dir):
    """What the command prints: one line per kernel (worst binary), the totals, the declined calls
    and the problems."""
    lines = [f"{row['kernel']:28s} {row['arch']} {row['dtypes']:9s} {row['binaries']:3d} binaries "
             f"{row['errors']:2d} errors  registers <= {row['registers']:3d}  spills <= "
             f"{row['spill_store_bytes']:6d} B  shared <= {row['shared_bytes']:6d} B"
             for row in summarize(report["results"])]
    lines.append(f"{len(report['results'])} binaries in {report['seconds']:.0f} s ({report['cached']} found in the "
                 f"cache); cache {cache_dir}: {report['cache_bytes'] / 2 ** 20:.1f} MiB"
                 + (f"; archive {report['archive']}: {report['archive_bytes'] / 2 ** 20:.1f} MiB"
                    if report.get("archive") else ""))
    lines += [f"not triton: {line}" for line in report["not_triton"]]
    lines += [f"PROBLEM {p}" for p in report["problems"]]
    return lines


def write_text(path, text, writer):
    with writer(path, "w") as f:
        f.write(text)
