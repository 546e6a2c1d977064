# Two commands do all set-up on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUILD  := build/demo
VENDOR := build/vendor
DEMO   := .demo
ENDPOINT ?= tcp://127.0.0.1:5555

.PHONY: run test venv demo provision lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned to the CPU build these machines carry; any other spec downloads a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[build,dev]'
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
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/inference.py
	$(BIN)/python bench/deepseek.py
	$(BIN)/python bench/moe_operator.py
	$(BIN)/python bench/audit_overhead.py --config $(DEMO)/appliance.toml
	$(BIN)/python bench/bundle_throughput.py
	$(BIN)/edge-models quantize --onnx $(BUILD)/onnx --out build/quant
	cp build/quant/quantize-report.json bench/results/quantize_demo.json
	$(BIN)/python bench/compression.py --teacher $(BUILD)/teacher
	$(BIN)/python bench/prune_realistic.py
	$(BIN)/python bench/scale.py

clean:
	rm -rf $(DEMO) build
