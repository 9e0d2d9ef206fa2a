#!/usr/bin/env bash
# Runs the test suite (unit tests, real peers on loopback, network-namespace scenarios as root).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh --tests
export WATCHTOWER_SUSHY_EMULATOR=${WATCHTOWER_SUSHY_EMULATOR:-$PWD/.venv-sushy/bin/sushy-emulator}
exec .venv/bin/pytest -q "$@"
