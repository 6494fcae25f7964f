# dataeff: every target sets up .venv itself (re-installed only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# make test-min: a second venv holding the oldest releases pyproject.toml admits.
VENV_MIN  := .venv-min
STAMP_MIN := $(VENV_MIN)/.installed-stamp
export WANDB_MODE ?= offline

# make shard SRC=<raw image tree> OUT=shards/<name> [ARGS="key=value ..."]
SRC ?=
OUT ?=
ARGS ?=
MAX_N ?= 10000

.PHONY: venv test test-fast test-min test-gpu test-slurm gpu-check demo fidelity shard bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	@# shellcheck lints the launch scripts (tests); Debian ships it.
	command -v shellcheck >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck) || \
	  echo "warning: shellcheck not installed (needs root + apt); its lint test will be skipped"; }
	@# A single-node SLURM for the launch/slurm tests (marker slurm): Debian's daemons and clients.
	PATH="$$PATH:/usr/sbin:/sbin" command -v slurmctld >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    slurmctld slurmd munge slurm-client) || \
	  echo "warning: SLURM not installed (needs root + apt); the real-SLURM tests will be skipped"; }
	touch $@

# Every tier: unit, integration, distributed, e2e (gpu tests skip with a reason on CPU).
# pytest's exit code 5 (no tests ran) passes through as a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Unit tier only: pure functions and tiny modules, under a minute on 2 cores.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Unit tier against the declared floors: every direct dependency pinned to its '>=' version
# (torch/torchvision: the pair on local disk; .ci/min_pins.py), dataeff itself with --no-deps.
test-min: $(STAMP_MIN)
	$(VENV_MIN)/bin/python -m pytest -q tests/unit

$(STAMP_MIN): pyproject.toml .ci/min_pins.py
	rm -rf $(VENV_MIN)
	$(PYTHON) -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q --upgrade pip
	$(PYTHON) .ci/min_pins.py > $(VENV_MIN)/requirements-min.txt
	$(VENV_MIN)/bin/python -m pip install -r $(VENV_MIN)/requirements-min.txt
	$(VENV_MIN)/bin/python -m pip install --no-deps -e .
	touch $@

# ruff lint + format check and mypy over dataeff/ (rules: pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

# launch/slurm against a real single-node SLURM the tests start (also part of make test).
test-slurm: $(STAMP)
	$(BIN)/python -m pytest -q -m slurm

# One CUDA GPU, under 8 minutes: the gpu tests, DeepSpeed MAE ViT-B/16 MFU, ViT-B embedding img/s,
# faiss-gpu k-means 1M x 768, SAM vit_b batched pass vs generator -> bench-out/gpu_check.json + a table.
# Needs the gpu extra (pip install -e '.[gpu,dev]'). Without a GPU: says so, runs the CPU dry run, exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash launch/demo.sh

# The fidelity sweep (docs/fidelity.md): the demo's pool and split, low-label fine-tuning and a
# frozen-encoder evaluation, 5 seeds; resumable, writes runs/fidelity/report.md.
fidelity: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH SWEEP_CONFIG=configs/sweep/fidelity.yaml bash launch/demo.sh

shard: $(STAMP)
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make shard SRC=<raw image dir> OUT=shards/<name> [ARGS='key=value ...']"; exit 2; }
	$(BIN)/dataeff shard --config configs/shard/default.yaml src=$(SRC) out=$(OUT) $(ARGS)

bench: $(STAMP)
	@set -e; for script in benchmarks/bench_*.py; do \
	  args=""; case $$script in *bench_scale.py) args="--max-n $(MAX_N)";; esac; \
	  echo "== $$script $$args"; $(BIN)/python $$script $$args; done

clean:
	rm -rf runs selections embeddings bench-out .pytest_cache
