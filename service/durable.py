"""Making a rename survive a power cut: a file's own fsync puts its bytes on disk, but the
name it was given (or moved to) is part of its folder, which needs an fsync of its own."""

from __future__ import annotations

import os
from pathlib import Path


def sync_folder(folder: Path) -> None:
    """Put ``folder``'s entries (files created, renamed into or out of it) on disk."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
