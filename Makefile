# Shortcuts. The pipeline itself is `dvc repro` (README).
PYTHON ?= python

# A quick CPU run of the whole pipeline as a real DVC experiment: presets/smoke.yaml (T91 only, a
# small VDSR and a small SRCNN, a few hundred steps each, Set5 and Set14). Not the paper's schedule:
# that is params.yaml as committed. `python -m vdsr.presets smoke` prints its -S options; a preset
# that does not load stops the target (it never runs the paper's schedule instead).

# The images: $VDSR_DATA_MIRROR when set, else ../shared/datasets when that folder exists, else
# the public URLs of data/manifest.json. A folder is made absolute: the experiment runs in a copy.
DATA_MIRROR := $(or $(VDSR_DATA_MIRROR),$(wildcard $(abspath ../shared/datasets)))
DATA_MIRROR := $(if $(wildcard $(DATA_MIRROR)),$(abspath $(DATA_MIRROR)),$(DATA_MIRROR))
SMOKE_NAME := $(or $(SMOKE_NAME),smoke-$(shell date +%Y%m%d-%H%M%S))

.PHONY: smoke release-cpu release-cpu-continue release-cpu-v2 release-cpu-v3 release-cpu-v4 release-srcnn release-srcnn-per-scale release-publish paper-check table3 test bench

# `--temp`: the experiment runs in a copy under .dvc/tmp/exps/, so params.yaml, dvc.lock and the
# outputs in the workspace stay as they were; its results are kept as experiment $(SMOKE_NAME).
smoke:
	smoke_params=$$($(PYTHON) -m vdsr.presets smoke) && \
		$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc exp run --temp -n $(SMOKE_NAME) $$smoke_params
	@echo "Smoke run done: experiment $(SMOKE_NAME); the workspace is unchanged. To look at it:"
	@echo "  dvc exp show --only-changed --drop 'Created|epochs|wall_time_s|patches_per_s|val_psnr_x.|train_loss|Set5|.*(x3|ssim|Set14|B100|Urban100)|(data|models|stages|vdsr|results|metrics|plots)(/|\Z)'"
	@echo "  dvc exp diff HEAD $(SMOKE_NAME)   # every param and metric that differs, one per line"
	@echo "  dvc exp apply $(SMOKE_NAME)       # its params, model, metrics, plots/images into the workspace"
	@echo "  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db --workers 1"
	@echo "    then http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=set5&workflowType=machine_learning"
	@echo "    (the evaluated runs, best Set5 x2 first, with the model and Set5 PSNR; run $(SMOKE_NAME))"

# The CPU release recipe (presets/release-cpu.yaml) as a DVC experiment: hours on a 2-core CPU with
# native bf16; Ctrl-C stops with a checkpoint and the same command resumes (README "Training on a CPU").
# VDSR only (its training and evaluation; not SRCNN's stages nor the report).
release-cpu:
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc exp run -n release-cpu \
		$$($(PYTHON) -m vdsr.presets release-cpu) evaluate@vdsr

# On a machine without the release's checkpoint: continue the shipped, unfinished release from
# pretrained/vdsr.pt (a warm start at the step it was released at, with a fresh optimizer; the model
# card records it; the prepared data must be the release's, checked), then train as release-cpu does.
# An existing checkpoint is resumed only if it is this recipe's on this data (the train stage checks
# the sha256 of train.h5 and val.h5); else the stage stops. VDSR_START_OVER=0: never from scratch here.
release-cpu-continue:
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc repro prepare
	test -e checkpoints/vdsr/last.pt || $(PYTHON) -m vdsr.release warm-start --to checkpoints/vdsr/last.pt --data data/prepared
	VDSR_START_OVER=0 $(MAKE) release-cpu || { echo "release-cpu-continue: stopped. If the train stage" \
		"refused checkpoints/vdsr/last.pt: move it out of checkpoints/vdsr/ to continue the release from" \
		"pretrained/vdsr.pt instead, or run 'VDSR_START_OVER=1 make release-cpu' to train the recipe" \
		"from scratch (it is moved aside)." >&2; exit 1; }

# The second CPU release: a new cosine cycle (presets/release-cpu-v2.yaml) from the shipped weights,
# with their moving average; the checkpoint is written once from pretrained/vdsr.pt, for the data in
# data/prepared (recorded in the release's chain), then the same command resumes it. VDSR's training only: `make release-publish` evaluates it.
# The third (presets/release-cpu-v3.yaml: MSE at a low peak) is made the same way from the second,
# the fourth (release-cpu-v4.yaml: MSE at three times that peak) from the third.
release-cpu-v2 release-cpu-v3 release-cpu-v4:
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc repro prepare
	test -e checkpoints/vdsr/last.pt || $(PYTHON) -m vdsr.release warm-start --new-cycle $@ --to checkpoints/vdsr/last.pt --data data/prepared
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc exp run -n $@ \
		$$($(PYTHON) -m vdsr.presets $@) train@vdsr

# Does the paper's recipe train? (docs/paper-recipe.md) The default train.vdsr for 150,016 patches (1.6
# passes), validated every 37,504, as the DVC experiment paper-check; PAPER_CHECK=paper-check-norm or
# paper-check-norm-cap: with norm clipping instead. About an hour on a 2-core CPU each.
PAPER_CHECK ?= paper-check
paper-check:
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc repro prepare
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc exp run -n $(PAPER_CHECK) \
		$$($(PYTHON) -m vdsr.presets $(PAPER_CHECK)) train@vdsr

# The SRCNN release (presets/release-srcnn.yaml, chosen by the pilots of presets/release-srcnn.md):
# SRCNN's training as a DVC experiment, resumable like release-cpu (Ctrl-C, then the same command).
# Then: make release-publish RELEASE_FROM=checkpoints/srcnn/last.pt RELEASE_PRESET=release-srcnn
release-srcnn:
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc repro prepare
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc exp run -n release-srcnn \
		$$($(PYTHON) -m vdsr.presets release-srcnn) train@srcnn
# The per-scale SRCNN releases (presets/release-srcnn-per-scale.yaml): Dong et al.'s setting, one SRCNN
# per scale trained on that scale's patches only, SCALE=2, 3 or 4, each in its own workspace (a clone:
# prepare cuts its patches at that scale only). Then, in that workspace:
# make release-publish RELEASE_FROM=checkpoints/srcnn/last.pt RELEASE_PRESET=release-srcnn-per-scale RELEASE_SCALE=2 \
#     RELEASE_WEIGHTS=raw
SCALE ?= 2
release-srcnn-per-scale:
	$(if $(DATA_MIRROR),VDSR_DATA_MIRROR="$(DATA_MIRROR)") dvc exp run -n release-srcnn-x$(SCALE) \
		$$($(PYTHON) -m vdsr.presets release-srcnn-per-scale) -S 'prepare.scales=[$(SCALE)]' train@srcnn
# Evaluate the release's last checkpoint (after the last epoch it holds the final weights) on the
# four test sets and write it to pretrained/ with the model card if it beats the shipped one on Set5.
# RELEASE_SETS="Set5 Set14 B100" skips Urban100's ~40 minutes on a 2-core CPU.
RELEASE_FROM ?= checkpoints/vdsr/last.pt
RELEASE_SETS ?= Set5 Set14 B100 Urban100
RELEASE_PRESET ?= release-cpu-v3
RELEASE_SCALE ?=
RELEASE_WEIGHTS ?= output
release-publish:
	$(PYTHON) -m vdsr.release publish --from $(RELEASE_FROM) --sets $(RELEASE_SETS) --preset $(RELEASE_PRESET) \
		--weights $(RELEASE_WEIGHTS) $(if $(RELEASE_SCALE),--kind srcnn --scale $(RELEASE_SCALE))

# The paper's Table 3 from the shipped models (reports/table3.md and .png; seconds: it reads the
# releases' eval.json, checked against their weights). Run after every release, commit both.
table3:
	$(PYTHON) -m vdsr.table3

test:
	$(PYTHON) -m pytest

bench:
	$(PYTHON) bench/prepare.py
	$(PYTHON) bench/train.py
