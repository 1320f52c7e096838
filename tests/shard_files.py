"""Reading shard tars in tests, independently of the code under test (plain tarfile)."""
from __future__ import annotations

import subprocess
import sys
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


def drop_jsons(shards: Path, positions) -> list[str]:
    """Shard 0 of `shards` (a copy: it is rewritten in place) without the .json of the
    samples at `positions`, its index rebuilt with DALI's wds2idx; the dropped keys."""
    tar = shards / "shard-000000.tar"
    rebuilt = shards / "rebuilt.tar"
    with tarfile.open(tar) as source, tarfile.open(rebuilt, "w") as target:
        members = source.getmembers()
        jsons = [m for m in members if m.name.endswith(".json")]
        dropped = [jsons[p] for p in positions]
        for member in members:
            if member not in dropped:
                target.addfile(member, source.extractfile(member))
    rebuilt.replace(tar)
    subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar),
                    str(shards / "shard-000000.idx")], check=True, capture_output=True)
    return [m.name.rsplit(".", 1)[0] for m in dropped]
