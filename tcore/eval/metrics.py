"""Benchmark metrics: DAVIS-2017 J and F, VIP mIoU, JHMDB PCK.

The DAVIS functions follow the definitions of the official davis2017-evaluation package
(region Jaccard, boundary F-measure with a disk tolerance, Mean / Recall / Decay statistics)
so that our numbers can be put next to published tables. They are written from those
definitions, not copied.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

# Boundary tolerance of the DAVIS F-measure, as a fraction of the image diagonal.
BOUNDARY_TOLERANCE = 0.008


# ---------------------------------------------------------------------------------------
# DAVIS region similarity J
# ---------------------------------------------------------------------------------------
def region_iou(annotation: np.ndarray, segmentation: np.ndarray) -> np.ndarray | float:
    """Jaccard index of binary masks; [H,W] -> float, [T,H,W] -> [T].

    Both masks empty counts as a perfect match (1), as in the official evaluation.
    """
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} "
                         "differ in shape")
    inter = np.sum(annotation & segmentation, axis=(-2, -1))
    union = np.sum(annotation | segmentation, axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / union
    if np.ndim(iou) == 0:
        return 1.0 if union == 0 else float(iou)
    iou = np.asarray(iou, dtype=np.float64)
    iou[union == 0] = 1.0
    return iou


# ---------------------------------------------------------------------------------------
# DAVIS contour accuracy F
# ---------------------------------------------------------------------------------------
def boundary_map(mask: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary of a binary mask (the Martin et al. seg2bmap convention).

    A pixel is on the boundary when it differs from its right, lower or lower-right
    neighbour; the last row compares only with the right neighbour, the last column only
    with the lower one, and the bottom-right pixel is never a boundary. This places the
    boundary half a pixel towards the origin, like the official evaluation.
    """
    seg = np.asarray(mask).astype(bool)
    if seg.ndim != 2:
        raise ValueError(f"boundary_map takes a 2-D mask, got shape {seg.shape}")
    right = np.zeros_like(seg)
    down = np.zeros_like(seg)
    down_right = np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    down[:-1, :] = seg[1:, :]
    down_right[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ down) | (seg ^ down_right)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ down[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk(radius: int) -> np.ndarray:
    """Disk structuring element: offsets with dx^2 + dy^2 <= radius^2."""
    r = int(radius)
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (xx * xx + yy * yy) <= r * r


def boundary_tolerance_pixels(shape: tuple[int, int], bound_th: float = BOUNDARY_TOLERANCE) -> int:
    """Match radius in pixels: bound_th itself when >= 1, else ceil(bound_th * diagonal)."""
    if bound_th >= 1:
        return int(bound_th)
    return int(math.ceil(bound_th * math.hypot(shape[0], shape[1])))


def boundary_f_frame(annotation: np.ndarray, segmentation: np.ndarray,
                     bound_th: float = BOUNDARY_TOLERANCE) -> float:
    """Boundary F-measure of one frame (segmentation = prediction, annotation = truth)."""
    annotation = np.asarray(annotation).astype(bool)
    segmentation = np.asarray(segmentation).astype(bool)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} "
                         "differ in shape")
    radius = boundary_tolerance_pixels(annotation.shape, bound_th)
    pred_b = boundary_map(segmentation)
    gt_b = boundary_map(annotation)
    n_pred, n_gt = int(pred_b.sum()), int(gt_b.sum())
    # Degenerate cases exactly as the official f_measure treats them.
    if n_pred == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_pred > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_pred == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        struct = disk(radius)
        pred_dil = ndimage.binary_dilation(pred_b, structure=struct)
        gt_dil = ndimage.binary_dilation(gt_b, structure=struct)
        precision = float(np.sum(pred_b & gt_dil)) / n_pred
        recall = float(np.sum(gt_b & pred_dil)) / n_gt
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def boundary_f(annotation: np.ndarray, segmentation: np.ndarray,
               bound_th: float = BOUNDARY_TOLERANCE) -> np.ndarray | float:
    """Boundary F-measure; [H,W] -> float, [T,H,W] -> [T]."""
    annotation = np.asarray(annotation)
    segmentation = np.asarray(segmentation)
    if annotation.shape != segmentation.shape:
        raise ValueError(f"annotation {annotation.shape} and segmentation {segmentation.shape} "
                         "differ in shape")
    if annotation.ndim == 2:
        return boundary_f_frame(annotation, segmentation, bound_th)
    if annotation.ndim != 3:
        raise ValueError(f"boundary_f takes [H,W] or [T,H,W] masks, got {annotation.shape}")
    return np.array([boundary_f_frame(a, s, bound_th) for a, s in zip(annotation, segmentation)],
                    dtype=np.float64)


# ---------------------------------------------------------------------------------------
# DAVIS statistics
# ---------------------------------------------------------------------------------------
def decay_bins(n_frames: int, n_bins: int = 4) -> list[slice]:
    """The official Decay bins: edges round(linspace(1, n, 5)) - 1, each bin inclusive of
    both edges (neighbouring bins share their edge frame)."""
    edges = (np.round(np.linspace(1, n_frames, n_bins + 1) + 1e-10) - 1).astype(np.int64)
    return [slice(int(edges[i]), int(edges[i + 1]) + 1) for i in range(n_bins)]


def statistics(per_frame: np.ndarray) -> tuple[float, float, float]:
    """(Mean, Recall, Decay) of a per-frame measure, NaNs ignored.

    Recall is the fraction of frames scoring strictly above 0.5; Decay is the mean of the
    first of four bins minus the mean of the last.
    """
    values = np.asarray(per_frame, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"statistics needs a non-empty 1-D per-frame array, got {values.shape}")
    mean = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
    recall = float(np.nanmean(values > 0.5))
    bins = decay_bins(values.size)
    first, last = values[bins[0]], values[bins[-1]]
    with np.errstate(invalid="ignore"):
        decay = float(_nanmean_or_nan(first) - _nanmean_or_nan(last))
    return mean, recall, decay


def _nanmean_or_nan(values: np.ndarray) -> float:
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmean(values))


# ---------------------------------------------------------------------------------------
# VIP: mean IoU over classes from an accumulated confusion matrix
# ---------------------------------------------------------------------------------------
def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, n_classes: int) -> np.ndarray:
    """[n_classes, n_classes] counts, rows = truth, columns = prediction.

    Pixels whose truth is outside [0, n_classes) (e.g. 255 = ignore) are not counted.
    """
    truth = np.asarray(truth).astype(np.int64)
    prediction = np.asarray(prediction).astype(np.int64)
    # shapes, not sizes: maps of equal pixel count but other shape would pair wrong pixels
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in "
                         "shape")
    truth, prediction = truth.ravel(), prediction.ravel()
    if prediction.size and (prediction.min() < 0 or prediction.max() >= n_classes):
        raise ValueError(f"prediction holds labels outside [0, {n_classes})")
    valid = (truth >= 0) & (truth < n_classes)
    index = truth[valid] * n_classes + prediction[valid]
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU = TP / (TP + FP + FN); NaN for a class absent from truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean of the per-class IoUs over classes that occur (truth or prediction)."""
    ious = class_iou(confusion)
    if np.all(np.isnan(ious)):
        return float("nan")
    return float(np.nanmean(ious))


# ---------------------------------------------------------------------------------------
# JHMDB: PCK normalised by the person box
# ---------------------------------------------------------------------------------------
def person_box_size(joints: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """Per-frame reference length 0.6 * diagonal of the visible joints' bounding box.

    joints: [2, J, T] (x, y); visible: [J, T] bool. Frames with no visible joint get NaN.
    """
    joints = np.asarray(joints, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool)
    sizes = np.full(joints.shape[2], np.nan)
    for t in range(joints.shape[2]):
        pts = joints[:, visible[:, t], t]
        if pts.shape[1] == 0:
            continue
        extent = pts.max(axis=1) - pts.min(axis=1)
        sizes[t] = 0.6 * float(np.hypot(extent[0], extent[1]))
    return sizes


def normalized_joint_distances(pred: np.ndarray, truth: np.ndarray, visible: np.ndarray,
                               skip_first: bool = True) -> list[np.ndarray]:
    """Distances pred-to-truth divided by the person size, one array per joint.

    pred, truth: [2, J, T]; visible: [J, T]. The first frame is given (ground truth) in the
    propagation protocol and is left out when skip_first.
    """
    pred = np.asarray(pred, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    visible = np.asarray(visible, dtype=bool).copy()
    if pred.shape != truth.shape or visible.shape != pred.shape[1:]:
        raise ValueError(f"pred {pred.shape}, truth {truth.shape}, visible {visible.shape} "
                         "do not agree")
    sizes = person_box_size(truth, visible)
    if skip_first:
        visible[:, 0] = False
    dist = np.hypot(pred[0] - truth[0], pred[1] - truth[1]) / sizes[None, :]
    return [dist[j, visible[j]] for j in range(pred.shape[1])]


def pck(per_joint_distances: list[np.ndarray], threshold: float) -> tuple[float, np.ndarray]:
    """PCK at a threshold: per joint the fraction of distances <= threshold, and their mean.

    Joints without any evaluated frame get NaN and are left out of the mean.
    """
    per_joint = np.array([np.mean(d <= threshold) if d.size else np.nan
                          for d in per_joint_distances], dtype=np.float64)
    if np.all(np.isnan(per_joint)):
        return float("nan"), per_joint
    return float(np.nanmean(per_joint)), per_joint
