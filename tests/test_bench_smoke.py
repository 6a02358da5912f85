"""The benchmark instrument works without a GPU: the timing loop records what the report needs, the
report's arithmetic is right, and a real CPU run of every suite (tiny shapes, few providers) ends
in a rendered markdown table and chart."""
import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # bench/ is not an installed package; plain `pytest` does not put the root on sys.path
    sys.path.insert(0, REPO)

from bench import report, timing  # noqa: E402


def test_timing_run_records_extra_info(benchmark):
    calls = []

    def fn(a, b):
        calls.append(1)
        return a @ b

    def make_inputs():
        return torch.randn(16, 16), torch.randn(16, 16)

    info = {"suite": "unit", "op": "mm", "mode": "fwd", "dtype": "f32", "case": "16", "provider": "reference",
            "flops": 2 * 16 ** 3, "bytes": 3 * 16 * 16 * 4}
    summary = timing.run(benchmark, fn, make_inputs, info=info, device=torch.device("cpu"), seconds=0.0)
    extra = benchmark.extra_info
    for key in ("time_ms", "time_ms_iqr", "first_call_s", "rounds", "iterations", "input_sets", "device_name",
                "flops", "bytes", "provider"):
        assert key in extra, key
    assert extra["timer"] == "perf_counter" and extra["device_name"] == "cpu"
    assert summary["time_ms"] > 0 and summary["n_calls"] >= 1
    assert len(calls) >= 1 + summary["n_calls"]  # warm-up call plus every timed call
    assert benchmark.group == "unit/mm fwd-f32-16"


def test_rotation_count_covers_l2():
    cpu = torch.device("cpu")
    assert timing.rotation_count(10 * 2**20, cpu) == 1  # no cache to defeat on the CPU path
    assert timing.nbytes((torch.empty(4, dtype=torch.float32), [torch.empty(2, dtype=torch.bfloat16)])) == 20


def _row(suite, op, provider, ms, flops=None, nbytes=None, case="c", **extra):
    return {"suite": suite, "op": op, "mode": "fwd", "dtype": "bf16", "case": case, "provider": provider,
            "time_ms": ms, "flops": flops, "bytes": nbytes, **extra}


def _write_run(path, rows, gpu_name="NVIDIA H100 80GB HBM3"):
    data = {"machine_info": {"gpu": {"name": gpu_name}, "torch": "2.11", "triton": "3.6"},
            "datetime": "2026-11-26T10:00:00+00:00",
            "benchmarks": [{"name": f"test_{r['op']}[{r['provider']}]", "stats": {"median": r["time_ms"] / 1e3},
                            "extra_info": r} for r in rows]}
    with open(path, "w") as f:
        json.dump(data, f)


def test_report_arithmetic_and_files(tmp_path):
    rows = [
        _row("ceiling", "matmul", "torch", 1.0, ceiling="matmul_tflops", ceiling_value=800.0),
        _row("ceiling", "copy", "torch", 1.0, ceiling="copy_gbps", ceiling_value=4000.0),
        _row("patch_detailer", "patch_detailer", "reference", 4.0, flops=400e9, nbytes=4e9),
        _row("patch_detailer", "patch_detailer", "compile", 2.0, flops=400e9, nbytes=4e9, first_call_s=12.5),
        _row("patch_detailer", "patch_detailer", "triton", 1.0, flops=400e9, nbytes=4e9),
        _row("model", "train_step", "dip", 100.0, case="b32", images_per_s=320.0, peak_memory_bytes=30e9),
    ]
    path = tmp_path / "run.json"
    _write_run(path, rows)
    assert report.main([str(path), "--out", str(tmp_path / "out")]) == 0
    stem = "2026-11-26_nvidia-h100-80gb-hbm3"
    md = (tmp_path / "out" / f"{stem}.md").read_text()
    assert (tmp_path / "out" / f"{stem}.png").stat().st_size > 1000
    json.loads((tmp_path / "out" / f"{stem}.json").read_text())
    triton_line = next(line for line in md.splitlines() if line.startswith("| patch_detailer | fwd") and "triton" in line)
    # 4 ms reference / 1 ms = 4x, 2 ms compile / 1 ms = 2x; 400 GFLOP in 1 ms = 400 TFLOP/s = 50% of 800;
    # 4 GB in 1 ms = 4000 GB/s = 100% of the copy ceiling
    assert "| 4.00x | 2.00x | 400.0 (50%) | 4000.0 (100%) |" in triton_line
    assert "build 12.5 s" in md and "320.0 img/s" in md and "peak 30.0 GB" in md
    assert "| matmul" in md and "800 TFLOP/s" in md


def test_report_reads_ceilings_file(tmp_path):
    path = tmp_path / "run.json"
    _write_run(path, [_row("elementwise", "swiglu", "reference", 1.0, nbytes=1e9),
                      _row("elementwise", "swiglu", "triton", 0.5, nbytes=1e9)])
    (tmp_path / "ceilings.json").write_text(json.dumps({"matmul_tflops": 700.0, "copy_gbps": 4000.0}))
    rows, _, _ = report.load_runs([str(path)])
    assert report.find_ceilings(rows, [str(path)]) == {"matmul_tflops": 700.0, "copy_gbps": 4000.0}


def test_cpu_bench_runs_and_renders(tmp_path):
    """Every suite on the CPU at its tiny shapes (every provider that runs there, Triton interpreted,
    except the Triton head; one timed round each), then the report: the path CI can check without a GPU."""
    env = dict(os.environ, DIP_BENCH_DEVICE="cpu", DIP_BENCH_SECONDS="0", DIP_BENCH_OUT=str(tmp_path))
    env.pop("DIP_BENCH_PROVIDERS", None)
    out_json = tmp_path / "bench.json"
    # the interpreted Triton head takes seconds per call: the op tests cover it, this run need not
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu",
           "-k", "not (test_patch_detailer and triton)", "--benchmark-json", str(out_json)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out_json.read_text())
    suites = {b["extra_info"]["suite"] for b in data["benchmarks"]}
    assert suites == {"ceiling", "patch_detailer", "attention", "elementwise", "patchify", "model"}, suites
    assert json.loads((tmp_path / "ceilings.json").read_text())["copy_gbps"] > 0
    proc = subprocess.run([sys.executable, "-m", "bench.report", str(out_json), "--out", str(tmp_path / "out")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mds = list((tmp_path / "out").glob("*_cpu.md"))
    assert len(mds) == 1
    md = mds[0].read_text()
    for section in ("## Ceilings", "## Summary", "## patch_detailer", "## attention", "## elementwise", "## patchify",
                    "## model"):
        assert section in md, section
    assert list((tmp_path / "out").glob("*_cpu.png"))
