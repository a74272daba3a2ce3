"""A run's raw figures (loadtest/hdr.py) into report.json, report.csv and an HTML page with
plots; SLO checks; the comparison of two reports."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from typing import Any

import yaml

from loadtest.hdr import DERIVED, PERCENTILES, decode, histogram, summarize

FIELDS = ["requests", "failures", "rps", *PERCENTILES, "max"]
SLO_KEYS = {f"{p}_ms": p for p in [*PERCENTILES, "max"]} | {
    "error_rate": "error_rate",
    "min_rps": "rps",
}


def build(raw: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """report.json's content: per entry and `total` (HTTP requests only), milliseconds."""
    started, stopped = raw.get("started"), raw.get("stopped")
    # No start: interrupted before the first user ran. No window, so no rate.
    seconds = max(stopped - started, 1e-9) if started and stopped else 0.0
    started = started or stopped or 0.0
    totals = {name: decode(text) for name, text in raw["totals"].items()}
    counts = raw.get("counts", {})
    endpoints = {}
    total_hist = histogram()
    total_requests = total_failures = 0
    for name in sorted(totals):
        count = counts.get(name, {})
        requests = int(count.get("requests", totals[name].get_total_count()))
        failures = int(count.get("failures", 0))
        figures = summarize(totals[name], requests, failures, seconds)
        derived = raw["kinds"].get(name) == DERIVED
        figures["kind"] = "measurement" if derived else "request"
        endpoints[name] = figures
        if not derived:
            total_hist.add(totals[name])
            total_requests += requests
            total_failures += failures
    total = summarize(total_hist, total_requests, total_failures, seconds)
    # Open model: sends dropped for being hopelessly late never reached the server, but a
    # client was waiting for each. They count against the run's error rate.
    total["dropped"] = int(raw.get("generator", {}).get("dropped", 0))
    return {
        **meta,
        "run_id": raw.get("run_id"),
        "started": started,
        "duration_s": round(seconds, 3),
        "locust_workers": raw.get("workers", 1),
        "generator": raw.get("generator", {}),
        "metrics_port": raw.get("metrics_port"),
        "breakpoint": raw.get("breakpoint"),
        "endpoints": endpoints,
        "total": total,
    }


# --- SLOs
def load_slo(path: Path) -> dict[str, dict[str, float]]:
    """`total: {p95_ms: 500, p99_ms: 1500, error_rate: 0.01}` and the same per endpoint
    name (`"POST /query [hit]": {p99_ms: 50}`). Unknown keys are an error, not ignored."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read SLO file {path}: {exc}") from None
    if not isinstance(loaded, dict) or not loaded:
        raise ValueError(f"{path}: expected a mapping of `total` or endpoint names to limits")
    slo: dict[str, dict[str, float]] = {}
    for scope, limits in loaded.items():
        if not isinstance(limits, dict):
            raise ValueError(f"{path}: {scope}: expected a mapping of limits")
        for key, value in limits.items():
            if key not in SLO_KEYS:
                raise ValueError(f"{path}: {scope}: unknown limit {key!r} ({', '.join(SLO_KEYS)})")
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{path}: {scope}.{key}: expected a number, got {value!r}")
        slo[str(scope)] = {k: float(v) for k, v in limits.items()}
    return slo


def breaches(report: dict[str, Any], slo: dict[str, dict[str, float]]) -> list[str]:
    found = []
    for scope, limits in slo.items():
        figures = report["total"] if scope == "total" else report["endpoints"].get(scope)
        if figures is None:
            found.append(f"{scope}: no such entry in this run")
            continue
        for key, limit in limits.items():
            if key == "error_rate":
                dropped = figures.get("dropped", 0)
                asked = figures["requests"] + dropped
                actual = (figures["failures"] + dropped) / asked if asked else 0
                if actual > limit:
                    found.append(f"{scope}: error rate {actual:.4f} > {limit}")
            elif key == "min_rps":
                if figures["rps"] < limit:
                    found.append(f"{scope}: {figures['rps']:.1f} req/s < {limit}")
            elif figures[SLO_KEYS[key]] is None:  # latencies of successes: there were none
                found.append(f"{scope}: {key[:-3]}: no request succeeded")
            elif figures[SLO_KEYS[key]] > limit:
                found.append(f"{scope}: {key[:-3]} {figures[SLO_KEYS[key]]:.1f} ms > {limit} ms")
    return found


# --- files
def write(report: dict[str, Any], raw: dict[str, Any], directory: Path) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with (directory / "report.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["endpoint", *FIELDS])
        for name, figures in [*report["endpoints"].items(), ("total", report["total"])]:
            writer.writerow([name, *(figures[f] for f in FIELDS)])
    _plots(raw, report, directory)
    (directory / "index.html").write_text(_html(report))


def _plots(raw: dict[str, Any], report: dict[str, Any], directory: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    started = report["started"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name in report["endpoints"]:
        decoded = [(at - started, decode(h[name])) for at, h, *_ in raw["intervals"] if name in h]
        points = [(x, hist) for x, hist in decoded if hist.get_total_count()]  # successes only
        if not points:
            continue
        xs = [x for x, _ in points]
        for percentile, style in ((50, "-"), (99, ":")):
            ys = [h.get_value_at_percentile(percentile) / 1000 for _, h in points]
            ax.plot(xs, ys, style, marker=".", label=f"{name} p{percentile}")
    ax.set_xlabel("seconds into the run")
    ax.set_yscale("log")
    _save(
        fig, ax, "Latency over time (per reporting interval)", directory / "latency_over_time.png"
    )

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, text in raw["totals"].items():
        hist = decode(text)
        levels = [50, 75, 90, 95, 99, 99.9, 99.99]
        ax.plot(
            [100 / (100 - p) for p in levels],
            [hist.get_value_at_percentile(p) / 1000 for p in levels],
            marker="o",
            label=name,
        )
    ax.set_xscale("log")
    ax.set_xticks([2, 4, 10, 20, 100, 1000, 10000])
    ax.set_xticklabels(["p50", "p75", "p90", "p95", "p99", "p99.9", "p99.99"])
    _save(fig, ax, "Latency by percentile (HDR, whole run)", directory / "percentiles.png")


def _save(fig: Any, ax: Any, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_ylabel("latency, ms")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _html(report: dict[str, Any]) -> str:
    rows = "".join(
        "<tr><td>"
        + html.escape(name)
        + "</td>"
        + "".join(f"<td>{'-' if figures[f] is None else figures[f]}</td>" for f in FIELDS)
        + "</tr>"
        for name, figures in [*report["endpoints"].items(), ("total", report["total"])]
    )
    head = "".join(f"<th>{f}</th>" for f in ["endpoint", *FIELDS])
    title = html.escape(f"Load test {report.get('run_id')} against {report.get('target')}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}table{{border-collapse:collapse}}tr:nth-child(even){{background:#f4f4f4}}</style>
</head><body>
<h1>{title}</h1>
<p>Scenario <b>{html.escape(str(report.get("scenario")))}</b>, {report.get("users")} users,
{report["duration_s"]} s. Latencies in milliseconds from HDR histograms of every request
(not Locust's rounded figures). The "first token" entry is a measurement inside a streamed
request and is not counted in the total.</p>
<table><tr>{head}</tr>{rows}</table>
<h2>Latency over time</h2><img src="latency_over_time.png" alt="latency over time">
<h2>Percentiles</h2><img src="percentiles.png" alt="latency by percentile">
</body></html>
"""


# --- comparison
def _figure(figures: dict[str, Any], key: str) -> float:
    if key == "error_rate":
        asked = figures["requests"] + figures.get("dropped", 0)
        return (figures["failures"] + figures.get("dropped", 0)) / asked if asked else 0.0
    value = figures[key]
    # No successful request, no latency: as bad as a latency can be.
    return float("inf") if value is None else float(value)


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> tuple[str, bool]:
    """A table of the two runs' figures; regressed if a percentile rose, or throughput fell,
    by more than `threshold` (a fraction), or failures appeared or their rate rose by
    more."""
    lines = [f"{'entry':40} {'figure':>8} {'old':>10} {'new':>10} {'change':>8}"]
    regressed = False
    scopes = [*old["endpoints"], *(e for e in new["endpoints"] if e not in old["endpoints"])]
    scopes.append("total")
    for scope in scopes:
        a = old["total"] if scope == "total" else old["endpoints"].get(scope)
        b = new["total"] if scope == "total" else new["endpoints"].get(scope)
        if a is None or b is None:
            lines.append(f"{scope:40} only in {'old' if b is None else 'new'} run")
            continue
        for key in ["rps", *PERCENTILES, "max", "error_rate"]:
            before, after = _figure(a, key), _figure(b, key)
            change = (after - before) / before if before else (0.0 if after == before else 1.0)
            worse = (
                change < -threshold
                if key == "rps"
                # A rate, not a count: runs of different lengths compare. Failures that
                # appear, or a rate that grows beyond the threshold, are a regression.
                else (after > 0 if before == 0 else change > threshold)
                if key == "error_rate"
                else change > threshold and key != "max"
            )
            regressed |= worse
            mark = "  WORSE" if worse else ""
            lines.append(
                f"{scope:40} {key:>8} {before:10.2f} {after:10.2f} {change * 100:+7.1f}%{mark}"
            )
    return "\n".join(lines), regressed
