# genimg — the two commands: `make demo` (the main job end to end) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= serve,train,local,test
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-fast soak chaos bench eval clean

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*; touch $@

venv: $(VENV)/.installed-$(EXTRAS)

demo: venv
	$(PY) -m producer.cli demo

eval: venv
	$(VENV)/bin/genimg models eval --json --sheet demo-out/models_sheet.png

test: venv
	$(PY) -m pytest -q -m "not soak"

test-fast: venv
	$(PY) -m pytest -q -m "not soak and not slow"

soak: venv
	$(PY) -m pytest -q -m soak

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache
