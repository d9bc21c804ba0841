"""A PocketBase-style backend server whose heart is a backup manager."""

__version__ = "0.1.0"
