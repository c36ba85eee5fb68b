# Two entry points: `make demo` and `make test`. Both create .venv here and install
# the project with its test extras; the legacy Caffe stack is built on first need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-alt venv proto bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/porting env build
	$(BIN)/porting demo --out out/demo

test: $(STAMP)
	$(BIN)/porting env build
	$(BIN)/python -m pytest -q tests

# The real-Caffe tests again under other kernel paths, as another machine would round:
# torch's portable kernels on one thread, and another OpenBLAS core type for Caffe.
ALT_CORETYPE ?= Sandybridge
test-alt: $(STAMP)
	$(BIN)/porting env build
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 OPENBLAS_CORETYPE=$(ALT_CORETYPE) \
		$(BIN)/python -m pytest -q -m caffe tests

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iporting --python_out=porting porting/caffe.proto

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
