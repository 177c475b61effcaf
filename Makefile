# `make pretrain` and `make test` work on a fresh clone: the first creates (or reuses)
# the virtual environment in .venv and installs the project into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= test,serve

.PHONY: install pretrain sft sft-lora rl rl-tools test test-all bench clean

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

# Post-training on a CPU after `make sft` (runs what is missing first): a reward model and
# DPO from runs/sft_tiny; SFT on the synthetic addition task, then GRPO and PPO on it.
rl: $(STAMP)
	@test -f runs/pretrain_tiny/summary.json || $(PY) -m lm train experiments/pretrain_tiny.py
	@test -f runs/sft_tiny/summary.json || $(PY) -m lm train experiments/sft_tiny.py
	$(PY) -m lm train experiments/reward_tiny.py $(ARGS)
	$(PY) -m lm train experiments/dpo_tiny.py $(ARGS)
	@test -f runs/sft_arith/summary.json || $(PY) -m lm train experiments/sft_arith.py
	$(PY) -m lm train experiments/grpo_arith.py $(ARGS)
	$(PY) -m lm train experiments/ppo_arith.py $(ARGS)

# A model that calls a calculator, on a CPU: pretraining with the tool tokens reserved, SFT
# on tool-using demonstrations, then GRPO whose rollouts call the tool (pass@1 without
# tools, with tools after SFT and after GRPO printed at the end).
rl-tools: $(STAMP)
	@test -f runs/pretrain_tools/summary.json || $(PY) -m lm train experiments/pretrain_tools.py
	@test -f runs/sft_calc/summary.json || $(PY) -m lm train experiments/sft_calc.py
	$(PY) -m lm train experiments/grpo_calc.py $(ARGS)

# The test suite on CPU with 8 fake devices (slow tests excluded; `make test-all` runs them),
# on JOBS pytest-xdist workers (JOBS=0: in this process, e.g. to use a debugger).
JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q tests -n $(JOBS) --durations=20 $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q tests -n $(JOBS) --runslow $(ARGS)

bench: $(STAMP)
	$(PY) -m lm bench all

clean:
	rm -rf runs .pytest_cache
