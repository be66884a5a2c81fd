# The README's two commands are `sudo make demo` and `sudo make test`; both install first.
.PHONY: setup demo test bench lint clean
VENV := .venv

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

clean:
	rm -rf $(VENV) build *.egg-info bench/out
