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

.PHONY: install train test tensorboard clean

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

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

tensorboard: install
	$(BIN)/tensorboard --logdir logs

clean:
	rm -rf $(VENV) .cache .pytest_cache
