"""scripts/carry_plan.py and scripts/gpu_prepare.sh's plan: which folders travel with which
device call of a GPU lease.

Real processes on real folders of real sizes (the limit scaled down to a few MiB): every
folder travels exactly once, no call goes over the limit with the tree, the first call
carries what the background needs, and what fits nowhere is named before a lease is spent.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from tcore.preprocess.shards import build_shards

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


def _folder(root: Path, name: str, mib: float) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "data").write_bytes(os.urandom(int(mib * MIB)))
    return name


def _plan(cwd, *args):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "carry_plan.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)


def _calls(stdout: str) -> list[tuple[list[str], float, str]]:
    """(folders, MiB, command) of each printed call."""
    found = re.findall(r"call \d+: carry (\[.*?\])  \(([\d.]+) MiB\)\n\s+(.*)", stdout)
    return [(json.loads(folders), float(mib), command) for folders, mib, command in found]


def test_parts_one_per_call_extras_where_room_is_left(tmp_path):
    parts = [_folder(tmp_path, f".carry/p0{k}", mib) for k, mib in ((1, 2.5), (2, 2.5), (3, 1.0))]
    first = _folder(tmp_path, ".whl", 0.3)
    extras = [_folder(tmp_path, ".whl-data", 0.6), _folder(tmp_path, ".gpushards", 1.5),
              _folder(tmp_path, ".gpuframes", 0.8)]
    done = _plan(tmp_path, "--tree-bytes", str(MIB // 2), "--limit-mib", "4.5",
                 "--margin-mib", "0.5", "--first", first, "--parts", *parts,
                 "--extras", *extras, "--finish-env", "GPU_CHECK_SHARDS=.gpushards")
    assert done.returncode == 0, done.stderr
    calls = _calls(done.stdout)
    assert len(calls) == 3
    carried = [f for folders, _, _ in calls for f in folders]
    assert sorted(carried) == sorted([first, *parts, *extras])         # each exactly once
    assert all(mib <= 4.0 + 1e-6 for _, mib, _ in calls)               # limit less margin
    # largest first into the roomiest call: the small last part takes the two larger ones,
    # the second call the wheels (0.7, 1.0 and 2.5 MiB free before)
    assert calls[2][0] == [".carry/p03", ".gpushards", ".gpuframes"]
    assert calls[1][0] == [".carry/p02", ".whl-data"] and calls[0][0] == [".whl", ".carry/p01"]
    assert "gpu_session.sh background" in calls[0][2]
    assert "gpu_session.sh progress" in calls[1][2]
    assert calls[2][2].endswith("scripts/carry_parts.sh join && GPU_CHECK_SHARDS=.gpushards "
                                "scripts/gpu_session.sh finish")


def test_a_folder_that_fits_in_no_call_is_named(tmp_path):
    part = _folder(tmp_path, ".carry/p01", 2.0)
    big = _folder(tmp_path, ".gpushards", 3.0)
    done = _plan(tmp_path, "--tree-bytes", "0", "--limit-mib", "4", "--margin-mib", "0",
                 "--parts", part, "--extras", big)
    assert done.returncode == 1
    assert ".gpushards (3.0 MiB) fits in no call" in done.stderr
    assert done.stdout == ""


def test_a_part_over_the_limit_says_to_cut_smaller_parts(tmp_path):
    part = _folder(tmp_path, ".carry/p01", 3.0)
    done = _plan(tmp_path, "--tree-bytes", str(2 * MIB), "--limit-mib", "4", "--margin-mib",
                 "0", "--parts", part)
    assert done.returncode == 1
    assert "call 1 (.carry/p01) needs 5.0 MiB" in done.stderr and "CARRY_PART_MIB" in done.stderr


def test_a_missing_folder_is_named(tmp_path):
    done = _plan(tmp_path, "--tree-bytes", "0", "--parts", ".carry/p01")
    assert done.returncode == 1 and "no such folder: .carry/p01" in done.stderr


def test_without_dali_parts_one_call_runs_the_check_itself(tmp_path):
    first = _folder(tmp_path, ".whl", 0.1)
    done = _plan(tmp_path, "--tree-bytes", "0", "--first", first)
    assert done.returncode == 0, done.stderr
    (folders, _, command), = _calls(done.stdout)
    assert folders == [".whl"] and command == "scripts/gpu_check.sh"


def _two_classes(root: Path) -> Path:
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.full((16, 16, 3), 60, np.uint8)).save(root / name / "x.jpg")
    return root


def test_gpu_prepare_plan_names_scripts_and_settings_that_exist(tmp_path):
    """`scripts/gpu_prepare.sh plan` in a scratch checkout with small stand-in wheel folders
    and real shards: it refuses shards in class order, and its commands call scripts that
    are there with settings gpu_session.sh reads."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "scripts", root / "scripts")
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    os.symlink(sys.prefix, root / ".venv")        # this environment, tcore installed
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    for name, mib in ((".carry/p01", 1.0), (".carry/p02", 0.5), (".whl", 0.1),
                      (".whl-data", 0.2)):
        _folder(root, name, mib)
    images = _two_classes(tmp_path / "images")
    build_shards(images, root / ".gpushards", kind="image", progress=False)
    build_shards(images, root / ".gpuframes", kind="image", shuffle_seed=None, progress=False)
    plan = ["bash", "scripts/gpu_prepare.sh", "plan"]
    done = subprocess.run(plan, cwd=root, capture_output=True, text=True, timeout=60)
    # shards in class order (a tcore before shuffling) would measure another loader
    assert done.returncode == 1 and done.stderr.strip() == (
        "gpu_prepare: .gpuframes hold their inputs in class order: rebuild them with "
        "scripts/gpu_prepare.sh shards")
    shutil.rmtree(root / ".gpuframes")
    build_shards(images, root / ".gpuframes", kind="image", progress=False)
    done = subprocess.run(plan, cwd=root, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = _calls(done.stdout)
    assert [folders[0] for folders, _, _ in calls] == [".whl", ".carry/p02"]
    session = (REPO / "scripts" / "gpu_session.sh").read_text()
    check = (REPO / "scripts" / "gpu_check.sh").read_text()
    for _, _, command in calls:
        for script in re.findall(r"scripts/[\w.]+", command):
            assert (REPO / script).is_file(), script
        for setting in re.findall(r"(GPU_\w+)=", command):
            assert f"${{{setting}" in session or f"${{{setting}" in check, setting
    steps = re.findall(r'STEPS="([^"]+)"', done.stdout)
    known = re.search(r"GPU_CHECK_ONLY \(space-separated step\n# names to run: (.*?)\);", check,
                      re.S).group(1).replace("#", " ").replace(",", " ").replace(";", " ")
    for step in " ".join(steps).split():
        assert step in known.split(), step
