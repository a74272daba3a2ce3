"""The benchmarks are code too. Each `make bench` part that drives servers runs here once,
briefly, so a change that breaks one fails the suite instead of the next benchmark pass
(the overhead benchmark once lost track of the span relay that way). No speed is asserted:
the figures live in docs/BENCHMARKS.md."""

from __future__ import annotations

import pytest

from benchmarks import components, instructions, overhead, stack, versus
from benchmarks.inprocess import SETTINGS
from tests.servers import ROOT


def test_the_overhead_benchmark_measures_every_server_and_the_relay():
    result = overhead.measure(rounds=1, seconds=2, concurrency=2, slices=2)
    rates = ("on_rps", "sampled_rps", "ids_rps", "off_rps", "logs_rps", "off_again_rps")
    assert min(result[name] for name in rates) > 0
    # Paired in the round: the share on lost against off is the rates' own.
    low, mean, high = result["paired"]["on"]
    assert low == mean == high == 1 - result["on_rps"] / result["off_rps"]
    assert set(result["paired"]) == {"on", "on_against_logs", "sampled", "ids", "logs", "control"}
    # Worker CPU per request has one definition: what "on" adds is the difference of the two.
    cpu = result["worker_us_per_request"]
    assert min(cpu.values()) > 0
    assert abs(result["worker_us_added"][1] - (cpu["on"] - cpu["off"])) < 1e-6
    relay = result["relay_us_per_request"]
    assert relay["on"] > 0  # the relay was found, and it did work
    # Only the exporting servers have a relay (a 1 s run at 10% may not cost it a tick).
    assert relay["ids"] == relay["off"] == relay["logs"] == relay["off, again"] == 0
    overhead.report(result)  # every figure the report prints is in the result


def test_the_versus_benchmark_measures_both_checkouts_on_and_off():
    result = versus.measure(ROOT, rounds=1, seconds=1, concurrency=2)  # this one, twice
    assert set(result["rps"]) == {"this on", "this off", "other on", "other off"}
    assert min(result["rps"].values()) > 0
    cpu = result["worker_us_per_request"]
    assert min(cpu.values()) > 0
    assert abs(result["this_over_other_us"][1] - (cpu["this on"] - cpu["other on"])) < 1e-6
    versus.report(result)  # every figure the report prints is in the result


def test_the_stack_benchmark_measures_both_endpoints_through_nginx():
    result = stack.measure(rounds=1, seconds=1, connections=4)
    assert result["health_rps"] > 0 and result["query_rps"] > 0


def test_the_components_benchmark_measures_every_setting():
    # The relay's CPU is read in 10 ms ticks: at ~13 µs a request (session 12), 600 requests
    # crossed a tick only most of the time; 2,000 always do.
    result = components.measure(rounds=1, batch=2000)
    assert set(result["us_per_request"]) == set(SETTINGS)
    assert all(value > 0 for value in result["us_per_request"].values())
    assert result["relay_us_per_request"]["traces"] > 0  # the relay was measured, and worked


def test_the_instruction_count_counts_every_setting_under_callgrind():
    result = instructions.measure(requests=8)
    counted = result["per_request"]
    assert set(counted) == set(SETTINGS)
    for values in counted.values():
        assert set(values) == set(instructions.KINDS)
        assert all(value > 0 for value in values.values())
    # Counted in the window, not before or after it: a cached answer is some 100,000s of
    # instructions, and the telemetry's share shows.
    assert 100_000 < counted["off"]["instructions"] < 5_000_000
    assert counted["everything"]["instructions"] > counted["off"]["instructions"]
    # Off, counted first and again last, agrees: no window leaks into the next.
    assert abs(counted["off, again"]["instructions"] / counted["off"]["instructions"] - 1) < 0.03


def test_the_overheads_interval_is_students_t_over_the_rounds():
    low, mean, high = overhead.interval([0.1, 0.2, 0.3])
    # Two degrees of freedom: t = 4.303; the standard error is 0.1 / sqrt(3).
    assert mean == 0.2
    assert abs((high - mean) - 4.303 * 0.1 / 3**0.5) < 1e-4  # the table value, rounded
    assert abs((mean - low) - (high - mean)) < 1e-12
    assert overhead.interval([0.15]) == (0.15, 0.15, 0.15)


def test_the_overhead_benchmark_refuses_slices_wrk_cannot_run():
    with pytest.raises(ValueError, match="whole seconds"):
        overhead.run(lambda endpoint: {}, rounds=1, seconds=5, concurrency=1, slices=2)
