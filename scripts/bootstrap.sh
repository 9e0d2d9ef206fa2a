#!/usr/bin/env bash
# Installs what watchtower's demo and tests need on Debian 12: system packages and a venv in .venv
# (with --tests also the Redfish emulator in .venv-sushy).
# Idempotent: a second run only checks. Needs root for apt (the demo and tests need root anyway).
set -euo pipefail
cd "$(dirname "$0")/.."

# test peers: snmpd/snmp (SNMP agent, snmptrap), openipmi/ipmitool (ipmi_sim BMC and its client),
# nut-server (dummy-ups + upsd)
APT_PACKAGES=(iproute2 nftables iptables fping prometheus openssl procps
              snmpd snmp openipmi ipmitool nut-server nut-client)
# test-only: a headless browser for the status page test (tests/integration/test_browser.py),
# with a font so its screenshots are readable; Alertmanager for the sink test
# (tests/integration/test_alertmanager.py); blackbox_exporter for the Prometheus side of bench/;
# systemd for systemd-analyze verify/security of the unit; restic and borgbackup for real backup
# repositories (tests/integration/test_backups.py); poppler-utils (pdftoppm) to look at the plan PDF
TEST_APT_PACKAGES=(chromium fonts-liberation prometheus-alertmanager prometheus-blackbox-exporter systemd
                   restic borgbackup poppler-utils)
if [[ "${1:-}" == "--tests" ]]; then
  APT_PACKAGES+=("${TEST_APT_PACKAGES[@]}")
fi
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  if ! "$PYTHON" -m venv .venv 2>/dev/null; then
    apt-get install -y -q python3-venv >/dev/null && "$PYTHON" -m venv .venv
  fi
fi
# sushy-tools (the Redfish emulator, a test peer only) lives in a venv of its own: it pins Flask
# and bcrypt. The demo does not need it.
if [[ "${1:-}" == "--tests" && ! -x .venv-sushy/bin/sushy-emulator ]]; then
  "$PYTHON" -m venv .venv-sushy && .venv-sushy/bin/pip install -q "sushy-tools>=2,<3"
fi
# Reinstall only when pyproject.toml changed since the last install.
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [[ ! -f $stamp ]]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e ".[dev]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
