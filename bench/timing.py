"""How every benchmark in bench/ is timed.

GPU: each call is bracketed by a pair of CUDA events recorded on the current stream, with no host
sync between calls, so the device queue stays full and the events measure device time (launch gaps
included, as in real use) rather than Python overhead; the host syncs once per pytest-benchmark
round. Input tensors rotate over enough pre-built random sets that one set's bytes are evicted from
L2 before it comes round again, so small ops are not timed out of a warm cache. Warm-up calls
(which also absorb torch.compile builds, Triton autotuning and cuDNN's algorithm search) run
before anything is timed; the first call's wall time is kept as ``first_call_s``.

pytest-benchmark still drives the loop (``benchmark.pedantic``) and keeps its own statistics,
taken with a clock that synchronises the device before reading the host timer, so they are
per-call device-inclusive times too (amortised over ``iterations`` calls per round). The number
the report uses is ``extra_info["time_ms"]``: the median of the per-call CUDA-event times (per-call
``perf_counter`` times on the CPU, where execution is synchronous).

Knobs (environment): DIP_BENCH_SECONDS (timed seconds per benchmark, default 1.0 on GPU, 0.05 on
CPU), DIP_BENCH_MIN_ROUNDS (default 5 GPU / 1 CPU), DIP_BENCH_DEVICE (cpu|cuda, default cuda when
available).
"""
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

_DEFAULT_L2_BYTES = 50 * 2**20  # H100 SXM; only used if the driver does not report it
_MAX_INPUT_SETS = 32
_SET_MEMORY_CAP = 4 * 2**30  # never spend more than this on rotated copies of the inputs
_MAX_CALLS = 20000
_MIN_ROUND_MS_GPU = 20.0  # one host sync (~10-50 us) per round must stay well under 1% of the round


# ----------------------------------------------------------------------------- device facts
def bench_device() -> torch.device:
    """The device the suites run on: $DIP_BENCH_DEVICE, else cuda when available, else cpu."""
    name = os.environ.get("DIP_BENCH_DEVICE", "").strip().lower()
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("DIP_BENCH_DEVICE asks for cuda but torch.cuda.is_available() is False")
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu() -> bool:
    return bench_device().type == "cuda"


def device_name(device: Optional[torch.device] = None) -> str:
    device = torch.device(device) if device is not None else bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def gpu_facts(device: Optional[torch.device] = None) -> Dict[str, object]:
    """What the report and the results' file names need to know about the GPU: torch's device
    properties, plus driver, clocks and power limit from NVML (nvidia-ml-py) when it is there.
    Empty dict without a GPU."""
    if not torch.cuda.is_available():
        return {}
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    facts: Dict[str, object] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sm_count": props.multi_processor_count,
        "memory_bytes": props.total_memory,
        "l2_bytes": getattr(props, "L2_cache_size", None),
        "torch_cuda": torch.version.cuda,
    }
    try:
        import pynvml
    except ImportError:
        return facts
    try:
        pynvml.nvmlInit()
    except Exception as e:  # no driver library: keep torch's facts
        facts["nvml_error"] = str(e)
        return facts
    try:
        handle = None
        uuid = getattr(props, "uuid", None)
        if uuid is not None:
            try:
                handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
            except Exception:
                handle = None
        if handle is None:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        queries = {
            "driver": lambda: pynvml.nvmlSystemGetDriverVersion(),
            "nvml_name": lambda: pynvml.nvmlDeviceGetName(handle),
            "max_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "max_mem_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM),
            "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
            "power_limit_w": lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0,
            "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
        }
        for key, query in queries.items():
            try:
                value = query()
                facts[key] = value.decode() if isinstance(value, bytes) else value
            except Exception:
                pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return facts


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or _DEFAULT_L2_BYTES


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- inputs
def tensors_in(obj) -> List[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []


def nbytes(obj) -> int:
    """Bytes of every distinct tensor storage in ``obj`` (nested lists/tuples/dicts)."""
    seen, total = set(), 0
    for t in tensors_in(obj):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def rotation_count(set_bytes: int, device: torch.device) -> int:
    """How many input sets to cycle through so a set is out of L2 by the time it is reused: enough
    sets to cover 3x the L2 size (LRU-ish eviction is not exact), capped by count and memory."""
    if device.type != "cuda" or set_bytes <= 0:
        return 1
    want = math.ceil(3 * l2_bytes(device) / set_bytes) + 1
    by_memory = max(1, _SET_MEMORY_CAP // set_bytes)
    return int(max(1, min(want, _MAX_INPUT_SETS, by_memory)))


# ----------------------------------------------------------------------------- the timed loop
def _env_float(name, default):
    value = os.environ.get(name)
    return float(value) if value else default


def _synced_perf_counter():
    """pytest-benchmark's timer on GPU: read the host clock only once the device is idle."""
    torch.cuda.synchronize()
    return time.perf_counter()


def _summary(times_ms: Sequence[float]) -> Dict[str, float]:
    ts = sorted(times_ms)
    n = len(ts)
    if n == 0:
        return {}
    q1 = ts[(n - 1) // 4]
    q3 = ts[(3 * (n - 1)) // 4]
    return {
        "time_ms": statistics.median(ts),
        "time_ms_min": ts[0],
        "time_ms_max": ts[-1],
        "time_ms_mean": statistics.fmean(ts),
        "time_ms_iqr": q3 - q1,
        "n_calls": n,
    }


def run(benchmark, fn: Callable, make_inputs: Callable[[], tuple], *, info: Dict[str, object],
        device: Optional[torch.device] = None, warmup: int = 2, min_rounds: Optional[int] = None,
        seconds: Optional[float] = None, input_sets: Optional[int] = None) -> Dict[str, float]:
    """Time ``fn(*inputs)`` under pytest-benchmark and record everything in ``benchmark.extra_info``.

    ``make_inputs()`` returns one fresh tuple of arguments (random data, never zeros); it is called
    once per rotated input set. ``info`` (flops, bytes, shape, provider, mode, dtype, ...) is merged
    into extra_info. Returns the timing summary (``time_ms`` = median per-call time)."""
    device = device or bench_device()
    gpu = device.type == "cuda"
    first = make_inputs()
    set_bytes = nbytes(first)
    n_sets = input_sets or rotation_count(set_bytes, device)
    sets = [first] + [make_inputs() for _ in range(n_sets - 1)]

    # the first call carries torch.compile's build, Triton's JIT/autotuning and cuDNN's search
    synchronize(device)
    t0 = time.perf_counter()
    fn(*sets[0])
    synchronize(device)
    first_call_s = time.perf_counter() - t0

    if gpu:
        for i in range(max(warmup, 0)):
            fn(*sets[(i + 1) % n_sets])
        # a short probe sizes the rounds: per-call time estimate from 3 calls
        probe = []
        for i in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*sets[i % n_sets])
            end.record()
            end.synchronize()
            probe.append(start.elapsed_time(end))
            if probe[-1] > 100.0:  # long calls (a whole sampling run): one probe is enough
                break
        est_ms = max(statistics.median(probe), 1e-3)
    else:
        # CPU runs only prove the suites work (some providers are interpreted Triton, seconds per
        # call): the first call is the warm-up and sizes the rounds
        est_ms = max(first_call_s * 1e3, 1e-3)

    seconds = seconds if seconds is not None else _env_float("DIP_BENCH_SECONDS", 1.0 if gpu else 0.05)
    if min_rounds is None:
        min_rounds = int(_env_float("DIP_BENCH_MIN_ROUNDS", 5 if gpu else 1))
    iterations = max(1, min(1000, math.ceil(_MIN_ROUND_MS_GPU / est_ms))) if gpu else 1
    rounds = int(min(200, max(min_rounds, round(seconds * 1e3 / (iterations * est_ms)))))
    rounds = max(min_rounds, min(rounds, _MAX_CALLS // iterations))  # bounds the event pool for tiny ops

    n_calls = rounds * iterations + (iterations > 1)  # pedantic's extra call for its return value
    if gpu:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls + 1)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_calls + 1)]
    host_ms: List[float] = []
    counter = [0]

    def target():
        i = counter[0]
        args = sets[i % n_sets]
        if gpu and i < len(starts):
            starts[i].record()
            fn(*args)
            ends[i].record()
        else:
            t = time.perf_counter()
            fn(*args)
            host_ms.append((time.perf_counter() - t) * 1e3)
        counter[0] = i + 1

    if "suite" in info:  # pytest-benchmark's console table then lists the providers of a case together
        benchmark.group = f"{info['suite']}/{info.get('op')} {info.get('mode')}-{info.get('dtype')}-{info.get('case')}"
    if gpu and hasattr(benchmark, "_timer"):
        # pytest-benchmark reads its timer around each round of `iterations` calls; syncing there
        # makes its own statistics device-inclusive (the events below are what the report uses)
        benchmark._timer = _synced_perf_counter
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=0)
    synchronize(device)
    if gpu:
        times = [starts[i].elapsed_time(ends[i]) for i in range(min(counter[0], len(starts)))]
    else:
        times = host_ms

    summary = _summary(times)
    extra = dict(info)
    extra.update(summary)
    extra.update({
        "timer": "cuda_event" if gpu else "perf_counter",
        "rounds": rounds,
        "iterations": iterations,
        "input_sets": n_sets,
        "input_set_bytes": set_bytes,
        "first_call_s": first_call_s,
        "device": str(device),
        "device_name": device_name(device),
    })
    for key, value in extra.items():
        benchmark.extra_info[key] = value
    return summary


def peak_memory(fn: Callable, args: tuple, device: torch.device) -> Optional[int]:
    """Peak bytes allocated by torch on ``device`` during one ``fn(*args)`` (None on CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn(*args)
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)
