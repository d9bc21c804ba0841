"""The layout of the data directory (``pb_data``) and its preparation at start."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def data_db(self) -> Path:
        return self.root / "data.db"

    @property
    def aux_db(self) -> Path:
        return self.root / "auxiliary.db"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def backups(self) -> Path:
        return self.root / "backups"

    @property
    def temp(self) -> Path:
        return self.root / ".pb_temp_to_delete"

    def record_dir(self, collection_id: str, record_id: str) -> Path:
        return self.storage / collection_id / record_id

    def prepare(self, empty_temp: bool = True) -> None:
        """Create the directories and empty the temp one (blocking: call before serving).

        ``empty_temp=False`` while another process may have work in progress there."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        self.backups.mkdir(exist_ok=True)
        os.chmod(self.backups, 0o700)  # backups hold everything: owner only
        if empty_temp and self.temp.exists():
            shutil.rmtree(self.temp, ignore_errors=True)
        self.temp.mkdir(exist_ok=True)
        os.chmod(self.temp, 0o700)
