# Two entry points: `make demo` and `make test`. Both install the host tools they need,
# create .venv here and install the project with its test extras; the legacy Caffe stack
# is built on first need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-alt venv host-tools proto bench clean

# Host tools: python3-venv (for .venv) and, for root, debootstrap (the root chroot and the
# Docker base image start from a debootstrap folder). As root with apt-get they are
# installed here; otherwise the exact command to run is printed and make stops.
host-tools:
	@need=""; \
	$(PY) -c 'import ensurepip' 2>/dev/null || need="$$need python3-venv"; \
	if [ "$$(id -u)" = 0 ]; then command -v debootstrap >/dev/null || need="$$need debootstrap"; fi; \
	if [ -n "$$need" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$need (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; \
	  else \
	    echo "missing host tools:$$need; install them with: sudo apt-get install -y$$need" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml | host-tools
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: host-tools $(STAMP)
	$(BIN)/porting env build
	$(BIN)/porting demo --out out/demo

test: host-tools $(STAMP)
	$(BIN)/porting env build
	$(BIN)/python -m pytest -q tests

# The real-Caffe tests again under other kernel paths, as another machine would round:
# torch's portable kernels on one thread, and another OpenBLAS core type for Caffe.
ALT_CORETYPE ?= Sandybridge
test-alt: host-tools $(STAMP)
	$(BIN)/porting env build
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 OPENBLAS_CORETYPE=$(ALT_CORETYPE) \
		$(BIN)/python -m pytest -q -m caffe tests

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iporting --python_out=porting porting/caffe.proto

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
