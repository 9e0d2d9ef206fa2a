"""``watchtower lab ...``: bring the simulated site up/down, inspect it, break and repair hosts.

Kept separate from :mod:`watchtower.lab.site` so the project's CLI can delegate with one call,
``lab_main(argv)``, and so user errors become one-line messages (exit 2) instead of tracebacks.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from watchtower.lab.site import (
    BREAK_MODES,
    SITES,
    Lab,
    LabError,
    LabUsageError,
    SpecError,
    require_privileges,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

MODE_HELP = {
    "poweroff": "every link down (and the chassis OFF on its BMC, if it has one)",
    "linkdown": "eth0 down (a hypervisor's mgmt NIC keeps answering)",
    "mgmtdown": "eth1 (mgmt NIC) down, production keeps running",
    "loss": "drop PCT% of inbound IP on eth0 (default 100)",
    "icmpdrop": "drop echo-requests to the host (TCP keeps working)",
    "delay": "hold echo-requests to the host for MS ms (default 2000)",
    "hang": "OS hung: every NIC drops all it receives, chassis stays ON, nothing in the SEL",
    "psufail": "BMC hosts: critical SEL record (PS1 failure detected), chassis OFF, links down",
    "bmcdown": "BMC hosts: the BMC's NIC down (BMC unreachable, host unaffected)",
    "prodloss": "production side drops all it receives, the mgmt NIC (eth1) keeps answering",
}
"""One line per break mode, for the epilogs of ``--help`` and ``break --help``."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line (argparse's default prints usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def build_parser(prog: str = "watchtower lab") -> argparse.ArgumentParser:
    """The ``lab`` command line (exposed so the project CLI can show its help)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--site", choices=sorted(SITES), default=argparse.SUPPRESS, help="which site (default: demo)"
    )
    common.add_argument(
        "--run-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="state dir for PID files and logs (default: /run/watchtower-lab/PREFIX)",
    )
    modes = "\n".join(f"  {m:<9} {MODE_HELP.get(m, '')}" for m in BREAK_MODES)
    ap = _Parser(
        prog=prog,
        parents=[common],
        description="Simulated small-business site in network namespaces (needs root).",
        epilog=f"break modes (undo any of them with: repair HOST):\n{modes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    sub.add_parser("up", parents=[common], help="build the site (tears down leftovers first)")
    sub.add_parser("down", parents=[common], help="remove everything the site created")
    sub.add_parser("status", parents=[common], help="show hosts, links and injected faults")
    b = sub.add_parser(
        "break",
        parents=[common],
        help="inject a fault: break HOST MODE [ARG]",
        epilog=f"modes:\n{modes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("host")
    b.add_argument("mode", choices=BREAK_MODES, help="see below")
    b.add_argument("arg", nargs="?", help="loss: percent (default 100); delay: ms (default 2000)")
    r = sub.add_parser("repair", parents=[common], help="undo every fault on HOST")
    r.add_argument("host")
    sub.add_parser(
        "cut-monitor", parents=[common], help="cut the monitoring box off (all its links to the site down)"
    )
    sub.add_parser("restore-monitor", parents=[common], help="undo cut-monitor")
    return ap


def lab_main(argv: list[str]) -> int:
    """Run ``watchtower lab ARGV``; returns the exit code (0 ok, 1 operation failed, 2 user error)."""
    ap = build_parser()
    try:
        args = ap.parse_args(argv)
    except _UsageError as e:
        print(f"watchtower lab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help: return instead of exiting the caller's process
        return e.code if isinstance(e.code, int) else EXIT_OK
    spec = SITES[getattr(args, "site", "demo")]
    lab = Lab(spec, getattr(args, "run_dir", None))
    try:
        if args.cmd in ("break", "repair"):
            lab.ns(args.host)  # unknown host is a user error: report it before needing root
        require_privileges()
    except (LabError, SpecError) as e:
        print(f"watchtower lab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.cmd == "up":
            t0 = time.monotonic()
            lab.up()
            print(lab.status())
            bmcs = f", {len(spec.bmc_hosts())} BMCs" if spec.bmc_hosts() else ""
            print(f"lab {spec.prefix} is up ({len(spec.hosts)} hosts{bmcs}) in {time.monotonic() - t0:.1f}s")
        elif args.cmd == "down":
            lab.down()
            print(f"lab {spec.prefix} is down")
        elif args.cmd == "status":
            print(lab.status())
        elif args.cmd == "break":
            lab.break_host(args.host, args.mode, args.arg)
            print(f"{args.host}: {args.mode}{' ' + args.arg if args.arg else ''}")
        elif args.cmd == "repair":
            lab.repair(args.host)
            print(f"{args.host}: repaired")
        elif args.cmd == "cut-monitor":
            lab.cut_monitor()
            print("monitor cut off: every link from this box into the site is down")
        elif args.cmd == "restore-monitor":
            lab.restore_monitor()
            print("monitor links restored")
    except (SpecError, LabUsageError) as e:
        print(f"watchtower lab: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as e:
        print(f"watchtower lab: failed: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("watchtower lab: interrupted (run 'watchtower lab down' to clean up)", file=sys.stderr)
        return 130
    return EXIT_OK


def main() -> None:
    """``python -m watchtower.lab``."""
    sys.exit(lab_main(sys.argv[1:]))
