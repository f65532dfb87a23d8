# pistill: `make edge` runs the whole chain on the offline default; `make test` runs the test suite.
PYTHON ?= python3
VENV   ?= .venv
# torch==2.13.0 is the CPU build on this machine; with CUDA: make edge TORCH=torch
TORCH  ?= torch==2.13.0
RECIPE ?= recipes/default.toml
PI     ?=
OUT    ?=
EVAL_ITEMS ?=
DEPLOY ?=
PYTEST_ARGS ?=

BIN := $(VENV)/bin
STAMP := $(VENV)/.pistill-installed

.PHONY: install llama system-deps edge test test-fast clean
install: $(STAMP) llama

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python pistill/llama_build.py --python $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test,deploy]"
	touch $@

# llama-cpp-python is built here, natively but without AMX (its kernels crash on Q4_0 files; see
# pistill/llama_build.py), and cached by flags and CPU. Checked on every install: a venv built before, or on
# another CPU, is rebuilt.
llama: $(STAMP)
	$(BIN)/python pistill/llama_build.py --python $(BIN)/python

# with PI set, the student is then deployed there (served on the Pi's 127.0.0.1:8080; DEPLOY=0 skips it)
edge: install
	report=$$($(BIN)/pistill run $(RECIPE) $(if $(PI),--target $(PI)) $(if $(OUT),--out $(OUT)) \
	    $(if $(EVAL_ITEMS),--eval-items $(EVAL_ITEMS))) && echo "$$report" && \
	if [ -n "$(PI)" ] && [ "$(DEPLOY)" != 0 ]; then \
	    $(BIN)/pistill deploy "$$(dirname "$$(dirname "$$report")")" --target $(PI) --recipe $(RECIPE); fi

system-deps:
	bash tests/system-deps.sh

test: system-deps install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e" $(PYTEST_ARGS)

clean:
	rm -rf runs build *.egg-info
