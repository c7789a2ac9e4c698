# SlicerDeSAM developer entry points. `make demo` and `make test` each do all setup first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
STAMP := $(VENV)/.installed

.PHONY: setup serve demo decoders test lint bench bench-service bench-fast-path bench-module lock clean

$(STAMP): ModelServer/pyproject.toml ModelServer/requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r ModelServer/requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e ModelServer
	touch $(STAMP)

setup: $(STAMP)

# The main job: fetch the embedded default model (pretrained MobileSAM) and start the
# service on http://127.0.0.1:8765, ready for Slicer. Settings: DESAM_* variables or
# DESAM_CONFIG=file.toml (docs/API.md).
serve: $(STAMP)
	$(VENV)/bin/desam-server fetch-weights mobile_sam
	$(VENV)/bin/desam-server serve

# Headless batch demo: fetch the pretrained default weights (MobileSAM, LiteMedSAM) and the
# sample head CT, then segment the head on every slice headlessly into a .seg.nrrd.
demo: $(STAMP)
	$(VENV)/bin/desam-server fetch-weights
	$(PY) scripts/demo.py --out $(OUT)

# The first trained decoders for the embedded default encoder (MobileSAM): "head" on the
# sample CT, "brain" on synthetic T1 heads around the MNI152 brain (cross-domain check on
# Colin27), installed in the decoder registry that `make serve` reads (docs/TRAINING.md).
decoders: $(STAMP)
	$(VENV)/bin/desam-server fetch-weights mobile_sam
	$(PY) scripts/make_decoders.py --json $(OUT)/decoders.json

# What CI runs: the linter (ruff.toml), then the whole test suite (no test is excluded).
test: lint
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(VENV)/bin/desam-server bench --json $(OUT)/bench_engine.json

# The service end to end (a real `desam-server serve` child, driven through ServerClient):
# click latency, scroll-and-click first clicks, encode throughput, upload, cache bytes, grid mode.
bench-service: $(STAMP)
	$(PY) scripts/bench_service.py --json $(OUT)/bench_service.json

# Each part of the click's fast path removed in turn, through the service, against
# segment_anything's SamPredictor (docs/benchmarks/click_fast_path.md).
bench-fast-path: $(STAMP)
	$(PY) scripts/bench_fast_path.py --json $(OUT)/bench_fast_path.json

# The Slicer module on slicer-core against a MobileSAM service: a click to the segment
# updated (service round trip vs module work), the automatic run over the sample CT.
bench-module: $(STAMP)
	$(PY) scripts/bench_module.py --json $(OUT)/bench_module.json

lock: $(STAMP)
	{ head -n 2 ModelServer/requirements.lock; $(PY) -m pip freeze --exclude-editable; } > ModelServer/requirements.lock.new
	mv ModelServer/requirements.lock.new ModelServer/requirements.lock

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
