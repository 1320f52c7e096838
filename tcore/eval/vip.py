"""VIP (Video Instance-level Parsing) body-part propagation: mIoU over 20 classes.

Layout: ROOT/Images/<video>/<frame>.jpg and ROOT/Annotations/Category_ids/<video>/<frame>.png
(class ids 0 = background, 1..19 parts; 255 = ignore). Videos: ROOT/lists/val_videos.txt (one
name per line) when present, else every folder of Annotations/Category_ids. The first frame's
annotation is propagated; every later frame that has an annotation is scored, and one
confusion matrix is accumulated over all of them (the CRW evaluation), from which the
per-class IoUs and their mean are taken.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tcore.eval import metrics
from tcore.eval.features import (backbone_patch_encoder, evaluates_frozen, long_side_size,
                                 patch_size_of, resolve_device, short_side_size)
from tcore.eval.io import (read_label_png, read_name_list, read_rgb, read_same_size, size_text,
                           write_label_png)
from tcore.eval.report import staged_run, write_results
from tcore.eval.segment import PropagationSettings, propagate_segmentation

VIP_CLASSES = 20
VIP_SHORT_SIDE = 880
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


def video_names(root: Path) -> list[str]:
    listing = root / "lists" / "val_videos.txt"
    if listing.is_file():
        names = read_name_list(listing)
    else:
        ann_root = root / "Annotations" / "Category_ids"
        if not ann_root.is_dir():
            raise FileNotFoundError(f"{ann_root}: VIP annotation folder not found")
        names = sorted(p.name for p in ann_root.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{root}: no VIP video to evaluate")
    return names


def read_video(root: Path, name: str) -> tuple[list[Path], dict[str, Path]]:
    """Sorted frame paths and the annotations by frame stem; frame 0 must be annotated."""
    frame_dir = root / "Images" / name
    ann_dir = root / "Annotations" / "Category_ids" / name
    for folder in (frame_dir, ann_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: VIP video folder not found")
    frames = sorted(p for p in frame_dir.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not frames:
        raise FileNotFoundError(f"{frame_dir}: no frames")
    annotations = {p.stem: p for p in ann_dir.glob("*.png")}
    orphans = sorted(set(annotations) - {p.stem for p in frames})
    if orphans:
        raise ValueError(f"{ann_dir}: annotations without a frame: {orphans[:5]}")
    if frames[0].stem not in annotations:
        raise FileNotFoundError(f"{ann_dir}: first frame {frames[0].stem} has no annotation")
    return frames, annotations


def read_annotation(path: Path, shape: tuple[int, int], frame: Path) -> np.ndarray:
    """Class ids of one annotation, checked like the first: the frames' size, and ids below
    VIP_CLASSES or 255 (ignore). Any other id would silently drop out of the confusion."""
    labels = read_label_png(path)
    if labels.shape != tuple(shape):
        raise ValueError(f"{path}: annotation is {size_text(labels.shape)} but frame {frame} is "
                         f"{size_text(shape)}")
    bad = np.unique(labels[(labels >= VIP_CLASSES) & (labels != 255)])
    if bad.size:
        raise ValueError(f"{path}: class ids {bad[:10].tolist()} outside 0..{VIP_CLASSES - 1} "
                         "(255 = ignore)")
    return labels


def input_size(annotation_shape, size, long_side: int | None, short_side: int,
               patch: int) -> tuple[int, int]:
    """A video's network input size: the fixed size, else the released loader's long-side
    rule, else the short side (METHOD.md)."""
    if size is not None:
        return tuple(size)
    if long_side is not None:
        return long_side_size(annotation_shape, long_side)
    return short_side_size(annotation_shape, short_side, patch)


def score_video(truths: dict[int, np.ndarray], prediction: np.ndarray,
                score_first_frame: bool) -> tuple[np.ndarray, int]:
    """The video's confusion matrix over its annotated frames (from frame 1, or 0 too), and
    how many frames it counts."""
    confusion = np.zeros((VIP_CLASSES, VIP_CLASSES), dtype=np.int64)
    scored = [t for t in sorted(truths) if t >= (0 if score_first_frame else 1)]
    for t in scored:
        confusion += metrics.confusion_matrix(truths[t], prediction[t], VIP_CLASSES)
    return confusion, len(scored)


@evaluates_frozen
def evaluate_vip(backbone, data_root, output_dir, *, short_side: int = VIP_SHORT_SIDE,
                 size=None, long_side: int | None = None, score_first_frame: bool = False,
                 topk: int = 10, radius: float = 20, temperature: float = 0.7,
                 context: int = 20, device=None, visualize: bool = False, progress: bool = True,
                 videos: list[str] | None = None, batch_size: int = 8, chunk_size: int = 1024,
                 encoder=None, patch: int | None = None, run_info: dict | None = None) -> dict:
    """Propagate part labels through VIP videos; writes OUTPUT/predictions/<video>/<frame>.png
    and results.json/csv; returns {"summary": {"mIoU", ...}, "per_class", "per_sequence"}.
    `size` (H, W) overrides the short-side resize, and so does `long_side` (the released
    code's VIP loader: the long side, the other floored to a multiple of 64).
    `score_first_frame`: frame 0 is scored too, its prediction being its own labels read out
    at the feature grid, as the released code writes and scores it (METHOD.md: from frame 1)."""
    if size is not None and long_side is not None:
        raise ValueError("give a fixed size or a long side, not both")
    from tcore.eval.visualize import mask_strip

    root, output = Path(data_root), Path(output_dir)
    device = resolve_device(backbone, device)
    encode = encoder if encoder is not None else backbone_patch_encoder(backbone)
    patch = patch if patch is not None else patch_size_of(backbone)
    if long_side is not None and (long_side % patch or 64 % patch):
        raise ValueError(f"--long-side {long_side}: the released loader's sizes (the long "
                         f"side, the other a multiple of 64) need a patch size dividing 64 and "
                         f"a long side that is a multiple of it ({patch}); give --size or "
                         "--short-side otherwise")
    settings = PropagationSettings(topk=topk, radius=radius, temperature=temperature,
                                   context=context, batch_size=batch_size, chunk_size=chunk_size)
    names = videos if videos is not None else video_names(root)
    if not names:
        raise ValueError("videos: an empty list, no video to evaluate")
    total = np.zeros((VIP_CLASSES, VIP_CLASSES), dtype=np.int64)
    seq_rows, warnings, input_sizes = [], [], {}
    # Every video's folders and first annotation are found before the first (long) propagation.
    layouts = {name: read_video(root, name) for name in names}
    started = time.time()
    with staged_run(output) as staging:
        bar = tqdm(names, desc="vip", disable=not progress, unit="video")
        for name in bar:
            bar.set_postfix_str(name)
            frames_paths, annotations = layouts[name]
            frames = read_same_size(frames_paths, read_rgb)
            # every annotation is read and checked before the (long) propagation
            truths = {t: read_annotation(annotations[path.stem], frames.shape[1:3], path)
                      for t, path in enumerate(frames_paths) if path.stem in annotations}
            first = truths[0]
            video_size = input_size(first.shape, size, long_side, short_side, patch)
            input_sizes[name] = list(video_size)
            prediction, _ = propagate_segmentation(encode, frames, first, size=video_size,
                                                   patch=patch, settings=settings, device=device,
                                                   first_read_out=score_first_frame,
                                                   centred_nearest=True)
            confusion, scored = score_video(truths, prediction, score_first_frame)
            unscored = len(frames_paths) - (0 if score_first_frame else 1) - scored
            if unscored:
                warnings.append(f"{name}: {unscored} frames have no annotation; propagated, "
                                "not scored")
            total += confusion
            seq_rows.append({"sequence": name, "frames": len(frames_paths),
                             "scored_frames": scored, "mIoU": metrics.mean_iou(confusion)})
            for path, labels in zip(frames_paths, prediction):
                write_label_png(staging / "predictions" / name / f"{path.stem}.png", labels)
            if visualize:
                mask_strip(staging / "visualize" / f"{name}.png", frames, prediction)
        ious = metrics.class_iou(total)
        results = {"benchmark": "vip", "data": str(root.resolve()), **(run_info or {}),
                   # the setting that sized the inputs: a fixed size, or the short side
                   "settings": {"short_side": None if size or long_side else short_side,
                                "long_side": long_side,
                                "size": list(size) if size else None,
                                "first_frame_scored": score_first_frame,
                                **settings.as_dict()},
                   "input_sizes": input_sizes,
                   "summary": {"mIoU": metrics.mean_iou(total),
                               "classes_present": int(np.sum(~np.isnan(ious)))},
                   "per_class": [{"class": c, "IoU": float(v)} for c, v in enumerate(ious)],
                   "per_sequence": seq_rows, "warnings": warnings,
                   "seconds": round(time.time() - started, 2)}
        write_results(staging, results)
    return results
