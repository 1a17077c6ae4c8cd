#!/usr/bin/env bash
# Remove the bpfprof agent (idempotent). --purge also removes /etc/bpfprof.
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/install.sh" "${1:---uninstall}"
