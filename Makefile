# feddiff: `make demo` runs a real federated job on loopback; `make test` runs the suite; `make lint`,
# `make typecheck` and `make test-unit` are the quick checks (ruff, mypy, the fast tests).
# Each installs what is missing first (a .venv at the repository root, torch pinned to the CPU wheel).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install dataset system-packages proto lint typecheck test-unit test smoke demo soak bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,diffusers]"
	touch $(STAMP)

# Fashion-MNIST from Debian's package (needs root; CI runs as root).
dataset: $(FMNIST)
$(FMNIST):
	@command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && (apt-get install -y dataset-fashion-mnist || (apt-get update && apt-get install -y dataset-fashion-mnist)) \
	  || { echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'"; exit 1; }

# The Debian packages of the Prometheus and network suites (prometheus: promtool and the server; iproute2:
# ip and tc): installed when missing as root, like the dataset; otherwise named, with the command to run.
system-packages:
	@$(PYTHON) -m tools.system_packages

proto: install
	$(PY) -m tools.gen_proto

smoke: install dataset
	$(PY) -m tools.smoke

demo: install dataset
	$(PY) -m tools.demo

# Every benchmark in its quick form (each under 3 minutes on 2 CPU cores); figures last, one per line.
bench: install dataset
	$(PY) -m bench.train_throughput --quick
	$(PY) -m bench.transfer --quick
	$(PY) -m bench.coordinator_memory --quick
	$(PY) -m bench.rounds_scale --quick
	$(PY) -m bench.accept --quick

# ruff's rules and its formatter's width are in pyproject.toml ([tool.ruff]); `ruff format .` applies the format.
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every package and the tests, as pyproject.toml's [tool.mypy] says; the cache (.mypy_cache) makes reruns quick.
typecheck: install
	$(PY) -m mypy

# The fast tests: everything but the suites that start processes, kill them, shape networks or run Prometheus
# (a few minutes on 2 CPU cores).
UNIT_TESTS := not slow and not e2e and not faults and not network and not prometheus and not gpu
test-unit: install dataset
	$(PY) -m pytest -q -m "$(UNIT_TESTS)"

test: install dataset system-packages
	$(PY) -m pytest -q

# Endurance: 50 rounds, 4 workers; fails when the coordinator's RSS grows by 10% or more from round 5 to 50.
soak: install dataset
	$(PY) -m tools.soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache runs
