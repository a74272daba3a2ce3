"""Command-line argument types shared by `python -m loadtest` and `python -m loadtest.oom`:
each refuses what would make a run meaningless, before any load is sent."""

from __future__ import annotations

import argparse
import re


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number >= 1")
    return int(text)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):  # NaN too: every comparison with it is false
        raise argparse.ArgumentTypeError(f"{text!r}: expected a fraction >= 0, like 0.1")
    return value


def duration(text: str) -> str:
    """Locust's own form (1h30m, 60s), kept as text for its command line."""
    if not re.fullmatch(r"(\d+h)?(\d+m)?(\d+s)?", text) or not text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a duration like 60s, 5m, 1h30m")
    if duration_seconds(text) == 0:  # Locust reads a zero run time as "no limit"
        raise argparse.ArgumentTypeError(f"{text!r}: a run must last at least 1s")
    return text


def duration_seconds(text: str) -> float:
    parts = re.findall(r"(\d+)([hms])", text)
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[unit] for n, unit in parts))
