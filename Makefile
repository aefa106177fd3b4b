# Two commands on a fresh machine: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install geoseg with its dependencies on first use (pip shows its
# progress). On a machine without a GPU, `make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu`
# takes torch's CPU-only wheels from that index first: about 4.6 GB less than PyPI's CUDA build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geoseg-installed
TORCH_INDEX ?=

.PHONY: demo test install lint bench clean

$(STAMP): pyproject.toml
	@echo "installing geoseg and its dependencies into $(VENV) (first use only; see README)"
	python3 -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
ifneq ($(TORCH_INDEX),)
	$(PY) -m pip install --progress-bar on --index-url $(TORCH_INDEX) torch torchvision
endif
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/geoseg run pipelines/demo.yml

lint: $(STAMP)
	$(VENV)/bin/ruff check geoseg tests benchmarks
	$(VENV)/bin/ruff format --check geoseg tests benchmarks
	$(VENV)/bin/mypy geoseg tests

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf out bench_out .pytest_cache .mypy_cache .ruff_cache
