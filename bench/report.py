"""Turn pytest-benchmark JSON runs of bench/ into a markdown table and a PNG chart.

    python -m bench.report RUN.json [MORE.json ...] [--ceilings ceilings.json] [--out DIR]

Writes DIR/<date>_<gpu>.md, .png and .json (the merged rows), DIR defaulting to bench/results, and
prints the summary table. Times are extra_info["time_ms"] (median of per-call CUDA-event times on
GPU; see bench/timing.py); speedups are reference/provider and compile/provider; TFLOP/s and GB/s are
taken against the card's ceilings measured in the same run (the ceiling benchmark's rows in the
JSON, a ceilings.json given with --ceilings, or one beside the first JSON file).
"""
import argparse
import datetime
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional

SUITE_ORDER = ("patch_detailer", "attention", "elementwise", "patchify", "model")
PROVIDER_ORDER = ("reference", "compile", "op_reference", "triton", "cuda", "onednn", "dip")
BASELINES = ("reference", "compile", "op_reference")
OURS = ("triton", "cuda", "onednn", "dip")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- loading
def load_runs(paths: List[str]):
    """(rows, machine_info, datetime string) from pytest-benchmark JSON files; rows are the
    benchmarks that carry bench/'s extra_info, in file order."""
    rows, machine, when = [], {}, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        when = when or data.get("datetime")
        for bench in data.get("benchmarks", []):
            info = dict(bench.get("extra_info") or {})
            if "suite" not in info:
                continue
            if info.get("time_ms") is None:
                stats = bench.get("stats") or {}
                if stats.get("median") is None:
                    continue
                info["time_ms"] = stats["median"] * 1e3
            info["name"] = bench.get("name")
            info["source"] = os.path.basename(path)
            rows.append(info)
    return rows, machine, when


def find_ceilings(rows, paths, ceilings_path=None) -> Dict[str, float]:
    ceilings: Dict[str, float] = {}
    candidates = [ceilings_path] if ceilings_path else []
    candidates += [os.path.join(os.path.dirname(os.path.abspath(p)), "ceilings.json") for p in paths]
    for path in candidates:
        if path and os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            ceilings.update({k: v for k, v in data.items() if k in ("matmul_tflops", "copy_gbps", "matmul_case")})
            break
    for row in rows:  # the same run's ceiling rows win over a file
        if row.get("ceiling") and row.get("ceiling_value"):
            ceilings[row["ceiling"]] = row["ceiling_value"]
            if row["ceiling"] == "matmul_tflops":
                ceilings["matmul_case"] = f"{row.get('dtype')} {row.get('case')}^3"
    return ceilings


# ----------------------------------------------------------------------------- arithmetic
def _case_key(row):
    return (row["suite"], row.get("op"), row.get("mode"), row.get("dtype"), row.get("case"))


def group_cases(rows):
    """{case key: {provider: row}}, suites in SUITE_ORDER, cases in first-seen order within a suite."""
    cases: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        if row["suite"] == "ceiling":
            continue
        cases.setdefault(_case_key(row), {})[row["provider"]] = row
    rank = {s: i for i, s in enumerate(SUITE_ORDER)}
    keys = sorted(cases, key=lambda k: rank.get(k[0], len(rank)))  # stable: keeps first-seen order
    return {k: cases[k] for k in keys}


def rates(row, ceilings):
    """(TFLOP/s, % of matmul ceiling, GB/s, % of copy ceiling); None where not applicable."""
    seconds = row["time_ms"] * 1e-3
    tflops = row["flops"] / seconds / 1e12 if row.get("flops") else None
    gbps = row["bytes"] / seconds / 1e9 if row.get("bytes") else None
    tf_pct = 100 * tflops / ceilings["matmul_tflops"] if tflops and ceilings.get("matmul_tflops") else None
    gb_pct = 100 * gbps / ceilings["copy_gbps"] if gbps and ceilings.get("copy_gbps") else None
    return tflops, tf_pct, gbps, gb_pct


def _fmt_ms(ms):
    if ms is None:
        return "-"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 0.1:
        return f"{ms:.3f}"
    return f"{ms:.4f}"


def _fmt_x(x):
    return "-" if x is None else f"{x:.2f}x"


def _fmt_rate(value, pct, unit):
    if value is None:
        return "-"
    text = f"{value:.1f}" if value >= 10 else f"{value:.3g}"
    return f"{text} ({pct:.0f}%)" if pct is not None else text


def _notes(row):
    parts = []
    if row.get("images_per_s"):
        parts.append(f"{row['images_per_s']:.1f} img/s")
    if row.get("peak_memory_bytes"):
        parts.append(f"peak {row['peak_memory_bytes'] / 1e9:.1f} GB")
    if row.get("provider") == "compile" and row.get("first_call_s") is not None:
        parts.append(f"build {row['first_call_s']:.1f} s")
    if row.get("compile_backend") and row.get("compile_backend") != "inductor":
        parts.append(f"backend {row['compile_backend']}")
    return ", ".join(parts)


def speedups(row, providers_of_case):
    reference = providers_of_case.get("reference")
    comp = providers_of_case.get("compile")
    vs_reference = reference["time_ms"] / row["time_ms"] if reference else None
    vs_compile = comp["time_ms"] / row["time_ms"] if comp else None
    return vs_reference, vs_compile


def _ordered(providers_of_case):
    known = [p for p in PROVIDER_ORDER if p in providers_of_case]
    return known + sorted(p for p in providers_of_case if p not in PROVIDER_ORDER)


def _suites(cases):
    present = {key[0] for key in cases}
    return [s for s in SUITE_ORDER if s in present] + sorted(present - set(SUITE_ORDER))


# ----------------------------------------------------------------------------- markdown
def summary_table(cases) -> List[str]:
    """One line per case: reference, compile, the best of ours and its speedups."""
    lines = ["| case | reference | compile | ours (best) | vs reference | vs compile |",
             "|---|---:|---:|---|---:|---:|"]
    for key, provs in cases.items():
        suite, op, mode, dtype, case = key
        ours = [provs[p] for p in OURS if p in provs]
        best = min(ours, key=lambda r: r["time_ms"]) if ours else None
        vs_e, vs_c = speedups(best, provs) if best else (None, None)
        lines.append(f"| {op} {mode} {dtype} {case} | {_fmt_ms(provs['reference']['time_ms']) if 'reference' in provs else '-'} "
                     f"| {_fmt_ms(provs['compile']['time_ms']) if 'compile' in provs else '-'} "
                     f"| {(_fmt_ms(best['time_ms']) + ' ' + best['provider']) if best else '-'} "
                     f"| {_fmt_x(vs_e)} | {_fmt_x(vs_c)} |")
    return lines


def render_markdown(rows, machine, when, ceilings, png_name=None) -> str:
    cases = group_cases(rows)
    gpu = machine.get("gpu") or {}
    device = gpu.get("name") or (rows[0].get("device_name") if rows else "cpu")
    out = [f"# dip-kernels benchmarks: {device}, {(when or '')[:10]}", ""]
    facts = [f"torch {machine.get('torch', '?')}", f"triton {machine.get('triton', '?')}"]
    if gpu:
        facts += [f"driver {gpu.get('driver', '?')}", f"CUDA {gpu.get('torch_cuda', '?')}",
                  f"{gpu.get('sm_count', '?')} SMs",
                  f"max SM clock {gpu.get('max_sm_clock_mhz', '?')} MHz",
                  f"power limit {gpu.get('power_limit_w', '?')} W"]
    facts.append(f"cuDNN benchmark {'on' if machine.get('cudnn_benchmark') else 'off'}")
    out += ["Machine: " + ", ".join(str(f) for f in facts) + ".", ""]
    if device == "cpu" or machine.get("bench_device") == "cpu":
        out += ["**CPU run**: tiny float32 shapes, Triton interpreted, torch.compile with the aot_eager backend; "
                "it only proves the suites run. The numbers mean nothing for performance.", ""]

    out += ["## Ceilings (measured in this run)", "", "| measure | value |", "|---|---:|"]
    if ceilings.get("matmul_tflops"):
        out.append(f"| matmul {ceilings.get('matmul_case', '')} | {ceilings['matmul_tflops']:.4g} TFLOP/s |")
    if ceilings.get("copy_gbps"):
        out.append(f"| device-to-device copy (read + write) | {ceilings['copy_gbps']:.4g} GB/s |")
    if not ceilings:
        out.append("| (no ceiling benchmark in this run) | - |")
    out.append("")

    out += ["## Summary", "", *summary_table(cases), ""]
    if png_name:
        out += [f"![speedup over the reference]({png_name})", ""]

    for suite in _suites(cases):
        out += [f"## {suite}", "",
                "| op | mode | dtype | case | provider | median ms | IQR ms | vs reference | vs compile "
                "| TFLOP/s (% peak) | GB/s (% peak) | notes |",
                "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for key, provs in cases.items():
            if key[0] != suite:
                continue
            _, op, mode, dtype, case = key
            for p in _ordered(provs):
                row = provs[p]
                vs_e, vs_c = speedups(row, provs)
                tf, tf_pct, gb, gb_pct = rates(row, ceilings)
                out.append(f"| {op} | {mode} | {dtype} | {case} | {p} | {_fmt_ms(row['time_ms'])} "
                           f"| {_fmt_ms(row.get('time_ms_iqr'))} | {_fmt_x(vs_e)} | {_fmt_x(vs_c)} "
                           f"| {_fmt_rate(tf, tf_pct, 'TFLOP/s')} | {_fmt_rate(gb, gb_pct, 'GB/s')} | {_notes(row)} |")
        out.append("")

    out += ["## How these were measured", "",
            "- Median of per-call times: CUDA events around each call with the device queue kept full "
            "(GPU), `perf_counter` (CPU); warm-up first (it absorbs torch.compile builds, Triton "
            "autotuning, cuDNN's search: see `build` in notes), inputs rotated over enough random "
            "sets to cover 3x L2, so small ops are timed from DRAM, not a warm cache.",
            "- Op level: `reference` is the reference function called directly under autograd; `compile` is "
            "torch.compile of it (static shapes); `op_reference` is the dip op on its reference backend "
            "(attention also computes the lse with an explicit fp32 QK^T and its backward recomputes "
            "the forward); `triton`/`cuda` are the dip op's backends.",
            "- Model level: `reference` runs the model on the reference functions (no custom ops, "
            "plain autograd: the PyTorch DiP a user would otherwise run) and `compile` is torch.compile "
            "of exactly that; `dip` runs the custom ops on the fastest available backend per op.",
            "- FLOPs: matmuls/convolutions/attention matmuls; fwdbwd and training steps count 3x the "
            "forward (attention 3.5x). Bytes: each input read once, each output written once "
            "(model forward: the parameters). % peak is against the ceilings above.",
            ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- chart
def render_png(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (used through matplotlib.ticker below)

    cases = group_cases(rows)
    suites = [s for s in _suites(cases) if any(k[0] == s and "reference" in v for k, v in cases.items())]
    if not suites:
        return False
    fig, axes = plt.subplots(len(suites), 1, figsize=(12, 3.2 * len(suites)), squeeze=False)
    colors = {"reference": "#9e9e9e", "compile": "#5c6bc0", "op_reference": "#bdbdbd", "triton": "#ef6c00",
              "cuda": "#2e7d32", "dip": "#c62828"}
    for ax, suite in zip(axes[:, 0], suites):
        keys = [k for k, v in cases.items() if k[0] == suite and "reference" in v]
        provs = [p for p in PROVIDER_ORDER if any(p in cases[k] for k in keys)]
        width = 0.8 / max(len(provs), 1)
        for j, p in enumerate(provs):
            xs, ys = [], []
            for i, k in enumerate(keys):
                if p in cases[k]:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(cases[k]["reference"]["time_ms"] / cases[k][p]["time_ms"])
            ax.bar(xs, ys, width, label=p, color=colors.get(p))
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"{k[1]}\n{k[2]} {k[3]} {k[4]}" for k in keys], fontsize=7)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_ylabel("speedup vs reference")
        ax.set_title(suite, fontsize=10)
        ax.legend(fontsize=7, ncol=len(provs))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def result_stem(machine, rows, when) -> str:
    gpu = (machine.get("gpu") or {}).get("name")
    name = gpu or (rows[0].get("device_name") if rows else None) or "cpu"
    date = (when or datetime.datetime.now().isoformat())[:10]
    return f"{date}_{slug(name)}"


def _latest_autosaved() -> List[str]:
    found = sorted(glob.glob(os.path.join(".benchmarks", "*", "*.json")), key=os.path.getmtime)
    return found[-1:]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON files (default: the newest in .benchmarks/)")
    parser.add_argument("--ceilings", help="ceilings.json written by bench/test_bench_ceiling.py")
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default bench/results)")
    parser.add_argument("--no-png", action="store_true", help="skip the chart")
    args = parser.parse_args(argv)

    paths = args.json or _latest_autosaved()
    if not paths:
        parser.error("no benchmark JSON given and none in .benchmarks/ (run pytest bench --benchmark-json=FILE)")
    rows, machine, when = load_runs(paths)
    if not rows:
        print(f"no bench/ results in {paths}", file=sys.stderr)
        return 1
    ceilings = find_ceilings(rows, paths, args.ceilings)
    os.makedirs(args.out, exist_ok=True)
    stem = result_stem(machine, rows, when)
    png_name = None
    if not args.no_png:
        title = f"dip-kernels: speedup over eager PyTorch, {stem.replace('_', ', ')}"
        if render_png(rows, os.path.join(args.out, stem + ".png"), title):
            png_name = stem + ".png"
    markdown = render_markdown(rows, machine, when, ceilings, png_name)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(markdown)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"datetime": when, "machine_info": machine, "ceilings": ceilings, "rows": rows}, f, indent=1)
    print("\n".join(summary_table(group_cases(rows))))
    if ceilings:
        print("ceilings: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in ceilings.items()))
    print(f"wrote {os.path.join(args.out, stem)}.md" + (" and .png" if png_name else "") + " and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
