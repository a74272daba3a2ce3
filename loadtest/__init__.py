"""The load-testing harness: Locust scenarios, HDR-recorded latencies, reports, SLO gates."""
