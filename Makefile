# Two commands from a fresh clone: `make train` and `make test`. Each sets up .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Use the repository's data mirror when it sits beside the checkout and DATA_DIR is not set.
ifeq ($(origin DATA_DIR), undefined)
ifneq ($(wildcard ../shared/data/omniglot),)
export DATA_DIR := $(abspath ../shared/data)
endif
endif

.PHONY: install train test tensorboard clean gpu-check gpu-wheels gpu-data

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# A short MAML run on Omniglot (5-way 1-shot); extra Hydra overrides go in ARGS="...".
train: install
	$(BIN)/python train.py experiment=quick_omniglot $(ARGS)
	@echo "TensorBoard logs are under $(CURDIR)/logs: make tensorboard (or $(BIN)/tensorboard --logdir logs)"

# one pytest worker per core (pytest-xdist), each test module whole on one worker, one torch thread per worker
test: install
	$(BIN)/python -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

tensorboard: install
	$(BIN)/tensorboard --logdir logs

# On a GPU machine: the CUDA tests, the meta-step benchmark and a 2-minute protocol run, within 9 minutes
# (README, GPUs). Uses .venv when it exists, else $(PYTHON) with what that machine has installed.
GPU_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(ARGS)

# For a GPU machine without a package index: hydra-core, omegaconf and antlr4 (built here from its sdist)
# as wheels in .whl/, which gpu-check installs there with pip --no-index when hydra is missing.
gpu-wheels:
	$(GPU_PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --dest .whl hydra-core==1.3.8 omegaconf==2.3.0
	$(GPU_PYTHON) -m pip wheel --quiet --no-deps --wheel-dir .whl antlr4-python3-runtime==4.9.3
	@ls .whl/*.whl

# Omniglot's two zips and the Vinyals split files (about 14 MB) copied from $(DATA_DIR) into ./data, the
# default data folder, to bring along to a machine that lacks them.
gpu-data:
	@test -n "$(DATA_DIR)" || { echo "DATA_DIR is not set: point it at the folder holding omniglot/"; exit 2; }
	mkdir -p data/omniglot/splits/vinyals
	cp -f $(DATA_DIR)/omniglot/images_background.zip $(DATA_DIR)/omniglot/images_evaluation.zip data/omniglot/
	cp -f $(DATA_DIR)/omniglot/splits/vinyals/train.txt $(DATA_DIR)/omniglot/splits/vinyals/val.txt \
		$(DATA_DIR)/omniglot/splits/vinyals/test.txt data/omniglot/splits/vinyals/
	@du -sh data/omniglot

clean:
	rm -rf $(VENV) .cache .pytest_cache
