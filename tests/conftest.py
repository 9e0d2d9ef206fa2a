"""Shared fixtures. Network safety: tests talk only to 127.0.0.0/8, ::1 and namespaces they create."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from watchtower.lab import DEMO, Lab


def netns_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = "wtt-probe-ns"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=10).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return ok


NETNS = netns_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if NETNS:
        return
    skip = pytest.mark.skip(reason="needs root and `ip netns` (network namespaces)")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_lab() -> Iterator[Lab]:
    """The demo site (config/demo.yaml's hosts), built once per run for every test that breaks it;
    each test repairs what it broke."""
    lab = Lab(DEMO)
    lab.up()
    try:
        yield lab
    finally:
        lab.down()
