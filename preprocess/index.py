"""DALI webdataset index files (the format DALI's `wds2idx` writes).

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]   one line per sample

Offsets are byte offsets of a member's data (past its 512-byte tar header); a sample's
components are the consecutive tar members sharing the name before the first dot.
"""
from __future__ import annotations

from pathlib import Path

INDEX_VERSION = "v1.2"

# One component: (extension, data offset, size, member name)
Component = tuple[str, int, int, str]


def format_index(samples: list[list[Component]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components))
    return "\n".join(lines) + "\n"


def read_index(path) -> list[list[Component]]:
    """Parse an index file; raises ValueError naming the file on a malformed one."""
    path = Path(path)
    lines = path.read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty index file")
    header = lines[0].split()
    if len(header) != 2 or header[0] != INDEX_VERSION or not header[1].isdigit():
        raise ValueError(f"{path}: header {lines[0]!r} is not '{INDEX_VERSION} <count>'")
    samples = []
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{path}:{number}: expected groups of 'ext offset size name'")
        samples.append([(fields[i], int(fields[i + 1]), int(fields[i + 2]), fields[i + 3])
                        for i in range(0, len(fields), 4)])
    if len(samples) != int(header[1]):
        raise ValueError(f"{path}: header says {header[1]} samples, file lists {len(samples)}")
    return samples
