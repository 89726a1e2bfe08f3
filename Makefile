# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# EasyOCR's own venv: PyPI's torchvision does not import beside palikit's CPU torch (palikit.eval.easyocr_env)
EASYOCR_VENV ?= .venv-easyocr
JS := tests/js

.PHONY: demo test test-fast system-packages bench demo-model demo-model-v2 clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU wheel (2.13.0), so the package's torch range never pulls a CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# the easyocr baseline's venv: torch + torchvision + easyocr + its offline English weights (5.1 GB, mostly
# torch's CUDA libraries, triton left out; about a minute from this machine's wheels; it checks for 6 GB free first)
$(EASYOCR_VENV)/.installed: src/palikit/eval/easyocr_env.py | $(VENV)/.installed
	$(PY) -m palikit.eval.easyocr_env $(EASYOCR_VENV)
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/palikit demo

# system packages first (chromium, tesseract-ocr, tesseract-ocr-eng, libgl1, libglib2.0-0, nodejs, npm): installed
# when root with apt, else it stops at once with the command to run; then the two venvs and transformers.js
# (pinned in tests/js/package-lock.json)
test: system-packages $(VENV)/.installed $(EASYOCR_VENV)/.installed $(JS)/node_modules/.installed
	PALIKIT_EASYOCR_VENV=$(abspath $(EASYOCR_VENV)) $(PY) -m pytest -q

# the fast lane: core, parity and API tests, no test marked slow (server, CLI and training processes,
# Ray, torch.compile, codec/demo training, the system-package check); under 2 min on 2 cores
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow"

system-packages:
	bash scripts/setup-system.sh

# transformers.js for the ONNX export's test; --ignore-scripts: onnxruntime-node's install script downloads
# GPU binaries from outside the npm registry, and its CPU binary is in the package
$(JS)/node_modules/.installed: $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

# the bundled demo model from scratch: data, reading warm-up, task mix, anneal, scorecard (+ install if it meets every target)
demo-model: $(VENV)/.installed
	$(PY) -m lab.demo.build --out work/demo
	$(VENV)/bin/palikit train lab/recipes/demo-ocr-warmup.yaml
	$(VENV)/bin/palikit train lab/recipes/demo.yaml
	$(VENV)/bin/palikit train lab/recipes/demo-anneal.yaml
	$(PY) -m lab.demo.evaluate --model work/demo/anneal/final --data work/demo/data --out work/demo/eval --install

# demo model v2 (issue 19): shapes v2 at free positions, started from v1's weights (run demo-model first), the
# task mix (cosine to 0), scorecard (+ install if it meets every target)
demo-model-v2: $(VENV)/.installed
	test -f work/demo/anneal/final/model.safetensors || $(MAKE) demo-model
	$(PY) -m lab.demo.build --version 2 --out work/demo2 --train 48000 --warm-start work/demo/anneal/final
	$(VENV)/bin/palikit train lab/recipes/demo-v2.yaml
	$(PY) -m lab.demo.evaluate --version 2 --model work/demo2/run/final --data work/demo2/data --out work/demo2/eval --install

bench: $(VENV)/.installed
	$(VENV)/bin/palikit bench --compile

clean:
	rm -rf $(VENV) $(EASYOCR_VENV) out $(JS)/node_modules
