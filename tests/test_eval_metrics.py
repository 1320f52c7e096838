"""Benchmark metrics against hand-computed cases (DAVIS J/F/statistics, VIP mIoU, JHMDB PCK)."""
import math

import numpy as np
import pytest
from scipy import ndimage

from tcore.eval import metrics


def square(size=20, top=5, left=5, side=5):
    mask = np.zeros((size, size), dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


# ----------------------------------------------------------------------------- J
def test_region_iou_known_overlap():
    gt = square(left=5)
    pred = square(left=7)  # 5x5 squares overlapping in 5x3
    assert metrics.region_iou(gt, pred) == pytest.approx(15 / 35)


def test_region_iou_empty_cases():
    empty = np.zeros((6, 6), dtype=bool)
    full = np.ones((6, 6), dtype=bool)
    assert metrics.region_iou(empty, empty) == 1.0
    assert metrics.region_iou(empty, full) == 0.0
    stacked = metrics.region_iou(np.stack([empty, full]), np.stack([empty, empty]))
    np.testing.assert_array_equal(stacked, [1.0, 0.0])


def test_region_iou_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.region_iou(np.zeros((4, 4)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------- F
def test_boundary_map_of_a_square_is_the_outline_shifted_towards_the_origin():
    bmap = metrics.boundary_map(square(size=20, top=5, left=5, side=5))
    expected = np.zeros((20, 20), dtype=bool)
    expected[4:10, 4:10] = True
    expected[5:9, 5:9] = False  # a one-pixel outline of rows/cols 4..9
    np.testing.assert_array_equal(bmap, expected)
    assert bmap.sum() == 20


def test_boundary_map_edges_of_the_image():
    mask = np.zeros((4, 4), dtype=bool)
    mask[:, 2:] = True  # touches the right and bottom borders
    bmap = metrics.boundary_map(mask)
    # column 1 differs from its right neighbour; the last row compares only to the right,
    # so (3, 1) is a boundary; the last column compares only downwards (never differs);
    # the bottom-right corner is never a boundary.
    expected = np.zeros((4, 4), dtype=bool)
    expected[:, 1] = True
    np.testing.assert_array_equal(bmap, expected)


def test_tolerance_radius_follows_the_diagonal():
    assert metrics.boundary_tolerance_pixels((480, 854)) == 8  # ceil(0.008 * 979.6)
    assert metrics.boundary_tolerance_pixels((20, 20)) == 1
    assert metrics.boundary_tolerance_pixels((20, 20), bound_th=3) == 3


def test_boundary_f_shift_within_tolerance_is_perfect():
    assert metrics.boundary_f(square(left=5), square(left=6)) == pytest.approx(1.0)


def test_boundary_f_known_partial_match():
    # 20x20 -> tolerance 1 pixel (4-neighbourhood disk). Shifting a 5x5 square by 3 columns:
    # of the 20 predicted boundary pixels, 10 lie within one pixel of the true boundary
    # (3+1 on the top row, 3+1 on the bottom row, 2 on the left column), and symmetrically
    # for recall, so precision = recall = F = 0.5.
    assert metrics.boundary_f(square(left=5), square(left=8)) == pytest.approx(0.5)


def test_boundary_f_far_apart_is_zero_and_empty_cases():
    assert metrics.boundary_f(square(left=0, side=4), square(left=12, side=4)) == 0.0
    empty = np.zeros((20, 20), dtype=bool)
    assert metrics.boundary_f(empty, empty) == 1.0       # no boundary either side
    assert metrics.boundary_f(square(), empty) == 0.0    # precision 1, recall 0
    assert metrics.boundary_f(empty, square()) == 0.0    # precision 0, recall 1


def test_boundary_f_stacked_frames():
    gt = np.stack([square(left=5), square(left=5)])
    pred = np.stack([square(left=6), square(left=8)])
    np.testing.assert_allclose(metrics.boundary_f(gt, pred), [1.0, 0.5])


def test_disk_structuring_element():
    np.testing.assert_array_equal(metrics.disk(1), [[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    assert metrics.disk(2).sum() == 13


def _brute_force_f(annotation, segmentation, radius):
    """F from its definition: a boundary pixel matches when a boundary pixel of the other mask
    lies within Euclidean distance `radius` (all pairs compared)."""
    pred = np.argwhere(metrics.boundary_map(segmentation)).astype(float)
    gt = np.argwhere(metrics.boundary_map(annotation)).astype(float)
    dist = np.hypot(pred[:, None, 0] - gt[None, :, 0], pred[:, None, 1] - gt[None, :, 1])
    precision = np.mean(dist.min(1) <= radius)
    recall = np.mean(dist.min(0) <= radius)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_boundary_f_tolerance_is_a_euclidean_disk_not_a_square():
    # 20x20: tolerance 1 pixel, so a diagonal neighbour (distance sqrt 2) does not match.
    gt, pred = square(top=5, left=5), square(top=6, left=6)
    assert metrics.boundary_f(gt, pred) == pytest.approx(_brute_force_f(gt, pred, 1))
    assert metrics.boundary_f(gt, pred) < 1.0
    # 100x100: tolerance ceil(0.008 * 141.4) = 2 pixels; seeded random blobs
    rng = np.random.default_rng(0)
    for _ in range(3):
        blobs = ndimage.gaussian_filter(rng.normal(size=(2, 100, 100)), sigma=(0, 4, 4)) > 0
        assert metrics.boundary_f(blobs[0], blobs[1]) == pytest.approx(
            _brute_force_f(blobs[0], blobs[1], 2))


# ----------------------------------------------------------------------------- statistics
def test_statistics_mean_recall_decay_on_a_known_sequence():
    values = np.array([1.0, 1.0, 1.0, 0.5, 0.4, 0.2, 0.2, 0.2])
    mean, recall, decay = metrics.statistics(values)
    assert mean == pytest.approx(values.mean())
    assert recall == pytest.approx(3 / 8)  # strictly above 0.5
    # 8 frames: bin edges round(linspace(1, 8, 5) + 1e-10) - 1 = [0, 2, 4, 5, 7] (4.5 rounds
    # up thanks to the 1e-10), first bin frames 0..2, last bin frames 5..7.
    assert decay == pytest.approx(1.0 - 0.2)


def test_decay_bins_overlap_at_their_edges():
    bins = metrics.decay_bins(10)  # linspace(1, 10, 5) = 1, 3.25, 5.5, 7.75, 10
    assert [(b.start, b.stop) for b in bins] == [(0, 3), (2, 6), (5, 8), (7, 10)]
    # 7 frames: linspace(1, 7, 5) = 1, 2.5, 4, 5.5, 7; the official + 1e-10 rounds 2.5 up to 3
    # (numpy alone would round half to even, 2), so the first bin is frames 0..2
    bins = metrics.decay_bins(7)
    assert [(b.start, b.stop) for b in bins] == [(0, 3), (2, 4), (3, 6), (5, 7)]
    _, _, decay = metrics.statistics(np.array([1.0, 1.0, 0.4, 0.4, 0.4, 0.0, 0.0]))
    assert decay == pytest.approx(0.8)  # first bin (1 + 1 + 0.4) / 3, last bin 0


def test_statistics_ignore_nan_and_short_sequences():
    mean, recall, decay = metrics.statistics(np.array([0.8, np.nan, 0.2]))
    assert mean == pytest.approx(0.5)
    assert recall == pytest.approx(1 / 3)  # NaN > 0.5 is False, as in the official code
    single = metrics.statistics(np.array([0.7]))
    assert single[0] == pytest.approx(0.7) and single[2] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- VIP mIoU
def test_confusion_and_mean_iou():
    truth = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 3, 1]])
    confusion = metrics.confusion_matrix(truth, pred, 4)
    assert confusion.sum() == 7  # the ignore pixel is not counted
    ious = metrics.class_iou(confusion)
    # class 0: TP 1, truth 2, pred 2 -> 1/3; class 1: TP 3, truth 3, pred 4 -> 3/4;
    # class 2: TP 1, truth 2, pred 1 -> 1/2; class 3 absent everywhere counted -> NaN
    np.testing.assert_allclose(ious[:3], [1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(ious[3])
    assert metrics.mean_iou(confusion) == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)


def test_confusion_refuses_predictions_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        metrics.confusion_matrix(np.zeros(3), np.array([0, 1, 7]), 4)


# ----------------------------------------------------------------------------- JHMDB PCK
def test_pck_with_hand_computed_distances():
    # Two joints, three frames; the truth box of every frame spans (0,0)-(30,40):
    # diagonal 50 -> person size 0.6 * 50 = 30.
    truth = np.zeros((2, 2, 3))
    truth[:, 1, :] = [[30.0], [40.0]]
    pred = truth.copy()
    pred[0, 0, 1] += 2.0   # 2/30 = 0.067 -> within 0.1
    pred[0, 0, 2] += 5.0   # 5/30 = 0.167 -> within 0.2 only
    pred[1, 1, 1] += 9.0   # 9/30 = 0.3 -> outside both
    visible = np.ones((2, 3), dtype=bool)
    dists = metrics.normalized_joint_distances(pred, truth, visible)
    np.testing.assert_allclose(dists[0], [2 / 30, 5 / 30])   # frame 0 is skipped
    np.testing.assert_allclose(dists[1], [9 / 30, 0.0])
    mean01, per_joint01 = metrics.pck(dists, 0.1)
    np.testing.assert_allclose(per_joint01, [0.5, 0.5])
    assert mean01 == pytest.approx(0.5)
    mean02, per_joint02 = metrics.pck(dists, 0.2)
    np.testing.assert_allclose(per_joint02, [1.0, 0.5])
    assert mean02 == pytest.approx(0.75)
    # a distance equal to the threshold counts as correct (dist <= threshold)
    assert metrics.pck([np.array([0.1, 0.2, 0.3])], 0.2)[0] == pytest.approx(2 / 3)


def test_invisible_joints_leave_the_box_and_the_count():
    truth = np.zeros((2, 3, 2))
    truth[:, 1, :] = 3.0
    truth[:, 2, :] = 100.0  # an outlier joint that is not visible
    pred = truth.copy()
    visible = np.array([[True, True], [True, True], [False, False]])
    sizes = metrics.person_box_size(truth, visible)
    np.testing.assert_allclose(sizes, [0.6 * math.hypot(3, 3)] * 2)
    dists = metrics.normalized_joint_distances(pred, truth, visible)
    assert dists[2].size == 0
    mean, per_joint = metrics.pck(dists, 0.1)
    assert math.isnan(per_joint[2]) and mean == pytest.approx(1.0)


def test_confusion_refuses_maps_of_another_shape():
    # same pixel count, other shape: flattening would pair the wrong pixels
    with pytest.raises(ValueError, match=r"truth \(2, 3\) and prediction \(3, 2\) differ"):
        metrics.confusion_matrix(np.zeros((2, 3)), np.zeros((3, 2)), 4)
