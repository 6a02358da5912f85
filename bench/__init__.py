"""Benchmarks of the dip ops and the whole DiP model against eager PyTorch and torch.compile.

Run ``pytest bench`` (GPU: the model's real shapes in bf16; no GPU: tiny float32 shapes on the CPU,
which only proves the suites work), then ``python -m bench.report <benchmark.json>`` for the
markdown table and chart. ``bench/gpu_check.sh OUTDIR`` does build + GPU tests + all of it on a
lent GPU in one call. See bench/results/README.md.
"""
