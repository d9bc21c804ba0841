"""This server against PocketBase 0.40.6 on the same data: backup, restore, upload, download.

    python -m bench.compare [--scale 1.0] [--seed 1] [--keep] [--out FILE] [--servers ours,pocketbase]
                            [--server-rev REV] [--timeout SECONDS]
    python -m bench.compare --show bench/results/compare.json

Our server runs from this working tree, or with ``--server-rev`` from ``server/`` of one commit
(exported with ``git archive``), e.g. to measure a commit while the working tree is being edited.

What it does, everything in one temporary directory (removed at the end unless ``--keep``):

1. Data (``generate``), the same rows and bytes for the same scale and seed. At scale 1: one
   collection of 1.2 million records of mixed text (a data.db of about 450 MB) and 200 files of
   500 KiB of random bytes (incompressible); ``--scale`` multiplies both counts. Each server
   (ours, then PocketBase) gets a superuser and the collection through its own API (same name,
   same fields); then, with the servers stopped, the rows go straight into the collection's table
   of our ``data.db`` (``executemany`` in big transactions), the files into
   ``storage/<collectionId>/<recordId>/<name>`` (the record's file field names them), and
   PocketBase's ``data.db`` gets the very same rows (``ATTACH`` + ``INSERT ... SELECT``) and a
   copy of the files.
2. For each server in turn, alone on the machine (one server process, this one's threads):
   - ``backup``: ``POST /api/backups {"name": "bench.zip"}``; PocketBase answers when the archive
     is complete, ours at once, and then ``GET /api/backups/status`` (every 50 ms) until no job
     runs and the last one ended ok. Meanwhile: the server's RSS (``VmRSS`` every 20 ms, and the
     kernel's ``VmHWM`` reset before the phase), a writer inserting a small record every 20 ms
     (``POST /api/collections/<c>/records`` as the superuser, one request at a time, the next one
     20 ms after the previous one started, or at once if it took longer) and a poller of
     ``GET /api/health`` every 10 ms on a keep-alive connection;
   - a record added after the backup (it must be gone after the restore);
   - ``upload``: the archive just made, streamed from disk as ``POST /api/backups/upload`` under
     another name; ``download``: that upload, ``GET /api/backups/{key}?token=...``, to /dev/null;
   - ``restore``: ``POST /api/backups/bench.zip/restore``, then, every 50 ms on a fresh connection
     whenever one breaks, until the server answers ``/api/health`` and serves the restored data:
     the record added after the backup is gone (404), the one added just before it and a
     generated one are there (200). Both servers re-execute themselves (same PID).
3. One table with both servers and their ratio (ours / PocketBase, with which direction is
   better), the machine's cores, and the JSON (``bench/results/compare.json``).

Absolute numbers depend on the machine, its disk and its load: only ratios are comparable between
runs. The load generators run in this process: on a machine with few cores they compete with the
server for CPU (the same way for both servers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

from .s3_memory import (
    MB,
    SUPERUSER_EMAIL,
    SUPERUSER_PASSWORD,
    Api,
    RssSampler,
    ServerProcess,
    TextMaker,
    _raise_exit,
    machine,
    proc_status,
    reset_peak,
    source_version,
    tail,
    venv_binary,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "compare.json"

ROWS = 1_200_000  # at scale 1
FILES = 200
FILE_SIZE = 500 << 10  # 500 KiB of random bytes each
COLLECTION = "bench_records"
FIELDS: list[dict[str, Any]] = [
    {"name": "title", "type": "text", "max": 300},
    {"name": "body", "type": "text", "max": 100_000},
    {"name": "meta", "type": "text", "max": 2_000},
    {"name": "attachment", "type": "file", "maxSelect": 1, "maxSize": 16 * MB},
    {"name": "created", "type": "autodate", "onCreate": True, "onUpdate": False},
    {"name": "updated", "type": "autodate", "onCreate": True, "onUpdate": True},
]
COLUMNS = ("id", "title", "body", "meta", "attachment", "created", "updated")
BACKUP_NAME = "bench.zip"
UPLOAD_NAME = "bench_upload.zip"

WRITE_INTERVAL = 0.02
HEALTH_INTERVAL = 0.01
STATUS_POLL = 0.01
RESTORE_POLL = 0.05
SETTLE_SECONDS = 1.0
DEFAULT_TIMEOUT = 1800.0  # of each phase, seconds
TIE = 0.02  # ratios within 2% of 1: neither wins

OURS, PB = "ours", "pocketbase"
LABELS = {OURS: "ours", PB: "PocketBase"}

NOTE = ("Only ratios (ours / PocketBase) are comparable between runs: absolute numbers depend on the machine, "
        "its disk, its load and the library versions.")


class BenchError(RuntimeError):
    """A failure with a message meant for the reader (which server, what, the log's tail)."""


# --- data --------------------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_FILE_STEMS = ("scan", "photo", "report", "export", "invoice", "audio_take", "video_clip", "archive", "dump", "img")
_FILE_EXTS = (".bin", ".jpg", ".png", ".pdf", ".dat", ".mp4")
_KINDS = ("note", "comment", "paragraph", "article")
# Sentences per body, by kind (about 95 characters each): mostly short notes, a few long articles.
_KIND_WEIGHTS = (0.6, 0.27, 0.11, 0.02)
_KIND_SENTENCES = {"note": (1, 1), "comment": (1, 2), "paragraph": (2, 5), "article": (5, 16)}


@dataclass
class Dataset:
    collection: str
    rows: int = 0
    text_bytes: int = 0  # of the rows' values
    files: int = 0
    file_bytes: int = 0
    db_bytes: dict[str, int] = field(default_factory=dict)  # data.db of each server
    collection_ids: dict[str, str] = field(default_factory=dict)
    text_zlib1_ratio: float = 0.0
    sample_ids: list[str] = field(default_factory=list)  # generated records, checked after a restore
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return self.text_bytes + self.file_bytes


def counts(scale: float) -> tuple[int, int]:
    rows = max(1, round(ROWS * scale))
    return rows, min(rows, max(1, round(FILES * scale)))


def write_rows(db_path: Path, table: str, rows: int, files: int, seed: int, storage: Path,
               batch: int = 20_000) -> Dataset:
    """Insert ``rows`` records into ``table`` of ``db_path`` (the server stopped) and write ``files``
    files of random bytes for evenly spread records into ``storage/<recordId>/``."""
    dataset = Dataset(table, rows=rows)
    text_rng, id_rng, file_rng = (random.Random(f"compare:{seed}:{what}") for what in ("text", "ids", "files"))
    maker = TextMaker(text_rng)
    sentences, words, cum = maker.sentences, maker.words, maker.cum
    choices, randint, rnd = text_rng.choices, text_rng.randint, text_rng.random
    every = rows // files
    quoted = '"' + table.replace('"', '""') + '"'
    insert = f"INSERT INTO {quoted} ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)})"
    taken: set[str] = set()
    sample = bytearray()
    clock = datetime(2024, 1, 1, tzinfo=timezone.utc)
    step = timedelta(seconds=23)
    kinds = text_rng.choices(_KINDS, weights=_KIND_WEIGHTS, k=rows)
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")  # the bulk insert goes straight into the file
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB
        pending: list[tuple[str, ...]] = []
        conn.execute("BEGIN")
        for index in range(rows):
            while True:
                record_id = "".join(id_rng.choices(_ALNUM, k=15))
                if record_id not in taken:
                    taken.add(record_id)
                    break
            title = " ".join(choices(words, cum_weights=cum, k=randint(2, 10))).capitalize()
            low, high = _KIND_SENTENCES[kinds[index]]
            picked = choices(sentences, k=randint(low, high))
            body = "\n\n".join(" ".join(picked[i:i + 5]) for i in range(0, len(picked), 5))
            roll = rnd()
            if roll < 0.5:  # a small JSON document, as a text
                meta = json.dumps({"ref": f"{text_rng.getrandbits(48):012x}", "seq": index,
                                   "score": round(rnd() * 100, 2), "tags": choices(words, cum_weights=cum, k=randint(0, 4)),
                                   "active": roll < 0.4}, separators=(",", ":"))
            elif roll < 0.8:
                meta = f"{kinds[index]}:{text_rng.getrandbits(32):08x}"
            else:
                meta = ""
            attachment = ""
            if index % every == 0 and dataset.files < files:
                attachment = (f"{file_rng.choice(_FILE_STEMS)}_{''.join(file_rng.choices(_ALNUM, k=10))}"
                              f"{file_rng.choice(_FILE_EXTS)}")
                directory = storage / record_id
                directory.mkdir(parents=True)
                (directory / attachment).write_bytes(file_rng.randbytes(FILE_SIZE))
                dataset.files += 1
                dataset.file_bytes += FILE_SIZE
            clock += step
            stamp = clock.strftime("%Y-%m-%d %H:%M:%S.") + f"{index % 1000:03d}Z"
            pending.append((record_id, title, body, meta, attachment, stamp, stamp))
            dataset.text_bytes += 15 + len(title) + len(body) + len(meta) + len(attachment) + 48
            if len(sample) < 4 * MB:
                sample += f"{title}\x00{body}\x00{meta}\x00".encode()
            if index in (0, rows // 2, rows - 1):
                dataset.sample_ids.append(record_id)
            if len(pending) >= batch:
                conn.executemany(insert, pending)
                pending.clear()
                if index % 200_000 < batch:
                    conn.execute("COMMIT")
                    conn.execute("BEGIN")
        if pending:
            conn.executemany(insert, pending)
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")  # as the servers keep it
    finally:
        conn.close()
    dataset.text_zlib1_ratio = round(len(sample) / max(1, len(zlib.compress(bytes(sample), 1))), 2)
    return dataset


def copy_rows(source_db: Path, target_db: Path, table: str) -> int:
    """The rows of ``table`` in ``source_db`` into the same table of ``target_db`` (by column name)."""
    quoted = '"' + table.replace('"', '""') + '"'
    names = ", ".join(COLUMNS)
    conn = sqlite3.connect(target_db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("ATTACH DATABASE ? AS source", (str(source_db),))
        conn.execute("BEGIN")
        cursor = conn.execute(f"INSERT INTO main.{quoted} ({names}) SELECT {names} FROM source.{quoted} ORDER BY rowid")
        copied = cursor.rowcount
        conn.execute("COMMIT")
        conn.execute("DETACH DATABASE source")
        conn.execute("PRAGMA journal_mode = WAL")
    finally:
        conn.close()
    return copied


def copy_tree(source: Path, target: Path) -> None:
    """The files under ``source`` into ``target`` (real copies: the servers may move or delete them)."""
    for directory, _dirs, names in os.walk(source):
        relative = Path(directory).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(Path(directory) / name, target / relative / name)


# --- servers -----------------------------------------------------------------------------------


class PocketBaseProcess(ServerProcess):
    """``pocketbase serve`` over ``data_dir`` on a free loopback port (its migrations and hooks
    directories next to it); the same interface as ``ServerProcess``."""

    def __init__(self, data_dir: Path, log_path: Path, port: int | None = None) -> None:
        super().__init__(data_dir, log_path, port, cwd=data_dir.parent)

    @staticmethod
    def binary() -> str:
        return venv_binary("pocketbase")

    def command(self) -> list[str]:
        return [self.binary(), "serve", "--http", f"127.0.0.1:{self.port}", "--dir", str(self.data_dir),
                "--migrationsDir", str(self.cwd / "pb_migrations"), "--hooksDir", str(self.cwd / "pb_hooks")]

    def upsert_superuser(self) -> None:
        result = subprocess.run([self.binary(), "superuser", "upsert", SUPERUSER_EMAIL, SUPERUSER_PASSWORD,
                                 "--dir", str(self.data_dir)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"pocketbase superuser upsert failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


class OurServer(ServerProcess):
    """``python -m server serve`` run from ``source`` (a directory holding the ``server`` package:
    this repository, or an export of one commit)."""

    def __init__(self, data_dir: Path, log_path: Path, source: Path = ROOT) -> None:
        super().__init__(data_dir, log_path, cwd=source)
        self.source = source

    def upsert_superuser(self) -> None:
        result = subprocess.run([sys.executable, "-m", "server", "superuser", "upsert", SUPERUSER_EMAIL,
                                 SUPERUSER_PASSWORD, "--dir", str(self.data_dir)],
                                cwd=self.source, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise BenchError(f"superuser upsert failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


Server = OurServer | PocketBaseProcess
SOURCE = ROOT  # where our server runs from (``--server-rev`` exports a commit elsewhere)


def make_server(kind: str, data_dir: Path, log_path: Path) -> Server:
    return OurServer(data_dir, log_path, SOURCE) if kind == OURS else PocketBaseProcess(data_dir, log_path)


def create_collection(kind: str, data_dir: Path, log_path: Path) -> dict[str, Any]:
    """A superuser and the benchmark's collection, through the API of a server started for it."""
    server = make_server(kind, data_dir, log_path)
    server.upsert_superuser()
    with server:
        api = Api(server.url)
        try:
            return api.create_collection(COLLECTION, FIELDS)
        finally:
            api.close()


def generate(work: Path, kinds: list[str], scale: float, seed: int) -> tuple[Dataset, dict[str, Path]]:
    """A data directory per server (``work/<kind>/pb_data``) with the same collection, rows and files."""
    started = time.perf_counter()
    rows, files = counts(scale)
    dirs = {kind: work / kind / "pb_data" for kind in kinds}
    collections = {}
    for kind, data_dir in dirs.items():
        data_dir.mkdir(parents=True)
        collections[kind] = create_collection(kind, data_dir, work / kind / "setup.log")
        print(f"  {LABELS[kind]}: collection {collections[kind]['name']} ({collections[kind]['id']}) created "
              f"through the API", flush=True)
    first, *others = kinds
    t = time.perf_counter()
    dataset = write_rows(dirs[first] / "data.db", COLLECTION, rows, files, seed,
                         dirs[first] / "storage" / collections[first]["id"])
    print(f"  {LABELS[first]}: {rows} rows and {dataset.files} files written in {time.perf_counter() - t:.1f} s", flush=True)
    for kind in others:
        t = time.perf_counter()
        copied = copy_rows(dirs[first] / "data.db", dirs[kind] / "data.db", COLLECTION)
        if copied != rows:
            raise BenchError(f"{LABELS[kind]}: {copied} rows copied, not {rows}")
        copy_tree(dirs[first] / "storage" / collections[first]["id"], dirs[kind] / "storage" / collections[kind]["id"])
        print(f"  {LABELS[kind]}: the same rows and files copied in {time.perf_counter() - t:.1f} s", flush=True)
    for kind, data_dir in dirs.items():
        dataset.db_bytes[kind] = (data_dir / "data.db").stat().st_size
        dataset.collection_ids[kind] = collections[kind]["id"]
    os.sync()  # the written data on disk before anything is measured
    dataset.seconds = round(time.perf_counter() - started, 1)
    return dataset, dirs


# --- the machine's limit ------------------------------------------------------------------------

LIMIT_SAMPLE = 64 << 20  # bytes of data.db deflated (and of files copied) to measure the machine


def machine_limit(data_dir: Path, workers: int | None = None) -> dict[str, Any]:
    """The fastest this machine could write our backup of ``data_dir``: the bytes to deflate (the
    databases) divided by the ISA-L throughput of all its cores on a sample of data.db (1 MiB
    chunks, level 2, as the server's writer: ``server.backups.archive.COMPRESS_LEVEL``), plus the
    stored bytes (the incompressible files) at the speed of a plain copy (read, write) on this disk."""
    from concurrent.futures import ThreadPoolExecutor

    from isal import isal_zlib

    from server.backups.archive import COMPRESS_LEVEL

    workers = workers or len(os.sched_getaffinity(0))
    chunk = 1 << 20
    with open(data_dir / "data.db", "rb") as handle:
        sample = handle.read(LIMIT_SAMPLE)
    pieces = [sample[i:i + chunk] for i in range(0, len(sample), chunk)]

    def deflate(piece: bytes) -> int:
        compressor = isal_zlib.compressobj(COMPRESS_LEVEL, isal_zlib.DEFLATED, -15)
        return len(compressor.compress(piece)) + len(compressor.flush(isal_zlib.Z_SYNC_FLUSH))

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(deflate, pieces[:workers]))  # warm up
        started = time.perf_counter()
        list(pool.map(deflate, pieces))
        deflate_s = time.perf_counter() - started
    deflate_bps = len(sample) / deflate_s

    files = sorted(p for p in (data_dir / "storage").rglob("*") if p.is_file())
    copied, started = 0, time.perf_counter()
    target = data_dir.parent / "limit_copy.bin"
    with open(target, "wb") as out:
        for path in files:
            with open(path, "rb") as source:
                while block := source.read(chunk):
                    out.write(block)
                    copied += len(block)
            if copied >= LIMIT_SAMPLE:
                break
        out.flush()
        os.fsync(out.fileno())
    copy_s = time.perf_counter() - started
    target.unlink()
    copy_bps = copied / copy_s if copied else float("inf")

    db_bytes = sum((data_dir / name).stat().st_size for name in ("data.db", "auxiliary.db") if (data_dir / name).exists())
    file_bytes = sum(path.stat().st_size for path in files)
    seconds = db_bytes / deflate_bps + (file_bytes / copy_bps if copied else 0.0)
    return {"seconds": round(seconds, 3), "workers": workers, "deflate_mb_s": round(deflate_bps / MB, 1),
            "copy_mb_s": round(copy_bps / MB, 1), "deflated_bytes": db_bytes, "stored_bytes": file_bytes}


# --- measuring ---------------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def proc_counters(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) and I/O counters of ``pid`` (they survive an exec)."""
    found: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        found["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/io") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key in ("rchar", "wchar", "read_bytes", "write_bytes"):
                    found[key] = int(value)
    except (OSError, ValueError):
        pass
    return found


def counters_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: round(after[key] - before[key], 2) for key in before if key in after}


class Load(threading.Thread):
    """Sends one request after another (``send``) at most every ``interval`` seconds on one
    keep-alive connection and keeps (start, latency, status) of each; started with ``begin``,
    stopped with ``end`` (which waits for the request in flight)."""

    def __init__(self, name: str, url: str, interval: float, send: Callable[[httpx.Client, int], httpx.Response],
                 headers: dict[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(name=name, daemon=True)
        self.url = url
        self.interval = interval
        self.send = send
        self.headers = headers or {}
        self.timeout = timeout
        self.samples: list[tuple[float, float, int]] = []  # (start, latency, status; 0 = transport error)
        self.errors: list[str] = []
        self._warm = threading.Event()
        self._halt = threading.Event()

    def begin(self) -> "Load":
        self.start()
        if not self._warm.wait(30):
            raise BenchError(f"{self.name}: the first request did not complete")
        return self

    def end(self) -> "Load":
        self._halt.set()
        self.join(self.timeout + 10)
        return self

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=self.timeout) as client:
            count = 0
            try:
                self.send(client, -1)  # opens the connection; not measured
            except httpx.HTTPError as exc:
                self.errors.append(f"warm-up: {exc!r}")
            self._warm.set()
            next_at = time.perf_counter()
            while not self._halt.is_set():
                started = time.perf_counter()
                try:
                    status = self.send(client, count).status_code
                except httpx.HTTPError as exc:
                    status = 0
                    if len(self.errors) < 20:
                        self.errors.append(repr(exc))
                self.samples.append((started, time.perf_counter() - started, status))
                count += 1
                next_at = max(next_at + self.interval, time.perf_counter())
                self._halt.wait(max(0.0, next_at - time.perf_counter()))

    def summary(self, since: float, until: float, ok: int = 200) -> dict[str, Any]:
        """Latencies (ms) of the requests started between ``since`` and ``until`` (perf_counter)."""
        within = [(lat, status) for start, lat, status in self.samples if since <= start <= until]
        latencies = [lat * 1000 for lat, _ in within]
        return {"requests": len(within), "ok": sum(1 for _, status in within if status == ok),
                "failed": sum(1 for _, status in within if status != ok),
                "p50_ms": _round(percentile(latencies, 50)), "p99_ms": _round(percentile(latencies, 99)),
                "max_ms": _round(max(latencies) if latencies else None), "errors": self.errors[:5]}


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class Measured:
    """What a phase measured of the server process."""

    seconds: float
    baseline_rss: int
    peak_rss: int  # sampled every 20 ms
    vm_hwm: int | None  # the kernel's peak since the reset before the phase (None: cannot reset, or exec'd)
    counters: dict[str, float]  # CPU seconds and I/O of the server during the phase

    @property
    def peak(self) -> int:
        return max(self.peak_rss, self.vm_hwm or 0)


@contextlib.contextmanager
def watching(pid: int, use_hwm: bool = True):  # type: ignore[no-untyped-def]
    """Measure ``pid`` over the ``with`` block; the block sets ``box["seconds"]`` (else: wall time)."""
    os.sync()
    time.sleep(SETTLE_SECONDS)
    baseline = proc_status(pid)["VmRSS"]
    can_reset = use_hwm and reset_peak(pid)
    before = proc_counters(pid)
    sampler = RssSampler(pid).start()
    box: dict[str, Any] = {}
    started = time.perf_counter()
    try:
        yield box
    finally:
        seconds = box.get("seconds", time.perf_counter() - started)
        sampler.stop()
    hwm = None
    if can_reset:
        try:
            hwm = proc_status(pid)["VmHWM"]
        except OSError:
            pass
    box["measured"] = Measured(seconds, baseline, sampler.peak_rss, hwm, counters_delta(before, proc_counters(pid)))


class Client:
    """The benchmark's calls on one server (ours or PocketBase: the routes are the same)."""

    def __init__(self, kind: str, server: Server, timeout: float) -> None:
        self.kind = kind
        self.server = server
        self.timeout = timeout
        self.api = Api(server.url)
        self.api.http.timeout = httpx.Timeout(60, read=timeout)

    @property
    def token(self) -> str:
        return str(self.api.http.headers["Authorization"])

    def close(self) -> None:
        self.api.close()

    def add_record(self, title: str) -> str:
        response = self.api.http.post(f"/api/collections/{COLLECTION}/records",
                                      json={"title": title, "body": f"{title}: a marker of the benchmark", "meta": ""})
        return Api._check(response, f"add the record {title!r}", 200).json()["id"]

    def backup(self, name: str) -> None:
        """Create the backup ``name`` and return once it is complete (ours: polls the status)."""
        response = self.api.http.post("/api/backups", json={"name": name})
        Api._check(response, "start the backup", 204)
        if self.kind == PB:
            return  # PocketBase answers when the archive is complete
        deadline = time.monotonic() + self.timeout
        while True:
            status = Api._check(self.api.http.get("/api/backups/status"), "backup status", 200).json()
            if status.get("active") is None:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the backup did not end within {self.timeout:.0f} s")
            time.sleep(STATUS_POLL)
        last = status.get("last") or {}
        if last.get("key") != name or not last.get("ok"):
            raise BenchError(f"the backup failed: {last}")

    def restore(self, name: str, gone: str, present: list[str], body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Restore ``name`` (``body``: e.g. an encrypted backup's identity); returns when the server
        answers with the restored data (``gone`` 404, ``present`` 200), with the timeline of what
        the poller saw."""
        Api._check(self.api.http.post(f"/api/backups/{name}/restore", **({"json": body} if body else {})),
                   "start the restore", 204)
        started = time.perf_counter()
        deadline = started + self.timeout
        seen: dict[str, Any] = {"last_old_s": None, "first_failure_s": None, "failures": 0, "longest_request_s": 0.0}
        headers = {"Authorization": self.token}
        poller = httpx.Client(base_url=self.server.url, headers=headers, timeout=httpx.Timeout(60, connect=2))
        try:
            while True:
                if time.perf_counter() > deadline:
                    raise BenchError(f"the restored data was not served within {self.timeout:.0f} s ({seen})")
                process = self.server.process
                if process is None or process.poll() is not None:
                    raise BenchError(f"the server exited during the restore:\n{tail(self.server.log_path)}")
                asked = time.perf_counter()
                try:
                    health = poller.get("/api/health")
                    states = [poller.get(f"/api/collections/{COLLECTION}/records/{record_id}").status_code
                              for record_id in (gone, *present)]
                except httpx.TransportError:
                    seen["failures"] += 1
                    if seen["first_failure_s"] is None:
                        seen["first_failure_s"] = round(asked - started, 3)
                    poller.close()
                    poller = httpx.Client(base_url=self.server.url, headers=headers,
                                          timeout=httpx.Timeout(60, connect=2))
                    time.sleep(RESTORE_POLL)
                    continue
                now = time.perf_counter()
                seen["longest_request_s"] = round(max(seen["longest_request_s"], now - asked), 3)
                seen["last_states"] = [health.status_code, *states]
                if 401 in states:  # a token of the old data: log in again
                    self.api.close()
                    self.api = Api(self.server.url)
                    headers = {"Authorization": self.token}
                    poller.headers.update(headers)
                    time.sleep(RESTORE_POLL)
                    continue
                if health.status_code == 200 and states[0] == 200:
                    seen["last_old_s"] = round(now - started, 3)  # still the data from before the restore
                elif health.status_code == 200 and states[0] == 404 and all(s == 200 for s in states[1:]):
                    seen["done_s"] = round(now - started, 3)
                    return seen
                time.sleep(RESTORE_POLL)
        finally:
            poller.close()

    def backups(self) -> dict[str, int]:
        return self.api.backups()

    def wait_idle(self) -> float:
        """Poll ours until no job runs (the safety copy after a restore); when that was, perf_counter."""
        deadline = time.monotonic() + self.timeout
        while True:
            response = self.api.http.get("/api/backups/status")
            if response.status_code == 401:
                self.api.close()
                self.api = Api(self.server.url)
                continue
            if Api._check(response, "backup status", 200).json().get("active") is None:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchError(f"a job still ran {self.timeout:.0f} s after the restore")
            time.sleep(STATUS_POLL)


def run_server(kind: str, data_dir: Path, dataset: Dataset, timeout: float) -> dict[str, Any]:
    """All phases against one server; returns its metrics."""
    log_path = data_dir.parent / "server.log"
    server = make_server(kind, data_dir, log_path)
    result: dict[str, Any] = {"server": kind}
    with contextlib.ExitStack() as stack:
        server.start(timeout=120)
        stack.callback(server.stop)
        client = Client(kind, server, timeout)
        stack.callback(lambda: client.close())
        pid = server.pid
        result["pid"] = pid
        result["rss_after_start_mb"] = round(proc_status(pid)["VmRSS"] / MB, 1)
        result["vm_hwm_reset"] = reset_peak(pid)
        try:
            before = client.add_record("before the backup")

            # backup, with a writer and a health poller
            headers = {"Authorization": client.token}
            body = {"body": "a record written during the backup", "meta": ""}
            writer = Load(f"writer-{kind}", server.url, WRITE_INTERVAL,
                          lambda http, n: http.post(f"/api/collections/{COLLECTION}/records",
                                                    json={**body, "title": f"write {n}"}),
                          headers, timeout)
            health = Load(f"health-{kind}", server.url, HEALTH_INTERVAL, lambda http, n: http.get("/api/health"),
                          timeout=timeout)
            print(f"  {LABELS[kind]}: backup ...", flush=True)
            with watching(pid) as box:
                writer.begin()
                health.begin()
                try:
                    started = time.perf_counter()
                    client.backup(BACKUP_NAME)
                    ended = time.perf_counter()
                    box["seconds"] = ended - started
                finally:
                    writer.end()
                    health.end()
            backup: Measured = box["measured"]
            size = client.backups().get(BACKUP_NAME)
            if not size:
                raise BenchError(f"the backup {BACKUP_NAME} is not listed")
            result["backup"] = {"seconds": round(backup.seconds, 2), "archive_bytes": size,
                                "baseline_rss_mb": round(backup.baseline_rss / MB, 1),
                                "peak_rss_sampled_mb": round(backup.peak_rss / MB, 1),
                                "vm_hwm_mb": None if backup.vm_hwm is None else round(backup.vm_hwm / MB, 1),
                                "peak_rss_mb": round(backup.peak / MB, 1), "server": backup.counters,
                                "writer": writer.summary(started, ended), "health": health.summary(started, ended)}
            print(f"  {LABELS[kind]}: backup {backup.seconds:.1f} s, {size / MB:.1f} MB, peak RSS "
                  f"{backup.peak / MB:.1f} MB, writer max {result['backup']['writer']['max_ms']} ms", flush=True)

            after = client.add_record("after the backup")

            # upload (the archive just made, from outside pb_data) and download
            source = data_dir.parent / "upload_source.zip"
            try:
                os.link(data_dir / "backups" / BACKUP_NAME, source)
            except OSError:
                shutil.copyfile(data_dir / "backups" / BACKUP_NAME, source)
            with watching(pid) as box:
                client.api.upload(source, UPLOAD_NAME)
            upload: Measured = box["measured"]
            result["upload"] = {"seconds": round(upload.seconds, 2), "bytes": size,
                                "mb_per_s": round(size / MB / upload.seconds, 1),
                                "peak_rss_mb": round(upload.peak / MB, 1), "server": upload.counters}
            with watching(pid) as box:
                received, _ = client.api.download(UPLOAD_NAME)
            download: Measured = box["measured"]
            if received != size:
                raise BenchError(f"the download gave {received} bytes, not {size}")
            result["download"] = {"seconds": round(download.seconds, 2), "bytes": received,
                                  "mb_per_s": round(received / MB / download.seconds, 1),
                                  "peak_rss_mb": round(download.peak / MB, 1), "server": download.counters}
            print(f"  {LABELS[kind]}: upload {result['upload']['mb_per_s']} MB/s, download "
                  f"{result['download']['mb_per_s']} MB/s; restore ...", flush=True)

            # restore
            with watching(pid, use_hwm=False) as box:  # an exec resets VmHWM: sampled only
                started = time.perf_counter()
                seen = client.restore(BACKUP_NAME, gone=after, present=[before, *dataset.sample_ids])
                box["seconds"] = time.perf_counter() - started
                if kind == OURS:  # then the replaced data is saved as a backup, in the background
                    seen["safety_copy_s"] = round(client.wait_idle() - started, 2)
            restore: Measured = box["measured"]
            if server.pid != pid:
                raise BenchError("the server's PID changed during the restore")
            result["restore"] = {"seconds": round(restore.seconds, 2), "peak_rss_mb": round(restore.peak / MB, 1),
                                 "server": restore.counters, "seen": seen}
            if seen.get("last_old_s") is not None:
                result["restore"]["switch_seconds"] = round(seen["done_s"] - seen["last_old_s"], 2)
            print(f"  {LABELS[kind]}: restore {restore.seconds:.1f} s", flush=True)
        except (BenchError, RuntimeError, httpx.HTTPError, OSError) as exc:
            raise BenchError(f"{LABELS[kind]}: {exc}\n--- {LABELS[kind]} server log (tail) ---\n{tail(log_path)}") from exc
    return result


# --- the report --------------------------------------------------------------------------------


# (label, how to get it from a server's result, "lower" or "higher" is better, digits)
METRICS: list[tuple[str, Callable[[dict[str, Any]], float | None], str, int]] = [
    ("backup s", lambda r: r["backup"]["seconds"], "lower", 2),
    ("archive MB", lambda r: r["backup"]["archive_bytes"] / MB, "lower", 1),
    ("backup: server CPU s", lambda r: r["backup"]["server"].get("cpu_s"), "lower", 1),
    ("backup: server MB written", lambda r: _mb(r["backup"]["server"].get("wchar")), "lower", 0),
    ("backup / machine limit (ours)", lambda r: r["backup"].get("limit_ratio"), "info", 2),
    ("backup: peak RSS MB", lambda r: r["backup"]["peak_rss_mb"], "lower", 1),
    ("backup: writer max ms", lambda r: r["backup"]["writer"]["max_ms"], "lower", 1),
    ("backup: writer p99 ms", lambda r: r["backup"]["writer"]["p99_ms"], "lower", 1),
    ("backup: writes/s (paced at 50)", lambda r: r["backup"]["writer"]["ok"] / r["backup"]["seconds"], "higher", 1),
    ("backup: health p99 ms", lambda r: r["backup"]["health"]["p99_ms"], "lower", 1),
    ("backup: health max ms", lambda r: r["backup"]["health"]["max_ms"], "lower", 1),
    ("restore s (until restored data served)", lambda r: r["restore"]["seconds"], "lower", 2),
    ("restore: old data until s", lambda r: r["restore"]["seen"].get("last_old_s"), "info", 2),
    ("restore: safety copy done at s (ours)", lambda r: r["restore"]["seen"].get("safety_copy_s"), "info", 2),
    ("restore: server CPU s", lambda r: r["restore"]["server"].get("cpu_s"), "lower", 1),
    ("restore: peak RSS MB", lambda r: r["restore"]["peak_rss_mb"], "lower", 1),
    ("upload MB/s", lambda r: r["upload"]["mb_per_s"], "higher", 1),
    ("download MB/s", lambda r: r["download"]["mb_per_s"], "higher", 1),
]


def _mb(value: float | None) -> float | None:
    return None if value is None else value / MB


def _value(getter: Callable[[dict[str, Any]], float | None], result: dict[str, Any] | None) -> float | None:
    if not result or "error" in result:
        return None
    try:
        return getter(result)
    except (KeyError, TypeError):
        return None


def comparison(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for label, getter, better, digits in METRICS:
        ours, pb = _value(getter, results.get(OURS)), _value(getter, results.get(PB))
        ratio = None if ours is None or pb is None or pb == 0 else ours / pb
        winner = None
        if ours is not None and pb is not None and better in ("lower", "higher"):
            if ratio is not None and abs(ratio - 1) < TIE:
                winner = "tie"
            else:
                winner = OURS if (ours < pb) == (better == "lower") else PB
        rows.append({"metric": label, "ours": None if ours is None else round(ours, digits),
                     "pocketbase": None if pb is None else round(pb, digits),
                     "ratio": None if ratio is None else round(ratio, 2), "better": better, "winner": winner,
                     "digits": digits})
    return rows


def table(rows: list[dict[str, Any]], per_run: list[list[dict[str, Any]]] | None = None) -> str:
    def cell(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    header = ("metric", "ours", "PocketBase", "ours/PB", "better", "winner") + (("each run",) if per_run else ())
    body = [(r["metric"], cell(r["ours"], r["digits"]), cell(r["pocketbase"], r["digits"]),
             "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}",
             {"lower": "lower", "higher": "higher", "info": "-"}[r["better"]],
             {OURS: "ours", PB: "PocketBase", "tie": "tie", None: "-"}[r["winner"]])
            + ((", ".join(cell(run[i]["ratio"], 2) if r["pocketbase"] is not None else cell(run[i]["ours"], r["digits"])
                          for run in per_run),) if per_run else ()) for i, r in enumerate(rows)]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 4, 5, 6) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pocketbase_version() -> str | None:
    try:
        out = subprocess.run([PocketBaseProcess.binary(), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() or None
    except (OSError, RuntimeError, subprocess.SubprocessError):
        return None


def export_revision(rev: str, target: Path) -> dict[str, Any]:
    """``server/`` of the commit ``rev`` into ``target`` (our server then runs from there)."""
    def git(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, timeout=60)

    commit = git("rev-parse", "--short", f"{rev}^{{commit}}")
    if commit.returncode != 0:
        raise BenchError(f"--server-rev {rev}: {commit.stderr.decode(errors='replace').strip()}")
    target.mkdir(parents=True)
    archive = git("archive", "--format=tar", rev, "server")
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True, timeout=60)
    return {"commit": commit.stdout.decode().strip(), "server_modified": False, "rev": rev, "exported": True}


def run(scale: float, seed: int, keep: bool, out: Path | None, kinds: list[str], timeout: float,
        server_rev: str | None = None, runs: int = 1) -> int:
    global SOURCE
    begun = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="pb-bench-compare-"))
    with contextlib.ExitStack() as stack:
        if keep:
            stack.callback(print, f"kept {work}")
        else:
            stack.callback(shutil.rmtree, work, True)
        print(f"working in {work}", flush=True)
        if server_rev:
            source = export_revision(server_rev, work / "src")
            SOURCE = work / "src"
            print(f"our server: {server_rev} ({source['commit']}), exported to {SOURCE}", flush=True)
        else:
            source = source_version()
            SOURCE = ROOT
            if source["server_modified"]:
                print(f"our server: the working tree, with uncommitted changes in server/ (on {source['commit']})",
                      flush=True)
        rows, files = counts(scale)
        print(f"generating {rows} records and {files} files of {FILE_SIZE >> 10} KiB (scale {scale}, seed {seed}) ...",
              flush=True)
        dataset, dirs = generate(work, kinds, scale, seed)
        print(f"  data: {dataset.rows} rows ({dataset.text_bytes / MB:.0f} MB of text, zlib-1 ratio "
              f"{dataset.text_zlib1_ratio}), data.db " + ", ".join(f"{LABELS[k]} {v / MB:.0f} MB" for k, v in
                                                                   dataset.db_bytes.items())
              + f"; {dataset.files} files ({dataset.file_bytes / MB:.0f} MB); generated in {dataset.seconds:.1f} s",
              flush=True)

        limit = machine_limit(dirs[kinds[0]])
        print(f"  the machine's limit for our backup of it: {limit['seconds']:.2f} s (ISA-L on {limit['workers']} "
              f"cores {limit['deflate_mb_s']:.0f} MB/s, copy {limit['copy_mb_s']:.0f} MB/s)", flush=True)

        runs_results: list[dict[str, dict[str, Any]]] = []
        for number in range(1, runs + 1):
            results: dict[str, dict[str, Any]] = {}
            for kind in kinds:
                print(f"{LABELS[kind]}" + (f" (run {number} of {runs})" if runs > 1 else "") + ":", flush=True)
                # Each run on a fresh copy of the generated data (a run changes it: records, a restore).
                run_dir = work / f"run{number}" / kind / "pb_data"
                if runs > 1:
                    shutil.copytree(dirs[kind], run_dir, symlinks=True)
                    os.sync()
                else:
                    run_dir = dirs[kind]
                try:
                    results[kind] = run_server(kind, run_dir, dataset, timeout)
                except BenchError as exc:
                    print(f"ERROR: {exc}", file=sys.stderr, flush=True)
                    results[kind] = {"server": kind, "error": str(exc)}
                if not keep:  # free the disk: the data of a server that is done is not needed any more
                    shutil.rmtree(run_dir.parent, ignore_errors=True)
                if OURS in results and "error" not in results[OURS]:
                    results[OURS]["backup"]["limit_ratio"] = round(results[OURS]["backup"]["seconds"] / limit["seconds"], 2)
            runs_results.append(results)

        info = machine()
        rows_per_run = [comparison(results) for results in runs_results]
        medians = median_rows(rows_per_run)
        report = {
            "benchmark": "compare",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "scale": scale,
            "seed": seed,
            "runs": runs,
            "source": source,
            "pocketbase": pocketbase_version(),
            "machine": info,
            "machine_limit": limit,
            "dataset": {**{k: v for k, v in asdict(dataset).items()}, "total_bytes": dataset.total_bytes},
            "results": runs_results[-1],
            "runs_results": runs_results,
            "comparison": [{k: v for k, v in row.items() if k != "digits"} for row in medians],
            "comparison_per_run": [[{k: v for k, v in row.items() if k != "digits"} for row in rows]
                                   for rows in rows_per_run],
            "seconds": round(time.perf_counter() - begun, 1),
            "note": NOTE,
        }
        print()
        print(table(medians, rows_per_run if runs > 1 else None))
        print()
        print("ratio = ours / PocketBase: below 1 is better for 'lower' rows, above 1 for 'higher' rows."
              + (f" Each cell: the median of {runs} runs; 'each run' lists the runs' ratios (ours alone where PocketBase has none)." if runs > 1 else ""))
        print(f"machine limit (our backup of this data at ISA-L speed on all cores): {limit['seconds']:.2f} s; "
              "'backup / machine limit' is ours against it.")
        print(f"machine: {info['cores']} cores ({info['usable_cores']} usable), Python {info['python']}, "
              f"{info['platform']}; {report['pocketbase'] or 'PocketBase ?'}")
        print(f"data: {dataset.rows} records, data.db {max(dataset.db_bytes.values()) / MB:.0f} MB, {dataset.files} "
              f"files ({dataset.file_bytes / MB:.0f} MB); scale {scale}, seed {seed}; whole run "
              f"{report['seconds']:.0f} s")
        print("MB = MiB. " + NOTE)
        failed = [result for results in runs_results for result in results.values() if "error" in result]
        for result in failed:
            print(f"FAILED: {result['error'].splitlines()[0]}")
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            print(f"written to {out}")
        return 1 if failed else 0


def median_rows(rows_per_run: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per metric: the median of each column over the runs (the ratio: the median ratio)."""
    merged = []
    for index, row in enumerate(rows_per_run[0]):
        column = [rows[index] for rows in rows_per_run]

        def middle(key: str) -> float | None:
            values = [r[key] for r in column if r[key] is not None]
            return round(statistics.median(values), row["digits"] if key != "ratio" else 2) if values else None

        ours, pb, ratio = middle("ours"), middle("pocketbase"), middle("ratio")
        winner = None
        if ours is not None and pb is not None and row["better"] in ("lower", "higher") and ratio is not None:
            winner = "tie" if abs(ratio - 1) < TIE else (OURS if (ratio < 1) == (row["better"] == "lower") else PB)
        merged.append({**row, "ours": ours, "pocketbase": pb, "ratio": ratio, "winner": winner})
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help=f"multiplies the {ROWS} records and {FILES} files (default 1.0; 0.05 for a quick look)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (data, logs, archives)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON results (default {DEFAULT_OUT.relative_to(ROOT)})")
    parser.add_argument("--servers", default=f"{OURS},{PB}", help=f"which servers, in order (default {OURS},{PB})")
    parser.add_argument("--server-rev", metavar="REV",
                        help="run our server from this commit (git archive of server/) instead of the working tree")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help=f"seconds each phase may take (default {DEFAULT_TIMEOUT:.0f})")
    parser.add_argument("--runs", type=int, default=1,
                        help="how many times each server runs every phase, each on a fresh copy of the data (the "
                             "table gives the medians; `make bench` runs 3)")
    parser.add_argument("--show", type=Path, metavar="JSON", help="print the table of a saved result and exit")
    args = parser.parse_args(argv)
    if args.show is not None:
        report = json.loads(args.show.read_text())
        print(table(comparison(report["results"])))
        print(f"scale {report['scale']}, {report['machine']['cores']} cores, {report['date']}, source {report['source']}")
        return 0
    if args.scale <= 0:
        parser.error("--scale must be positive")
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    if not kinds or any(k not in (OURS, PB) for k in kinds) or len(set(kinds)) != len(kinds):
        parser.error(f"--servers takes {OURS} and/or {PB}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    try:
        return run(args.scale, args.seed, args.keep, args.out, kinds, args.timeout, args.server_rev, max(1, args.runs))
    except BenchError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
