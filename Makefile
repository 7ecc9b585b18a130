# imaging-meta: every target creates the virtual environment when it is missing.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/imaging-meta
# torch is pinned here (CPU wheel on this machine); on a GPU cluster install your CUDA build of torch 2.13.0
# into .venv first (python3.11 -m venv .venv; .venv/bin/pip install torch==2.13.0 --index-url <CUDA index>),
# then `make install TORCH_SPEC=torch`: a later reinstall's torch==2.13.0 is met by that build (README).
TORCH_SPEC ?= torch==2.13.0
DATA_DIR ?= data/demo
TRAINER ?= default
DATA ?= demo_segmentation
MODEL ?= protonet_seg
RUN_NAME ?= $(MODEL)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install install-bench install-docs train results evaluate selfsup test test-full bench lint typecheck docs tensorboard demo clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: TRAINER=$(TRAINER) DATA=$(DATA) MODEL=$(MODEL) DATA_DIR=$(DATA_DIR) ARGS='...'"

# a .venv without pip (a first make stopped during ensurepip, a python without its venv package) is made again in
# place, keeping what it holds (a CUDA torch put there first); `test -x` of its python trusted it for ever (a review).
# A python link that points nowhere (its base python removed or upgraded) is removed first: `venv` keeps it (a review)
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m pip --version >/dev/null 2>&1 || { for f in $(VENV)/bin/python*; do \
	    if [ -L "$$f" ] && [ ! -e "$$f" ]; then rm -f "$$f"; fi; done; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "$(TORCH_SPEC)" -e ".[dev,jpeg]"
	touch $@

install: $(VENV)/.installed  ## create .venv and install imaging-meta with its pinned dependencies

demo: install  ## generate the demo cohort into DATA_DIR (skipped when present)
	$(CLI) demo --out "$(DATA_DIR)" --if-missing

# demo data configs get the demo cohort (generated when missing) as their root; your own configs keep theirs
ifeq ($(DATA),demo_classification)
TRAIN_PREREQ := demo
ROOT_ARG := --data.init_args.source.init_args.csv "$(DATA_DIR)/lesions.csv"
else ifneq ($(filter demo_%,$(DATA)),)
TRAIN_PREREQ := demo
ROOT_ARG := --data.init_args.root "$(DATA_DIR)"
else
TRAIN_PREREQ := install
ROOT_ARG :=
endif

train: $(TRAIN_PREREQ)  ## meta-train (default: the demo cohort), then test the best checkpoint and print the results table
	$(CLI) fit --config configs/trainer/$(TRAINER).yaml --config configs/data/$(DATA).yaml \
	    --config configs/model/$(MODEL).yaml $(ROOT_ARG) \
	    --trainer.logger.init_args.name "$(RUN_NAME)" --test_after_fit true $(ARGS)

RESULTS_DIR ?= results
RESULTS_ARGS ?=
results: demo  ## train and test every learner on the same fixed demo test episodes; writes RESULTS_DIR/results.md (default results/)
	$(CLI) results --out "$(RESULTS_DIR)" --data-dir "$(DATA_DIR)" --trainer $(TRAINER) $(RESULTS_ARGS)

PROTOCOLS ?= in_domain cross_organ cross_site
EVAL_DIR ?= evaluation
EVAL_EPOCHS ?= 3
EVAL_ARGS ?= --shots 1 5 --episodes 200 --scan-protocols whole_scan oracle_extent --scan-pairs 2
evaluate: $(TRAIN_PREREQ)  ## fit MODEL under each segmentation protocol, evaluate it on fixed episodes; writes EVAL_DIR/comparison.md (default evaluation/)
	@set -e; for p in $(PROTOCOLS); do \
	  $(CLI) fit --config configs/trainer/$(TRAINER).yaml --config configs/data/$(DATA).yaml \
	      --config configs/protocol/$$p.yaml --config configs/model/$(MODEL).yaml $(ROOT_ARG) \
	      --trainer.logger.init_args.save_dir "$(EVAL_DIR)/runs" --trainer.logger.init_args.name $(MODEL)-$$p \
	      --trainer.max_epochs $(EVAL_EPOCHS) $(ARGS); \
	  run=$$(ls -td "$(EVAL_DIR)/runs/$(MODEL)-$$p"/version_* | head -1); \
	  ckpt=$$(ls -t "$$run"/checkpoints/best*.ckpt 2>/dev/null | head -1); \
	  if [ -z "$$ckpt" ]; then ckpt="$$run/checkpoints/last.ckpt"; \
	    echo "$$run: no best.ckpt (no validation was scored); evaluating its last.ckpt"; fi; \
	  $(CLI) evaluate --checkpoint "$$ckpt" --out "$(EVAL_DIR)/$(MODEL)-$$p" $(EVAL_ARGS); \
	done
	$(CLI) compare $(foreach p,$(PROTOCOLS),"$(EVAL_DIR)/$(MODEL)-$(p)") --out "$(EVAL_DIR)/comparison.md"

SELFSUP_DIR ?= evaluation/selfsup
SELFSUP_RUNS ?= selfsup_global selfsup_alp supervised mixed
# one row each; every label is hidden from training, and the last checkpoint is scored (no selection on labels)
ARGS_selfsup_global := --model.learner.init_args.local_window 0 --model.learner.init_args.location_weight 0
ARGS_selfsup_alp :=
ARGS_supervised := --data.init_args.selfsup_ratio 0
ARGS_mixed := --data.init_args.selfsup_ratio 0.5
selfsup-%: demo
	$(CLI) fit --config configs/trainer/$(TRAINER).yaml --config configs/data/selfsup_segmentation.yaml \
	    --config configs/model/protonet_seg.yaml --data.init_args.root "$(DATA_DIR)" \
	    --trainer.logger.init_args.save_dir "$(SELFSUP_DIR)/runs" --trainer.logger.init_args.name $* \
	    --trainer.max_epochs $(EVAL_EPOCHS) $(ARGS_$*) $(ARGS)
	$(CLI) evaluate --checkpoint "$$(ls -td "$(SELFSUP_DIR)/runs/$*"/version_* | head -1)/checkpoints/last.ckpt" \
	    --out "$(SELFSUP_DIR)/$*" --shots 1 --episodes 200

selfsup: $(addprefix selfsup-,$(SELFSUP_RUNS))  ## self-supervised (superpixel) against supervised training, same held-out episodes
	$(CLI) compare $(foreach r,$(SELFSUP_RUNS),"$(SELFSUP_DIR)/$(r)") --out "$(SELFSUP_DIR)/comparison.md"

test: install  ## fast test suite (no `slow` tests), a few minutes on 2 CPU cores
	$(PY) -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-full: install  ## every test, the slow ones included
	$(PY) -m pytest -m "not gpu" -q $(PYTEST_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "$(TORCH_SPEC)" -e ".[dev,jpeg,bench]"
	touch $@

install-bench: $(VENV)/.installed-bench  ## install the benchmark extra (the peer library `higher`)

BENCH_ARGS ?=
bench: demo install-bench  ## speed and memory tables (learner steps, MAML vs higher, data path); never part of make test
	$(PY) -m benchmarks.run --data-dir "$(DATA_DIR)" $(BENCH_ARGS)

lint: install  ## ruff, then the type check (make typecheck)
	$(VENV)/bin/ruff check imaging_meta datamodules tests benchmarks mkdocs_hooks.py
	$(MAKE) --no-print-directory typecheck

# settings in [tool.mypy] of pyproject.toml; the cache lives in the virtual environment, out of the repository root
typecheck: install  ## mypy on imaging_meta and datamodules
	$(VENV)/bin/mypy --cache-dir $(VENV)/.mypy_cache

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "$(TORCH_SPEC)" -e ".[dev,jpeg,docs]"
	touch $@

install-docs: $(VENV)/.installed-docs  ## install the docs extra (MkDocs)

docs: install-docs  ## build the documentation site from docs/ into site/ (--strict: a broken link fails)
	$(VENV)/bin/mkdocs build --strict --site-dir site

tensorboard: install  ## serve the TensorBoard logs in runs/
	$(VENV)/bin/tensorboard --logdir runs

# the generated demo cohort only, never DATA_DIR (a user's own folder) nor the rest of data/ (datasets prepared there
# by docs/recipes.md: removing all of data/ took them too; a review)
clean:  ## remove runs, reports (results, evaluation), caches, the demo cohort data/demo and the built docs (keeps .venv and the rest of data/)
	rm -rf runs data/demo .cache results evaluation site
