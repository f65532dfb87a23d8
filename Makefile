# pistill: `make edge` runs the whole chain on the offline default; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 is the CPU build on this machine; with CUDA: make edge TORCH=torch
TORCH  ?= torch==2.13.0
RECIPE ?= recipes/default.toml
PI     ?=
OUT    ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.pistill-installed

.PHONY: install system-deps edge test test-fast clean
install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

edge: install
	$(BIN)/pistill run $(RECIPE) $(if $(PI),--target $(PI)) $(if $(OUT),--out $(OUT))

system-deps:
	bash tests/system-deps.sh

test: system-deps install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf runs build *.egg-info
