# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tcore demo --output runs/demo

# Two pytest workers (pytest-xdist): run serially, the suite keeps about 1.3 of 2 cores busy,
# as many tests wait on child processes. On 2 cores (2026-11-28) the suite took 12.2 -> 9.0
# minutes from a fresh clone, 9.7 -> 7.6 with Inductor's compile cache warm. A test file
# stays on one worker, so its module-scoped runs are made once. TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) runs build *.egg-info
