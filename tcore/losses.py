"""The loss terms of T-CoRe (METHOD.md section 5), as plain tensor functions.

All functions compute in float32 (callers may run the networks in bf16/fp16), use no host
synchronisation and no boolean-mask indexing, so they can sit inside a compiled step.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

KOLEO_EPS = 1e-8  # DINOv2's KoLeo epsilon (normalisation, pairwise distance and log)


def softmax_centered(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Teacher targets: ``softmax((t - center) / T_t)`` over prototypes."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * batch mean of ``logits``, in place.

    Across ranks the batch mean is the mean of the ranks' means (DINOv2's rule, which the
    reference builds on): for the cls center every rank has the same count; for the masked
    patch center the counts differ, and each rank's mean still weighs the same."""
    batch_mean = logits.float().mean(dim=0, keepdim=True)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_mean)
        batch_mean /= dist.get_world_size()
    center.mul_(momentum).add_(batch_mean, alpha=1.0 - momentum)


def cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row ``-sum_k t_k log_softmax(s / T_s)_k`` (shape: student_logits without the last dim)."""
    log_probs = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * log_probs).sum(dim=-1)


def dino_global_loss(student_global: torch.Tensor, teacher_swapped: torch.Tensor, student_temp: float) -> torch.Tensor:
    """One CE pair averaged over all rows (the 2B global crops, crop-major)."""
    return cross_entropy(student_global, teacher_swapped, student_temp).mean()


def dino_local_loss(student_local: torch.Tensor, teacher_probs: torch.Tensor, n_global: int,
                    student_temp: float) -> torch.Tensor:
    """Sum over (local crop, teacher crop) pairs of the CE averaged over the B samples.

    ``student_local`` [L*B, K] and ``teacher_probs`` [n_global*B, K] are crop-major. The CE is
    linear in the target, so the teacher crops are summed first: one [L, B, K] product instead
    of L * n_global pairs (and no Python loop).
    """
    batch = teacher_probs.shape[0] // n_global
    if student_local.shape[0] == 0:
        return student_local.new_zeros((), dtype=torch.float32)
    log_probs = F.log_softmax(student_local.float() / student_temp, dim=-1)
    log_probs = log_probs.reshape(-1, batch, log_probs.shape[-1])  # [L, B, K]
    teacher_sum = teacher_probs.reshape(n_global, batch, -1).sum(dim=0)  # [B, K]
    return -(log_probs * teacher_sum).sum(dim=-1).mean(dim=-1).sum()


def dino_loss(student_global: torch.Tensor, student_local: torch.Tensor, teacher_probs: torch.Tensor,
              student_temp: float, global_weight: float = 2.0) -> torch.Tensor:
    """L_DINO = [local term + 2 * global term] / (n_g (n_g - 1) + n_g n_l).

    ``teacher_probs`` [2B, K] are the centred teacher probabilities *in crop order* (not
    swapped); the global term uses them swapped, the local term both crops.
    """
    n_global = 2
    batch = teacher_probs.shape[0] // n_global
    n_local = student_local.shape[0] // batch
    swapped = swap_crops(teacher_probs)
    terms = n_global * (n_global - 1) + n_global * n_local
    total = global_weight * dino_global_loss(student_global, swapped, student_temp)
    total = total + dino_local_loss(student_local, teacher_probs, n_global, student_temp)
    return total / terms


def swap_crops(crop_major: torch.Tensor) -> torch.Tensor:
    """[crop1 rows; crop2 rows] -> [crop2 rows; crop1 rows]."""
    first, second = crop_major.chunk(2)
    return torch.cat([second, first])


def koleo(features: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator as DINOv2 computes it.

    L2-normalise, find each row's nearest other row by inner product, and average
    ``-log(||x - x_nn + eps|| + eps)`` (``nn.PairwiseDistance`` adds eps to the difference).
    """
    # float32 throughout, as DINOv2 (autocast would put the matmul back in half precision).
    with torch.autocast(device_type=features.device.type, enabled=False):
        x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            dots = x @ x.t()
            dots.fill_diagonal_(-2.0)  # below any cosine similarity: never pick yourself
            nearest = dots.argmax(dim=1)
        distances = (x - x.index_select(0, nearest) + eps).norm(p=2, dim=-1)
    return -torch.log(distances + eps).mean()


def koleo_loss(student_global_cls: torch.Tensor, n_global: int = 2) -> torch.Tensor:
    """Sum over the global crops of KoLeo on that crop's backbone cls tokens (unweighted)."""
    return sum(koleo(chunk) for chunk in student_global_cls.chunk(n_global))


def masked_patch_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor,
                      mask_weights: torch.Tensor, n_crops: int, student_temp: float) -> torch.Tensor:
    """iBOT-style: ``-sum_m w_m sum_k t log_softmax(s/T_s)`` / (number of global crops).

    Rows are the masked tokens (gathered with ``mask_indices``), ``mask_weights`` is
    1 / (masked tokens of the token's crop).
    """
    per_token = cross_entropy(student_logits, teacher_probs, student_temp)
    return (per_token * mask_weights.float()).sum() / n_crops


def past_future_loss(past_logits: torch.Tensor, future_logits: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the prototype logits of the past and future PMM outputs."""
    if past_logits.shape[0] == 0:
        return past_logits.new_zeros((), dtype=torch.float32)
    return F.mse_loss(past_logits.float(), future_logits.float())


__all__ = ["KOLEO_EPS", "softmax_centered", "update_center", "cross_entropy", "dino_global_loss",
           "dino_local_loss", "dino_loss", "swap_crops", "koleo", "koleo_loss", "masked_patch_loss",
           "past_future_loss"]
