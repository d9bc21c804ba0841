"""Encrypted backups: age (age-encryption.org/v1) through ``pyrage`` (rage, the Rust age).

While ``settings.backups.encryption.recipients`` holds public keys (``age1...``), every archive
the server writes (backups, scheduled ones, pre-restore safety copies) is an age file encrypted to
them, under its usual ``.zip`` name: the standard ``age`` tool decrypts it
(``age -d -i key.txt backup.zip > plain.zip``) and we restore what it encrypted. The server
never holds a private key: a restore, partial restore, dry run or verify of an encrypted backup
takes an identity (``AGE-SECRET-KEY-1...``) with the request, used for that job and dropped.

Streaming, bounded memory: pyrage's ``encrypt_io``/``decrypt_io`` read and write file-like
objects in chunks (64 KiB age chunks, 8 KiB reads), never the whole file. They pull from a
reader, while the zip writer pushes, so an ``EncryptingWriter`` is a pipe: the zip writer writes
into it, a thread of its own runs ``encrypt_io`` from the pipe into the storage writer (a local
file, or S3's multipart upload, unchanged). A restore decrypts into a local temporary zip
(``plain_copy``), which ``archive.extract`` reads as before (a zip is read from its end).

pyrage holds the GIL while it encrypts a chunk, but each of its reads and writes goes through
Python file objects that release it around the system call, so other threads (the event loop)
get it back every few hundred microseconds.

Facts for the catalog (issue 15): ``is_encrypted(head)`` tells an age file from its first bytes;
``EncryptionFacts`` (``Job.encryption`` in the manager) says what a job wrote: encrypted or not,
and the fingerprints of the recipients (``fingerprint``), which an age file does not reveal.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage

from ..storage.base import FileInfo, Progress, Storage, Writer
from ..tools.security import random_string
from ..tools.threads import lower_priority
from .archive import ArchiveError, Cancelled

AGE_MAGIC = b"age-encryption.org/v1\n"
ARMOR_MAGIC = b"-----BEGIN AGE ENCRYPTED FILE-----"
HEAD_SIZE = 64  # bytes enough for ``is_encrypted``
MAX_IDENTITY_TEXT = 64 << 10  # an identity file of many keys and comments is a few KB
MAX_RECIPIENTS = 64
PIPE_SIZE = 1 << 20  # the kernel buffer between the zip writer and the encrypting thread

# The three reasons a decryption fails (issue 17), exactly.
IDENTITY_REQUIRED = "this backup is encrypted: an identity is required"
IDENTITY_MISMATCH = "the identity does not match any recipient of this backup"
DAMAGED = "the backup is damaged or was tampered with"
NOT_AGE = "the file is not a well-formed age-encrypted file"

Identities = list[Any]  # pyrage.x25519.Identity: str() of one is the secret key; never format it
Recipients = list[Any]  # pyrage.x25519.Recipient


class CryptoError(ArchiveError):
    """An encrypted backup cannot be read; the message is one of the reasons above (never a key)."""


class IdentityError(ValueError):
    """An identity that is not one (its text is never part of the message)."""


# --- keys ----------------------------------------------------------------------------------------


def is_encrypted(head: bytes) -> bool:
    """Whether a file starting with ``head`` (``HEAD_SIZE`` bytes suffice) is an age file, binary
    or ASCII-armored (``age -a``)."""
    return head.startswith(AGE_MAGIC) or head.lstrip(b" \t\r\n").startswith(ARMOR_MAGIC)


def fingerprint(recipient: str) -> str:
    """A short, stable name for a recipient (a public key): ``sha256:`` and 16 hex digits of the
    SHA-256 of its ``age1...`` text. ``age-keygen -y key.txt | tr -d '\\n' | sha256sum`` gives it."""
    return "sha256:" + hashlib.sha256(recipient.strip().encode("ascii")).hexdigest()[:16]


def identity_fingerprints(identities: Identities) -> list[str]:
    """The fingerprints of the recipients these identities decrypt for."""
    return [fingerprint(str(identity.to_public())) for identity in identities]


def parse_recipient(text: str) -> Any:
    """An ``age1...`` public key as pyrage's recipient; ``ValueError`` if it is not one."""
    if not isinstance(text, str) or not text.strip().startswith("age1"):
        raise ValueError("not an age public key")
    try:
        return pyrage.x25519.Recipient.from_str(text.strip())
    except Exception:
        raise ValueError("not an age public key") from None


def recipient_errors(value: Any) -> str | None:
    """What is wrong with ``settings.backups.encryption.recipients`` (None: nothing)."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        return "Must be a list of age public keys (age1...)."
    if len(value) > MAX_RECIPIENTS:
        return f"At most {MAX_RECIPIENTS} recipients."
    for index, item in enumerate(value):
        try:
            parse_recipient(item)
        except ValueError:
            return f"Recipient {index + 1} is not an age public key (age1..., as age-keygen prints)."
    return None


def recipients_of(settings: dict[str, Any]) -> list[str]:
    """The recipients (``age1...`` texts) backups are encrypted to now; [] for none."""
    encryption = settings.get("backups", {}).get("encryption") or {}
    return [item.strip() for item in encryption.get("recipients") or [] if isinstance(item, str) and item.strip()]


def parse_identities(text: Any) -> Identities:
    """Identities from the text of an age identity file, or a single ``AGE-SECRET-KEY-1...``:
    one per line, blank lines and ``#`` comments ignored. ``IdentityError`` (with a message that
    never quotes the text) for anything else."""
    if not isinstance(text, str) or len(text) > MAX_IDENTITY_TEXT:
        raise IdentityError("Must be an age identity (AGE-SECRET-KEY-1...).")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("AGE-SECRET-KEY-1"):
            raise IdentityError("Must be an age identity (AGE-SECRET-KEY-1...).")
        try:
            found.append(pyrage.x25519.Identity.from_str(line))
        except Exception:
            raise IdentityError("Must be an age identity (AGE-SECRET-KEY-1...).") from None
    if not found:
        raise IdentityError("Must be an age identity (AGE-SECRET-KEY-1...).")
    return found


@dataclass(frozen=True)
class EncryptionFacts:
    """What a job knows of a backup's encryption, for the catalog (``info``): ``encrypted``, the
    ``recipients``' fingerprints when we encrypted it (None when unknown: an uploaded file, whose
    header does not name them), and for an upload whether its content was ``verified`` with an
    identity. No key, public or private, is in here."""

    encrypted: bool
    recipients: tuple[str, ...] | None = None
    verified: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encrypted": self.encrypted}
        if self.encrypted:
            out["recipients"] = list(self.recipients) if self.recipients is not None else None
        if self.verified is not None:
            out["verified"] = self.verified
        return out

    @classmethod
    def written_for(cls, recipients: list[str]) -> "EncryptionFacts":
        if not recipients:
            return cls(False)
        return cls(True, tuple(fingerprint(r) for r in recipients))


# --- writing -------------------------------------------------------------------------------------


class _Source:
    """The pipe's read end as pyrage's reader: remembers a failure, and stops when told."""

    def __init__(self, fd: int) -> None:
        self._file = os.fdopen(fd, "rb", buffering=0)
        self.stop = False

    def read(self, size: int = -1) -> bytes:
        if self.stop:
            raise OSError(errno.ECANCELED, "the encryption was stopped")
        return self._file.read(size if size is not None and size > 0 else 1 << 16) or b""

    def close(self) -> None:
        self._file.close()


class _Sink:
    """A file-like object over a storage ``Writer`` (or a file) that remembers the first failure
    of its own, so that it is raised as itself rather than as pyrage's wrapping of it."""

    def __init__(self, out: Any, progress: Progress | None = None) -> None:
        self._out = out
        self._progress = progress
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            count = self._out.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise
        if self._progress is not None:
            self._progress(len(data))
        return len(data) if count is None else count

    def flush(self) -> None:
        try:
            flush = getattr(self._out, "flush", None)
            if flush is not None:
                flush()
        except BaseException as exc:
            self.error = self.error or exc
            raise


class EncryptingWriter(Writer):
    """A storage ``Writer`` whose content is age-encrypted to ``recipients`` on its way into
    ``inner`` (which publishes it on ``commit``, as before). Blocking, like every Writer: the zip
    writer's threads write into a pipe; the ``age-encrypt`` thread encrypts from it into ``inner``."""

    def __init__(self, inner: Writer, recipients: list[str]) -> None:
        if not recipients:
            raise ValueError("no recipients")
        self._inner = inner
        self._recipients = [parse_recipient(r) for r in recipients]
        self.facts = EncryptionFacts.written_for(recipients)
        read_fd, write_fd = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(write_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        except OSError:  # pragma: no cover - an older kernel: its default (64 KiB) does
            pass
        self._source = _Source(read_fd)
        self._pipe: Any = os.fdopen(write_fd, "wb", buffering=0)
        self._sink = _Sink(inner)
        self._error: BaseException | None = None
        self._done = False
        self._thread = threading.Thread(target=self._encrypt, name="age-encrypt", daemon=True)
        self._thread.start()

    @property  # type: ignore[override]
    def bytes_written(self) -> int:
        """Bytes stored (the ciphertext)."""
        return self._inner.bytes_written

    def _encrypt(self) -> None:
        lower_priority()  # as the job's other threads (tools.threads)
        try:
            pyrage.encrypt_io(self._source, self._sink, self._recipients)
        except BaseException as exc:
            self._error = self._sink.error or exc
        finally:
            self._source.close()  # a write still waiting on the pipe fails now (EPIPE)

    def _failure(self) -> BaseException:
        error = self._error
        if isinstance(error, OSError) and error.errno is not None:
            return error  # the storage's own failure (a full disk), as itself
        if error is not None and not isinstance(error, pyrage.EncryptError):
            return error
        return ArchiveError("the backup could not be encrypted")

    def write(self, data: Any) -> int:
        if self._pipe is None:
            raise ValueError("writer is closed")
        view = memoryview(data).cast("B")
        size = len(view)
        try:
            while view:
                view = view[self._pipe.write(view):]
        except BrokenPipeError:
            self._thread.join()
            raise self._failure() from None
        return size

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            pipe.close()

    def commit(self) -> FileInfo:
        if self._done:
            raise ValueError("writer is closed")
        try:
            self._close_pipe()  # the end of the plaintext: the last age chunk is written
            self._thread.join()
            if self._error is not None:
                raise self._failure()
            info = self._inner.commit()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return info

    def abort(self) -> None:
        self._source.stop = True
        try:
            self._close_pipe()
        except OSError:
            pass
        self._thread.join()
        self._done = True
        self._inner.abort()


# --- reading -------------------------------------------------------------------------------------


class _Counted:
    """A reader that reports what it read to ``progress`` and stops at ``cancel``."""

    def __init__(self, handle: Any, progress: Progress | None, cancel: threading.Event | None) -> None:
        self._handle = handle
        self._progress = progress
        self._cancel = cancel
        self.error: BaseException | None = None

    def read(self, size: int = -1) -> bytes:
        if self._cancel is not None and self._cancel.is_set():
            self.error = self.error or Cancelled()
            raise OSError(errno.ECANCELED, "cancelled")
        try:
            data = self._handle.read(size if size is not None and size > 0 else 1 << 16)
        except BaseException as exc:
            self.error = self.error or exc
            raise
        if self._progress is not None and data:
            self._progress(len(data))
        return data or b""


def read_head(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(HEAD_SIZE)


def decrypt_file(source: Path, target: Path, identities: Identities | None,
                 progress: Progress | None = None, cancel: threading.Event | None = None) -> None:
    """Decrypt the age file ``source`` into the new file ``target`` (0600), in chunks. Blocking:
    run it in a worker thread. ``CryptoError`` with one of the three reasons, ``target`` removed."""
    if not identities:
        raise CryptoError(IDENTITY_REQUIRED)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with open(source, "rb", buffering=0) as raw, os.fdopen(fd, "wb") as out:
            reader = _Counted(raw, progress, cancel)
            sink = _Sink(out)
            try:
                pyrage.decrypt_io(reader, sink, identities)
            except BaseException as exc:
                own = reader.error or sink.error
                if own is not None:
                    raise own from None
                raise _reason(exc) from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _reason(exc: BaseException) -> CryptoError:
    """pyrage's failure as one of our three reasons. Its messages: "No matching keys found" (no
    identity unwraps a file key: a wrong identity, or a stanza changed so that none can);
    anything else of the header or the payload (a MAC, a chunk's tag, a file cut short) is
    damage or tampering."""
    if isinstance(exc, pyrage.DecryptError) and "no matching keys" in str(exc).lower():
        return CryptoError(IDENTITY_MISMATCH)
    return CryptoError(DAMAGED)


def check_header(path: Path) -> None:
    """An age file's header must parse (its payload is not read): ``CryptoError(NOT_AGE)`` if not.

    pyrage has no header-only API: the file is opened for decryption with a throwaway identity,
    which parses the header and then finds no key for it ("No matching keys"); any other failure
    means the header is not well-formed. Nothing is written."""
    throwaway = pyrage.x25519.Identity.generate()

    class _Discard:
        def write(self, data: Any) -> int:  # pragma: no cover - no key: nothing is decrypted
            return len(data)

        def flush(self) -> None:
            pass

    with open(path, "rb", buffering=0) as raw:
        try:
            pyrage.decrypt_io(_Counted(raw, None, None), _Discard(), [throwaway])
        except pyrage.DecryptError as exc:
            if "no matching keys" in str(exc).lower():
                return
            raise CryptoError(NOT_AGE) from None
        except Exception:
            raise CryptoError(NOT_AGE) from None
    raise CryptoError(NOT_AGE)  # pragma: no cover - decrypted with a random key: impossible


@asynccontextmanager
async def plain_copy(storage: Storage, key: str, temp_dir: Path, progress: Progress | None = None,
                     identities: Identities | None = None, cancel: threading.Event | None = None,
                     on_decrypt: Callable[[int], None] | None = None,
                     in_thread: Callable[..., Any] | None = None) -> AsyncIterator[Path]:
    """A local path holding the plaintext zip of the backup ``key``: ``storage.local_copy`` for a
    plain one; for an age file, that copy decrypted into ``temp_dir`` (removed when the context
    ends). ``on_decrypt(size)`` is told when decryption starts (``progress`` then counts the
    ciphertext read). ``in_thread(fn, *args)`` runs the decryption (the job's threads)."""
    import asyncio

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        if in_thread is not None:
            return await in_thread(fn, *args)
        return await asyncio.to_thread(fn, *args)

    async with storage.local_copy(key, temp_dir, progress) as path:
        head = await asyncio.to_thread(read_head, path)
        if not is_encrypted(head):
            yield path
            return
        if not identities:
            raise CryptoError(IDENTITY_REQUIRED)
        size = (await asyncio.to_thread(path.stat)).st_size
        if on_decrypt is not None:
            on_decrypt(size)
        target = temp_dir / f"decrypted_{random_string(12)}.zip"
        try:
            await run(decrypt_file, path, target, identities, progress, cancel)
            yield target
        finally:
            await asyncio.to_thread(target.unlink, True)
