"""Loss functions against plain loop implementations of METHOD.md's formulas."""
import math

import torch

from tcore import losses


def plain_ce(student_row, teacher_row, temp):
    log_probs = torch.log_softmax(student_row / temp, dim=-1)
    return -float((teacher_row * log_probs).sum())


def test_dino_loss_matches_loops():
    torch.manual_seed(0)
    batch, n_local, prototypes, temp = 3, 4, 11, 0.1
    student_global = torch.randn(2 * batch, prototypes)
    student_local = torch.randn(n_local * batch, prototypes)
    teacher = torch.softmax(torch.randn(2 * batch, prototypes), dim=-1)
    # Global: crop c of the student against the teacher's other crop, averaged over samples.
    global_term = 0.0
    for crop in range(2):
        other = 1 - crop
        global_term += sum(plain_ce(student_global[crop * batch + i], teacher[other * batch + i], temp)
                           for i in range(batch)) / batch
    local_term = 0.0
    for local in range(n_local):
        for crop in range(2):
            local_term += sum(plain_ce(student_local[local * batch + i], teacher[crop * batch + i], temp)
                              for i in range(batch)) / batch
    expected = (global_term + local_term) / (2 * 1 + 2 * n_local)
    got = losses.dino_loss(student_global, student_local, teacher, temp)
    assert math.isclose(float(got), expected, rel_tol=1e-5)
    # Without local crops only the global pairs remain (2 terms).
    got = losses.dino_loss(student_global, student_local[:0], teacher, temp)
    assert math.isclose(float(got), global_term / 2, rel_tol=1e-5)


def test_koleo_matches_loops():
    torch.manual_seed(0)
    features = torch.randn(6, 5)
    eps = 1e-8
    rows = [f / max(float(f.norm()), eps) for f in features]
    total = 0.0
    for i, row in enumerate(rows):
        nearest = max((j for j in range(len(rows)) if j != i), key=lambda j: float(row @ rows[j]))
        distance = float((row - rows[nearest] + eps).norm())
        total += -math.log(distance + eps)
    assert math.isclose(float(losses.koleo(features)), total / len(rows), rel_tol=1e-5)
    # koleo_loss sums over the crop-major halves.
    two = torch.cat([features, features.flip(0)])
    assert math.isclose(float(losses.koleo_loss(two)), 2 * total / len(rows), rel_tol=1e-5)


def test_koleo_gradient_pushes_neighbours_apart():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], requires_grad=True)
    before = float(losses.koleo(features.detach()))
    losses.koleo(features).backward()
    with torch.no_grad():
        after = float(losses.koleo(features - 0.05 * features.grad))
    assert after < before


def test_masked_patch_loss_matches_loops():
    torch.manual_seed(0)
    crops, tokens, prototypes, temp = 3, 5, 7, 0.1
    masks = torch.zeros(crops, tokens, dtype=torch.bool)
    masks[0, [0, 3]] = True
    masks[2, [1, 2, 4]] = True
    indices = masks.reshape(-1).nonzero()[:, 0]
    weights = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3])
    student = torch.randn(len(indices), prototypes)
    teacher = torch.softmax(torch.randn(len(indices), prototypes), dim=-1)
    expected = 0.0
    position = 0
    for crop in range(crops):
        count = int(masks[crop].sum())
        for _ in range(count):
            expected += plain_ce(student[position], teacher[position], temp) / count
            position += 1
    expected /= crops
    got = losses.masked_patch_loss(student, teacher, weights, crops, temp)
    assert math.isclose(float(got), expected, rel_tol=1e-5)


def test_centered_softmax_and_past_future():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    center = torch.tensor([[0.5, 0.5, 0.5]])
    probs = losses.softmax_centered(logits, center, 0.5)
    assert torch.allclose(probs, torch.softmax((logits - 0.5) / 0.5, dim=-1))
    past, future = torch.randn(4, 3), torch.randn(4, 3)
    expected = sum(float((past[i, k] - future[i, k]) ** 2) for i in range(4) for k in range(3)) / 12
    assert math.isclose(float(losses.past_future_loss(past, future)), expected, rel_tol=1e-5)
    assert float(losses.past_future_loss(past[:0], future[:0])) == 0.0


def test_koleo_computes_in_float32_under_autocast():
    """DINOv2 computes KoLeo in float32 whatever the autocast: bf16 features (what a bf16
    backbone hands over) give the float32 value of the same numbers, as a float32 tensor."""
    torch.manual_seed(0)
    features = torch.randn(16, 64).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = losses.koleo(features)
    assert mixed.dtype == torch.float32
    assert math.isclose(float(mixed), float(losses.koleo(features.float())), rel_tol=1e-6)
