"""DAVIS-2017 semi-supervised video object segmentation: propagation and official scoring.

Layout (official): ROOT/JPEGImages/480p/<seq>/%05d.jpg, ROOT/Annotations/480p/<seq>/%05d.png
(palette, object ids, 255 = void), ROOT/ImageSets/2017/<split>.txt.

Scoring follows the davis2017-evaluation semi-supervised task: the objects of a sequence are
ids 1..max(id in the first annotation); the first and last frames are left out; a result whose
PNGs hold an id above that count is an error; objects the result never mentions are scored as
empty masks; per object J and F give Mean / Recall / Decay; the summary averages over all
objects of all sequences and J&F-Mean = (J-Mean + F-Mean) / 2.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tcore.eval import metrics
from tcore.eval.features import (backbone_patch_encoder, check_input_size, evaluates_frozen,
                                 native_size, patch_size_of, resolve_device)
from tcore.eval.io import (read_label_png, read_name_list, read_rgb, read_same_size, size_text,
                           write_label_png)
from tcore.eval.report import staged_run, write_results
from tcore.eval.segment import PropagationSettings, propagate_segmentation

DAVIS_SIZE = (480, 880)
SUMMARY_KEYS = ("J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay")


@dataclass(frozen=True)
class DavisSequence:
    name: str
    frames: list[Path]
    annotations: list[Path]


def sequence_names(root: Path, split: str = "val", year: str = "2017") -> list[str]:
    split_file = root / "ImageSets" / year / f"{split}.txt"
    if not split_file.is_file():
        raise FileNotFoundError(f"{split_file}: DAVIS split file not found (expected the "
                                f"official layout ROOT/ImageSets/{year}/{split}.txt, one "
                                "sequence name a line)")
    names = read_name_list(split_file)
    if not names:
        raise ValueError(f"{split_file}: lists no sequence")
    return names


def read_sequence(root: Path, name: str, resolution: str = "480p") -> DavisSequence:
    """Frames and annotations of one sequence; counts and names must agree."""
    frame_dir = root / "JPEGImages" / resolution / name
    ann_dir = root / "Annotations" / resolution / name
    for folder in (frame_dir, ann_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: sequence folder not found")
    frames = sorted(frame_dir.glob("*.jpg"))
    annotations = sorted(ann_dir.glob("*.png"))
    if not frames:
        raise FileNotFoundError(f"{frame_dir}: no .jpg frames")
    if not annotations or annotations[0].stem != frames[0].stem:
        raise FileNotFoundError(f"{ann_dir}: the first frame {frames[0].stem} has no "
                                "annotation (semi-supervised evaluation needs it)")
    return DavisSequence(name, frames, annotations)


def _check_full_annotations(seq: DavisSequence) -> None:
    """From the listing alone, so that every sequence is checked before the first one is
    propagated: an annotation per frame, and at least 3 frames."""
    if len(seq.frames) < 3:
        raise ValueError(f"sequence {seq.name}: needs at least 3 frames (first and last are "
                         f"not scored), has {len(seq.frames)}")
    frame_stems = [p.stem for p in seq.frames]
    ann_stems = [p.stem for p in seq.annotations]
    if frame_stems != ann_stems:
        missing = sorted(set(frame_stems) - set(ann_stems))[:5]
        extra = sorted(set(ann_stems) - set(frame_stems))[:5]
        raise ValueError(f"sequence {seq.name}: {len(seq.frames)} frames but "
                         f"{len(seq.annotations)} annotations (missing {missing}, extra {extra})")


# ---------------------------------------------------------------------------------------
# Scoring (davis-score)
# ---------------------------------------------------------------------------------------
def object_masks(labels: np.ndarray, n_objects: int) -> np.ndarray:
    """[T,H,W] ids -> [n_objects, T, H, W] bool masks of ids 1..n_objects."""
    ids = np.arange(1, n_objects + 1).reshape(-1, 1, 1, 1)
    return labels[None] == ids


def score_sequence(truth: np.ndarray, prediction: np.ndarray, name: str) -> list[dict]:
    """Per-object rows of one sequence from full-length [T,H,W] id maps (the first and last
    frames are not scored)."""
    if truth.shape != prediction.shape:
        raise ValueError(f"sequence {name}: predictions {prediction.shape} and annotations "
                         f"{truth.shape} differ in shape")
    return score_objects(count_objects(truth[0]), truth[1:-1], prediction[1:-1], name)


def count_objects(first_truth: np.ndarray) -> int:
    """Objects of a sequence: ids 1..max id of the first annotation (void 255 excluded)."""
    return int(np.where(first_truth == 255, 0, first_truth).max())


def score_objects(n_objects: int, truth: np.ndarray, prediction: np.ndarray,
                  name: str, sources: list[Path] | None = None) -> list[dict]:
    """Per-object rows (J and F statistics) over the scored frames.

    truth, prediction: [T',H,W] ids of the scored frames (all but the first and last); void
    (255) in the truth counts as background, as in the official semi-supervised task.
    sources: the prediction's file of each frame, named when one holds an id above the
    object count (an error, as in the official evaluation).
    """
    if truth.shape != prediction.shape:
        raise ValueError(f"sequence {name}: predictions {prediction.shape} and annotations "
                         f"{truth.shape} differ in shape")
    if truth.shape[0] == 0:
        raise ValueError(f"sequence {name}: needs at least 3 frames (first and last are not "
                         "scored)")
    truth = np.where(truth == 255, 0, truth)
    too_high = np.flatnonzero(prediction.reshape(len(prediction), -1).max(axis=1) > n_objects)
    if too_high.size:
        frame = int(too_high[0])
        where = f"{sources[frame]}: holds" if sources else f"sequence {name}: predictions hold"
        raise ValueError(f"{where} object id {int(prediction[frame].max())} but the first "
                         f"annotation of sequence {name} has only {n_objects} objects")
    gt_masks = object_masks(truth, n_objects)
    pred_masks = object_masks(prediction, n_objects)
    rows = []
    for index in range(n_objects):
        j = metrics.region_iou(gt_masks[index], pred_masks[index])
        f = metrics.boundary_f(gt_masks[index], pred_masks[index])
        j_mean, j_recall, j_decay = metrics.statistics(j)
        f_mean, f_recall, f_decay = metrics.statistics(f)
        rows.append({"sequence": name, "object": index + 1, "name": f"{name}_{index + 1}",
                     "J&F-Mean": (j_mean + f_mean) / 2, "J-Mean": j_mean, "J-Recall": j_recall,
                     "J-Decay": j_decay, "F-Mean": f_mean, "F-Recall": f_recall,
                     "F-Decay": f_decay, "frames": int(truth.shape[0])})
    return rows


def prediction_folder(results: Path, seq: DavisSequence) -> Path:
    folder = results / seq.name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no predictions for sequence {seq.name}")
    return folder


def read_prediction_sequence(results: Path, seq: DavisSequence,
                             size: tuple[int, int] | None = None) -> np.ndarray:
    """Predicted id maps of the scored frames (all but the first and last), like the
    official reader. With `size` (the annotations' H, W) a map of another size is an error
    naming its file, not just the sequence."""
    folder = prediction_folder(results, seq)
    maps = []
    for annotation in seq.annotations[1:-1]:
        path = folder / annotation.name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prediction missing (predictions must be indexed "
                                    "PNGs named like the annotations)")
        labels = read_label_png(path)
        if size is not None and labels.shape != tuple(size):
            raise ValueError(f"{path}: prediction is {size_text(labels.shape)} but annotation "
                             f"{annotation} is {size_text(size)}")
        maps.append(labels)
    return np.stack(maps)


def summarize(object_rows: list[dict]) -> dict:
    """Dataset numbers: each statistic averaged over all objects."""
    if not object_rows:
        return {key: float("nan") for key in SUMMARY_KEYS}
    summary = {key: float(np.mean([row[key] for row in object_rows])) for key in SUMMARY_KEYS[1:]}
    summary = {"J&F-Mean": (summary["J-Mean"] + summary["F-Mean"]) / 2, **summary}
    return summary


def per_sequence(object_rows: list[dict]) -> list[dict]:
    names = list(dict.fromkeys(row["sequence"] for row in object_rows))
    rows = []
    for name in names:
        objs = [row for row in object_rows if row["sequence"] == name]
        rows.append({"sequence": name, "objects": len(objs),
                     **{key: float(np.mean([r[key] for r in objs])) for key in SUMMARY_KEYS}})
    return rows


def score_davis(data_root, results_dir, *, split: str = "val", sequences: list[str] | None = None,
                progress: bool = True) -> dict:
    """Score palette PNG predictions in RESULTS/<seq>/%05d.png against DAVIS annotations."""
    root, results = Path(data_root), Path(results_dir)
    names = sequences if sequences is not None else sequence_names(root, split)
    object_rows: list[dict] = []
    # Every sequence's files and prediction folder are found before the first is scored.
    sequences_found = [read_sequence(root, name) for name in names]
    for seq in sequences_found:
        _check_full_annotations(seq)     # 3 frames or more, each annotated
        prediction_folder(results, seq)
    for seq in tqdm(sequences_found, desc="davis-score", disable=not progress, unit="video"):
        truth = read_same_size(seq.annotations, read_label_png)
        prediction = read_prediction_sequence(results, seq, truth.shape[1:])
        sources = [results / seq.name / annotation.name for annotation in seq.annotations[1:-1]]
        object_rows += score_objects(count_objects(truth[0]), truth[1:-1], prediction,
                                     seq.name, sources)
    return {"benchmark": "davis-2017", "split": split, "summary": summarize(object_rows),
            "per_sequence": per_sequence(object_rows), "per_object": object_rows}


# ---------------------------------------------------------------------------------------
# Propagation + scoring (tcore eval davis)
# ---------------------------------------------------------------------------------------
@evaluates_frozen
def evaluate_davis(backbone, data_root, output_dir, *, size=DAVIS_SIZE, topk: int = 7,
                   radius: float = 20, temperature: float = 0.7, context: int = 20,
                   device=None, visualize: bool = False, progress: bool = True,
                   split: str = "val", sequences: list[str] | None = None, batch_size: int = 8,
                   chunk_size: int = 1024, encoder=None, patch: int | None = None,
                   run_info: dict | None = None) -> dict:
    """Propagate first-frame masks through every sequence with the frozen backbone, write
    OUTPUT/predictions/<seq>/%05d.png, score them like davis2017-evaluation and write
    results.json / results.csv. size=None uses each video's own size (multiple of 16).
    `encoder` (images -> patch tokens) and `patch` replace the backbone when given (tests);
    `run_info` is recorded in results.json (e.g. the checkpoint evaluated).

    Returns the results dict ({"summary": {"J&F-Mean", ...}, "per_sequence", "per_object",
    "settings", "warnings"}).
    """
    from tcore.eval.visualize import mask_strip

    root, output = Path(data_root), Path(output_dir)
    device = resolve_device(backbone, device)
    encode = encoder if encoder is not None else backbone_patch_encoder(backbone)
    patch = patch if patch is not None else patch_size_of(backbone)
    if size is not None:
        size = check_input_size(size, patch)
    settings = PropagationSettings(topk=topk, radius=radius, temperature=temperature,
                                   context=context, batch_size=batch_size, chunk_size=chunk_size)
    names = sequences if sequences is not None else sequence_names(root, split)
    if not names:
        raise ValueError("sequences: an empty list, no sequence to evaluate")
    object_rows, warnings, input_sizes = [], [], {}
    # Every sequence's files are found before the first (long) propagation.
    sequences_found = {name: read_sequence(root, name) for name in names}
    for seq in sequences_found.values():
        _check_full_annotations(seq)
    started = time.time()
    with staged_run(output) as staging:
        bar = tqdm(names, desc="davis", disable=not progress, unit="video")
        for name in bar:
            bar.set_postfix_str(name)
            seq = sequences_found[name]
            frames = read_same_size(seq.frames, read_rgb)
            truth = read_same_size(seq.annotations, read_label_png)
            if truth.shape[1:] != frames.shape[1:3]:
                raise ValueError(f"sequence {name}: annotation {seq.annotations[0]} is "
                                 f"{size_text(truth.shape[1:])} but frame {seq.frames[0]} is "
                                 f"{size_text(frames.shape[1:3])}")
            warnings += _sequence_warnings(name, truth)
            first = np.where(truth[0] == 255, 0, truth[0])
            video_size = size if size is not None else native_size(frames.shape[1:3], patch)
            input_sizes[name] = list(video_size)
            prediction, _ = propagate_segmentation(encode, frames, first, size=video_size,
                                                   patch=patch, settings=settings, device=device)
            for path, labels in zip(seq.annotations, prediction):
                write_label_png(staging / "predictions" / name / path.name, labels)
            object_rows += score_sequence(truth, prediction, name)
            if visualize:
                mask_strip(staging / "visualize" / f"{name}.png", frames, prediction)
        results = {"benchmark": "davis-2017", "split": split, "data": str(root.resolve()),
                   **(run_info or {}),
                   "settings": {"size": list(size) if size is not None else "native",
                                **settings.as_dict()},
                   "input_sizes": input_sizes,
                   "summary": summarize(object_rows), "per_sequence": per_sequence(object_rows),
                   "per_object": object_rows, "warnings": warnings,
                   "predictions": str((output / "predictions").resolve()),
                   "seconds": round(time.time() - started, 2)}
        write_results(staging, results)
    return results


def _sequence_warnings(name: str, truth: np.ndarray) -> list[str]:
    """Cases the official evaluation scores in a particular way, reported so none is silent."""
    found = []
    clean = np.where(truth == 255, 0, truth)
    n_objects = int(clean[0].max())
    if n_objects == 0:
        found.append(f"{name}: first annotation is empty; the sequence has no object to score")
    first_ids = set(np.unique(clean[0]).tolist())
    later_ids = set(np.unique(clean[1:]).tolist()) if len(clean) > 1 else set()
    for obj in sorted(later_ids - first_ids - {0}):
        if obj <= n_objects:
            found.append(f"{name}: object {obj} is absent from the first frame; it cannot be "
                         "propagated and is scored against empty predictions")
        else:
            found.append(f"{name}: object {obj} appears after the first frame with an id above "
                         f"the first frame's {n_objects}; the official evaluation ignores it")
    return found
