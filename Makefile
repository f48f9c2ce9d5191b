# Two commands for a newcomer: `make run` (demo daemon + EMS simulator) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR := var/demo

.PHONY: run test lint bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

# The demo: the built-in EMS simulator and the daemon on loopback, in the foreground.
# Ctrl-C stops both.
run: $(VENV)/.installed
	@mkdir -p $(DEMO_DIR)
	@test -f $(DEMO_DIR)/pnl.json || echo '{"pnl": 0}' > $(DEMO_DIR)/pnl.json
	@echo "killswitch demo: EMS simulator on 127.0.0.1:9480, daemon API on 127.0.0.1:9470"
	@echo "  trip it:   pkill -USR1 -f 'python.*killswitch run -c config/demo.yaml'"
	@echo "         or: $(BIN)/killswitch trip -c config/demo.yaml --reason drill"
	@echo "  status:    $(BIN)/killswitch status -c config/demo.yaml"
	@echo "  reset:     $(BIN)/killswitch reset -c config/demo.yaml --reason 'drill over'"
	@echo "  PnL trip:  echo '{\"pnl\": -60000}' > $(DEMO_DIR)/pnl.json.tmp && mv $(DEMO_DIR)/pnl.json.tmp $(DEMO_DIR)/pnl.json"
	@# The wrapper shell ignores SIGUSR1 (the daemon installs its own handler), so a
	@# signal aimed at the demo can never kill the wrapper and with it the simulator.
	@bash -c '$(BIN)/killswitch ems-sim --listen 127.0.0.1:9480 & sim=$$!; \
	  trap "kill $$sim 2>/dev/null; wait $$sim 2>/dev/null" EXIT; trap "" USR1; \
	  $(BIN)/killswitch run -c config/demo.yaml'

test: $(VENV)/.installed-dev
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/run.py

soak: $(VENV)/.installed-dev
	$(BIN)/python bench/soak.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
