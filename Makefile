# The README's two commands are `sudo make demo` and `sudo make test`; both install first.
.PHONY: setup demo test bench bench-baseline install deb clean
VENV ?= $(or $(AGENTTRACE_VENV_DIR),.venv)

setup:
	scripts/setup.sh

demo:
	scripts/setup.sh --test
	$(VENV)/bin/agenttrace demo

test:
	scripts/setup.sh --test --bench
	AGENTTRACE_REQUIRE_BPF=1 AGENTTRACE_REQUIRE_NATIVE=1 $(VENV)/bin/python -m pytest -q -ra --durations=15 tests

# BENCH_ARGS: more options, e.g. BENCH_ARGS="--before /work/wt-before/.venv/bin/agenttrace" for
# before/after in one run (bench/README.md). Writes bench/out/.
bench:
	scripts/setup.sh --test --bench
	$(VENV)/bin/python -m bench --profile $(BENCH_ARGS)

# Keep bench/out/ as a new baseline, bench/baseline/<UTC date>-<size>[-BASELINE_TAG]; an
# existing baseline is never overwritten (the old one stays for comparison).
bench-baseline:
	@test -f bench/out/report.md || { echo "bench-baseline: no bench/out/report.md: run make bench first" >&2; exit 2; }
	@size=$$(sed -n 's/.*Size `\([a-z]*\)`.*/\1/p' bench/out/report.md | head -1); \
	 d=bench/baseline/$$(date -u +%F)-$$size$(if $(BASELINE_TAG),-$(BASELINE_TAG)); \
	 if [ -e $$d ]; then echo "bench-baseline: $$d exists; set BASELINE_TAG=... to keep both" >&2; exit 2; fi; \
	 mkdir -p $$d && cp bench/out/report.md bench/out/*.png $$d/ && { ! test -f bench/out/backlog.md || cp bench/out/backlog.md $$d/; } && echo "bench-baseline: wrote $$d"

# A Debian package of this tree (packaging/build-deb.sh): agenttrace in its own venv in
# /opt/agenttrace, the unit, the example config (a conffile) and a man page. DEB_OUT: where;
# DEB_ZLEVEL: gzip level (default 6).
deb:
	packaging/build-deb.sh

# The systemd service on this node, from the package: the root daemon runs files dpkg owns
# in /opt/agenttrace, never this checkout or its .venv.
install: setup deb
	dpkg -i build/agenttrace_$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)_$$(dpkg --print-architecture).deb
	@echo "installed; review /etc/agenttrace/agenttrace.yaml, then: systemctl enable --now agenttrace"

clean:
	rm -rf $(VENV) build *.egg-info bench/out
