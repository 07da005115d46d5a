# Two commands for a fresh clone (see README):
#   make demo   set up .venv (CPU torch from local disk) and run the main job on the bundled default
#   make test   set up .venv and run the test suite
# Also: make cuda-check (CUDA build in .venv-cuda, as CI does), make bench, make clean; GPU-less kernel
# checks: make ptxas-check, make triton-aot-check, make cuda-host-check.
PY ?= python3
VENV ?= .venv
VENV_CUDA ?= .venv-cuda
export HF_HUB_OFFLINE = 1
export HF_DATASETS_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export MAX_JOBS ?= 2

.PHONY: demo test venv build cuda-check bench cmake-check clean ptxas-check triton-aot-check cuda-host-check

$(VENV)/.deps: requirements/cpu.txt requirements/common.txt requirements/demo.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements/cpu.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements/demo.txt
	touch $@

venv: $(VENV)/.deps

build: venv
	COFI_CUDA=0 $(VENV)/bin/pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(VENV)/bin/cofi demo

test: build
	$(VENV)/bin/python -m pytest tests

bench: build
	for b in benchmarks/bench_*.py; do $(VENV)/bin/python $$b --quick || exit 1; done

# The CUDA variant, built out of tree so it never touches the CPU build's in-place extension.
$(VENV_CUDA)/.deps: requirements/cuda.txt requirements/common.txt
	$(PY) -m venv $(VENV_CUDA)
	$(VENV_CUDA)/bin/pip install -q --upgrade pip
	$(VENV_CUDA)/bin/pip install -q -r requirements/cuda.txt
	touch $@

cuda-check: $(VENV_CUDA)/.deps
	rm -rf build/cuda-src && mkdir -p build/cuda-src
	git ls-files -z | xargs -0 -I{} cp --parents {} build/cuda-src/ 2>/dev/null || cp -r setup.py pyproject.toml csrc python cofi_kernels build/cuda-src/
	cd build/cuda-src && CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 COFI_CUDA=1 \
		../../$(VENV_CUDA)/bin/pip install -q --no-build-isolation --no-deps .
	cd build && ../$(VENV_CUDA)/bin/python -c "import cofi, json; from cofi.ops import backends; \
		b = backends(); none = lambda r: r != 'available' and all('has no CUDA kernel' in x for x in r); \
		bad = {op: r['native']['cuda'] for op, r in b.items() if r['native']['cuda'] != 'available' and not none(r['native']['cuda'])}; \
		print(json.dumps({op: r['native'] for op, r in b.items()}, indent=1)); \
		print('ops without a CUDA kernel by design:', sorted(op for op, r in b.items() if none(r['native']['cuda']))); \
		assert not bad, f'native CUDA kernels not built: {bad}'; print('CUDA build OK')"
	cd build && ../$(VENV_CUDA)/bin/python -m pytest -c ../pyproject.toml --rootdir .. ../tests

# ptxas -v resources of every CUDA kernel for sm_90 (fails on local memory in attention).
ptxas-check: venv
	CUDA_HOME=$${CUDA_HOME:-/usr/local/cuda} $(VENV)/bin/python tools/ptxas_check.py

# Every shipped Triton configuration compiled ahead of time for sm_90 (shared memory, spills).
triton-aot-check: venv
	$(VENV)/bin/python tools/triton_aot_check.py

# The CUDA kernels executed on the CPU (host harness under ASan + UBSan and TSan).
cuda-host-check: build
	$(VENV)/bin/python -m pytest -q tests/kernels/test_cuda_host_harness.py

cmake-check: venv
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH=$$($(VENV)/bin/python -c "import torch; print(torch.utils.cmake_prefix_path)") \
		-DPython3_EXECUTABLE=$(VENV)/bin/python
	cmake --build build/cmake -j 2

clean:
	rm -rf build *.egg-info python/cofi/_C*.so python/cofi/_build_info.json
