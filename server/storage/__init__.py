"""Where backups live: one small async interface, on the local disk (``local``) or in an
S3-compatible bucket (``s3``).

Nothing above this package knows which implementation it talks to. Keys are flat file names
(``pb_backup_x.zip``); an implementation refuses any key that could name something else (see
``check_key``).

The interface:

- ``list(prefix)``, ``stat(key)``, ``exists(key)``: what is stored, with size and modified time.
- ``read(key, start, end)``: the bytes of ``[start, end)`` as an async stream of chunks.
- ``open_write(key)``: a blocking, file-like ``Writer`` for worker threads (the zip writer runs in
  one). Nothing is visible under ``key`` until ``commit()``; ``abort()`` leaves nothing behind.
- ``write(key, chunks)``: an async stream written through ``open_write``, published atomically.
- ``put_file(key, path, progress)``: publish a finished local file under ``key`` (moved or uploaded).
- ``local_copy(key, temp_dir, progress)``: a local path holding the object's bytes, for as long as
  the context lasts (the file itself on local disk, a download in ``temp_dir`` from S3).
- ``delete(key)``.
"""

from __future__ import annotations

from .base import FileInfo, Progress, InvalidKey, Storage, StorageError, StoredFileExists, StoredFileMissing, Writer, check_key

__all__ = ["FileInfo", "Progress", "InvalidKey", "Storage", "StorageError", "StoredFileExists", "StoredFileMissing", "Writer",
           "check_key"]
