"""Test pictures and per-crop colour parameters for the colour tests (DALI graph and torch
stage alike, CPU and GPU). Nothing here needs PyAV: the GPU machine has none."""
import itertools

import numpy as np
import torch


def colour_test_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """uint8 HWC: random colours, smooth gradients, the primaries / secondaries, grays,
    black and white."""
    rng = np.random.default_rng(seed)
    image = (rng.random((size, size, 3)) * 256).astype(np.uint8)
    ramp = np.linspace(0, 255, size).astype(np.uint8)
    image[: size // 4, :, 0] = ramp[None, :]
    image[: size // 4, :, 1] = ramp[::-1][None, :]
    image[: size // 4, :, 2] = 128
    corners = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255),
               (255, 0, 255), (0, 0, 0), (255, 255, 255), (128, 128, 128), (1, 0, 0)]
    for k, colour in enumerate(corners):
        image[-1, k] = colour
    return image


def as_chw(images) -> torch.Tensor:
    """HWC uint8 pictures as one uint8 [N, 3, H, W] tensor."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def photometric_row(brightness, contrast, saturation, hue, gray=0.0, sigma=0.0, solarize=0.0):
    """One view's drawn colour parameters (`sampling.PHOTO_FIELDS` order)."""
    return np.array([brightness, contrast, saturation, hue, gray, sigma, solarize], np.float32)


def every_step_batch(size: int):
    """Crops (a picture each) whose switches exercise every step both ways: the 24 jitter
    orders, hue on and off, grayscale, blur at several sigmas (narrowed windows among them),
    solarize; then crops without jitter, with and without the later steps. Returns the
    images and `view_rows`' rows, switches and blur windows."""
    from tcore.pipelines.views import view_rows

    orders = [np.array(p) for p in itertools.permutations(range(4))]
    hues, sigmas = (0.08, 0.0, -0.12), (0.0, 0.1, 0.6, 1.3, 2.0)
    rows = [photometric_row(1.3, 0.7, 1.25, hues[k % 3], gray=float(k % 4 == 0),
                            sigma=sigmas[k % 5], solarize=float(k % 3 == 1))
            for k in range(len(orders))]
    rows += [photometric_row(1, 1, 1, 0, gray=float(k == 1), sigma=0.8 * (k == 2),
                             solarize=float(k == 3)) for k in range(4)]
    orders += [np.arange(4)] * 4
    full, switches, windows = view_rows(np.stack(rows), np.stack(orders), blur_kernel=9)
    images = as_chw([colour_test_image(size, seed=k) for k in range(len(rows))])
    return images, full, switches, windows
