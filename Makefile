# Two commands on a fresh clone: `make demo` and `make test`. Each installs first, so each works alone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch's PyPI wheel (CUDA build) runs on CPU; torchvision must match it for timm to import.
TORCH_PINS := torch==2.14.0 torchvision==0.29.0

.PHONY: install demo test readme-test bench lint clean tflite-env tflite-test tflite-bench

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[all]'
	touch $(STAMP)

# Each prints its own wall time (the README quotes these), whether it passed or not.
WALL = start=$$(date +%s); rc=0; $(1) || rc=$$?; echo "make $@: $$(( $$(date +%s) - start )) s wall on $$(nproc) cores \
	(load average $$(cut -d' ' -f1-3 /proc/loadavg))" >&2; exit $$rc

demo: install
	@$(call WALL,$(BIN)/mist-kit demo --out demo-out)

test: install
	@$(call WALL,$(BIN)/python -m pytest -q)

# The README's marked command blocks, run as written on the demo's outputs (writes runs/ and bundles/).
readme-test: demo
	@$(call WALL,$(BIN)/python tests/test_readme_commands.py demo)

# Benchmarks on real data (needs ../shared: Caltech-101 VTAB-1k + DINOv2 ViT-S/14 weights); each writes its own
# section of BENCHMARKS.md. Slow on 2 cores (the Caltech feature cache is most of it); not part of `make test`.
W := bench/work/caltech
bench: install
	nice -n 10 $(BIN)/python bench/train_caltech.py
	nice -n 10 $(BIN)/python bench/export_caltech.py
	nice -n 10 $(BIN)/python bench/codec_caltech.py
	nice -n 10 $(BIN)/python bench/runtime_caltech.py --from-cache
	nice -n 10 $(BIN)/python bench/serve_load.py --bundle $(W)/runtime/bundle --checkpoint $(W)/mist/checkpoint
	bench/aarch64/run_aarch64.sh

# `export --tflite` needs the tflite extra, which downgrades typing_extensions/pydantic (and pulls jax,
# transformers, torchao): it lives in its own environment, outside the repo, never in .venv.
TFLITE_VENV ?= ../tflite-venv
TFLITE_STAMP := $(TFLITE_VENV)/.installed

tflite-env: $(TFLITE_STAMP)

$(TFLITE_STAMP): pyproject.toml
	$(PY) -m venv $(TFLITE_VENV)
	$(TFLITE_VENV)/bin/pip install -q --upgrade pip
	$(TFLITE_VENV)/bin/pip install -q $(TORCH_PINS)
	$(TFLITE_VENV)/bin/pip install -q -e '.[train,dev,tflite]'
	$(TFLITE_VENV)/bin/pip check
	touch $(TFLITE_STAMP)

tflite-test: tflite-env
	$(TFLITE_VENV)/bin/python -m pytest -q tests/test_tflite.py

tflite-bench: tflite-env
	nice -n 10 $(TFLITE_VENV)/bin/python bench/export_tflite_caltech.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf demo-out runs bundles .pytest_cache
