# The two commands: `make run` (serve the bundled models) and `make test` (the whole suite).
# Both create .venv with the interpreter in $(PYTHON) when needed and are idempotent.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null || echo python3.11)
VENV   := .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: run test tools lint typecheck models schema clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
	  { echo "need Python >= 3.11 (found: $(PYTHON)); set PYTHON=/path/to/python3.11"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet -c constraints.txt -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.runtime
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $@

run: $(VENV)/.runtime
	$(BIN)/gateway serve --host $(HOST) --port $(PORT) --models models --policies policies

# promtool (Debian's prometheus package) checks and unit-tests the alert rules, nginx checks
# docker/nginx/nginx.conf (`nginx -t`), and the shared-state tests start their own redis-server
# (RUNLEVEL=1 keeps the packages from starting servers of their own);
# installed when this machine allows it (root + apt-get), else those tests are skipped with a note.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	      || echo "note: could not install promtool; alert-rule tests will be skipped"; \
	  else echo "note: promtool not installed (apt-get install prometheus); alert-rule tests will be skipped"; fi; }
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light) >/dev/null 2>&1 \
	      || echo "note: could not install nginx; the nginx -t test will be skipped"; \
	  else echo "note: nginx not installed (apt-get install nginx-light); the nginx -t test will be skipped"; fi; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server) >/dev/null 2>&1 \
	      || echo "note: could not install redis-server; the shared-state tests will be skipped"; \
	  else echo "note: redis-server not installed (apt-get install redis-server); shared-state tests will be skipped"; fi; }

test: $(VENV)/.dev tools
	$(BIN)/ruff check .
	$(BIN)/mypy gateway
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check .

typecheck: $(VENV)/.dev
	$(BIN)/mypy gateway

models: $(VENV)/.dev  ## regenerate the example model repository from its seed
	$(BIN)/python models/build_credit_risk.py

schema: $(VENV)/.runtime  ## regenerate policies/policy.schema.json and the README reference tables
	$(BIN)/gateway policy schema --output policies/policy.schema.json
	$(BIN)/gateway policy docs --write README.md

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
