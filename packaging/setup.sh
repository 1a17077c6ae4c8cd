#!/usr/bin/env bash
# Sets up this machine for bpfprof, then runs a job. Idempotent; run as root.
#
#   packaging/setup.sh demo   set up, then record a CPU profile of a demo workload
#   packaging/setup.sh test   set up, then run the whole test suite
#   packaging/setup.sh        set up only
#
# Set-up: Debian packages (BCC, kernel headers, perf, compilers), a venv at
# .venv with bpfprof and its test tools, bcc made importable from the venv
# (that one package, not all of dist-packages), tracefs/debugfs mounted and
# kernel headers linked for the running kernel, and the default probe selections
# compiled into the BPF cache so that `bpfprof record` starts without clang
# (`bpfprof doctor --fix`).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
JOB=${1:-setup}
VENV="$ROOT/.venv"
PYTHON=${PYTHON:-python3}

log() { printf 'setup: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    echo "setup: run as root (BPF needs it): sudo $0 $*" >&2
    exit 2
fi

# --- system packages --------------------------------------------------------
ARCH=$(dpkg --print-architecture)
PACKAGES=(python3-bpfcc bpfcc-tools "linux-headers-$ARCH" linux-perf python3-venv gcc g++ binutils systemd bpftool)
# libc6-dbg: libc's separate debug info (build-id tree), which the symbolizer reads for libc's names.
PACKAGES+=(libc6-dbg)
# `bpfprof serve`'s browser tests: Debian's Chromium and its driver (never a downloaded browser).
PACKAGES+=(chromium chromium-driver)
# npm installs the web UI's flame graph library; a machine with Node.js from elsewhere keeps it.
command -v npm >/dev/null || PACKAGES+=(nodejs npm)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- virtual environment ------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.bpfprof-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
    log "installing bpfprof into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    touch "$stamp"
fi
# The editable install runs the sources in place: their bytecode compiled now (what pip does for an
# installed package), not at every start, which under PYTHONDONTWRITEBYTECODE is never kept (~50 ms of
# each start here). Up-to-date files are skipped.
"$VENV/bin/python" -m compileall -q -j 0 -x node_modules agent symbolizer exporters bpf viewer >/dev/null

# The web UI's JS libraries (viewer/package-lock.json) into viewer/node_modules, never into git.
npm_stamp="viewer/node_modules/.bpfprof-installed"
if [[ ! -f "$npm_stamp" || viewer/package-lock.json -nt "$npm_stamp" ]]; then
    log "installing the web UI's npm packages"
    ( cd viewer && npm ci --no-audit --no-fund --loglevel=error )
    touch "$npm_stamp"
fi

# bcc comes from Debian's python3-bpfcc; expose that one package to the venv.
BCC_DIR=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(os.path.dirname(bcc.__file__)))' 2>/dev/null \
          || echo /usr/lib/python3/dist-packages)
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$VENV/bcc-only"
ln -sfn "$BCC_DIR/bcc" "$VENV/bcc-only/bcc"
echo "$VENV/bcc-only" > "$SITE/bcc-only.pth"

# --- kernel: tracefs, debugfs, headers; the BPF cache warmed ------------------
"$VENV/bin/bpfprof" doctor --fix

# --- the job ----------------------------------------------------------------
case "$JOB" in
    setup) ;;
    demo)
        mkdir -p build/demo
        ( cd tests/fixtures/go/cpusplit && GO111MODULE=off GOTOOLCHAIN=local GOPROXY=off \
            GOCACHE="$ROOT/build/demo/gocache" "$VENV/bin/go" build -o "$ROOT/build/demo/cpusplit" . )
        log "recording the demo workload (spinA ~70%, spinB ~30% of its CPU)"
        "$VENV/bin/bpfprof" record --output bpfprof-demo.pb.gz -- build/demo/cpusplit -duration 5s
        log "open it with: $VENV/bin/go tool pprof -top bpfprof-demo.pb.gz"
        ;;
    test)
        export BPFPROF_REQUIRE_BPF=1  # a skipped BPF test is a failure here
        # One process by default. BPFPROF_TEST_WORKERS=N runs N pytest-xdist workers, a module each at a
        # time, tests marked `alone` with the machine to themselves (tests/conftest.py): faster, but not
        # yet flake-free (README).
        "$VENV/bin/python" -m pytest -n "${BPFPROF_TEST_WORKERS:-0}" --dist loadscope "${@:2}"
        ;;
    *)
        echo "setup: unknown job '$JOB' (demo, test)" >&2
        exit 2
        ;;
esac
