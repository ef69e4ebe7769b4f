# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   install, then run the whole workflow on the bundled synthetic cohort, and build the report
#   make test   install, then lint and run the test suite (what CI runs: .ci/run)
SHELL := /bin/bash
VENV ?= .venv
CORES ?= 2
# make test: pytest-xdist workers (tests/conftest.py keeps each module, and the end-to-end run, on one worker)
TEST_WORKERS ?= 2
PYTHON ?= $(shell command -v python3.11 || command -v python3)
BIN := $(abspath $(VENV))/bin
export PATH := $(BIN):$(PATH)
SNAKEMAKE := $(BIN)/snakemake

.PHONY: install demo study test lint peers clean-results gpu-check gpu-check-cohort

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

# DEMO_ARGS: more snakemake arguments, DEMO_OUT: that run's output_dir as seen from here (the test suite runs
# the demo's exact recipe on a small cohort elsewhere: DEMO_ARGS="--directory D --configfile D/config.yaml").
DEMO_ARGS ?=
DEMO_OUT ?= results
# Snakemake stats every input of every ready job at each scheduling round; on 2 cores with ~200 ready jobs
# that was ~45 % of a core. Choosing among a random 10 x CORES of them keeps every core busy for a fraction.
SUBSAMPLE ?= $(shell echo $$(( 10 * $(CORES) )) 2>/dev/null)
SMK_RUN = --cores $(CORES) $(if $(SUBSAMPLE),--scheduler-subsample $(SUBSAMPLE)) --rerun-incomplete --show-failed-logs

# A run killed outright (kill -9, a lost session) leaves Snakemake's lock: `neuromoe unlock-stale` removes it when
# no Snakemake runs in that folder on this machine, so the same command simply goes on.
demo: install
	@$(BIN)/neuromoe unlock-stale $(DEMO_ARGS)
	$(SNAKEMAKE) $(SMK_RUN) $(DEMO_ARGS)
	@awk '/^### Pooled/{exit} {print}' $(DEMO_OUT)/evaluation/ablation.md
	$(call report,$(DEMO_OUT),$(DEMO_ARGS))

# The full ablation study (README: "The study"): 180 subjects at full image size, every variant, the lambda
# sweep, 5 folds x 2 seeds. About 1.5 h on 2 cores (bench/study.py); resumable: rerun the same command.
study: install
	@$(BIN)/neuromoe unlock-stale
	$(SNAKEMAKE) $(SMK_RUN) --configfile presets/study.yaml
	@awk '/^### Pooled/{exit} {print}' study/evaluation/ablation.md
	$(call report,study,--configfile presets/study.yaml)

# The GPU check (issue 25; README "On a GPU"): bench/gpu_check.py on this machine's GPU. On a lent GPU machine
# whose image lacks this project's packages: bash bench/gpu_wheels.sh && make gpu-check-cohort here, then
# bash bench/gpu_check.sh there, carrying .whl and .gpucheck.
gpu-check: install
	$(BIN)/python bench/gpu_check.py $(if $(wildcard .gpucheck/cohort),--cohort .gpucheck/cohort)

# The GPU check's cohort: the demo's acquisition and settings on 18 synthetic subjects, preprocessed and cached
# here (minutes), the cohort cache kept with its splits and config in .gpucheck/cohort (git-ignored).
gpu-check-cohort: install
	@grep -qx '/.gpucheck/' .git/info/exclude || echo /.gpucheck/ >> .git/info/exclude
	test -d .gpucheck/bids || $(BIN)/python -c "import yaml; from neuromoe.inputs.synth import SynthParams, make_cohort; \
	  acq = yaml.safe_load(open('config.yaml'))['synthetic']['acquisition']; \
	  make_cohort('.gpucheck/bids', 18, 42, params=SynthParams(**acq), n_jobs=$(CORES))"
	printf 'bids_dir: .gpucheck/bids\noutput_dir: .gpucheck/run\nevaluation:\n  folds: 3\n' > .gpucheck/settings.yaml
	$(SNAKEMAKE) --cores $(CORES) --configfile .gpucheck/settings.yaml \
	  -- .gpucheck/run/cache/cohort/manifest.json .gpucheck/run/model/splits.tsv
	rm -rf .gpucheck/cohort && cp -r .gpucheck/run/cache/cohort .gpucheck/cohort
	cp .gpucheck/run/model/splits.tsv config.yaml .gpucheck/cohort/

# $(call report,OUTPUT_DIR[,EXTRA SNAKEMAKE ARGS]): the zip report (its HTML loads each figure from
# report/data/), unpacked next to it, checked against the workflow's manifest of what it must hold; rebuilt
# only when a file it holds is newer, so an unchanged rerun only prints where it is (a report that failed its
# check is removed, so the next run builds and checks it again).
define report
	@if [ ! -f $(1)/report.zip ] || [ -n "$$(find $(1)/report_manifest.txt $(1)/evaluation $(1)/qc -newer $(1)/report.zip -print -quit)" ]; then \
	  $(SNAKEMAKE) --cores 1 $(2) --report $(abspath $(1))/report.zip && \
	  rm -rf $(1)/report && $(BIN)/python -m zipfile -e $(1)/report.zip $(1)/ && \
	  $(BIN)/neuromoe check-report $(1)/report.zip --manifest $(1)/report_manifest.txt \
	  || { rm -f $(1)/report.zip; exit 1; }; fi
	@echo "Report: $(abspath $(1)/report/report.html)  ($(1)/report.zip: the same, to share)"
endef

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
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -ra --durations=30

clean-results:
	rm -rf results .snakemake
