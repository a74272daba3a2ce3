"""Scenario names and the Locust user classes each runs (kept apart from the locustfile,
which imports Locust and with it gevent's monkey-patching)."""

SCENARIOS: dict[str, list[str]] = {
    "cache-hit": ["CacheHitUser"],
    "cache-miss": ["CacheMissUser"],
    "streaming": ["StreamingUser"],
    "ingest": ["IngestUser"],
    "mixed": ["CacheHitUser", "CacheMissUser", "StreamingUser", "IngestUser"],
}
