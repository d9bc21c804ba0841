"""Where replica files go: a local directory, or an S3 bucket under a prefix (Litestream's
``ReplicaClient``). Keys are relative paths (``<lineage>/<db>/ltx/<level>/<file>.ltx``); every
call blocks (run them in threads)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from ..tools.fsync import fsync_dir


@dataclass(frozen=True)
class RemoteFile:
    key: str
    size: int
    modified: float  # seconds since the epoch (the LTX timestamp where the client keeps it)


class ReplicaClient:
    kind = ""
    requests = 0  # requests made (S3: one per call; the idle cost)

    def put(self, key: str, path: Path, timestamp_ms: int) -> None:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[RemoteFile]:
        raise NotImplementedError

    def fetch(self, key: str, target: Path) -> None:
        """The file ``key`` copied to the local path ``target``."""
        raise NotImplementedError

    def delete(self, keys: list[str]) -> None:
        raise NotImplementedError

    def probe(self) -> None:
        """Raise if the replica cannot be written now."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


def _safe(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise ValueError("invalid replica key")
    return key


class FileClient(ReplicaClient):
    """Files under ``root``, written to a temp name, fsynced, given the LTX timestamp as their
    modification time (as Litestream's file client does) and renamed into place."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, path: Path, timestamp_ms: int) -> None:
        target = self.root / _safe(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(target.name + ".tmp")
        with open(path, "rb") as source, open(temp, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.utime(temp, ns=(timestamp_ms * 1_000_000, timestamp_ms * 1_000_000))
        os.replace(temp, target)
        fsync_dir(target.parent)

    def list(self, prefix: str = "") -> list[RemoteFile]:
        found = []
        base = self.root
        if not base.is_dir():
            return []
        for directory, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(".tmp"):
                    continue
                path = Path(directory) / name
                key = path.relative_to(base).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                found.append(RemoteFile(key, st.st_size, st.st_mtime))
        return sorted(found, key=lambda f: f.key)

    def fetch(self, key: str, target: Path) -> None:
        shutil.copyfile(self.root / _safe(key), target)

    def open(self, key: str) -> BinaryIO:
        return open(self.root / _safe(key), "rb")

    def delete(self, keys: list[str]) -> None:
        parents = set()
        for key in keys:
            path = self.root / _safe(key)
            path.unlink(missing_ok=True)
            parents.add(path.parent)
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            directory = parent
            while directory != self.root and directory.is_relative_to(self.root):
                try:
                    directory.rmdir()  # only empty ones
                except OSError:
                    break
                directory = directory.parent

    def probe(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / ".probe.tmp"
        probe.write_bytes(b"")
        probe.unlink()

    def describe(self) -> str:
        return f"local directory {self.root.name or self.root}"


class S3Client(ReplicaClient):
    """Objects under ``prefix`` of the backups bucket, through boto3 (the storage's own client)."""

    kind = "s3"

    def __init__(self, storage: Any, prefix: str) -> None:
        self.storage = storage  # server.storage.s3.S3Storage
        self.prefix = prefix

    def _call(self, name: str, **kwargs: Any) -> Any:
        self.requests += 1
        client = self.storage.client()
        return self.storage.call(getattr(client, name), Bucket=self.storage.config.bucket, **kwargs)

    def put(self, key: str, path: Path, timestamp_ms: int) -> None:
        stamp = datetime.fromtimestamp(timestamp_ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with open(path, "rb") as body:
            self._call("put_object", Key=self.prefix + _safe(key), Body=body,
                       Metadata={"litestream-timestamp": stamp})

    def list(self, prefix: str = "") -> list[RemoteFile]:
        found = []
        token = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            answer = self._call("list_objects_v2", Prefix=self.prefix + prefix, **extra)
            for item in answer.get("Contents", []):
                key = item["Key"][len(self.prefix):]
                found.append(RemoteFile(key, int(item["Size"]), item["LastModified"].timestamp()))
            if not answer.get("IsTruncated"):
                break
            token = answer.get("NextContinuationToken")
        return sorted(found, key=lambda f: f.key)

    def fetch(self, key: str, target: Path) -> None:
        answer = self._call("get_object", Key=self.prefix + _safe(key))
        with open(target, "wb") as out:
            for chunk in answer["Body"].iter_chunks(1 << 20):
                out.write(chunk)

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            self._call("delete_objects", Delete={"Objects": [{"Key": self.prefix + _safe(k)} for k in batch],
                                                 "Quiet": True})

    def probe(self) -> None:
        self._call("list_objects_v2", Prefix=self.prefix, MaxKeys=1)

    def describe(self) -> str:
        return f"S3 bucket {self.storage.config.bucket}/{self.prefix}"
