"""Many concurrent HTTP clients against a running server, each on its own keep-alive connection.

    python -m bench.load --url http://127.0.0.1:8090 --collection NAME [--clients 200] [--procs 1]
                         [--seconds 10] [--per-page 30]   (PB_LOAD_TOKEN: a superuser token)

Each client loops over ``GET /api/backups`` (superuser), ``GET /api/collections/<c>/records?page=N``
(a random page) and ``GET /api/health``, one request after the other (a closed loop: no think
time, so the server is kept saturated). ``tests/test_load.py`` runs the same workers during a
backup and a restore and splits the samples into phases by their start time.

Failures are classified, not retried, except one case: a request sent on a keep-alive connection
that has already served a response, which the server closed between two requests (uvicorn closes
idle connections when it shuts down for a restore's re-exec; the close and the next request can
cross on the wire). httpx reports that as ``RemoteProtocolError``/``ReadError``/``WriteError``;
the request is retried once on a new connection, counted in ``keepalive_closed``, and its latency
runs from the first attempt to the answer. The same errors on a fresh connection, any
``ConnectError`` (refused) and timeouts are failures.

A worker (``python -m bench.load worker``) runs ``--clients`` clients in one asyncio loop, prints
``ready`` once every client has had one answer, stops when its stdin closes (or says ``stop``) and
writes its samples as JSON to ``--out``. Times are ``time.monotonic()`` (CLOCK_MONOTONIC: the same
clock in every process of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from .compare import percentile

ROOT = Path(__file__).resolve().parent.parent
ENDPOINTS = ("backups", "records", "health")
HEALTH_BODY = {"message": "API is healthy.", "code": 200, "data": {}}
RETRIED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
TOKEN_ENV = "PB_LOAD_TOKEN"


# --- one worker process ---------------------------------------------------------------------------


def check_shape(endpoint: str, response: httpx.Response, page: int, per_page: int) -> tuple[str | None, int, int]:
    """``(what is wrong or None, totalItems, items on the page)`` of one answer (-1, -1 but for
    a records page). The number of items is not checked against ``totalItems``: the count and the
    page are two queries (as PocketBase's), so a write between them may shift the last page; the
    caller checks it where it knows no write happens."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]}", -1, -1
    try:
        body = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}", -1, -1
    if endpoint == "health":
        return (None if body == HEALTH_BODY else f"health body {body!r}"), -1, -1
    if endpoint == "backups":
        if not isinstance(body, list) or any(not isinstance(b, dict) or set(b) - {"pinned"} != {"key", "size", "modified"}
                                             or not isinstance(b["size"], int) for b in body):
            return f"backups body {str(body)[:200]}", -1, -1
        return None, -1, -1
    if not isinstance(body, dict) or set(body) != {"items", "page", "perPage", "totalItems", "totalPages"}:
        return f"records body keys {sorted(body) if isinstance(body, dict) else type(body).__name__}", -1, -1
    total, items = body["totalItems"], body["items"]
    if (not isinstance(total, int) or body["page"] != page or body["perPage"] != per_page
            or body["totalPages"] != math.ceil(total / per_page)):
        return f"records paging {body['page']}/{body['perPage']}/{body['totalPages']} for page {page}, total {total}", -1, -1
    if (not isinstance(items, list) or len(items) > per_page
            or any(not isinstance(item, dict) or len(item.get("id", "")) != 15 for item in items)):
        return f"records page {page} of {total}: {str(items)[:200]}", -1, -1
    return None, total, len(items)


class Worker:
    def __init__(self, url: str, token: str, collection: str, clients: int, pages: int, per_page: int,
                 timeout: float, seed: int, fresh: int = 0) -> None:
        self.url = url
        self.fresh = fresh  # the first ``fresh`` clients open a new connection for every request
        self.token = token
        self.collection = collection
        self.clients = clients
        self.pages = pages
        self.per_page = per_page
        self.timeout = timeout
        self.seed = seed
        self.stop = asyncio.Event()
        self.ready = 0
        self.ready_event = asyncio.Event()
        # (endpoint index, start, end, totalItems or -1, items on the page or -1, page, retried 0/1,
        #  fresh 0/1)
        self.samples: list[tuple[int, float, float, int, int, int, int, int]] = []
        # (endpoint, start, end, kind, message, client: "keep-alive" or "fresh")
        self.failures: list[tuple[str, float, float, str, str, str]] = []
        self.keepalive_closed: list[tuple[str, float, str]] = []  # (endpoint, when, error)
        self.connections = 0  # new connections opened (first one of each client included)

    async def client(self, index: int) -> None:
        rng = random.Random(f"{self.seed}:{index}")
        turn = index % len(ENDPOINTS)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        records = f"/api/collections/{self.collection}/records"
        first = True
        fresh = index < self.fresh
        close = {"Connection": "close"} if fresh else {}
        who = "fresh" if fresh else "keep-alive"
        async with httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits) as http:
            served = 0  # answers on the current connection (0: the next request opens a new one)
            while not self.stop.is_set():
                kind = turn % len(ENDPOINTS)
                endpoint = ENDPOINTS[kind]
                turn += 1
                page = rng.randint(1, self.pages)
                if endpoint == "backups":
                    path, params, headers = "/api/backups", None, {"Authorization": self.token, **close}
                elif endpoint == "records":
                    path, params, headers = records, {"page": page, "perPage": self.per_page}, close
                else:
                    path, params, headers = "/api/health", None, close
                started = time.monotonic()
                retried = 0
                while True:
                    if served == 0:
                        self.connections += 1
                    try:
                        response = await http.get(path, params=params, headers=headers)
                    except httpx.ConnectError as exc:
                        self.failures.append((endpoint, started, time.monotonic(), "connect", repr(exc), who))
                        served = 0
                        break
                    except RETRIED as exc:
                        if served > 0 and not retried:
                            self.keepalive_closed.append((endpoint, time.monotonic(), type(exc).__name__))
                            served, retried = 0, 1
                            continue
                        self.failures.append((endpoint, started, time.monotonic(),
                                              "reset" if retried else "fresh-connection", repr(exc), who))
                        served = 0
                        break
                    except httpx.HTTPError as exc:
                        self.failures.append((endpoint, started, time.monotonic(), type(exc).__name__, repr(exc), who))
                        served = 0
                        break
                    ended = time.monotonic()
                    served = 0 if response.headers.get("connection", "").lower() == "close" else served + 1
                    problem, total, count = check_shape(endpoint, response, page, self.per_page)
                    if problem is not None:
                        kind_of = "5xx" if response.status_code >= 500 else "shape"
                        self.failures.append((endpoint, started, ended, kind_of, problem, who))
                    else:
                        self.samples.append((kind, started, ended, total, count, page, retried, int(fresh)))
                    break
                if first:
                    first = False
                    self.ready += 1
                    if self.ready == self.clients:
                        self.ready_event.set()

    async def run(self, on_ready: Any, stop_when: Any) -> float:
        """Run the clients until ``stop_when`` (an awaitable) completes; returns the CPU seconds used."""
        cpu = time.process_time()
        tasks = [asyncio.create_task(self.client(i)) for i in range(self.clients)]
        waiter = asyncio.create_task(self.ready_event.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            on_ready()
        await stop_when
        self.stop.set()
        await asyncio.gather(*tasks)
        return time.process_time() - cpu

    def result(self, cpu_seconds: float, wall: tuple[float, float]) -> dict[str, Any]:
        return {"clients": self.clients, "cpu_s": round(cpu_seconds, 3), "wall": wall,
                "connections": self.connections, "samples": self.samples, "failures": self.failures,
                "keepalive_closed": self.keepalive_closed}


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def read() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                break
        loop.call_soon_threadsafe(done.set_result, None)

    threading.Thread(target=read, daemon=True).start()
    await done


def worker_main(args: argparse.Namespace) -> int:
    token = os.environ.get(TOKEN_ENV, "")
    worker = Worker(args.url, token, args.collection, args.clients + args.fresh, args.pages, args.per_page,
                    args.timeout, args.seed, args.fresh)

    def ready() -> None:
        print("ready", flush=True)

    began = time.monotonic()
    cpu = asyncio.run(worker.run(ready, _stdin_closed()))
    Path(args.out).write_text(json.dumps(worker.result(cpu, (began, time.monotonic()))))
    return 0


# --- several workers, from another process --------------------------------------------------------


class Load:
    """``procs`` worker processes sharing ``clients`` clients; ``start`` returns once every client
    has had an answer, ``stop`` collects the samples of all of them."""

    def __init__(self, url: str, token: str, collection: str, clients: int, procs: int, pages: int,
                 per_page: int = 30, timeout: float = 120, workdir: Path | None = None, fresh: int = 0) -> None:
        self.fresh = fresh  # more clients (in the first worker), opening a new connection per request
        self.url, self.token, self.collection = url, token, collection
        self.clients, self.procs = clients, max(1, min(procs, clients))
        self.pages, self.per_page, self.timeout = pages, per_page, timeout
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pb_load_"))
        self.processes: list[tuple[subprocess.Popen[str], Path]] = []

    def start(self, ready_timeout: float = 120) -> "Load":
        share = [self.clients // self.procs + (1 if i < self.clients % self.procs else 0) for i in range(self.procs)]
        for index, count in enumerate(share):
            out = self.workdir / f"load-{index}.json"
            command = [sys.executable, "-m", "bench.load", "worker", "--url", self.url, "--collection", self.collection,
                       "--clients", str(count), "--pages", str(self.pages), "--per-page", str(self.per_page),
                       "--timeout", str(self.timeout), "--seed", str(index), "--out", str(out),
                       "--fresh", str(self.fresh if index == 0 else 0)]
            process = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       env={**os.environ, TOKEN_ENV: self.token})
            self.processes.append((process, out))
        deadline = time.monotonic() + ready_timeout
        for process, _ in self.processes:
            line = process.stdout.readline() if process.stdout else ""  # blocks; the worker prints "ready"
            if line.strip() != "ready" or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"a load worker did not get ready (said {line!r}, exit {process.poll()})")
        return self

    def stop(self, timeout: float = 180) -> dict[str, Any]:
        """Stop every worker (they finish the request in flight) and merge what they measured."""
        for process, _ in self.processes:
            if process.stdin:
                process.stdin.write("stop\n")
                process.stdin.close()
        merged: dict[str, Any] = {"clients": 0, "procs": len(self.processes), "cpu_s": 0.0, "connections": 0,
                                  "samples": [], "failures": [], "keepalive_closed": [], "walls": []}
        for process, out in self.processes:
            process.wait(timeout)
            assert process.returncode == 0, f"a load worker exited {process.returncode}"
            result = json.loads(out.read_text())
            for key in ("clients", "cpu_s", "connections"):
                merged[key] += result[key]
            for key in ("samples", "failures", "keepalive_closed"):
                merged[key] += result[key]
            merged["walls"].append(result["wall"])
        self.processes = []
        return merged

    def kill(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.processes = []


# --- figures --------------------------------------------------------------------------------------


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def summarize(samples: list[list[Any]], since: float, until: float) -> dict[str, Any]:
    """Per endpoint (and all together): count, requests per second, p50, p99 and max latency (ms)
    of the answers to the requests started in ``[since, until)``."""
    figures: dict[str, Any] = {"seconds": round(until - since, 2)}
    within = [s for s in samples if since <= s[1] < until]
    for index, name in [*enumerate(ENDPOINTS), (None, "all")]:
        latencies = [s[2] - s[1] for s in within if index is None or s[0] == index]
        figures[name] = {"count": len(latencies),
                         "rps": round(len(latencies) / (until - since), 1) if until > since else None,
                         "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99)),
                         "max_ms": _ms(max(latencies) if latencies else None)}
    return figures


def longest_gap(samples: list[list[Any]], since: float, until: float) -> float:
    """The longest time in ``[since, until]`` during which no answer arrived at all (seconds)."""
    ends = sorted(s[2] for s in samples if since <= s[2] <= until)
    marks = [since, *ends, until]
    return max(b - a for a, b in zip(marks, marks[1:]))


def table(phases: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'phase':<16}{'endpoint':<10}{'count':>7}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"]
    for phase, figures in phases.items():
        for name in (*ENDPOINTS, "all"):
            f = figures[name]
            cells = [f"{v:>9.1f}" if v is not None else f"{'-':>9}" for v in (f["p50_ms"], f["p99_ms"], f["max_ms"])]
            lines.append(f"{phase:<16}{name:<10}{f['count']:>7}{(f['rps'] or 0):>8.0f}{''.join(cells)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", choices=("run", "worker"), default="run")
    parser.add_argument("--url", required=True)
    parser.add_argument("--collection", required=True)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--fresh", type=int, default=0,
                        help="more clients, each opening a new connection for every request")
    parser.add_argument("--pages", type=int, default=1)
    parser.add_argument("--per-page", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.mode == "worker":
        return worker_main(args)
    load = Load(args.url, os.environ.get(TOKEN_ENV, ""), args.collection, args.clients, args.procs, args.pages,
                args.per_page, args.timeout, fresh=args.fresh).start()
    began = time.monotonic()
    time.sleep(args.seconds)
    result = load.stop()
    figures = summarize(result["samples"], began, began + args.seconds)
    print(table({"load": figures}))
    print(f"failures {len(result['failures'])}, keep-alive closed {len(result['keepalive_closed'])}, "
          f"load generator CPU {result['cpu_s']:.1f} s over {args.seconds:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"figures": figures, "failures": result["failures"][:20]}, indent=2))
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
