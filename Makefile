# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install geoseg with its dependencies on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geoseg-installed

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/geoseg run pipelines/demo.yml

lint: $(STAMP)
	$(VENV)/bin/ruff check geoseg tests benchmarks
	$(VENV)/bin/ruff format --check geoseg tests benchmarks
	$(VENV)/bin/mypy geoseg

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf out bench_out .pytest_cache .mypy_cache .ruff_cache
