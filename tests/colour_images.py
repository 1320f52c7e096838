"""A test picture for the colour tests (DALI graph and torch stage alike)."""
import numpy as np


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
