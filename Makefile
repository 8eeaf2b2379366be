# The two commands of the README. Both do all set-up first (scripts/setup.sh is idempotent).
PYTHON ?= python3
NPROC ?= 1
# pytest-xdist workers of `make test` (0: one process); tests/conftest.py splits the cores.
TEST_WORKERS ?= 2

.PHONY: setup demo test bench

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The main job: pre-train on the embedded MNIST digits (CPU: a few minutes), then k-NN.
# `python -m torch.distributed.run` is `torchrun` (works even before the shell rehashes PATH).
demo: setup
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) \
		-m ibot_fast.train --preset demo $(ARGS)

test: setup
	$(PYTHON) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile $(ARGS)

bench: setup
	$(PYTHON) -m pytest bench --benchmark-only -q $(ARGS)
