# moejax: `make train` and `make test` set everything up themselves (a .venv on Python >= 3.12).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
CPU_MESH := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu
DATA := data/shakespeare

# A Python >= 3.12: $(PYTHON), then PATH, then pyenv's installed versions.
FIND_PYTHON = for c in $(PYTHON) python3.14 python3.13 python3.12 python3 \
  $$( (ls -d "$$(pyenv root 2>/dev/null)"/versions/3.1[2-9]*/bin/python3 2>/dev/null || true) | sort -rV); do \
  "$$c" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { echo "$$c"; break; }; done

SPEEDRUN := experiments/speedrun.py
.PHONY: speedrun setup data train test test-slow bench device-check bench-data bench-eval bench-convert bench-attention memory clean ablate-balancing ablate-optimizer ablate-precision ablate-epochs ablate-attention ablate-quality sweep-width
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@if ! $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then \
	  py=$$($(FIND_PYTHON)); \
	  [ -n "$$py" ] || { echo "moejax needs Python >= 3.12: install one (e.g. 'pyenv install 3.12') or run make PYTHON=/path/to/python3.12"; exit 1; }; \
	  echo "setting up $(VENV) with $$py"; rm -rf $(VENV); "$$py" -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

data: setup
	$(PY) $(DATA)/fetch.py
	$(PY) -m moejax.data.prepare --raw=$(DATA)/raw --out=$(DATA)/prepared --vocab_size=4096 \
	  --variant_regex='(?P<doc>.+?)_gut(?:_(?P<variant>f))?'

train: data
	$(PY) -m moejax.train --config=experiments/default.py --workdir=runs/default
	$(PY) -m moejax.sample --workdir=runs/default --prompt="ROMEO:" --max_new_tokens=60
	$(PY) -m moejax.report --workdir=runs/default

# Wall time to the fixed held-out loss (docs/speedrun.md); appends to results/speedrun.{json,md}.
# RECIPE=<name> runs another recipe of experiments/speedrun.py.
speedrun: data
	$(PY) -m moejax.speedrun --config=$(SPEEDRUN)$(if $(RECIPE),:$(RECIPE))

# Two workers, one test file each at a time (files share module-scoped runs): CI has 2 cores.
test: setup
	$(CPU_MESH) $(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile tests

test-slow: data
	$(CPU_MESH) $(PY) -m pytest -q -m slow -n 2 --dist loadfile tests

bench: data
	$(PY) -m moejax.tools.bench --force_balance --out=docs/perf.md

# On a GPU or TPU host (< 8 min): platform tests, fp8 GEMMs in the HLO, throughput/MFU (docs/tools.md).
device-check: setup
	$(PY) -m moejax.tools.device_check --out=docs/perf_accelerator.md

# Bytes per device of the 1B and 20B MoE configs on a 64-device mesh, from the shardings (seconds, no devices).
memory: setup
	JAX_PLATFORMS=cpu $(PY) -m moejax.tools.memory --out=docs/memory.md

# Studies (experiments/studies/<name>.py): every variant is validated first, then trained in
# runs/study-<name>/<variant> (a finished run with the same config is read back; --fresh retrains).
STUDY := $(PY) -m moejax.tools.study

# Optimizer and precision ablations on the smoke model (one CPU device, a few minutes each).
ablate-optimizer: setup
	JAX_PLATFORMS=cpu $(STUDY) --study=experiments/studies/optimizer.py --out=results/optimizer.md

ablate-precision: setup
	JAX_PLATFORMS=cpu $(STUDY) --study=experiments/studies/precision.py --out=results/precision.md

ablate-epochs: data
	$(STUDY) --study=experiments/studies/epochs.py --out=results/epochs.md

# A loopback judge grades a web-like source, a classifier scores it, then all vs filtered vs filtered +
# rephrased vs weighted under one token budget (data in data/quality; about 6 minutes on 2 cores).
ablate-quality: setup
	JAX_PLATFORMS=cpu $(PY) -m moejax.tools.quality_data --out=data/quality
	JAX_PLATFORMS=cpu $(STUDY) --study=experiments/studies/quality.py --out=results/quality.md

# Learning-rate sweep at d_model 64 and 128, with and without the width-transfer rule (14 short CPU runs).
sweep-width: setup
	JAX_PLATFORMS=cpu $(STUDY) --study=experiments/studies/width.py --out=results/sweep_width.md --jobs=2

# moejax.data.prepare on a generated 1 GB corpus (and 100 MB): stage throughput vs the tokenizers
# anchor, worker scaling, peak RSS per process, MinHash quality. 20-40 minutes on 2 cores.
bench-data: setup
	$(PY) -m moejax.tools.bench_data --out=docs/data_perf.md

bench-eval: data
	$(PY) -m moejax.tools.bench_eval --out=docs/eval_perf.md

bench-convert: setup
	$(PY) -m moejax.tools.bench_convert --out=docs/convert_perf.md --gb=2.5

bench-attention: setup
	$(PY) -m moejax.tools.bench_attention --out=docs/attention.md

ablate-attention: setup
	$(STUDY) --study=experiments/studies/attention.py --out=results/attention.md

clean:
	rm -rf runs data/*/prepared

ablate-balancing: data
	$(STUDY) --study=experiments/studies/balancing.py --out=results/balancing.md
	$(PY) -m moejax.tools.bench --sections=controllers --out=results/balancing_speedbar.md
