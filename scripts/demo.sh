#!/usr/bin/env bash
# Builds the simulated site (network namespaces on 10.213.0.0/16) and runs watchtower against it.
# Stop with Ctrl-C: the site is removed again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/watchtower demo -c config/demo.yaml "$@"
