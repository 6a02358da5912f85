"""bench/gpu_check.sh without a GPU: its syntax, its exits, and the plan of its --quick pass.

A stand-in python (a shell script passed as the script's PYTHON) records every
command the script runs and answers as a GPU machine would, so the step order, each step's
arguments, the budget, the per-step timing table and the exit codes are checked here, in about a
second; the real run happens on a lent GPU (bench/results/README.md)."""
import os
import subprocess
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")

FAKE_PYTHON = """#!/usr/bin/env bash
# answers like a GPU machine's python; every call is logged
printf '%s\\n' "$*" >> "$FAKE_LOG"
[[ $1 == - ]] && cat >/dev/null   # a script on stdin
case "$*" in
  *"torch.cuda.is_available()"*) exit ${FAKE_GPU_RC:-0} ;;
  *"built_with_cuda() else 1"*) exit ${FAKE_PREBUILT_RC:-0} ;;
  *"-m pytest"*" tests "*) exit ${FAKE_TESTS_RC:-0} ;;
  *) exit 0 ;;
esac
"""


def _run(tmp_path, *args, **env):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DIP_", "TRITON_CACHE"))}
    full_env.update({"PYTHON": str(fake), "FAKE_LOG": str(log),
                     "DIP_TRITON_CACHE_ARCHIVE": str(tmp_path / "none.tar.xz"), **env})
    done = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), *args], capture_output=True, text=True,
                          env=full_env, cwd=ROOT, timeout=120)
    return done, log.read_text().splitlines()


def test_script_parses():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0


def test_bad_arguments_exit_2(tmp_path):
    done, _ = _run(tmp_path, "--fastest")
    assert done.returncode == 2 and "unknown option --fastest" in done.stdout
    assert subprocess.run(["bash", SCRIPT], capture_output=True).returncode == 2


def test_no_gpu_exits_3_before_any_step(tmp_path):
    done, calls = _run(tmp_path, "--quick", FAKE_GPU_RC="1")
    assert done.returncode == 3 and "torch sees no CUDA device" in done.stdout
    assert not any("pytest" in c or "pip install" in c for c in calls)


def test_quick_plan(tmp_path):
    archive = tmp_path / "cache.tar.xz"
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "__grp___attention_fwd_kernel.json").write_text("{}")
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(entry, arcname="ABCDEF")
    done, calls = _run(tmp_path, "--quick", DIP_TRITON_CACHE_ARCHIVE=str(archive))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "budget 285s" in out  # the quick pass is planned for under 5 minutes
    # the carried cache is unpacked and checked against this triton before anything compiles
    assert (tmp_path / "out" / "triton-cache" / "ABCDEF" / "__grp___attention_fwd_kernel.json").exists()
    assert any("--check-cache" in c for c in calls)
    assert "skipped (--quick): dip_kernels._C is already built" in out
    assert not any("pip install" in c for c in calls)
    pytest_calls = [c for c in calls if "-m pytest" in c]
    assert "tests -m gpu" in pytest_calls[0]
    suites = [c for c in pytest_calls[1:]]
    assert [s.split("--benchmark-json=")[1].split()[0].rsplit("/", 1)[1] for s in suites] == \
        ["bench_ceiling.json", "bench_ops.json", "bench_model.json"]
    assert all("-k not compile" in s for s in suites[1:])  # no cold inductor builds in the quick pass
    assert not any("-m slow" in c for c in calls)
    # the closing table: every step with its status and seconds, and the cache misses
    table = out[out.index("step "):]
    for step in ("warm_cache", "build", "backends", "tests", "bench_ceiling", "bench_ops", "bench_model"):
        assert step in table, step
    assert "Triton binaries compiled on this machine (cache misses): 0" in out
    assert "0 step(s) not ok" in out


def test_a_failing_step_fails_the_run_and_the_rest_still_runs(tmp_path):
    done, calls = _run(tmp_path, "--quick", FAKE_TESTS_RC="1", FAKE_PREBUILT_RC="1")
    assert done.returncode == 1
    assert "FAILED (rc=1)" in done.stdout
    assert any("pip install" in c for c in calls)  # no prebuilt extension: it builds
    assert any("bench_model.json" in c for c in calls)  # the benchmarks still ran after the failed tests
    assert "1 step(s) not ok" in done.stdout


def test_on_this_machine_without_a_gpu_it_stops_at_once(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIP_")}
    env["PYTHON"] = __import__("sys").executable
    done = subprocess.run(["bash", SCRIPT, str(tmp_path / "out"), "--quick"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "torch sees no CUDA device" in done.stdout and (tmp_path / "out" / "logs" / "env.log").exists()
