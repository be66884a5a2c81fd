#!/usr/bin/env bash
# `make deb`: a Debian package of this working tree, built with dpkg-deb.
#
# agenttrace goes into its own prefix, /opt/agenttrace, a Python venv that sees Debian's BCC
# (--system-site-packages; PyPI's "bcc" is another project) and holds every other dependency,
# so the root daemon runs only files the package owns, never a user's checkout. Also shipped:
# /usr/bin/agenttrace (a link), the systemd unit, the example config as a conffile, a man page.
#
# The venv is built under a staging root and moved into place by rewriting the staging path
# out of every text file that names it (scripts' #! lines, pyvenv.cfg, pip's records); the
# interpreter link stays /usr/bin/python3, hence the python3 (>= 3.11, << 3.12) dependency:
# the compiled wheels inside are for that minor version. Building needs gcc and python3-dev
# (the compiled pipeline modules; scripts/setup.sh installs both).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${DEB_OUT:-$ROOT/build}
# gzip level of the package: 6 for what ships; the test suite's build (tests/test_deb.py) asks
# for 1, which saves it seconds of compressing and unpacking and changes no file in the package
ZLEVEL=${DEB_ZLEVEL:-6}
case $ZLEVEL in [0-9]) ;; *) echo "deb: DEB_ZLEVEL must be a gzip level 0-9, not '$ZLEVEL'" >&2; exit 2 ;; esac
PREFIX=/opt/agenttrace
PY=/usr/bin/python3
say() { echo "deb: $*"; }

command -v dpkg-deb >/dev/null || { echo "deb: dpkg-deb not found (Debian's dpkg package)" >&2; exit 2; }
"$PY" -c 'import bcc' 2>/dev/null || { echo "deb: Debian's python3-bpfcc is needed (scripts/setup.sh installs it)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
VERSION=$("$PY" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$ROOT/pyproject.toml")
PYMINOR=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
ARCH=$(dpkg --print-architecture)
WORK=$(mktemp -d "$OUT/.deb-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGE=$WORK/root

# The working tree's files (tracked, and new ones git does not ignore): no venv, no caches.
say "copying the source"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r tar -cf - --ignore-failed-read 2>/dev/null) \
    | tar -xf - -C "$WORK/src"
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -xf - -C "$WORK/src"
fi

say "building the venv in $PREFIX (staged)"
# Debian's pip, setuptools and wheel (python3-pip), seen through --system-site-packages, install
# and build: a venv without pip of its own takes 0.2 s instead of ensurepip's ~6 s, and
# building this project against them (--no-build-isolation) skips a throwaway build venv; the
# package has no pip or setuptools to remove afterwards. Without python3-pip: the old way.
if "$PY" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ("pip", "setuptools", "wheel"))))' 2>/dev/null; then
  "$PY" -m venv --system-site-packages --without-pip "$STAGE$PREFIX"
  PIP=("$STAGE$PREFIX/bin/python" -m pip)
  BUILD_OPTS=(--no-build-isolation)
else
  "$PY" -m venv --system-site-packages "$STAGE$PREFIX"
  PIP=("$STAGE$PREFIX/bin/pip")
  BUILD_OPTS=()
fi
# --ignore-installed: every dependency goes into the venv, none is taken from the system
# site-packages that happen to be on the build machine (only BCC comes from there)
"${PIP[@]}" install -q --disable-pip-version-check --no-compile --no-warn-script-location \
  --ignore-installed "${BUILD_OPTS[@]}" "$WORK/src"
# pip and setuptools are not needed at run time (only ensurepip's venv has them; Debian's own,
# outside the venv, are never touched)
if [ ${#BUILD_OPTS[@]} = 0 ]; then
  "${PIP[@]}" uninstall -q -y pip setuptools >/dev/null 2>&1 || true
fi
# The compiled pipeline modules (scripts/build_native.py) into the package's venv, where
# tracer/native.py looks (sys.prefix/lib/agenttrace-native). Built by a Python that has Cython:
# this checkout's venv (its build is copied when it matches these sources), else Cython
# fetched into the work folder. Same /usr/bin/python3, so the same ABI.
say "compiling the hot modules (Cython)"
NPY=${AGENTTRACE_VENV_DIR:-$ROOT/.venv}/bin/python
NPATH=
if ! "$NPY" -c 'import Cython' 2>/dev/null; then
  NPY=$PY; NPATH=$WORK/cython
  "$PY" -m pip install -q --disable-pip-version-check --target "$NPATH" "cython>=3.0,<4" >/dev/null
fi
PYTHONPATH=$NPATH "$NPY" "$WORK/src/scripts/build_native.py" --out "$STAGE$PREFIX/lib/agenttrace-native" \
  --reuse "$(dirname "$(dirname "$NPY")")/lib/agenttrace-native"
find "$STAGE$PREFIX" -name __pycache__ -prune -exec rm -rf {} +
grep -rlIF "$STAGE" "$STAGE$PREFIX" | while IFS= read -r f; do sed -i "s|$STAGE||g" "$f"; done
if grep -rqIF "$STAGE" "$STAGE$PREFIX"; then echo "deb: the staging path is still named in the venv" >&2; exit 1; fi

say "adding the unit, config, man page, docs"
install -D -m 0644 "$WORK/src/packaging/agenttrace.service" "$STAGE/lib/systemd/system/agenttrace.service"
install -D -m 0600 "$WORK/src/packaging/agenttrace.example.yaml" "$STAGE/etc/agenttrace/agenttrace.yaml"
chmod 0700 "$STAGE/etc/agenttrace"
install -D -m 0644 "$WORK/src/packaging/agenttrace.8" "$STAGE/usr/share/man/man8/agenttrace.8"
gzip -9n "$STAGE/usr/share/man/man8/agenttrace.8"
install -D -m 0644 "$WORK/src/packaging/deb/copyright" "$STAGE/usr/share/doc/agenttrace/copyright"
install -D -m 0644 "$WORK/src/packaging/agenttrace.example.yaml" "$STAGE/usr/share/doc/agenttrace/agenttrace.example.yaml"
mkdir -p "$STAGE/usr/bin"
ln -s "$PREFIX/bin/agenttrace" "$STAGE/usr/bin/agenttrace"

mkdir -p "$STAGE/DEBIAN"
for s in postinst prerm postrm; do install -m 0755 "$WORK/src/packaging/deb/$s" "$STAGE/DEBIAN/$s"; done
echo /etc/agenttrace/agenttrace.yaml > "$STAGE/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
cat > "$STAGE/DEBIAN/control" <<CTL
Package: agenttrace
Version: $VERSION
Architecture: $ARCH
Maintainer: agenttrace developers <agenttrace@localhost>
Installed-Size: $SIZE
Depends: python3 (>= $PYMINOR), python3 (<< $PYNEXT), python3-bpfcc, libbpfcc
Recommends: linux-headers-$ARCH
Section: admin
Priority: optional
Description: eBPF tracer and policy for AI-agent processes
 Traces exec, network, DNS, protocol, file and GPU activity of processes in
 agent cgroups with eBPF, matches it against rules that report, block, kill or
 freeze, and writes JSON lines (or OCSF) to the journal, files, syslog and a
 local socket. Runs as a systemd service on every GPU node.
CTL
DEB="$OUT/agenttrace_${VERSION}_${ARCH}.deb"
say "dpkg-deb --build → $DEB"
dpkg-deb --root-owner-group -Zgzip "-z$ZLEVEL" --build "$STAGE" "$DEB" >/dev/null
echo "$DEB"
