"""facegan explore: wall time of each action, over HTTP and in-process, against the 200 ms budget.

    python benchmarks/bench_explore.py [--run RUN] [--n 50]

Starts ``facegan explore --port 0 --no-browser`` as a separate process (as a user runs it), then
times --n requests of each action that makes a new face -- POST /api/random, /api/redraw,
/api/transfer, /api/interpolate -- from request sent to the whole answer read (urllib, one
connection per request, as the server closes them). The same actions are then timed in this
process on an :class:`ExploreSession` of the same model (no HTTP, no JSON), side by side. Also:
the first request after start (does start-up warm up everything?) and the fit of an uploaded
mesh (not a "new face": it takes seconds by design).

Prints median and 95th percentile in ms, the 95th percentile as a fraction of the 200 ms budget,
the server's own "ms" field (the session's work on that request), the HTTP + JSON cost (per request:
client wall time minus the server's "ms"; median), and the load average before and after: on a
machine shared with other jobs the times depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np

from facegan.explore.session import ExploreSession
from facegan.device import idle_threads
from facegan.mesh.io import write_mesh

BUDGET_MS = 200.0


def start_server(run: str | None) -> tuple[subprocess.Popen, str]:
    """``facegan explore`` on a free port; returns (process, base URL) once it listens."""
    command = [sys.executable, "-m", "facegan", "explore", "--port", "0", "--no-browser"]
    if run:
        command += ["--run", run]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    for line in process.stdout:
        if line.startswith("facegan explore: http"):
            return process, line.split()[2].rstrip("/")
        if time.monotonic() > deadline:
            break
    process.kill()
    raise SystemExit(f"the server did not start: {' '.join(command)}")


def post(url: str, path: str, body: dict | bytes) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def timed(action: Callable[[int], object], n: int) -> tuple[np.ndarray, list]:
    """(wall ms of each of n calls action(i), their results)."""
    times, results = [], []
    for i in range(n):
        start = time.perf_counter()
        results.append(action(i))
        times.append((time.perf_counter() - start) * 1000)
    return np.array(times), results


def http_actions(url: str) -> dict[str, Callable[[int], dict]]:
    a, b = post(url, "/api/random", {"seed": 1})["id"], post(url, "/api/random", {"seed": 2})["id"]
    keep, modes = ("identity", "expression"), ("replace", "add")
    return {
        "random": lambda i: post(url, "/api/random", {}),
        "redraw": lambda i: post(url, "/api/redraw", {"face": a, "keep": keep[i % 2]}),
        "transfer": lambda i: post(url, "/api/transfer", {"target": a, "source": b, "mode": modes[i % 2]}),
        "interpolate": lambda i: post(url, "/api/interpolate", {"a": a, "b": b, "factor": "identity",
                                                                "t": (i % 21) / 20}),
    }


def session_actions(session: ExploreSession) -> dict[str, Callable[[int], object]]:
    a, b = session.random(seed=1).id, session.random(seed=2).id
    keep, modes = ("identity", "expression"), ("replace", "add")
    return {
        "random": lambda i: session.random(),
        "redraw": lambda i: session.redraw(a, keep[i % 2]),
        "transfer": lambda i: session.transfer(a, b, modes[i % 2]),
        "interpolate": lambda i: session.interpolate(a, b, "identity", (i % 21) / 20),
    }


def load_line() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="run folder or model file (default: the shipped model)")
    parser.add_argument("--n", type=int, default=50, help="requests per action")
    parser.add_argument("--fits", type=int, default=3, help="uploads fitted")
    args = parser.parse_args()

    print(f"## facegan explore: {args.n} requests per action, {os.cpu_count()} cores; before: {load_line()}")
    started = time.perf_counter()
    process, url = start_server(args.run)
    print(f"server {url} up in {time.perf_counter() - started:.1f} s (model loaded and warmed up)")
    try:
        start = time.perf_counter()
        first = post(url, "/api/random", {})
        print(f"first request after start: {(time.perf_counter() - start) * 1000:.0f} ms "
              f"(server {first['ms']:.0f} ms)")
        actions = http_actions(url)
        for action in actions.values():  # a few untimed calls: connection and allocator warm-up
            for i in range(3):
                action(i)
        over_http = {name: timed(action, args.n) for name, action in actions.items()}
        mesh = tempfile.NamedTemporaryFile(suffix=".obj", delete=False).name
        session = ExploreSession.open(args.run)
        write_mesh(mesh, session.random(seed=3).vertices, session.codec.template.triangles)
        body = Path(mesh).read_bytes()
        fits, _ = timed(lambda i: post(url, "/api/upload?name=scan.obj", body), args.fits)
        os.unlink(mesh)
    finally:
        process.terminate()
        process.wait(timeout=30)
    local = session_actions(session)
    for action in local.values():
        for i in range(3):
            action(i)
    in_process = {name: timed(action, args.n)[0] for name, action in local.items()}

    print(f"\ntorch threads for a new face: {idle_threads()} (cores the load average leaves idle)\n")
    print("| action | in-process median / p95 (ms) | HTTP median / p95 (ms) | server 'ms' median | "
          "HTTP + JSON cost, median (ms) | HTTP p95 / 200 ms budget |")
    print("|---|---|---|---|---|---|")
    for name, (times, answers) in over_http.items():
        local_times = in_process[name]
        server_ms = np.array([a["ms"] for a in answers])
        print(f"| {name} | {np.median(local_times):.0f} / {np.percentile(local_times, 95):.0f} | "
              f"{np.median(times):.0f} / {np.percentile(times, 95):.0f} | {np.median(server_ms):.0f} | "
              f"{np.median(times - server_ms):.0f} | {np.percentile(times, 95) / BUDGET_MS:.2f} |")
    print(f"\nfit of an uploaded OBJ ({len(body) / 1e6:.2f} MB, default FitOptions), {args.fits} uploads: "
          f"median {np.median(fits) / 1000:.2f} s, max {fits.max() / 1000:.2f} s")
    print(f"after: {load_line()}")


if __name__ == "__main__":
    main()
