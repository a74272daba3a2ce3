"""Load from wrk (Debian's package): a C load generator, so the client's own CPU does not
eat into the server's share of this 2-core machine the way a Python client does."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# wrk's Lua hooks: POST the body, and print the totals as JSON at the end.
_SCRIPT = """
wrk.method = "{method}"
wrk.body = {body}
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read
    + summary.errors.write + summary.errors.timeout
  io.write(string.format(
    '{{"requests": %d, "errors": %d, "seconds": %f}}\\n',
    summary.requests, errors, summary.duration / 1e6))
end
"""


@dataclass
class WrkResult:
    requests: int
    errors: int
    rps: float


def wrk(
    url: str,
    seconds: float,
    connections: int,
    body: dict[str, object] | None = None,
) -> WrkResult:
    """`connections` keep-alive connections for `seconds`; a JSON `body` makes it a POST."""
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make system-deps`")
    method = "GET" if body is None else "POST"
    lua_body = "nil" if body is None else json.dumps(json.dumps(body))
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_SCRIPT.format(method=method, body=lua_body))
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",  # one thread: the rest of the machine is the servers'
                f"-c{connections}",
                f"-d{seconds:g}s",
                "--timeout",
                "10s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 60,
        ).stdout
    finally:
        Path(script.name).unlink()
    totals = json.loads(out.strip().splitlines()[-1])
    return WrkResult(
        totals["requests"],
        totals["errors"],
        totals["requests"] / totals["seconds"],
    )
