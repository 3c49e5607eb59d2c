# make bench: vipless-failover vs keepalived, side by side (root; see docs/bench.md)
PY ?= .venv/bin/python

.PHONY: bench bench-quick
bench:
	$(PY) -m bench --trials 10

bench-quick:
	$(PY) -m bench --quick --out /tmp/vfbench-quick
