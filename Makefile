# Two commands on a fresh clone: `make demo` and `make test`. Each installs first, so each works alone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch's PyPI wheel (CUDA build) runs on CPU; torchvision must match it for timm to import.
TORCH_PINS := torch==2.14.0 torchvision==0.29.0

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[all]'
	touch $(STAMP)

demo: install
	$(BIN)/mist-kit demo --out demo-out

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/run_all.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf demo-out .pytest_cache
