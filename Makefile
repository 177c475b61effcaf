# `make pretrain` and `make test` work on a fresh clone: the first creates (or reuses)
# the virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test

.PHONY: install pretrain sft sft-lora test test-all bench clean

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

# The main job: pretrain the tiny model on the embedded default corpus (no download).
pretrain: $(STAMP)
	$(PY) -m lm train experiments/pretrain_tiny.py $(ARGS)

# Fine-tune the pretrained tiny model into an assistant (SFT); pretrains it first if
# runs/pretrain_tiny is missing or unfinished (a finished run is only re-evaluated).
sft: $(STAMP)
	@test -f runs/pretrain_tiny/summary.json || $(PY) -m lm train experiments/pretrain_tiny.py
	$(PY) -m lm train experiments/sft_tiny.py $(ARGS)

sft-lora: $(STAMP)
	@test -f runs/pretrain_tiny/summary.json || $(PY) -m lm train experiments/pretrain_tiny.py
	$(PY) -m lm train experiments/sft_lora.py $(ARGS)

# The test suite on CPU with 8 fake devices (slow tests excluded; `make test-all` runs them).
test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q tests --runslow $(ARGS)

bench: $(STAMP)
	$(PY) -m lm bench all

clean:
	rm -rf runs .pytest_cache
