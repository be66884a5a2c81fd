# The README's two commands are `sudo make demo` and `sudo make test`; both install first.
.PHONY: setup demo test bench install deb clean
VENV ?= $(or $(AGENTTRACE_VENV_DIR),.venv)

setup:
	scripts/setup.sh

demo:
	scripts/setup.sh --test
	$(VENV)/bin/agenttrace demo

test:
	scripts/setup.sh --test --bench
	AGENTTRACE_REQUIRE_BPF=1 $(VENV)/bin/python -m pytest -q -ra --durations=15 tests

bench:
	scripts/setup.sh --test --bench
	$(VENV)/bin/python -m bench

# A Debian package of this tree (packaging/build-deb.sh): agenttrace in its own venv in
# /opt/agenttrace, the unit, the example config (a conffile) and a man page. DEB_OUT: where.
deb:
	packaging/build-deb.sh

# The systemd service on this node, from the package: the root daemon runs files dpkg owns
# in /opt/agenttrace, never this checkout or its .venv.
install: setup deb
	dpkg -i build/agenttrace_$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)_$$(dpkg --print-architecture).deb
	@echo "installed; review /etc/agenttrace/agenttrace.yaml, then: systemctl enable --now agenttrace"

clean:
	rm -rf $(VENV) build *.egg-info bench/out
