"""`python -m benchmarks.versus OTHER_CHECKOUT`: what observability costs in this checkout
and in another, side by side in one run.

A change to the telemetry moves its cost by a few µs a request, less than two runs of the
overhead benchmark land apart on this shared VM. So this runs the overhead benchmark's
"on" (everything, 100% traced and exported through the span relay) and "off" servers of
both checkouts in the same shuffled rounds, pinned the same way (benchmarks/overhead.py),
and prints each one's throughput and worker CPU per request. The other checkout runs with
this one's venv, model and corpus; its compiled modules must be built (copying in this
checkout's is enough if their sources are the same).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from benchmarks.overhead import OFF, added_us, everything_on, paired, run, shown, us_per_request
from tests.servers import ROOT


def measure(
    other: Path, rounds: int = 4, seconds: float = 8, concurrency: int = 4
) -> dict[str, Any]:
    checkouts = {"this": ROOT, "other": other.resolve()}
    figures = run(
        lambda endpoint: {
            f"{name} {setting}": (env, checkout)
            for name, checkout in checkouts.items()
            for setting, env in (("on", everything_on(endpoint)), ("off", OFF))
        },
        rounds,
        seconds,
        concurrency,
    )
    rates = figures["rates"]
    return {
        "rps": {name: statistics.mean(values) for name, values in rates.items()},
        "worker_us_per_request": us_per_request(figures["cpu"]),
        # Paired round by round, as benchmarks/overhead.py: (low, mean, high).
        "overhead": {name: paired(rates, f"{name} on", f"{name} off") for name in checkouts},
        "added_us": {
            name: added_us(figures["cpu"], f"{name} on", f"{name} off") for name in checkouts
        },
        # Everything on, this checkout's worker CPU per request over the other's.
        "this_over_other_us": added_us(figures["cpu"], "this on", "other on"),
        "checkouts": {name: str(path) for name, path in checkouts.items()},
        "rounds": rounds,
        "seconds": seconds,
    }


def report(result: dict[str, Any]) -> None:
    print(
        f"\nthis checkout against {result['checkouts']['other']}, cached /query, 1 worker, "
        f"{result['rounds']} shuffled rounds of {result['seconds']:.0f} s:"
    )
    for name, rps in result["rps"].items():
        print(f"  {name:9s} {rps:7.1f} req/s, {result['worker_us_per_request'][name]:5.1f} µs")
    for name in ("this", "other"):
        print(
            f"  {name}: on is {shown(result['overhead'][name])} fewer requests/s than off, "
            f"{shown(result['added_us'][name], '+.0f', ' µs')} of worker CPU"
        )
    this_over_other = shown(result["this_over_other_us"], "+.1f", " µs")
    print(f"  everything on, this against the other: {this_over_other} a request")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other checkout (a git worktree)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    if not (args.other / "api" / "__init__.py").is_file():
        parser.error(f"{args.other} is not a checkout of this project")
    report(measure(args.other, args.rounds, args.seconds))


if __name__ == "__main__":
    main()
