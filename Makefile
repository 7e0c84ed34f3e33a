# avmoe: `make demo` (install + tiny AVE run on CPU) and `make test` (install + full test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.avmoe-installed
DEMO_DATA ?= data/demo_ave
PYTEST_ARGS ?=
# Test worker processes (pytest-xdist); `make test PYTEST_WORKERS=0` runs serially in one process.
PYTEST_WORKERS ?= 2
# One intra-op thread per process: on a 2-core box the DataLoader workers (or the second DDP rank) need the other
# core, and tiny models gain nothing from threads (2 threads made the demo ~10x slower through oversubscription).
export OMP_NUM_THREADS ?= 1

.PHONY: help install demo demo-multitask test test-fast bench-cpu clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## project venv: CPU torch 2.13.0 unless a torch is already there, then the package (editable)
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: install  ## write the synthetic AVE release (if absent), train a tiny AVMoE on the CPU, test it
	$(PY) -m avmoe.datamodules.synthetic ave --root $(DEMO_DATA)
	$(VENV)/bin/lightning fit --config lightning_configs/demo.yaml --data.init_args.root $(DEMO_DATA)

demo-multitask: install  ## the four synthetic releases (if absent), one tiny backbone trained on AVE + AVVP + AVQA + AVS at once
	$(PY) -m avmoe.datamodules.synthetic ave --root data/demo_ave
	$(PY) -m avmoe.datamodules.synthetic llp --root data/demo_llp
	$(PY) -m avmoe.datamodules.synthetic musicavqa --root data/demo_avqa
	$(PY) -m avmoe.datamodules.synthetic avs_s4 --root data/demo_avs_s4
	$(VENV)/bin/lightning fit --config lightning_configs/demo_multitask.yaml

test: install  ## the whole suite (CPU; slow and 2-process DDP tests included)
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-fast: install  ## the suite without slow / DDP tests
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow and not ddp" $(PYTEST_ARGS)

clean:  ## remove runs, demo data and caches (keeps the venv)
	rm -rf runs data/demo_ave data/demo_llp data/demo_avqa data/demo_avqa_cache data/demo_avs_s4 .pytest_cache
