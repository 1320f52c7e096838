"""Reading shard tars in tests, independently of the code under test (plain tarfile)."""
from __future__ import annotations

import tarfile
from pathlib import Path


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{sample key: {extension: bytes}} of a WebDataset tar."""
    samples = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples
