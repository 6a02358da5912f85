"""Compile, on a machine without a GPU, every Triton kernel a DiP model launches on one: a warm Triton
cache and a report of each binary's registers, spills and shared memory against the target.

    python -m dip.precompile --model DiP-XL/16 --dtype bf16 --arch sm_90 \\
        --cache-dir build/triton-cache --out bench/results/precompile_sm90

The workloads are the model's training step (forward and backward) and its guided sampling
forward, run on fake tensors; under bf16 the model runs under CPU autocast, which casts exactly as
CUDA autocast does for the layers DiP uses (nn.Linear), so the ops see the dtypes a GPU run gives
them. Everything below the model (tracing the dip op calls, the Triton launches behind them, the
compile-only driver, the checks, the report and the cache's manifest) is dip_kernels.precompile.

Exit code 1 on a problem a GPU's first run would hit (dip_kernels.precompile.check), 2 on bad
arguments.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import time

import torch

from dip_kernels import precompile as kernels
from .checkpoint import atomic_write
from .models import CONFIGS, build_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def model_workloads(model, image_sizes, dtypes, train_batches, sample_batches):
    """(label, workload) pairs for a DiP model: a training step (forward and backward) per train
    batch and a sampling forward (no grad; guided, so 2B images) per sample batch, per dtype and
    image size. ``image_sizes`` empty: 16 patches a side (256 px at patch 16, 512 at patch 32).
    A label starts with the model and the dtype (dip_kernels.precompile.workload_dtype)."""
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


# ---------------------------------------------------------------- command line
def _arch(value):
    m = re.fullmatch(r"sm_?(\d+)a?", value)
    if not m or int(m.group(1)) not in kernels.SHARED_MEMORY_LIMIT:
        raise argparse.ArgumentTypeError(f"arch must be one of {[f'sm_{a}' for a in kernels.SHARED_MEMORY_LIMIT]}, "
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
    if value not in CONFIGS:
        raise argparse.ArgumentTypeError(f"model must be one of {sorted(CONFIGS)}, got {value!r}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m dip.precompile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", type=_model, help="a dip.models config, repeatable (default DiP-XL/16)")
    p.add_argument("--image-size", type=int, action="append", default=[],
                   help="image side in pixels, repeatable (default: 16 patches a side, 256 px at patch 16)")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                   help="workload precision, repeatable (default bf16): bf16/fp16 run the model under autocast")
    p.add_argument("--arch", action="append", type=_arch,
                   help="target, repeatable: sm_90 (default), sm_80, sm_100, ...")
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
    start = time.time()
    train_batches = [] if args.no_train else args.train_batch
    workloads = [job for model in args.model
                 for job in model_workloads(model, args.image_size, args.dtype, train_batches, args.sample_batch)]
    results, declined = kernels.compile_workloads(workloads, args.arch, args.cache_dir, args.jobs, atomic_write,
                                                  progress=not args.quiet)
    report = dict(models=args.model, image_sizes=args.image_size, dtypes=args.dtype,
                  archs=[f"sm_{a}" for a in args.arch], train_batches=train_batches,
                  sample_batches=args.sample_batch, argv=list(argv), environment=kernels.environment(),
                  jobs=args.jobs, seconds=round(time.time() - start, 1),
                  cache_bytes=kernels.directory_bytes(args.cache_dir),
                  compiled=sum(r["status"] == "compiled" and not r["cached"] for r in results),
                  cached=sum(r["status"] == "compiled" and r["cached"] for r in results),
                  not_triton=declined, results=results)
    kernels.record_run(args.cache_dir, report, atomic_write)
    if args.archive:
        report.update(archive=args.archive,
                      archive_bytes=kernels.write_archive(args.cache_dir, args.archive, atomic_write))
    report["problems"] = kernels.check(results)
    return report


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.check_cache:
        print(kernels.check_cache(args.check_cache))
        return 0
    report = run(args, argv)
    print("\n".join(kernels.summary_lines(report, args.cache_dir)))
    if args.out:
        kernels.write_text(args.out + ".json", json.dumps(report, indent=1) + "\n", atomic_write)
        kernels.write_text(args.out + ".md", kernels.markdown(report), atomic_write)
        if args.compare:
            with open(args.compare) as f:
                before = json.load(f)
            kernels.write_text(args.out + "_vs_before.md", kernels.compare_markdown(before, report), atomic_write)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
