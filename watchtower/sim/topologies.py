"""Built-in topologies for the simulator, besides any config file: an MSP-like multi-site one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from watchtower.config import Config, parse_config


def msp(sites: int = 5, vms_per_site: int = 30) -> Config:
    """``sites`` customer sites of 40 targets each (with the defaults: 200): a core switch, three
    hypervisors (production and management NIC, an IPMI BMC), a NAS, ``vms_per_site`` VMs spread
    over the hypervisors on the NAS, and five services on VMs. Addresses are only ever simulated."""
    targets: dict[str, Any] = {}
    for s in range(1, sites + 1):
        prod, mgmt = f"10.213.{s}", f"10.213.{100 + s}"
        sw = f"s{s}-sw"
        targets[sw] = {"role": "network", "paths": [{"icmp": f"{prod}.2"}]}
        hvs = []
        for h in range(1, 4):
            name = f"s{s}-hv{h}"
            hvs.append(name)
            targets[name] = {
                "role": "hypervisor",
                "depends_on": [sw],
                "paths": [{"icmp": {"host": f"{prod}.1{h}", "name": "prod"}},
                          {"icmp": {"host": f"{mgmt}.1{h}", "name": "mgmt"}}],
                "bmc": {"ipmi": {"host": f"{mgmt}.11{h}", "username": "monitor", "password": "sim"}},
            }  # fmt: skip
        nas = f"s{s}-nas"
        targets[nas] = {
            "role": "storage",
            "depends_on": [sw],
            "paths": [{"icmp": f"{prod}.5"}, {"tcp": f"{prod}.5:3260"}],
        }
        for v in range(vms_per_site):
            ip = f"{prod}.{50 + v}"
            vm: dict[str, Any] = {
                "role": "vm",
                "runs_on": hvs[v % len(hvs)],
                "storage": [nas],
                "paths": [{"icmp": ip}, {"tcp": f"{ip}:443"}],
            }
            if v < 5:
                vm["service"] = {"name": f"service {s}.{v}", "rto": "4h", "rpo": "1h"}
            targets[f"s{s}-vm{v}"] = vm
        for k in range(5):
            targets[f"s{s}-app{k}"] = {
                "role": "service",
                "depends_on": [f"s{s}-vm{k}"],
                "paths": [{"http": {"url": f"http://{prod}.{50 + k}:8080/app{k}", "expect_status": 200}}],
            }
    raw = {
        "site": "msp",
        "state_dir": "/nonexistent/sim",
        "vantage": [{"icmp": "10.213.250.1"}, {"tcp": "10.213.250.2:53"}],
        "targets": targets,
        "notify": {
            "channels": [
                {
                    "name": "signal",
                    "url": "signal://127.0.0.1:1/+15550000001/+15550000002",
                    "tags": ["tier1"],
                },
                {"name": "mail", "url": "mailto://127.0.0.1:1?from=a@b.test&to=c@d.test", "tags": ["tier2"]},
            ],
            "escalation": [
                {"after": "0s", "notify": ["tier1"]},
                {"after": "15m", "notify": ["tier2"], "unless": "acknowledged"},
            ],
        },
    }
    return parse_config(raw, Path("."))


TOPOLOGIES = {"msp200": msp}
