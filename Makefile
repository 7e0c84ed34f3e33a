# avmoe: `make demo` (install + tiny AVE run on CPU) and `make test` (install + full test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.avmoe-installed
DEMO_DATA ?= data/demo_ave
PYTEST_ARGS ?=
# Test worker processes (pytest-xdist); `make test PYTEST_WORKERS=0` runs serially in one process. loadgroup keeps
# the tests of one `xdist_group` (sharing an expensive module fixture) on one worker.
PYTEST_WORKERS ?= 2
# One intra-op thread per process: on a 2-core box the DataLoader workers (or the second DDP rank) need the other
# core, and tiny models gain nothing from threads (2 threads made the demo ~10x slower through oversubscription).
export OMP_NUM_THREADS ?= 1

.PHONY: help install demo demo-avvp demo-avs demo-avqa demo-multitask test test-fast bench-cpu clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## project venv: CPU torch 2.13.0 unless a torch is already there, then the package (editable)
$(STAMP): setup.cfg pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	@# The editable finder reports "Editable installation ... folders with the same name as your package" for the
	@# package_dir mapping avmoe.datamodules = datamodules/ (deliberate: see setup.cfg); nothing to act on.
	@PYTHONWARNINGS="ignore:Editable installation" $(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: install  ## write the synthetic AVE release (if absent), train a tiny AVMoE on the CPU, test it
	$(PY) -m avmoe.datamodules.synthetic ave --root $(DEMO_DATA)
	$(VENV)/bin/lightning fit --config lightning_configs/demo.yaml --data.init_args.root $(DEMO_DATA) --run.overwrite true

demo-avvp: install  ## the same for AVVP: synthetic LLP release in data/demo_llp, lightning_configs/demo_avvp.yaml
	$(PY) -m avmoe.datamodules.synthetic llp --root data/demo_llp
	$(VENV)/bin/lightning fit --config lightning_configs/demo_avvp.yaml --run.overwrite true

demo-avs: install  ## AVS: synthetic AVSBench S4 release in data/demo_avs_s4, lightning_configs/demo_avs.yaml
	$(PY) -m avmoe.datamodules.synthetic avs_s4 --root data/demo_avs_s4
	$(VENV)/bin/lightning fit --config lightning_configs/demo_avs.yaml --run.overwrite true

demo-avqa: install  ## AVQA: synthetic MUSIC-AVQA release in data/demo_avqa, lightning_configs/demo_avqa.yaml
	$(PY) -m avmoe.datamodules.synthetic musicavqa --root data/demo_avqa
	$(VENV)/bin/lightning fit --config lightning_configs/demo_avqa.yaml --run.overwrite true

demo-multitask: install  ## the four synthetic releases (if absent), one tiny backbone trained on AVE + AVVP + AVQA + AVS at once
	$(PY) -m avmoe.datamodules.synthetic ave --root data/demo_ave
	$(PY) -m avmoe.datamodules.synthetic llp --root data/demo_llp
	$(PY) -m avmoe.datamodules.synthetic musicavqa --root data/demo_avqa
	$(PY) -m avmoe.datamodules.synthetic avs_s4 --root data/demo_avs_s4
	$(VENV)/bin/lightning fit --config lightning_configs/demo_multitask.yaml

test: install  ## the whole suite (CPU; slow and 2-process DDP tests included)
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

test-fast: install  ## the suite without slow / DDP tests
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not slow and not ddp" $(PYTEST_ARGS)

clean:  ## remove runs, every demo's data and caches (keeps the venv)
	rm -rf runs $(DEMO_DATA) data/demo_ave data/demo_llp data/demo_avs_s4 data/demo_avqa data/demo_avqa_cache .pytest_cache
