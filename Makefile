# Two commands matter: `make demo` and `make test`. Each sets everything up on a fresh machine (virtual
# environment, pinned torch, build tools, the compiled extension) and then runs its job. Every pip call goes
# through constraints.txt so that nothing drags in a CUDA torch.
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
PIPC := $(PIP) install -c constraints.txt
VENV_STAMP := $(VENV)/.venv-stamp
DEPS_STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
EVAL_STAMP := $(VENV)/.eval-stamp
# Python files too: the editable install maps every module by name, so an added or removed module needs a reinstall.
SOURCES := $(shell find csrc -type f) $(shell find epic_ext -name "*.py") CMakeLists.txt pyproject.toml
PYTEST_ARGS ?=
# DeepSpeed JIT-compiles a CPU communication op once; keep it in the build tree so later runs reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions

PROFILE ?= quick
CONSTANTS ?=
.PHONY: all setup build eval-deps test test-compat test-tv test-torch-range test-stacks install-check fuzz demo \
	demo-model bench ablation real-width cuda-check cuda-emu cuda-emu-planted cuda-perf cuda-perf-planted cuda-link-check gpu-check gpu-wheels clean
all: test

# The venv counts as made only once its stamp is written: an interrupted `python -m venv` is made again.
$(VENV_STAMP):
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	touch $@

$(DEPS_STAMP): constraints.txt requirements-dev.txt requirements-build.txt | $(VENV_STAMP)
	$(PIPC) torch==2.13.0
	$(PIPC) -r requirements-dev.txt
	DS_BUILD_OPS=0 $(PIPC) --no-build-isolation deepspeed==0.19.8
	touch $@

setup: $(DEPS_STAMP)

# Editable install: Python edits are live; C++ edits rebuild incrementally in build/ (scikit-build-core build-dir).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIPC) --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

# The eval extra (lmms-eval and the `--model epic_ext` entry point), plus decord, which lmms-eval's own LLaVA / Qwen
# wrappers import at module level (the plugin tests compare against them). lmms-eval requires torchvision, and the one
# that pairs with torch 2.13.0 (0.28.0) is built against the CUDA torch: with our CPU torch it fails to import, and
# transformers, seeing it installed, then cannot build any processor. It is removed again where it cannot import
# (lmms-eval's core and our plugin never import it).
$(EVAL_STAMP): pyproject.toml constraints.txt | $(BUILD_STAMP)
	$(PIPC) --no-build-isolation -e ".[eval]" decord
	$(VPY) -c "import torchvision" 2>/dev/null || $(PIP) uninstall -y torchvision
	touch $@

eval-deps: $(EVAL_STAMP)

test: build $(EVAL_STAMP)
	$(VPY) -m pytest $(PYTEST_ARGS)

# The transformers-dependent tests against the lowest supported transformers and the newest one that installs
# (tools/test_compat.py; each in build/compat/, in front of .venv, nothing rebuilt). A failure names the release.
COMPAT_ARGS ?=
test-compat: build
	$(VPY) tools/test_compat.py $(COMPAT_ARGS)

# Other torch stacks, each in its own venv under build/stacks/ (tools/test_stacks.py; built beside its final name,
# moved into place with a completion marker, reused when complete; the extension compiled against that torch, with
# the CUDA kernels where nvcc matches torch's CUDA). A failure names the stack. STACKS_ARGS passes options to it.
STACKS_ARGS ?=
# torch 2.14.1 + torchvision 0.29.1 (CUDA builds run on the CPU), pinned transformers, DeepSpeed, the eval extra:
# the whole suite (CUDA cases skip without a GPU).
test-tv: build
	$(VPY) tools/test_stacks.py --stacks tv $(STACKS_ARGS)

# The ends of the declared torch range (pyproject's torch>= and the newest release, 2.15.0, above this machine's pip
# cap: the stack's own PIP_CONSTRAINT replaces the global constraints file for its pip calls): the op and model
# tests (STACKS_ARGS=--full: the training and compression tests too).
test-torch-range: build
	$(VPY) tools/test_stacks.py --stacks torch-lowest torch-newest $(STACKS_ARGS)

# Everything: CI's run (.ci/run), the tv stack again with the CUDA kernels built, and the range ends with their full
# test sets (training and compression tests too).
test-stacks:
	.ci/run
	$(MAKE) test-tv
	$(MAKE) test-torch-range STACKS_ARGS=--full

# The README's install commands, verbatim, in a fresh venv that holds only torch (PIP_CONSTRAINT keeps them on our
# pins), then the whole suite against that regular (non-editable) install, run from outside the source tree.
install-check:
	tools/install_check.sh

# The property-based op tests (python_tests/ops/test_fuzz_*.py) with many random examples instead of `make test`'s
# fixed, bounded set (Hypothesis profile "fuzz", see python_tests/conftest.py). Failures are saved in .hypothesis/
# and replayed first next time; turn each into an @example or a plain test.
fuzz: build
	$(VPY) -m pytest python_tests/ops/test_fuzz_*.py --hypothesis-profile=fuzz -p no:cacheprovider $(PYTEST_ARGS)

demo: build
	$(VPY) -m epic_ext.demo --output-dir runs/demo

# The demo's pretrained checkpoint (epic_ext/assets/demo_model): SFT at full visual tokens through the training path,
# validated in chunks; stages cached in build/demo_model (an interrupted run resumes). About an hour on 2 cores.
demo-model: build
	$(VPY) -m epic_ext.demo.model --work-dir build/demo_model --install

bench: build
	$(VPY) -m pytest bench -o python_files="bench_*.py" -p no:cacheprovider --benchmark-disable-gc -s $(PYTEST_ARGS)

# EPIC's ablations in miniature (bench/ablation.py): PROFILE=quick (CPU) or full (GPU); stages are cached in
# build/ablation/$(PROFILE), so an interrupted run resumes.
ablation: build
	$(VPY) bench/ablation.py --profile $(PROFILE) $(if $(CONSTANTS),--schedule-constants $(CONSTANTS))

# A training run at real widths on the CPU (bench/real_width.py): a LLaVA-1.5-7B-shaped model cut to 2 decoder
# layers, random weights, LoRA + projector trained with TCD under ZeRO-3 and gradient checkpointing for a few steps;
# peak memory and step time in bench/results/real_width.json, with --dry-run's DeepSpeed estimate for the full 7B.
# (bench/real_width.py --full fine-tunes fully: more than the CPU machine's 24 GiB.)
real-width: build
	$(VPY) bench/real_width.py

# Compile every CUDA source with nvcc -c (also run as a test by `make test`).
cuda-check: $(DEPS_STAMP)
	$(VPY) tools/nvcc_check.py

# The CUDA kernels run on the CPU (tools/cuda_emu, README "CUDA kernels on the CPU"): builds csrc/cuda for the host
# against the emulator (normal and AddressSanitizer builds, objects cached in build/cuda_emu), runs the emulator's
# self-test, then the op tests' CUDA cases under several device shapes and thread orders, and once under ASan.
# Without an nvcc on PATH the CUDA headers come from three small wheels (~33 MB).
cuda-emu: build
	@command -v nvcc >/dev/null || $(PIPC) nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl
	$(VPY) tools/cuda_emu/emu.py ci

# Proof that the emulated tests catch kernel bugs: plants known bugs in copies of csrc/cuda; each must fail them.
cuda-emu-planted: build
	$(VPY) tools/cuda_emu/planted.py

# Memory traffic of the CUDA kernels, counted in the emulator (tools/cuda_emu/PERF.md): sectors per request,
# efficiency, bytes against the op's minimum, bank conflicts, a modelled H100 time; bench/results/cuda_perf.*.
cuda-perf: build
	@command -v nvcc >/dev/null || $(PIPC) nvidia-cuda-runtime nvidia-cuda-crt nvidia-cuda-cccl
	$(VPY) tools/cuda_emu/perf.py report

# Proof that the report flags performance bugs planted in copies of csrc/cuda (also a test: test_cuda_perf.py).
cuda-perf-planted: build
	$(VPY) tools/cuda_emu/perf_planted.py

# Build with EPIC_EXT_CUDA=ON against a CUDA torch (2.15.0, CUDA 13.2) in a separate venv (build/link-check), import
# it and run the CPU op tests. Downloads ~2.7 GB the first time; run it before resolving a change to csrc/cuda.
cuda-link-check:
	tools/cuda_link_check.sh

# For a machine with a GPU (uses its python and torch, not .venv): build with CUDA, CUDA tests, compute-sanitizer,
# benchmarks; summary in bench/results/gpu-check-<device>.md. Carry build/gpu-wheels (make gpu-wheels) along.
gpu-check:
	tools/gpu_check.sh

# Wheels the GPU machines lack (no network there): DeepSpeed and Liger-Kernel, and DeepSpeed's small pure-Python
# dependencies (torch, triton, numpy, msgpack, psutil and pydantic are expected there; gpu-check reports it if not).
gpu-wheels: $(DEPS_STAMP)
	mkdir -p build/gpu-wheels
	DS_BUILD_OPS=0 $(PIP) wheel -q -c constraints.txt --no-deps --no-build-isolation -w build/gpu-wheels \
	  deepspeed==0.19.8 liger-kernel==0.8.5 hjson einops py-cpuinfo nvidia-ml-py
	ls build/gpu-wheels

clean:
	rm -rf build $(VENV) .pytest_cache
