# fusionserve: `make serve` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= train,video,export,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test lint fmt typecheck pytest pytest-backbones serve bundled clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt Makefile
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

test: install lint typecheck pytest pytest-backbones

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q

# timm and torchvision encoders (the [backbones] extra) are tested in a venv of their own, with the torch and
# torchvision pair of constraints-backbones.txt: see that file for why.
BB_VENV ?= .venv-backbones
BB_STAMP := $(BB_VENV)/.installed

$(BB_STAMP): pyproject.toml constraints.txt constraints-backbones.txt Makefile
	$(PYTHON) -m venv $(BB_VENV)
	$(BB_VENV)/bin/python -m pip install --quiet --upgrade pip
	grep -vE '^(torch|torchvision)==' constraints.txt | cat - constraints-backbones.txt > $(BB_VENV)/constraints.txt
	$(BB_VENV)/bin/python -m pip install --quiet -c $(BB_VENV)/constraints.txt -e ".[train,video,export,dev,backbones]"
	touch $@

pytest-backbones: $(BB_STAMP)
	$(BB_VENV)/bin/python -m pytest -q -m backbones tests/backbones

# Serve the bundled default model on 127.0.0.1:8000 (FUSIONSERVE_* variables and ARGS= flags apply).
serve: install
	$(BIN)/python -m app $(ARGS)

# Retrain the bundled checkpoints (about 12 minutes each on 2 CPU cores); see README.
bundled: install
	$(BIN)/python -m training synth --out build/moving-digits --seed 0
	for m in lstm attention mean; do \
		$(BIN)/python -m training fit --data build/moving-digits --model $$m \
			--out build/moving-digits-$$m.safetensors --epochs 15 --no-progress || exit 1; \
	done

clean:
	rm -rf $(VENV) $(BB_VENV) build .pytest_cache .mypy_cache .ruff_cache
