"""JHMDB pose propagation (split 1 test): PCK@0.1 and PCK@0.2, as in the CRW evaluation.

Layout (official): ROOT/Rename_Images/<class>/<video>/%05d.png,
ROOT/joint_positions/<class>/<video>/joint_positions.mat (`pos_img` [2, 15, T], 1-based x, y)
and ROOT/splits/<class>_test_split<k>.txt (lines "<video>.avi 1|2", 2 = test).

Each joint becomes a small Gaussian map (sigma 0.5 feature cells) at feature resolution, plus
a background channel where no joint map is set; the 16 maps are propagated like masks. The
predicted joint position is the value-weighted mean of the 3 highest cells of its propagated
map (no joint when the map is all zero), mapped back to pixels; PCK counts predictions within
threshold x 0.6 x the diagonal of the ground-truth joints' box, per joint over all videos and
frames but the first, then averaged over joints.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import scipy.io
import torch
from tqdm import tqdm

from tcore.eval import metrics
from tcore.eval.features import (backbone_patch_encoder, check_input_size, evaluates_frozen,
                                 extract_features, patch_size_of, resolve_device)
from tcore.eval.io import read_rgb, read_same_size, write_mat
from tcore.eval.propagation import propagate_labels
from tcore.eval.report import staged_run, write_results
from tcore.eval.segment import PropagationSettings

N_JOINTS = 15
JHMDB_SIZE = (320, 320)
GAUSSIAN_SIGMA = 0.5
PCK_THRESHOLDS = (0.1, 0.2)


def test_videos(root: Path, split: int = 1) -> list[tuple[str, str]]:
    """(class, video) pairs of the test part of a split."""
    split_dir = root / "splits"
    files = sorted(split_dir.glob(f"*_test_split{split}.txt"))
    if not files:
        raise FileNotFoundError(f"{split_dir}: no *_test_split{split}.txt split files")
    videos = []
    for path in files:
        action = path.name[: -len(f"_test_split{split}.txt")]
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("1", "2"):
                raise ValueError(f"{path}:{line_no}: expected '<video>.avi 1|2', got {line!r}")
            if parts[1] == "2":
                videos.append((action, Path(parts[0]).stem))
    if not videos:
        raise ValueError(f"{split_dir}: split {split} lists no test video")
    return videos


def video_inputs(root: Path, action: str, video: str,
                 warnings: list[str]) -> tuple[list[Path], np.ndarray]:
    """A test video's frame paths and its 0-based joints [2, 15, T]: the frames cut to the
    annotated poses, with a warning, where there are more frames than poses."""
    name = f"{action}/{video}"
    frame_dir = root / "Rename_Images" / action / video
    frame_paths = sorted(frame_dir.glob("*.png")) if frame_dir.is_dir() else []
    if not frame_paths:
        raise FileNotFoundError(f"{frame_dir}: no .png frames")
    truth = read_joints(root / "joint_positions" / action / video / "joint_positions.mat")
    n_poses = truth.shape[2]
    if n_poses > len(frame_paths):
        raise ValueError(f"{name}: {n_poses} annotated poses but only {len(frame_paths)} frames")
    if n_poses < len(frame_paths):
        warnings.append(f"{name}: {len(frame_paths)} frames but {n_poses} poses; only the "
                        f"first {n_poses} frames are propagated and scored")
    return frame_paths[:n_poses], truth


def read_joints(path: Path) -> np.ndarray:
    """pos_img of a joint_positions.mat as 0-based [2, 15, T] float64."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: joint positions not found")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as error:  # scipy raises several types for bad files
        raise ValueError(f"{path}: cannot read .mat file ({error})") from error
    if "pos_img" not in mat:
        raise ValueError(f"{path}: no 'pos_img' field")
    pos = np.asarray(mat["pos_img"], dtype=np.float64)
    if pos.ndim != 3 or pos.shape[:2] != (2, N_JOINTS):
        raise ValueError(f"{path}: pos_img has shape {pos.shape}, expected [2, {N_JOINTS}, T]")
    if pos.shape[2] == 0:
        raise ValueError(f"{path}: holds no poses (pos_img has shape {pos.shape})")
    return pos - 1.0  # MATLAB coordinates are 1-based


def gaussian_maps(points: np.ndarray, grid: tuple[int, int],
                  sigma: float = GAUSSIAN_SIGMA) -> np.ndarray:
    """[h, w, J] maps, joint j a Gaussian of peak 1 on a (6 sigma + 1)-cell window.

    points: [2, J] (x, y) in feature cells. The window starts at trunc(p - 3 sigma) and its
    peak is the window's middle cell (the CRW / pose-hg drawing); joints whose window falls
    outside the grid leave their map empty.
    """
    height, width = grid
    maps = np.zeros((height, width, points.shape[1]), dtype=np.float32)
    size = int(6 * sigma + 1)
    centre = size // 2
    offsets = np.arange(size, dtype=np.float64)
    kernel = np.exp(-((offsets[None, :] - centre) ** 2 + (offsets[:, None] - centre) ** 2)
                    / (2 * sigma ** 2))
    for j in range(points.shape[1]):
        x0, y0 = int(points[0, j] - 3 * sigma), int(points[1, j] - 3 * sigma)
        x1, y1 = int(points[0, j] + 3 * sigma + 1), int(points[1, j] + 3 * sigma + 1)
        if x0 >= width or y0 >= height or x1 < 0 or y1 < 0:
            continue
        gx0, gy0 = max(0, -x0), max(0, -y0)
        ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(x1, width), min(y1, height)
        maps[iy0:iy1, ix0:ix1, j] = kernel[gy0:gy0 + iy1 - iy0, gx0:gx0 + ix1 - ix0]
    return maps


def joint_labels(points: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[h, w, 1 + J]: background channel (1 where no joint map is set), then joint maps."""
    maps = gaussian_maps(points, grid)
    background = (maps.sum(-1, keepdims=True) == 0).astype(np.float32)
    return np.concatenate([background, maps], axis=-1)


# A joint is read out of its propagated map as the value-weighted mean of its strongest
# cells: 5 of them in T-CoRe's released evaluation code (its process_pose; CRW's, which it
# adapts, used 3), so PCK is comparable with the published figures.
KEYPOINT_TOP_CELLS = 5


def read_out_keypoints(soft: torch.Tensor, top: int = KEYPOINT_TOP_CELLS) -> np.ndarray:
    """[T, h, w, 1 + J] propagated maps -> [2, J, T] (x, y) in feature cells; -1 where a
    joint's map is all zero."""
    joints = soft[..., 1:]
    n_frames, height, width, n_joints = joints.shape
    flat = joints.reshape(n_frames, height * width, n_joints)
    k = min(top, height * width)
    values, index = torch.topk(flat, k, dim=1)
    weights = values / values.sum(1, keepdim=True).clamp_min(1e-30)
    xs = (index % width).float()
    ys = torch.div(index, width, rounding_mode="floor").float()
    coords = torch.stack([(xs * weights).sum(1), (ys * weights).sum(1)])  # [2, T, J]
    coords[:, flat.sum(1) == 0] = -1
    return coords.permute(0, 2, 1).cpu().numpy().astype(np.float64)


@evaluates_frozen
def evaluate_jhmdb(backbone, data_root, output_dir, *, size=JHMDB_SIZE, topk: int = 7,
                   radius: float = 20, temperature: float = 0.7, context: int = 20, device=None,
                   visualize: bool = False, progress: bool = True, split: int = 1,
                   videos: list[tuple[str, str]] | None = None, batch_size: int = 8,
                   chunk_size: int = 1024, encoder=None, patch: int | None = None,
                   run_info: dict | None = None) -> dict:
    """Propagate joints through the JHMDB test videos; writes the predicted joints as
    OUTPUT/predictions/joint_positions/<class>/<video>/joint_positions.mat (1-based pos_img,
    the benchmark's layout) and results.json/csv; returns {"summary": {"PCK@0.1", "PCK@0.2"}}."""
    from tcore.eval.visualize import keypoint_strip

    root, output = Path(data_root), Path(output_dir)
    device = resolve_device(backbone, device)
    encode = encoder if encoder is not None else backbone_patch_encoder(backbone)
    patch = patch if patch is not None else patch_size_of(backbone)
    size = check_input_size(size, patch)
    grid = (size[0] // patch, size[1] // patch)
    settings = PropagationSettings(topk=topk, radius=radius, temperature=temperature,
                                   context=context, batch_size=batch_size, chunk_size=chunk_size)
    pairs = videos if videos is not None else test_videos(root, split)
    if not pairs:
        raise ValueError("videos: an empty list, no video to evaluate")
    distances: list[list[np.ndarray]] = [[] for _ in range(N_JOINTS)]
    seq_rows, warnings = [], []
    # Every video's frames and joints are found before the first (long) propagation.
    inputs = [(action, video, *video_inputs(root, action, video, warnings))
              for action, video in pairs]
    started = time.time()
    with staged_run(output) as staging:
        bar = tqdm(inputs, desc="jhmdb", disable=not progress, unit="video")
        for action, video, frame_paths, truth in bar:
            name = f"{action}/{video}"
            bar.set_postfix_str(name)
            frames = read_same_size(frame_paths, read_rgb)
            pred, per_joint = _propagate_joints(encode, frames, truth, size, grid, patch, settings,
                                                device)
            for j in range(N_JOINTS):
                distances[j].append(per_joint[j])
            seq_rows.append({"sequence": name, "frames": len(frame_paths),
                             **{f"PCK@{th}": metrics.pck(per_joint, th)[0]
                                for th in PCK_THRESHOLDS}})
            _write_joints(staging / "predictions" / "joint_positions" / action / video
                          / "joint_positions.mat", pred)
            if visualize:
                keypoint_strip(staging / "visualize" / f"{action}__{video}.png", frames, pred)
        pooled = [np.concatenate(d) if d else np.zeros(0) for d in distances]
        summary, per_joint_rows = {}, []
        for th in PCK_THRESHOLDS:
            mean, joints = metrics.pck(pooled, th)
            summary[f"PCK@{th}"] = mean
            per_joint_rows.append({"threshold": th, **{f"joint{j}": float(v)
                                                       for j, v in enumerate(joints)}})
        results = {"benchmark": "jhmdb", "split": split, "data": str(root.resolve()),
                   **(run_info or {}),
                   "settings": {"size": list(size), "sigma": GAUSSIAN_SIGMA,
                                "keypoint_top_cells": KEYPOINT_TOP_CELLS,
                                **settings.as_dict()},
                   "summary": summary, "per_sequence": seq_rows, "per_joint": per_joint_rows,
                   "warnings": warnings, "seconds": round(time.time() - started, 2)}
        write_results(staging, results)
    return results


def _propagate_joints(encode, frames: np.ndarray, truth: np.ndarray, size, grid, patch: int,
                      settings: PropagationSettings, device) -> tuple[np.ndarray, list]:
    """One video's predicted joints (image pixels, -1 where none) and per-joint normalised
    distances to the truth."""
    height, width = frames.shape[1:3]
    first_cells = truth[:, :, 0] * np.array([[grid[1] / width], [grid[0] / height]])
    features = extract_features(encode, frames, size, patch=patch,
                                batch_size=settings.batch_size, device=device)
    first = torch.from_numpy(joint_labels(first_cells, grid)).to(features.device)
    soft = propagate_labels(features, first, topk=settings.topk, radius=settings.radius,
                            temperature=settings.temperature, context=settings.context,
                            chunk_size=settings.chunk_size)
    pred = read_out_keypoints(soft).copy()
    valid = pred[0] >= 0
    pred[0] = np.where(valid, pred[0] / grid[1] * width, -1)
    pred[1] = np.where(valid, pred[1] / grid[0] * height, -1)
    return pred, metrics.normalized_joint_distances(pred, truth, valid)


def _write_joints(path: Path, pred: np.ndarray) -> None:
    """Predicted joints as a joint_positions.mat (1-based pos_img; missing joints 0)."""
    write_mat(path, {"pos_img": np.where(pred >= 0, pred + 1.0, 0.0)})
