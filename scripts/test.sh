#!/usr/bin/env bash
# Runs the test suite (unit tests, real peers on loopback, network-namespace scenarios as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/pytest -q "$@"
