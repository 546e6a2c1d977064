# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUILD  := build/demo
VENDOR := build/vendor
DEMO   := .demo
ENDPOINT ?= tcp://127.0.0.1:5555

.PHONY: run test venv demo provision lint bench clean lock check-latest

LOCKS  := provisioning/locks
# Installs take exactly the locked wheels, each checked against its sha256 (docs/ARCHITECTURE.md, "The lock").
PIP_LOCKED := $(BIN)/pip install --quiet --require-hashes --only-binary=:all:

$(BIN)/python:
	@$(PYTHON) -c 'import sys, platform; ok = sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"; \
	sys.exit(None if ok else "make: the lock (provisioning/locks/dev.txt) is for CPython 3.11 on x86_64; " \
	"run with PYTHON=python3.11, or re-lock with `make lock`")'
	$(PYTHON) -m venv $(VENV)

# The lock pins torch to the CPU wheel these machines carry (2.13.0+cpu); any other spec downloads a CUDA build.
$(VENV)/.installed: pyproject.toml $(LOCKS)/pip.txt $(LOCKS)/dev.txt | $(BIN)/python
	$(PIP_LOCKED) -r $(LOCKS)/pip.txt
	$(PIP_LOCKED) -r $(LOCKS)/dev.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

# Build host side (never under .demo/): teacher, ONNX export, vendor signing key, sealed bundle.
$(BUILD)/report.json: $(VENV)/.installed
	$(BIN)/edge-models demo --out $(BUILD)

demo: $(BUILD)/report.json

$(VENDOR)/vendor-ed25519.pub: | $(VENV)/.installed
	$(BIN)/edge-provision keygen --vendor $(VENDOR)

# Device side: enroll once (keys 0600 under .demo/credentials), trust the vendor, write the config.
$(DEMO)/device-identity.json: | $(VENV)/.installed $(VENDOR)/vendor-ed25519.pub
	mkdir -p $(DEMO)/trust $(DEMO)/state
	$(BIN)/edge-provision enroll --keys $(DEMO)/credentials --out $@ --device-id demo-device
	cp $(VENDOR)/vendor-ed25519.pub $(DEMO)/trust/vendor.pub
	$(BIN)/edge-appliance init --out $(DEMO)/appliance.toml --endpoint $(ENDPOINT) --force

$(BUILD)/bundle/manifest.json: $(BUILD)/report.json $(DEMO)/device-identity.json $(VENDOR)/vendor-ed25519.pub
	rm -rf $(BUILD)/bundle
	$(BIN)/edge-provision seal --model $(BUILD)/onnx --torch $(BUILD)/student/student \
		--model-id demo-deepseek-v3-tiny --version $$(date +%s) \
		--signing-key $(VENDOR)/vendor-ed25519.key --recipient $(DEMO)/device-identity.json --out $(BUILD)/bundle

provision: $(BUILD)/bundle/manifest.json
	$(BIN)/edge-provision install $(BUILD)/bundle --state $(DEMO)/state --trust $(DEMO)/trust --keys $(DEMO)/credentials

run: provision
	@echo "Query it from another terminal:  $(BIN)/edge-appliance ask \"How do I reset the conveyor?\""
	@echo "Audit log:                       $(BIN)/edge-appliance --config $(DEMO)/appliance.toml audit list"
	$(BIN)/edge-appliance --config $(DEMO)/appliance.toml serve

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# Every benchmark, each measuring its comparison side by side in one run (~45 min on 2 cores);
# results in bench/results/*.json. The '.[bench]' extra adds onnxruntime-genai, the comparison runtime.
bench: provision
	$(PIP_LOCKED) -r $(LOCKS)/bench.txt
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/deepseek.py
	$(BIN)/python bench/moe_operator.py
	$(BIN)/python bench/audit_overhead.py --config $(DEMO)/appliance.toml
	$(BIN)/python bench/bundle_throughput.py
	$(BIN)/edge-models quantize --onnx $(BUILD)/onnx --out build/quant
	cp build/quant/quantize-report.json bench/results/quantize_demo.json
	sh bench/build_llama_cpp.sh build/llama.cpp
	$(BIN)/python -m bench.quality --llama-cpp build/llama.cpp/bin
	$(BIN)/python bench/speculative.py --llama-cpp build/llama.cpp/bin
	$(BIN)/python bench/compression.py --teacher $(BUILD)/teacher
	$(BIN)/python bench/prune_realistic.py
	$(BIN)/python bench/structured.py
	$(BIN)/python bench/scale.py

# Re-resolve every lock to today's newest releases within pyproject.toml's ranges (needs the network and uv,
# installed pinned into build/lock-tools). Run it when bumping a dependency; commit the result with the
# test run that proves it. See docs/ARCHITECTURE.md, "The lock".
lock:
	$(PYTHON) -m venv build/lock-tools
	build/lock-tools/bin/pip install --quiet uv==0.13.9
	UV=build/lock-tools/bin/uv sh $(LOCKS)/compile.sh

# Not in CI: a throwaway venv with the newest release of every dependency, pyproject's upper bounds ignored (torch
# excepted: the pinned CPU wheel), then the suite without the systemd boot. Run it before `make lock`, and once a
# month, so the next breaking release is ours to find first. Versions tried: build/latest/versions.txt.
check-latest: $(VENV)/.installed
	rm -rf build/latest && $(PYTHON) -m venv build/latest
	build/latest/bin/pip install --quiet --upgrade pip
	$(BIN)/python .ci/latest-requirements.py > build/latest/requirements.txt
	build/latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -r build/latest/requirements.txt
	build/latest/bin/pip install --quiet --no-deps --no-build-isolation -e .
	build/latest/bin/pip list --format=freeze > build/latest/versions.txt
	build/latest/bin/python -m pytest -q -m "not acceptance" -p no:cacheprovider
	@echo "check-latest passed with the versions in build/latest/versions.txt"

clean:
	rm -rf $(DEMO) build
