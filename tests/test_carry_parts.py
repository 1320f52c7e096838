"""scripts/carry_parts.sh: wheels too large for one device call, sent in parts and joined.

Real processes on real files: split two "wheels" into folders of at most 1 MiB, stash the
folders one call at a time into a parts directory, join and compare bytes; a missing part
is named, and a corrupted one is caught by the checksum."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "carry_parts.sh"


def _run(args, cwd, env, check=True):
    script = cwd / "scripts" / "carry_parts.sh"       # the checkout's copy (see `checkout`)
    done = subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    if check:
        assert done.returncode == 0, done.stderr
    return done


@pytest.fixture()
def checkout(tmp_path):
    """A copy of the script in a scratch 'repo', so .carry/ is written there, not here."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "carry_parts.sh")
    wheels = {"big-1.0-py3-none-any.whl": os.urandom(2_500_000),
              "small-2.0-py3-none-any.whl": os.urandom(300_000)}
    for name, data in wheels.items():
        (tmp_path / name).write_bytes(data)
    env = dict(os.environ, CARRY_PART_MIB="1", PARTS=str(tmp_path / "parts"),
               WHEELS=str(tmp_path / "wheels"))
    return root, tmp_path, wheels, env


def _send_all(root, env, folders):
    """One 'device call' per folder: only that folder is present under .carry/."""
    held = root.parent / "held"
    shutil.move(str(root / ".carry"), held)
    for folder in folders:
        (root / ".carry").mkdir()
        shutil.copytree(held / folder, root / ".carry" / folder)
        _run(["stash"], root, env)
        shutil.rmtree(root / ".carry")


def test_split_stash_join_round_trip(checkout):
    root, tmp, wheels, env = checkout
    out = _run(["split", *(str(tmp / n) for n in wheels)], root, env).stdout
    folders = sorted(p.name for p in (root / ".carry").iterdir())
    assert folders == [f"p{k:02d}" for k in range(1, len(folders) + 1)] and len(folders) >= 3
    assert f"{len(folders)} device calls" in out
    for folder in folders:
        size = sum(f.stat().st_size for f in (root / ".carry" / folder).iterdir())
        assert size <= 1024 * 1024 + 4096, folder        # a part plus its manifest
    _send_all(root, env, folders)
    _run(["join"], root, env)
    for name, data in wheels.items():
        assert (tmp / "wheels" / name).read_bytes() == data


def test_join_names_a_missing_part_and_catches_corruption(checkout):
    root, tmp, wheels, env = checkout
    _run(["split", *(str(tmp / n) for n in wheels)], root, env)
    folders = sorted(p.name for p in (root / ".carry").iterdir())
    _send_all(root, env, folders[:-1] if len(folders) > 1 else folders)
    done = _run(["join"], root, env, check=False)
    assert done.returncode != 0
    assert re.search(r"carry_parts: big-1\.0-py3-none-any\.whl: part \d+ of \d+ missing",
                     done.stderr), done.stderr
    # All parts there, but one chunk damaged: the checksum refuses the joined wheel.
    for folder in sorted((tmp / "held").iterdir()):
        for chunk in folder.iterdir():
            shutil.copy(chunk, tmp / "parts" / chunk.name)
    victim = sorted((tmp / "parts").glob("big-*.part001"))[0]
    victim.write_bytes(b"x" + victim.read_bytes()[1:])
    done = _run(["join"], root, env, check=False)
    assert done.returncode != 0 and "sha256 mismatch" in done.stderr
    assert not (tmp / "wheels" / "big-1.0-py3-none-any.whl").exists()
    assert (tmp / "wheels" / "small-2.0-py3-none-any.whl").read_bytes() == \
        wheels["small-2.0-py3-none-any.whl"]
