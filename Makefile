# make demo   create .venv, install, run the main job on an embedded local Ray
# make test   create .venv if needed, install, lint, run the whole test suite
# make bench  run every benchmark in benchmarks/ (results under results/)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ray-unlearn demo --config configs/digits.yaml

lint: $(STAMP)
	$(PY) -m ruff check ray_unlearn tests benchmarks

test: $(STAMP) lint
	$(PY) -m pytest -q

bench: $(STAMP)
	@set -e; for b in benchmarks/*.py; do \
	  name=$$(basename $$b .py); echo "== $$name"; \
	  $(PY) $$b --out results/$$name; \
	done

clean:
	rm -rf $(VENV) runs results .pytest_cache
