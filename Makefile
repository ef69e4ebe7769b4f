# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   install, then run the whole workflow on the bundled synthetic cohort, and build the report
#   make test   install, then lint and run the test suite (what CI runs: .ci/run)
SHELL := /bin/bash
VENV ?= .venv
CORES ?= 2
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
SNAKEMAKE := $(BIN)/snakemake

.PHONY: install demo report test lint peers clean-results

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

demo: install
	$(SNAKEMAKE) --cores $(CORES) --rerun-incomplete --show-failed-logs
	# A zip report: the HTML page loads each figure from report/data/ (one self-contained HTML of the
	# 180-subject demo's ~1,100 figures is 250 MB, too heavy for a browser); unpacked next to the zip.
	$(SNAKEMAKE) --cores 1 --report results/report.zip
	rm -rf results/report && $(BIN)/python -m zipfile -e results/report.zip results/
	@echo "Report: $(abspath results/report/report.html)  (results/report.zip: the same, to share)"

lint: install
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/

# Real peers for optional tests (MRtrix3 as a second DTI reference, a local SLURM): installed when
# running as root with apt (CI); elsewhere the tests that need them are skipped with the reason.
peers:
	-@bash tests/peers/install-peers.sh

test: install peers
	$(BIN)/ruff check .
	$(BIN)/snakefmt --check Snakefile workflow/
	$(BIN)/python -m pytest -ra --durations=15

clean-results:
	rm -rf results .snakemake
