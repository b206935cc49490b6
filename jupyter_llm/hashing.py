"""Content hashes of data inputs: a file, or a folder (a dataset saved with `save_to_disk`)."""

from __future__ import annotations

import hashlib
import os


def content_sha256(path: str) -> str:
    """SHA-256 of a file's bytes; for a folder, of every file's relative path and bytes."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                h.update(os.path.relpath(full, path).encode() + b"\x00")
                h.update(content_sha256(full).encode())
        return h.hexdigest()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
