# genimg — the two commands: `make demo` (the main job end to end) and `make test` (lint, then the whole suite).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
EXTRAS ?= serve,train,local,test
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv lint demo test test-fast soak chaos bench scale eval clean images deploy-check

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.installed-*; touch $@

venv: $(VENV)/.installed-$(EXTRAS)

REPO := .cache/genimg/model_repository
$(REPO)/genimg_repository.json: $(VENV)/.installed-$(EXTRAS) $(wildcard genimg/models/weights/*.safetensors) \
		$(wildcard genimg/profiles/bundled/*.toml) genimg/models/sources.py
	$(VENV)/bin/genimg models build-repo --flavor cpu --out $(REPO)

demo: venv $(REPO)/genimg_repository.json
	$(VENV)/bin/genimg demo

eval: venv
	$(VENV)/bin/genimg models eval --json --sheet demo-out/models_sheet.png

# Static checks ([tool.ruff] and [tool.mypy] in pyproject.toml); `make test` runs them first.
lint: venv
	$(VENV)/bin/ruff check genimg workers producer
	$(VENV)/bin/mypy

test: venv lint
	bash scripts/test-services.sh $(PY) -m pytest -q -m "not soak" --durations=25

test-fast: venv
	$(PY) -m pytest -q -m "not soak and not slow"

soak: venv
	$(PY) -m pytest -q -m soak

# The full chaos run (tests/chaos, docs/operations.md) once per seed; each report goes to
# demo-out/chaos-report-SEED.json, worker logs and Redis' AOF to demo-out/chaos-tmp/.
# Replay one seed: make chaos CHAOS_SEEDS=2
CHAOS_SEEDS ?= 1,2,3
chaos: venv
	mkdir -p demo-out
	GENIMG_CHAOS_SEED=$(CHAOS_SEEDS) GENIMG_CHAOS_REPORT='demo-out/chaos-report-{seed}.json' \
		$(PY) -m pytest -q -s -m soak tests/chaos --basetemp=demo-out/chaos-tmp

# Benchmarks (issues 9, 14, 20; benchmarks/README.md): genimg against the in-process upper bound, naive Celery
# and Ray Data on the same models, images and CPUs (txt2img and faces_x4); ~15-25 min on 2 cores. BENCH_ARGS=--quick for a smoke run.
BENCH_ARGS ?=
bench: venv
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# Container images (issue 17, deploy/README.md "Images"): genimg/worker:$(IMAGE_TAG) and
# genimg/triton-cpu:$(IMAGE_TAG) with podman, installed from Debian if missing; the base is the official
# python image when it can be pulled, else Debian's Python from debootstrap. The cpu model repository is
# rebuilt first (seconds; identical bytes while the models are unchanged) and copied into triton-cpu whole.
# Warm runs reuse every cached layer.
IMAGE_TAG ?= dev
images: venv
	$(VENV)/bin/genimg models build-repo --flavor cpu --out $(REPO)
	GENIMG_IMAGE_TAG=$(IMAGE_TAG) bash scripts/build-images.sh

# The images run as the cpu-dev manifests say (podman run, then podman kube play), a real job through them;
# prints items, images/s, image sizes, exit codes and what kube play ignored (demo-out/deploy-check.json).
deploy-check: images
	GENIMG_IMAGE_TAG=$(IMAGE_TAG) PY=$(PY) bash scripts/deploy-check.sh

# The scale run (issue 21, docs/operations.md "Scale"): fabricated committed state of jobs of 10^4 and 10^5 shards
# (and 2,000 on moto's S3 server), then the real finalisation, status, wait, exporter scrape and resume; enqueue of
# 10^6 messages. ~30 min and ~15 GB of disk under .cache/scale at 10^5 shards. SCALE_ARGS="--shards 1000 --s3-shards 100 --enqueue-shards 10000" for a smoke run.
SCALE_ARGS ?=
scale: venv
	$(PY) benchmarks/scale.py $(SCALE_ARGS)

clean:
	rm -rf $(VENV) .cache demo-out .pytest_cache
