# Shortcuts. The pipeline itself is `dvc repro` (README).
PYTHON ?= python

# A quick CPU run of the whole pipeline as a real DVC experiment: T91 only, a small VDSR, a few
# hundred steps. Not the paper's schedule: that is params.yaml as committed.
SMOKE_PARAMS = \
	-S 'download.sets=[T91,Set5,Set14]' \
	-S 'prepare.train_sets=[T91]' \
	-S train.depth=6 -S train.width=32 \
	-S train.optimizer=adam -S train.lr=0.001 -S train.clip=norm -S train.clip_theta=1.0 \
	-S train.epochs=3 -S train.steps_per_epoch=100 -S train.batch_size=32

.PHONY: smoke test bench

smoke:
	VDSR_DATA_MIRROR="$${VDSR_DATA_MIRROR:-../shared/datasets}" dvc exp run $(SMOKE_PARAMS)

test:
	$(PYTHON) -m pytest

bench:
	$(PYTHON) bench/prepare.py
	$(PYTHON) bench/train.py
