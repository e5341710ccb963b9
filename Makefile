# dllm_rl: `make run` runs the main job, `make test` runs the test suite; both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch (lies on local disk on CPU machines); on a GPU machine: make TORCH_SPEC='torch==<cuda build>'
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
# the TORCH_SPEC the venv's torch was installed from
TORCH_RECORD := $(VENV)/.torch-spec

.PHONY: install run test lint clean reproduce reproduce-quick swap-torch

install: $(STAMP)

# A TORCH_SPEC given on the command line or in the environment that differs from the recorded one
# swaps torch in an existing venv (a venv without a record counts as different); without TORCH_SPEC
# the venv keeps the torch it has.
ifneq ($(origin TORCH_SPEC),file)
ifneq ($(wildcard $(STAMP)),)
ifneq '$(shell cat $(TORCH_RECORD) 2>/dev/null)' '$(TORCH_SPEC)'
install: swap-torch
endif
endif
endif

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	printf '%s\n' '$(TORCH_SPEC)' > $(TORCH_RECORD)
	$(PY) -m pip install --quiet -e '.[dev]'
	# DeepSpeed JIT-builds its CPU shared-memory collective on first use; build it now, not in the first run.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

# Uninstall first: pip counts a build with another local label (2.13.0+cpu for torch==2.13.0) as installed.
swap-torch: $(STAMP)
	$(PY) -m pip uninstall --quiet --yes torch
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	printf '%s\n' '$(TORCH_SPEC)' > $(TORCH_RECORD)

run: install
	$(PY) -m dllm_rl objective=spg task=sudoku

# the papers' comparisons at small scale (about 50 min on 2 CPU cores): runs under outputs/reproduce/,
# tables and plots into docs/RESULTS.md and docs/results/
reproduce: install
	WANDB_MODE=disabled $(PY) -m dllm_rl.experiments.reproduce --page docs/RESULTS.md

# the same pipeline in a few minutes (1 seed, 2 rounds, spg and elbo): outputs/reproduce-quick/<time>/RESULTS.md
reproduce-quick: install
	WANDB_MODE=disabled $(PY) -m dllm_rl.experiments.reproduce --quick

# test processes side by side (pytest-xdist); each test file stays in one process, so its module-scoped
# bases and runs are built once, and files start in collection order (tests/conftest.py puts the longest
# first); TEST_WORKERS=0 runs the suite in this process alone
TEST_WORKERS ?= 2
test: install
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(PY) -m ruff check dllm_rl hydra_plugins tests bench

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache
