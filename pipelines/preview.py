"""`tcore pipeline preview`: what the model is fed, as a picture and as statistics.

The PNG shows one batch: per sample a row past | current global crops with their masks
overlaid | future, then a row of its local crops. The JSON statistics cover N batches: each
sample's T and frame-index triple, its crop boxes normalised to the frame, and the
masked-patch count of every current global crop. The statistical tests read the same output.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.loader import build_loader
from tcore.preprocess.files import write_atomically, write_text_atomically

GAP = 4
MASK_TINT = np.array([255, 40, 40], dtype=np.float32)


def _to_uint8(view: torch.Tensor, config: PipelineConfig) -> np.ndarray:
    mean = torch.tensor(config.views.mean).view(3, 1, 1)
    std = torch.tensor(config.views.std).view(3, 1, 1)
    image = (view.float().cpu() * std + mean).clamp(0, 1) * 255
    return image.permute(1, 2, 0).round().to(torch.uint8).numpy()


def _overlay_mask(image: np.ndarray, mask: torch.Tensor, patch: int) -> np.ndarray:
    grid = int(round(mask.numel() ** 0.5))
    cells = mask.view(grid, grid).cpu().numpy()
    pixels = np.kron(cells, np.ones((patch, patch), dtype=bool))
    out = image.astype(np.float32)
    out[pixels] = 0.5 * out[pixels] + 0.5 * MASK_TINT
    return out.astype(np.uint8)


def batch_grid(batch: dict, config: PipelineConfig, max_samples: int = 8) -> Image.Image:
    """past 1, past 2 | current 1, current 2 (masks overlaid) | future 1, future 2; then the
    local crops of the sample on the next row."""
    n = batch["labels"].shape[0]
    shown = min(n, max_samples)
    size, local = config.views.global_size, config.views.local_size
    n_local = config.views.n_local
    width = 6 * size + 7 * GAP + 2 * GAP
    local_rows = 0 if n_local == 0 else 1
    row_height = size + GAP + local_rows * (local + GAP)
    canvas = Image.new("RGB", (max(width, n_local * (local + GAP) + GAP), shown * row_height
                               + GAP), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for b in range(shown):
        y = GAP + b * row_height
        tiles = [_to_uint8(batch["past_crops"][k * n + b], config) for k in range(2)]
        tiles += [_overlay_mask(_to_uint8(batch["global_crops"][k * n + b], config),
                                batch["masks"][k * n + b], config.masks.patch_size)
                  for k in range(2)]
        tiles += [_to_uint8(batch["future_crops"][k * n + b], config) for k in range(2)]
        x = GAP
        for i, tile in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (x, y))
            x += size + GAP + (GAP if i in (1, 3) else 0)
        p, c, f = batch["frame_indices"][b].tolist()
        draw.text((GAP + 2, y + 2), f"p={p} c={c} f={f}", fill=(255, 255, 0))
        for k in range(n_local):
            tile = _to_uint8(batch["local_crops"][k * n + b], config)
            canvas.paste(Image.fromarray(tile), (GAP + k * (local + GAP), y + size + GAP))
    return canvas


def batch_stats(batch: dict) -> dict:
    """The statistics of one batch (needs a loader built with return_params=True)."""
    samples = []
    for params, source, T, (height, width) in zip(batch["params"], batch["sources"],
                                                  batch["frame_counts"], batch["frame_sizes"]):
        scale = np.array([height, width, height, width], dtype=np.float64)
        boxes = (params.boxes / scale).round(6).tolist()
        n_local = len(boxes) - 6
        samples.append({"source": source, "T": T, "frames": params.frames.tolist(),
                        "size": [height, width], "global_boxes": boxes[0:2],
                        "local_boxes": boxes[2:2 + n_local], "central_box": boxes[2 + n_local],
                        "local_flips": params.flips[2:2 + n_local].tolist()})
    return {"samples": samples,
            "masked_counts": batch["masks"].sum(-1).cpu().tolist(),
            "n_masked": int(batch["n_masked"].item())}


def run_preview(data, output, batches: int = 1, stats=None, batch_size: int = 8,
                config: PipelineConfig | None = None, seed: int = 0, device: str = "cpu",
                num_threads: int = 2) -> dict:
    """Write the PNG of the first batch (and, with `stats`, JSON over `batches` batches);
    returns a summary dict."""
    config = config or PipelineConfig()
    data = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    loader = build_loader(data, batch_size=batch_size, device=device, config=config,
                          seed=seed, num_threads=num_threads, infinite=True,
                          return_params=True)
    collected = []
    try:
        first = next(loader)
        image = batch_grid(first, config)
        write_atomically(Path(output), lambda path: image.save(path, format="PNG"))
        if stats is not None:
            collected.append(batch_stats(first))
            for _ in range(batches - 1):
                collected.append(batch_stats(next(loader)))
            report = {"data": [str(d) for d in data], "batch_size": batch_size, "seed": seed,
                      "batches": collected, "config": config.to_dict()}
            write_text_atomically(Path(stats), json.dumps(report, indent=1))
    finally:
        loader.close()
    return {"output": str(output), "stats": str(stats) if stats else None,
            "batches": len(collected) or 1, "samples_per_batch": batch_size,
            "skipped": loader.skipped_count}
