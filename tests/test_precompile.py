"""dip.precompile (the command and DiP's workloads) over dip_kernels.precompile (the kernel-level
machinery): the compile-only pre-flight of every Triton kernel for a GPU that is not here.

The slow test compiles, for sm_90 and sm_80, every autotune config of every Triton kernel that the
wrappers launch for DiP-XL/16 in bf16 (training step and guided sampling), with the triton installed
here, and fails on what a GPU's first run would hit: a compile error (as the attention kernels'
loop-carried ``_`` once was), shared memory or registers over the target's limit, a grid over CUDA's
limits, or spills in a hot-path kernel (budget precompile.SPILL_BUDGET_BYTES). It runs in a
subprocess without TRITON_INTERPRET (this process interprets Triton) and keeps its Triton cache in
the temp directory between runs: about 3 minutes cold on 2 busy cores, seconds warm.

The other tests check the pieces on small inputs: tracing, specialisation, the ptxas log parser and
the checks."""
import ast
import json
import os
import subprocess
import sys
import tempfile

import pytest

from dip import precompile as model_precompile
from dip.checkpoint import atomic_write
from dip_kernels import precompile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_only_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_python(code, timeout=600):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_compile_only_env(),
                          cwd=ROOT, timeout=timeout)


# ---------------------------------------------------------------- the pieces
def test_trace_records_the_dtypes_a_gpu_run_sees():
    """bf16 autocast: the attention gets a bf16 qkv with fp32 norm weights, the detailer bf16 everything."""
    workloads = dict(model_precompile.model_workloads("DiP-Tiny", [32], ["bf16"], [2], [1]))
    calls = precompile.trace_op_calls(workloads["DiP-Tiny bf16 train B=2 32px"])
    ops = [c.op for c in calls]
    for op in ("patchify", "attention", "attention_backward", "patch_detailer", "patch_detailer_backward",
               "rmsnorm_modulate", "gated_residual", "swiglu", "unpatchify"):
        assert op in ops, op
    attention = next(c for c in calls if c.op == "attention")
    qkv, q_norm_weight = attention.args[:2]
    assert (qkv.dtype, q_norm_weight.dtype) == ("bfloat16", "float32")
    assert qkv.shape[:2] == (2, 4)  # 32 x 32 image, 16 x 16 patches
    head = next(c for c in calls if c.op == "patch_detailer")
    assert head.args[0].dtype == "bfloat16" and {w.dtype for w in head.args[2]} == {"bfloat16"}
    sampling = precompile.trace_op_calls(workloads["DiP-Tiny bf16 sample B=1 32px"])
    assert not any(c.op.endswith("_backward") for c in sampling)
    assert next(c for c in sampling if c.op == "attention").args[0].shape[0] == 2  # guided: 2B


def _specs(code):
    out = _run_python("import json, dip_kernels.precompile as pc\n" + code)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_row_counts_do_not_specialise_and_configs_expand():
    """The detailer's kernels for 1 and 3 patches are the same binaries (row counts are not
    specialised), and each autotune config of the attention kernels is its own binary."""
    got = _specs('''
import torch
from dip_kernels.reference.patch_detailer import detailer_weight_shapes
def calls(m):
    p = pc.TensorSpec((m, 3, 16, 16), (768, 256, 16, 1), 0, "bfloat16")
    t = pc.TensorSpec((m, 64), (64, 1), 0, "bfloat16")
    ws = tuple(pc.TensorSpec(s, tuple(torch.empty(s, device="meta").stride()), 0, "bfloat16")
               for s in detailer_weight_shapes(64))
    return [pc.OpCall("patch_detailer", (p, t, ws)), pc.OpCall("patch_detailer_backward", (p, p, t, ws))]
from dip_kernels.triton import attention
launches = []
for m in (1, 3):
    for call in calls(m):
        launches += [(f"m={m}", call.op, l) for l in pc.triton_launches(call)[0]]
qkv = pc.TensorSpec((2, 256, 3456), (884736, 3456, 1), 0, "bfloat16")
w, tab = pc.TensorSpec((72,), (1,), 0, "float32"), pc.TensorSpec((256, 36), (36, 1), 0, "float32")
call = pc.OpCall("attention", (qkv, w, w, tab, tab, 16, 1e-6))
launches += [("att", "attention", l) for l in pc.triton_launches(call)[0]]
specs = pc.kernel_specs(launches)
head = [s for s in specs if "attention" not in s.name]
print(json.dumps(dict(head=len(head), shared=sum(len(s.workloads) == 2 for s in head),
                      attention=len([s for s in specs if s.name == "_attention_fwd_kernel"]),
                      configs=len(attention._fwd.configs))))
''')
    assert got["head"] > 10 and got["shared"] == got["head"]
    assert got["attention"] == got["configs"]


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
           "ptxas info    : Function properties for _k\n"
           "    56 bytes stack frame, 48 bytes spill stores, 52 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size\n")
    assert precompile.parse_ptxas_log(log) == (255, 56, 48, 52)
    assert precompile.parse_ptxas_log("") is None


def _result(**kw):
    base = dict(kernel="_k", config="", arch="sm_90", status="compiled", registers=128, num_warps=4,
                shared_bytes=1000, spill_store_bytes=0, grids=[(10, 2, 1)], workloads=["DiP-XL/16 bf16 train B=32"])
    base.update(kw)
    return base


def test_check_finds_what_a_first_gpu_run_would_hit():
    assert precompile.check([_result()]) == []
    problems = precompile.check([
        _result(status="error", error="CompilationError: Loop-carried variable _ ..."),
        _result(shared_bytes=precompile.SHARED_MEMORY_LIMIT[80] + 1, arch="sm_80"),
        _result(registers=255, num_warps=16),
        _result(grids=[(1, 70000, 1)]),
        _result(spill_store_bytes=8),
        _result(spill_store_bytes=8, workloads=["DiP-XL/16 fp32 sample B=1"]),  # not the bf16 hot path
    ])
    assert len(problems) == 5, problems
    for problem, word in zip(problems, ("Loop-carried", "shared memory", "registers", "grid", "spill")):
        assert word in problem


def test_cache_manifest_says_which_runs_apply(tmp_path, monkeypatch):
    monkeypatch.setattr(precompile, "environment", lambda: dict(triton="3.6.0", triton_build="abc", torch="x",
                                                                 python="3.12"))
    report = dict(models=["DiP-XL/16"], dtypes=["bf16"], archs=["sm_90"], image_sizes=[], argv=[],
                  environment=precompile.environment())
    assert "not filled by dip.precompile" in precompile.check_cache(str(tmp_path))
    precompile.record_run(str(tmp_path), report, atomic_write)
    precompile.record_run(str(tmp_path), report, atomic_write)  # the same run again: recorded once
    precompile.record_run(str(tmp_path), dict(report, models=["DiP-Tiny"], environment=dict(
        report["environment"], triton_build="old")), atomic_write)
    lines = precompile.check_cache(str(tmp_path)).splitlines()
    assert len(lines) == 2 and lines[0].endswith("applies here") and "DiP-Tiny" in lines[1]
    assert "does not apply here" in lines[1]


def test_command_line_rejects_bad_arguments():
    for argv in (["--arch", "sm_75"], ["--train-batch", "0"], ["--compare", "x.json"]):
        with pytest.raises(SystemExit) as exit_info:
            model_precompile.parse_args(argv)
        assert exit_info.value.code == 2
    assert model_precompile.parse_args(["--arch", "sm_100", "--arch", "sm_90a"]).arch == [100, 90]


def test_kernel_level_tool_imports_no_model():
    """dip_kernels.precompile is below the model: importing it loads nothing of dip."""
    out = _run_python("import sys, dip_kernels.precompile\n"
                      "print(sorted(m for m in sys.modules if m == 'dip' or m.startswith('dip.')))")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_sm100_report_is_generated_from_its_results():
    """The committed Blackwell report: its markdown is markdown() of its JSON, and its problems are
    check() of its results (two detailer backward kernels spill on sm_100 with sm_90's tiles)."""
    stem = os.path.join(ROOT, "bench", "results", "precompile_sm100_triton3.6.0")
    with open(stem + ".json") as f:
        report = json.load(f)
    assert report["archs"] == ["sm_100"] and report["environment"]["triton"] == "3.6.0"
    assert report["problems"] == precompile.check(report["results"])
    assert all(r["status"] == "compiled" for r in report["results"])
    with open(stem + ".md") as f:
        assert f.read() == precompile.markdown(report)


# ---------------------------------------------------------------- every kernel, compiled for sm_90 and sm_80
def _cache_dir():
    # shared across runs and worktrees: Triton keys its entries on source, triton build and target
    return os.path.join(tempfile.gettempdir(), "dip-kernels-precompile-cache")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_and_sm80_at_dip_xl16_bf16(tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "dip.precompile", "--model", "DiP-XL/16", "--dtype", "bf16",
           "--arch", "sm_90", "--arch", "sm_80", "--cache-dir", _cache_dir(), "--jobs", str(os.cpu_count() or 2),
           "--out", str(out), "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_compile_only_env(), cwd=ROOT, timeout=1500)
    assert os.path.exists(f"{out}.json"), done.stderr[-3000:]
    report = json.load(open(f"{out}.json"))
    assert not report["problems"], "\n".join(report["problems"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    kernels = {r["kernel"] for r in report["results"]}
    for name in ("_attention_fwd_kernel", "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel", "_conv_kernel",
                 "_conv_pool_grad_kernel", "_weight_grad_kernel", "_patch_copy_kernel", "_swiglu_fwd_kernel",
                 "_rmsnorm_modulate_bwd_kernel", "_gated_residual_bwd_kernel"):
        assert name in kernels, name
    assert {r["arch"] for r in report["results"]} == {"sm_90", "sm_80"}
    assert all(r["status"] == "compiled" and r["registers"] is not None for r in report["results"])


def test_committed_sm90_report_is_clean():
    """The report docs/precompile.md's summary is generated from (tests/test_docs.py checks the text)."""
    with open(os.path.join(ROOT, "bench", "results", "precompile_sm90_triton3.6.0.json")) as f:
        report = json.load(f)
    assert report["archs"] == ["sm_90"] and report["environment"]["triton"] == "3.6.0" and not report["problems"]
    assert report["archive_bytes"] < 64 * 2 ** 20  # an archive small enough to carry along with a job


# ---------------------------------------------------------------- every kernel launches through launch.py
def _jit_functions(tree):
    """The module's @triton.jit functions (bare or called with options)."""
    def is_jit(d):
        d = d.func if isinstance(d, ast.Call) else d
        return isinstance(d, ast.Attribute) and d.attr == "jit"
    return {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef) and any(map(is_jit, f.decorator_list))}


def test_every_triton_kernel_launches_through_launch_py():
    """precompile sees a kernel only through dip_kernels/triton/launch.py's ``launch``: no module
    indexes one of its kernels (or an autotune / heuristics wrapper of one) with a grid itself
    (``kernel[grid](...)``), and every @triton.jit function that no other Triton function calls (an
    entry point) is the first argument of a ``launch`` call in its module, directly or through a
    module-level wrapper."""
    package = os.path.join(ROOT, "dip_kernels")
    entry_points = 0
    for folder, _, files in os.walk(package):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            tree = ast.parse(open(path).read())
            jit = _jit_functions(tree)
            if not jit:
                continue
            wrappers = {t.id: {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                        for node in tree.body if isinstance(node, ast.Assign)
                        for t in node.targets if isinstance(t, ast.Name)}
            kernels = set(jit) | {w for w, names in wrappers.items() if names & set(jit)}
            grid_calls = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)
                          and isinstance(n.func.value, ast.Name) and n.func.value.id in kernels]
            assert not grid_calls, f"{path}:{grid_calls}: launch kernels with dip_kernels.triton.launch.launch"
            called = {n.func.id for f in jit.values() for n in ast.walk(f)
                      if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            launched = {n.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Name) and n.func.id == "launch" and n.args
                        and isinstance(n.args[0], ast.Name)}
            launched |= {name for w in launched for name in wrappers.get(w, ())}  # _fwd = autotune(...)(_kernel)
            for kernel in set(jit) - called:
                entry_points += 1
                assert kernel in launched, f"{path}: kernel {kernel} is not launched through launch()"
    assert entry_points >= 13  # the kernels the slow test below expects, and more
