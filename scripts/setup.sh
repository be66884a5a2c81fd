#!/usr/bin/env bash
# One setup for the README's two commands, .ci/run and the Vagrant VM.
# Idempotent: every step checks before it acts, so a second run installs nothing new.
#   scripts/setup.sh          runtime: BCC, kernel headers, tracefs, bpffs, venv + package
#   scripts/setup.sh --test   also what the test suite drives for real (sshd, iproute2, ...)
#   scripts/setup.sh --bench  also the peers the benchmarks compare against (bpftrace, auditd)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WANT_TEST=0; WANT_BENCH=0
for a in "$@"; do
  case "$a" in
    --test) WANT_TEST=1 ;;
    --bench) WANT_BENCH=1 ;;
    *) echo "setup.sh: unknown option '$a' (expected --test or --bench)" >&2; exit 2 ;;
  esac
done
say() { echo "setup: $*" >&2; }

[ "$(id -u)" = 0 ] || { echo "setup.sh: must run as root (eBPF, cgroups and apt need it)" >&2; exit 2; }
command -v apt-get >/dev/null || { echo "setup.sh: needs a Debian or Ubuntu machine (apt-get not found)" >&2; exit 2; }

# gcc + python3-dev: the compiled pipeline modules (scripts/build_native.py)
pkgs=(python3-bpfcc libbpfcc python3-venv python3-pip iproute2 ca-certificates gcc python3-dev)
[ $WANT_TEST = 1 ] && pkgs+=(openssh-server openssh-client git gcc make procps util-linux systemd dnsutils chromium rsyslog openssl)
[ $WANT_BENCH = 1 ] && pkgs+=(bpftrace auditd gcc make)

missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done

KREL=$(uname -r)
MODDIR=/lib/modules/$KREL
need_headers=0
[ -e "$MODDIR/build/include" ] || need_headers=1

apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { say "apt-get update"; apt-get update -qq; apt_updated=1; }; }
if [ ${#missing[@]} -gt 0 ]; then
  apt_update
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ $need_headers = 1 ]; then
  apt_update
  # Prefer the running kernel's own headers; BCC compiles against them.
  if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1; then
    say "installing linux-headers-$KREL"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "linux-headers-$KREL" >/dev/null
  fi
  if [ ! -e "$MODDIR/build/include" ]; then
    # No package for this kernel: fall back to the distro's generic headers. Safe because the
    # probes read no kernel-internal struct fields (DESIGN §3); offsets come from BTF.
    meta=linux-headers-amd64
    . /etc/os-release
    [ "${ID:-}" = ubuntu ] && meta=linux-headers-generic
    [ "$(uname -m)" = aarch64 ] && meta=${meta/amd64/arm64}
    dpkg -s "$meta" >/dev/null 2>&1 || { say "installing $meta"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$meta" >/dev/null; }
    build=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-generic /usr/src/linux-headers-*-arm64 2>/dev/null | sort -V | tail -n1 || true)
    [ -n "$build" ] || { echo "setup.sh: no kernel headers found under /usr/src after installing $meta" >&2; exit 1; }
    common=$(ls -d "${build%-*}-common" 2>/dev/null || echo "$build")
    mkdir -p "$MODDIR"
    ln -sfn "$build" "$MODDIR/build"
    ln -sfn "$common" "$MODDIR/source"
    echo "setup: WARNING: no headers packaged for kernel $KREL; linked $build as $MODDIR/build" >&2
    echo "setup: WARNING: (the probes use only tracepoint args, UAPI structs and BTF offsets, so this is safe)" >&2
  fi
fi

if ! grep -q ' /sys/kernel/tracing tracefs ' /proc/mounts && ! grep -q ' tracefs ' /proc/mounts; then
  say "mounting tracefs at /sys/kernel/tracing"
  mkdir -p /sys/kernel/tracing && mount -t tracefs tracefs /sys/kernel/tracing
fi
if ! grep -q ' /sys/fs/bpf bpf ' /proc/mounts; then
  say "mounting bpffs at /sys/fs/bpf"
  mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi

# The venv sees Debian's BCC (PyPI's "bcc" is an unrelated package).
# AGENTTRACE_VENV_DIR: a venv elsewhere (the Vagrant VM keeps its own off the shared folder)
VENV=${AGENTTRACE_VENV_DIR:-$ROOT/.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  say "creating $VENV"
  rm -rf "$VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
extras=""
[ $WANT_TEST = 1 ] && extras="test"
[ $WANT_BENCH = 1 ] && extras="${extras:+$extras,}bench"
stamp="$VENV/.agenttrace-installed"
want="$(sha256sum pyproject.toml | cut -c1-16) [$extras]"
if ! grep -qxF "$want" "$stamp" 2>/dev/null; then
  say "installing agenttrace into $VENV ${extras:+with [$extras]}"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
  echo "$want" >> "$stamp"
fi
# The hot pipeline modules compiled with Cython, outside the tree ($VENV/lib/agenttrace-native);
# skipped when its manifest matches the sources. A failed build is not fatal: the tracer runs
# the same .py files pure (slower per record; `agenttrace doctor` says so).
CYTHON_REQ="cython>=3.0,<4"
if ! "$VENV/bin/python" -c 'import Cython, sys; sys.exit(int(Cython.__version__.split(".")[0]) < 3)' 2>/dev/null; then
  say "installing $CYTHON_REQ into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$CYTHON_REQ"
fi
"$VENV/bin/python" scripts/build_native.py || say "WARNING: compiled modules not built; agenttrace runs pure Python"
# Bytecode for the package's own (editable) sources: where PYTHONDONTWRITEBYTECODE is set,
# as in some CI images, every agenttrace start would otherwise compile ~100 modules again
# (~0.3 s of its start-up). Stale files are simply recompiled in memory by the interpreter.
"$VENV/bin/python" -m compileall -q -j 0 tracer >/dev/null || say "bytecode not written (continuing)"
# The probes a first start loads, compiled into the probe cache now (agenttrace prepare): without
# this the node's first `run` or daemon start compiles them itself (3.5-4.7 s instead of ~0.7 s).
# Not fatal: that first start would compile them as before.
if [ "$(id -u)" = 0 ]; then
  "$VENV/bin/agenttrace" prepare || say "WARNING: probes not compiled ahead; the first start compiles them"
fi
# The benchmarks' C load generators (bench/loadgen), built where every bench and profile
# script looks for them (bench/out/bin); the bench rebuilds only what changed since
if [ $WANT_BENCH = 1 ]; then
  "$VENV/bin/python" -c 'from pathlib import Path; from bench import loadgen; loadgen.build(Path("bench/out/bin"))' \
    || { echo "setup.sh: building the load generators (bench/loadgen) failed" >&2; exit 1; }
fi
say "ready: $VENV/bin/agenttrace"
