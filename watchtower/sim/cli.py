"""``watchtower sim``: many random fault sequences (or one script) against the real engine, scored."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import yaml

from watchtower.config import Config, load_config
from watchtower.sim.faults import FaultEvent, drop_group, load_script, random_script
from watchtower.sim.run import simulate
from watchtower.sim.score import Score, Totals, score
from watchtower.sim.topologies import TOPOLOGIES

_config: Config | None = None


def _load(source: str) -> Config:
    global _config
    if _config is None:
        _config = TOPOLOGIES[source[1:]]() if source.startswith("@") else load_config(source)
    return _config


def run_script(config: Config, events: list[FaultEvent], seed: int) -> Score:
    world, recording = simulate(config, events, seed)
    return score(config, world, recording)


def _warm(source: str) -> None:
    """A worker's start: the config, and the probe registry the monitor imports on first use, so
    the first sequence's CPU time is the sequence's."""
    from watchtower.probes import get_probe

    _load(source)
    get_probe("icmp")


def _one_seed(source: str, seed: int) -> tuple[int, Score, float]:
    config = _load(source)
    started = time.process_time()
    s = run_script(config, random_script(config, seed), seed)
    return seed, s, time.process_time() - started


def run_seeds(source: str, seeds: range, jobs: int) -> tuple[Totals, dict[int, Score], float]:
    """Score every seed's random fault sequence on ``source`` (a config file, or ``@topology``)
    in ``jobs`` processes. Returns the totals (with the CPU time the sequences took), each seed's
    score and the wall time."""
    started = time.monotonic()
    totals = Totals()
    scores: dict[int, Score] = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs), initializer=_warm, initargs=(source,)) as pool:
        for seed, s, cpu in pool.map(_one_seed, [source] * len(seeds), seeds, chunksize=4):
            totals.add(seed, s)
            totals.cpu += cpu
            scores[seed] = s
    return totals, scores, time.monotonic() - started


def throughput(totals: Totals, elapsed: float, jobs: int) -> str:
    """How fast the sequences ran, e.g. for choosing ``--seeds`` (the results do not depend on it)."""
    per = totals.cpu / totals.runs if totals.runs else 0.0
    jobs = max(1, jobs)
    return (
        f"{totals.runs} fault sequences in {elapsed:.0f} s ({jobs} process{'es' if jobs > 1 else ''}), "
        f"{per:.3g} s CPU per sequence"
    )


def minimise(config: Config, events: list[FaultEvent], seed: int) -> list[FaultEvent]:
    """Drop whole faults (with their repairs and acks) while the run still fails."""
    groups = sorted({e.group for e in events})
    for group in groups:
        fewer = drop_group(events, group)
        if fewer and not run_script(config, fewer, seed).ok:
            events = fewer
    return events


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--topology", choices=sorted(TOPOLOGIES), help="a built-in topology instead of -c")
    p.add_argument("--seeds", type=int, default=200, help="how many random fault sequences (default 200)")
    p.add_argument("--first-seed", type=int, default=1, help="the first seed (default 1)")
    p.add_argument("--seed", type=int, help="run this one seed and show its script and messages")
    p.add_argument("--script", metavar="FILE", help="run this fault script (YAML list of events)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    p.add_argument("--minimise", type=int, default=3, metavar="N",
                   help="shrink the first N failing seeds to a short fault script (default 3)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="the totals as JSON")


def cmd_sim(args: argparse.Namespace) -> int:
    source = f"@{args.topology}" if args.topology else args.config
    try:
        config = _load(source)
    except Exception as exc:  # ConfigError prints its problems; anything else is one line
        problems = getattr(exc, "problems", [str(exc)])
        for p in problems:
            print(p, file=sys.stderr)
        return 2
    if args.script or args.seed is not None:
        return _single(config, args)
    totals, scores, elapsed = run_seeds(
        source, range(args.first_seed, args.first_seed + args.seeds), args.jobs
    )
    if args.json:
        print(json.dumps({k: v for k, v in totals.rows()} | {"failing_seeds": totals.failing}, indent=2))
        # the results alone on stdout (two runs compare with diff); how fast, beside them
        print(f"watchtower sim: {throughput(totals, elapsed, args.jobs)}", file=sys.stderr)
    else:
        print(f"watchtower sim on {source.lstrip('@')}: {throughput(totals, elapsed, args.jobs)}\n")
        width = max(len(k) for k, _ in totals.rows())
        for k, v in totals.rows():
            print(f"  {k:<{width}}  {v}")
        for seed in totals.failing[:10]:
            print(f"\nseed {seed}: " + "; ".join(scores[seed].failures[:4]))
        for seed in totals.failing[: args.minimise]:
            events = minimise(config, random_script(config, seed), seed)
            print(f"\nseed {seed}, minimised (watchtower sim --seed {seed}; or save as a --script):")
            print(yaml.safe_dump([e.to_dict() for e in events], sort_keys=False, default_flow_style=None))
    return 0 if not totals.failing else 1


def _single(config: Config, args: argparse.Namespace) -> int:
    seed = args.seed if args.seed is not None else 1
    if args.script:
        try:
            with open(args.script) as f:
                events = load_script(yaml.safe_load(f), config)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            print(f"{args.script}: {exc}", file=sys.stderr)
            return 2
    else:
        events = random_script(config, seed)
    print("fault script:")
    print(yaml.safe_dump([e.to_dict() for e in events], sort_keys=False, default_flow_style=None))
    world, recording = simulate(config, events, seed)
    print("messages:")
    for m in recording.messages:
        cause = f" ({m.cause})" if m.cause else ""
        print(f"  {m.at:8.1f}s  {m.kind:10} {m.channel:18} #{m.incident} {m.scope} {m.root}{cause}")
    s = score(config, world, recording)
    print("\nverdict: " + ("right" if s.ok else "WRONG"))
    for failure in s.failures:
        print(f"  {failure}")
    out: dict[str, Any] = {"ok": s.ok, "failures": s.failures}
    if args.json:
        print(json.dumps(out))
    return 0 if s.ok else 1
