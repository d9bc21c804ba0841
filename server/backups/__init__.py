"""Backups: the manager (one job at a time), the archive format, and the restore swap."""

from .manager import BackupManager, Busy, RestoreReady

__all__ = ["BackupManager", "Busy", "RestoreReady"]
