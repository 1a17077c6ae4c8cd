#!/usr/bin/env bash
# Install the bpfprof agent as a systemd service. Idempotent; run as root from a clone.
#
#   packaging/install.sh              install or upgrade into /opt/bpfprof, enable the unit
#   packaging/install.sh --uninstall  remove it (the config in /etc/bpfprof is kept unless --purge)
#
# Layout: /opt/bpfprof/venv (bpfprof and its Python deps, Debian's bcc made
# reachable), /etc/bpfprof/config.yaml (from config.example.yaml, never
# overwritten), /etc/systemd/system/bpfprof.service. PREFIX, ETC and UNIT_DIR
# override the three places (tests install into a temporary root).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${PREFIX:-/opt/bpfprof}
ETC=${ETC:-/etc/bpfprof}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}
SYSTEMCTL=${SYSTEMCTL:-systemctl}

log() { printf 'install: %s\n' "$*" >&2; }

have_systemd() { [[ -d /run/systemd/system ]] && command -v "$SYSTEMCTL" >/dev/null; }

uninstall() {
    local purge=$1
    if have_systemd; then
        "$SYSTEMCTL" disable --now bpfprof.service 2>/dev/null || true
    fi
    rm -f "$UNIT_DIR/bpfprof.service"
    have_systemd && "$SYSTEMCTL" daemon-reload || true
    rm -rf "$PREFIX"
    if [[ $purge == 1 ]]; then
        rm -rf "$ETC"
    fi
    log "removed (config in $ETC $([[ $purge == 1 ]] && echo removed || echo kept))"
}

case "${1:-}" in
    --uninstall) uninstall 0; exit 0 ;;
    --purge) uninstall 1; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--uninstall|--purge]" >&2; exit 2 ;;
esac

if [[ $(id -u) -ne 0 && -z "${ALLOW_NON_ROOT:-}" ]]; then
    echo "install: run as root: sudo $0" >&2
    exit 2
fi

# The venv: created once, bpfprof (re)installed when the source is newer.
if [[ ! -x "$PREFIX/venv/bin/python" ]]; then
    log "creating $PREFIX/venv"
    mkdir -p "$PREFIX"
    "$PYTHON" -m venv "$PREFIX/venv"
fi
stamp="$PREFIX/.installed-from"
if [[ ! -f "$stamp" || "$ROOT/pyproject.toml" -nt "$stamp" || -n "$(find "$ROOT/agent" "$ROOT/exporters" "$ROOT/symbolizer" "$ROOT/bpf" -newer "$stamp" -print -quit)" ]]; then
    log "installing bpfprof into $PREFIX/venv"
    "$PREFIX/venv/bin/python" -m pip install -q ${PIP_OPTS:-} "$ROOT"
    echo "$ROOT" > "$stamp"
fi
BCC_DIR=$(/usr/bin/python3 -c 'import bcc, os; print(os.path.dirname(os.path.dirname(bcc.__file__)))' 2>/dev/null \
          || echo /usr/lib/python3/dist-packages)
SITE=$("$PREFIX/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$PREFIX/bcc-only"
ln -sfn "$BCC_DIR/bcc" "$PREFIX/bcc-only/bcc"
echo "$PREFIX/bcc-only" > "$SITE/bcc-only.pth"
install -m 0644 "$ROOT/README.md" "$PREFIX/README.md"

# Config: installed once, never overwritten (an upgrade keeps local edits).
install -d -m 0750 "$ETC"
if [[ ! -f "$ETC/config.yaml" ]]; then
    install -m 0640 "$ROOT/packaging/config.example.yaml" "$ETC/config.yaml"
    log "wrote $ETC/config.yaml: set export.otlp.endpoint or export.pprof_dir.path"
fi
install -m 0644 "$ROOT/packaging/config.example.yaml" "$ETC/config.example.yaml"
"$PREFIX/venv/bin/bpfprof" agent --config "$ETC/config.yaml" --check-config >/dev/null

# The compiled-BPF cache for this kernel and the installed config, so the service starts without clang.
# A machine that cannot load BPF yet still gets the unit; the agent then compiles at its first start.
"$PREFIX/venv/bin/bpfprof" doctor --fix --config "$ETC/config.yaml" >&2 \
    || log "bpfprof doctor --fix failed (see above): the service compiles its BPF programs when it starts"

# The unit, with the paths of this install.
install -d "$UNIT_DIR"
sed -e "s#/opt/bpfprof#$PREFIX#g" -e "s#/etc/bpfprof#$ETC#g" "$ROOT/packaging/systemd/bpfprof.service" \
    > "$UNIT_DIR/bpfprof.service.tmp"
mv "$UNIT_DIR/bpfprof.service.tmp" "$UNIT_DIR/bpfprof.service"
if have_systemd; then
    "$SYSTEMCTL" daemon-reload
    "$SYSTEMCTL" enable bpfprof.service
    "$SYSTEMCTL" restart bpfprof.service
    log "bpfprof.service enabled and (re)started"
else
    log "no systemd here: unit installed at $UNIT_DIR/bpfprof.service, not started"
fi
