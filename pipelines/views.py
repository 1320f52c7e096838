"""Stage B: the DALI decode + augment graph, a pure function of its fed inputs.

Inputs (fed per sample through `external_source`, names in FEED_NAMES): the encoded clip or
image bytes, the frame triple, and the per-view boxes, flips and photometric rows drawn by
`sampling.draw_sample_params`. Outputs: one tensor per view, [3, S, S], in the per-sample
view order of `sampling`. Nothing here is random, which is why stage B needs no checkpoint.

The same graph runs on the CPU (`device_id=None`: `cpu` video / image decoder) and on a GPU
(`mixed` decoders: NVDEC / nvJPEG, then every op on the GPU).
"""
from __future__ import annotations

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from tcore.pipelines.config import ViewConfig

FEED_NAMES = ("data", "frames", "boxes", "flips", "photometric")

# Gaussian blur with sigma 0 would mean "derive sigma from the window" in DALI; a tiny sigma
# makes the 9-tap kernel an exact identity instead (exp(-1 / 2e-6) == 0 in float32).
NO_BLUR_SIGMA = 1e-3
LUMA = (0.299, 0.587, 0.114)   # the grayscale weights of torchvision and DALI


def _solarize_table(threshold: int):
    keys = list(range(256))
    return keys, [k if k < threshold else 255 - k for k in keys]


def _photometric(image, row, cfg_probs, views: ViewConfig, on_gpu: bool = False):
    """jitter -> grayscale -> blur -> solarize on one uint8 HWC view, per-sample params."""
    colour, blur, solarize = _enabled(cfg_probs)
    if colour:
        # Brightness alone first: torchvision clamps to 0..255 between its adjustments.
        image = fn.brightness_contrast(image, brightness=row[0])
        # torchvision's contrast blends with the mean gray level of the image, not with
        # mid-range: compute that centre per sample.
        means = fn.reductions.mean(image, axes=[0, 1])
        center = means[0] * LUMA[0] + means[1] * LUMA[1] + means[2] * LUMA[2]
        if on_gpu:
            center = center.cpu()     # argument inputs live on the CPU (dynamic executor)
        image = fn.brightness_contrast(image, contrast=row[1], contrast_center=center)
        # Saturation (a blend with luma) and hue act on chroma only, so DALI's single linear
        # transform covers both, and grayscale after jitter is saturation 0. DALI's hue is a
        # rotation about the gray axis, an approximation of torchvision's HSV shift.
        image = fn.hsv(image, hue=row[3] * 360.0, saturation=row[2] * (1.0 - row[4]))
    if blur:
        image = fn.gaussian_blur(image, window_size=views.blur_kernel, sigma=row[5])
    if solarize:
        keys, values = _solarize_table(views.solarize_threshold)
        solarized = fn.lookup_table(image, keys=keys, values=values, dtype=types.UINT8)
        flag = fn.cast(row[6], dtype=types.UINT8)
        if on_gpu:
            flag = flag.gpu()
        # Exactly one of the two terms is non-zero, so uint8 arithmetic cannot overflow.
        image = solarized * flag + image * (1 - flag)
    return image


@pipeline_def(enable_conditionals=False)
def views_pipeline(kind: str, views: ViewConfig, on_gpu: bool, out_dtype):
    data = fn.external_source(name="data", dtype=types.UINT8, ndim=1, no_copy=False)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    boxes = fn.external_source(name="boxes", dtype=types.FLOAT, ndim=2)
    flips = fn.external_source(name="flips", dtype=types.INT32, ndim=1)
    photometric = fn.external_source(name="photometric", dtype=types.FLOAT, ndim=2)
    decoder_device = "mixed" if on_gpu else "cpu"
    if kind == "video":
        clip = fn.decoders.video(data, device=decoder_device, frames=frames)
        past, current, future = clip[0], clip[1], clip[2]
    else:
        image = fn.decoders.image(data, device=decoder_device, output_type=types.RGB)
        past = current = future = image

    n_local = views.n_local
    plan = ([(current, views.global_size, views.global_1),
             (current, views.global_size, views.global_2)]
            + [(current, views.local_size, views.local)] * n_local
            + [(past, views.global_size, views.global_1), (past, views.global_size, views.global_2),
               (future, views.global_size, views.global_1),
               (future, views.global_size, views.global_2)])
    mean = [255.0 * m for m in views.mean]
    std = [255.0 * s for s in views.std]
    outputs = []
    resized = {}
    for v, (frame, size, probs) in enumerate(plan):
        # Crops 1 and 2 of the past (and of the future) frame share the central box: resize
        # once per frame, the most expensive op of the graph.
        shared = v - 2 - n_local if v >= 2 + n_local else None
        key = ("central", shared // 2) if shared is not None else v
        if key not in resized:
            resized[key] = fn.resize(frame, roi_start=boxes[v, 0:2], roi_end=boxes[v, 2:4],
                                     size=[size, size], interp_type=types.INTERP_CUBIC,
                                     antialias=True)
        crop = _photometric(resized[key], photometric[v], probs, views, on_gpu)
        outputs.append(fn.crop_mirror_normalize(
            crop, mirror=flips[v], mean=mean, std=std, dtype=out_dtype, output_layout="CHW"))
    return tuple(outputs)


def feed_arrays(samples_data, params) -> dict[str, list[np.ndarray]]:
    """Per-input lists for `Pipeline.feed_input`, from encoded bytes + SampleParams."""
    photometric = []
    for p in params:
        rows = p.photometric.copy()
        rows[:, 5] = np.where(rows[:, 5] > 0, rows[:, 5], NO_BLUR_SIGMA)
        photometric.append(rows)
    return {"data": list(samples_data),
            "frames": [p.frames.astype(np.int32) for p in params],
            "boxes": [p.boxes for p in params],
            "flips": [p.flips.astype(np.int32) for p in params],
            "photometric": photometric}


def build_views_pipeline(kind: str, views: ViewConfig, batch_size: int, device_id,
                         num_threads: int, prefetch: int, out_dtype, seed: int = 0):
    pipe = views_pipeline(kind=kind, views=views, on_gpu=device_id is not None,
                          out_dtype=out_dtype, batch_size=batch_size, num_threads=num_threads,
                          device_id=device_id, prefetch_queue_depth=prefetch, seed=seed,
                          exec_async=True, exec_pipelined=True,
                          # GPU -> CPU (contrast centre) needs DALI's dynamic executor.
                          **({"exec_dynamic": True} if device_id is not None else {}))
    pipe.build()
    # DALI prunes an input no op reads (photometric rows when every probability is 0).
    pruned = {"photometric"} if not uses_photometric(views) else set()
    pipe.feed_names = [name for name in FEED_NAMES
                       if name not in pruned and (name != "frames" or kind == "video")]
    return pipe


def _enabled(cfg) -> tuple[bool, bool, bool]:
    return (cfg.jitter_p > 0 or cfg.grayscale_p > 0, cfg.blur_p > 0, cfg.solarize_p > 0)


def uses_photometric(views: ViewConfig) -> bool:
    configs = [views.global_1, views.global_2] + ([views.local] if views.n_local else [])
    return any(any(_enabled(cfg)) for cfg in configs)
