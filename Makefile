# Shortcuts. The pipeline itself is `dvc repro` (README).
PYTHON ?= python

# A quick CPU run of the whole pipeline as a real DVC experiment: T91 only, a small VDSR and a small
# SRCNN, a few hundred steps each, Set5 and Set14. Not the paper's schedule: that is params.yaml as
# committed.
SMOKE_PARAMS = \
	-S 'download.sets=[T91,Set5,Set14]' \
	-S 'prepare.train_sets=[T91]' \
	-S 'baseline.sets=[Set5,Set14]' -S 'evaluate.sets=[Set5,Set14]' \
	-S train.vdsr.depth=6 -S train.vdsr.width=32 \
	-S train.vdsr.optimizer=adam -S train.vdsr.lr=0.001 -S train.vdsr.clip=norm -S train.vdsr.clip_theta=1.0 \
	-S train.vdsr.epochs=3 -S train.vdsr.steps_per_epoch=100 -S train.vdsr.batch_size=32 \
	-S train.srcnn.width=32 -S train.srcnn.lr=0.001 \
	-S train.srcnn.epochs=3 -S train.srcnn.steps_per_epoch=100 -S train.srcnn.batch_size=32

.PHONY: smoke release-cpu test bench

smoke:
	VDSR_DATA_MIRROR="$${VDSR_DATA_MIRROR:-../shared/datasets}" dvc exp run $(SMOKE_PARAMS)

# The CPU release recipe (presets/release-cpu.yaml) as a DVC experiment: hours on a 2-core CPU with
# native bf16; Ctrl-C stops with a checkpoint and the same command resumes (README "Training on a CPU").
release-cpu:
	VDSR_DATA_MIRROR="$${VDSR_DATA_MIRROR:-../shared/datasets}" dvc exp run -n release-cpu \
		$$($(PYTHON) -m vdsr.presets release-cpu)

test:
	$(PYTHON) -m pytest

bench:
	$(PYTHON) bench/prepare.py
	$(PYTHON) bench/train.py
