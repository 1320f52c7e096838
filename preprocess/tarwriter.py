"""Deterministic WebDataset tar writing that records every member's data offset, so the
DALI index comes for free (no second pass over the tar).

Every header carries fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644, ustar
format), so the same samples give a byte-identical tar.
"""
from __future__ import annotations

import io
import tarfile

from tcore.preprocess.index import Component

_BLOCK = tarfile.BLOCKSIZE


class ShardTarWriter:
    """Write samples (`key` + components) into a tar file opened at `path`."""

    def __init__(self, path):
        self._file = open(path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[list[Component]] = []

    def add_sample(self, key: str, components: list[tuple[str, bytes]]) -> None:
        """Append one sample; components are (extension, bytes) in the order to store."""
        if not key or "." in key or "/" in key:
            raise ValueError(f"invalid sample key {key!r}: no dots or slashes allowed")
        entries = []
        for ext, data in components:
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
            # After addfile the tar offset sits past the data padded to whole blocks.
            padded = -(-len(data) // _BLOCK) * _BLOCK
            entries.append((ext, self._tar.offset - padded, len(data), name))
        self.samples.append(entries)

    def close(self) -> None:
        self._tar.close()
        self._file.flush()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
