# The README's two commands are `sudo make demo` and `sudo make test`; both install first.
.PHONY: setup demo test bench install clean
VENV ?= $(or $(AGENTTRACE_VENV_DIR),.venv)

setup:
	scripts/setup.sh

demo:
	scripts/setup.sh --test
	$(VENV)/bin/agenttrace demo

test:
	scripts/setup.sh --test --bench
	AGENTTRACE_REQUIRE_BPF=1 $(VENV)/bin/python -m pytest -q -ra tests

bench:
	scripts/setup.sh --test --bench
	$(VENV)/bin/python -m bench

# The systemd service on this node (see packaging/agenttrace.service).
install: setup
	ln -sf "$(CURDIR)/$(VENV)/bin/agenttrace" /usr/local/bin/agenttrace
	test -e /etc/agenttrace/agenttrace.yaml || install -D -m 0600 packaging/agenttrace.example.yaml /etc/agenttrace/agenttrace.yaml
	install -m 0644 packaging/agenttrace.service /etc/systemd/system/agenttrace.service
	@echo "installed; now: systemctl daemon-reload && systemctl enable --now agenttrace"

clean:
	rm -rf $(VENV) build *.egg-info bench/out
