# Two entry points for a fresh machine (Python >= 3.10): `make reproduce` and `make test`.
# Each creates .venv if missing and installs the package with its dev extra at the pinned versions.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Exact pins for a reproducible environment (package metadata keeps ranges).
PINS := torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 'nbdev>=2.4,<3' 'fastcore<2' 'execnb<0.2'
RUNS ?= runs
export HF_HUB_OFFLINE ?= 1
# two cores: one thread per test process avoids oversubscription (nbdev_test runs two notebooks at once)
test: export OMP_NUM_THREADS ?= 1

.PHONY: setup reproduce mini-pretrain test test-full-size check-sync readme outputs docs-html bench gpu-wheels gpu-check clean mutants

$(BIN)/.installed: setup.py settings.ini
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS)
	$(BIN)/python -m pip install -q -e '.[dev]' $(PINS)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

setup: $(BIN)/.installed

# The main job: every row of the table on the embedded miniature benchmark (CPU; built and cached on the
# first run), then the figures (the run's, beside the authors') under figures/ as <pool>_*.png/pdf.
REPRO_POOL ?= mini
REPRO_ARGS ?= -p eval_every 20
FIGURES ?= figures
reproduce: setup
	mkdir -p $(RUNS)/$(REPRO_POOL) $(FIGURES)
	$(BIN)/papermill nbs/20_reproduce.ipynb $(RUNS)/$(REPRO_POOL)/20_reproduce.ipynb -p pool $(REPRO_POOL) -p output_dir $(RUNS)/$(REPRO_POOL) $(REPRO_ARGS)
	$(BIN)/papermill nbs/21_figures.ipynb $(RUNS)/$(REPRO_POOL)/21_figures.ipynb -p run_dir $(RUNS)/$(REPRO_POOL) -p output_dir $(FIGURES) -p prefix $(REPRO_POOL)_
	@echo "results: $(RUNS)/$(REPRO_POOL)/results.md (and .csv); trajectories: $(RUNS)/$(REPRO_POOL)/lambdas.csv; figures: $(FIGURES)/$(REPRO_POOL)_*"

# The miniature's pretrained encoder, shipped as package data: pretrain it again, deterministically on one thread
# (about 18 minutes on one core), into adamerging_nb/mini_encoder.safetensors and its record mini_encoder.json
# (settings and SHA-256). On the same CPU and library versions the file comes out identical, bit for bit.
mini-pretrain: setup
	OMP_NUM_THREADS=1 $(BIN)/python -c "from adamerging_nb.mini import write_encoder; write_encoder()"
	@git diff --quiet -- adamerging_nb/mini_encoder.safetensors adamerging_nb/mini_encoder.json \
	  && echo "identical, bit for bit, to the committed files" || echo "differs from the committed files: see git diff"

# Engine against the reference loop (full size on a GPU, a tiny model on CPU).
bench: setup
	$(BIN)/adamerging-bench --out $(RUNS)/bench.json

test: setup
	$(BIN)/nbdev_test --n_workers 2
	$(BIN)/pytest -q tests

# Both real pools end to end at full ViT-B/32 size on the CPU, from stand-ins in the real formats (about 30 min
# on 2 cores, peak RAM about 14 GiB, 12 GB of temporary files); the phases measured go to $(RUNS)/full_size.json.
test-full-size: setup
	FULL_SIZE_REPORT=$(RUNS)/full_size.json $(BIN)/pytest -q --full-size tests/test_full_size.py

# The GPU check, in two steps. Here (with PyPI): fetch the wheels that a GPU machine with only its own python3
# and torch lacks (about 2 MiB) into .whl/, with the commit they belong to.
GPU_WHEELS := open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 fastcore==1.14.5
gpu-wheels: setup
	rm -rf .whl && mkdir -p .whl
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	git rev-parse HEAD > .whl/COMMIT
	@du -sh .whl

# There (offline, no .venv: the machine's own python3 and torch): stand-ins, the paper-recipe table at full length
# on them, adamerging-bench, one report in $(GPU_OUT)/gpu_check.json. Stand-ins and the run go to $(GPU_WORK) (17 GiB).
GPU_OUT ?= $(RUNS)/gpu-check
GPU_WORK ?= /tmp/adamerging-gpu-check
GPU_ARGS ?=
gpu-check:
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	PYTHONPATH=/tmp/site:$(CURDIR) ADAMERGING_COMMIT=$$(cat .whl/COMMIT) python3 -m adamerging_nb.gpu_check $(GPU_OUT) --work $(GPU_WORK) $(GPU_ARGS)

# CI: notebooks and package must agree, notebooks must be clean, README.md must be what nbs/index.ipynb gives,
# and nbdev's processing for the docs site must succeed on every notebook (no Quarto needed).
check-sync: setup
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean
	@git status --porcelain -- nbs adamerging_nb | tee /tmp/adamerging-sync.txt
	@test ! -s /tmp/adamerging-sync.txt || { echo "nbdev_export/nbdev_clean changed the files above: run them and commit"; exit 1; }
	$(BIN)/python tools/readme.py --check
	OMP_NUM_THREADS=1 $(BIN)/nbdev_proc_nbs --force

# README.md from nbs/index.ipynb (nbdev's convention: the home page is the README).
readme: setup
	$(BIN)/python tools/readme.py

# Run the notebooks in place so that they keep the outputs of their examples (figures, tables, printed
# results), skipping what nbdev_test skips; then clean them and rewrite the README (about 15 min on 2 cores).
outputs: setup
	OMP_NUM_THREADS=1 $(BIN)/python tools/outputs.py
	$(BIN)/nbdev_clean
	$(BIN)/python tools/readme.py

# A local preview of the docs site without Quarto: nbdev's processing, then nbconvert to _docs_html/.
# MATHJAX=<url or path> serves MathJax from elsewhere than its CDN (e.g. offline).
MATHJAX ?=
docs-html: setup
	OMP_NUM_THREADS=1 $(BIN)/nbdev_proc_nbs --force
	$(BIN)/python tools/docs_html.py $(if $(MATHJAX),--mathjax $(MATHJAX))

clean:
	rm -rf $(VENV) $(RUNS) build *.egg-info _proc _docs _docs_html

# Plant bugs in the package one at a time (tools/mutants.py: exact-string replacements in a temporary copy of
# adamerging_nb/) and run each one's targeted tests; prints caught and survived, fails under 90 % caught
# (about 7 min on 2 cores: not part of `make test` or CI). MUTANTS_ARGS="--only <id> ..." runs some of them.
MUTANTS_ARGS ?=
mutants: export OMP_NUM_THREADS ?= 1
mutants: setup
	$(BIN)/python tools/mutants.py $(MUTANTS_ARGS)
