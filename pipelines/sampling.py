"""Every random choice of a sample, drawn on the host from one seed.

`draw_sample_params(seed, T, height, width, config)` is a pure function: the DALI loader and
the torchvision baseline both call it, so a resumed run redraws exactly the same parameters
and the two loaders can be compared pixel by pixel from the same draw.

View order inside a sample (used everywhere): current global 1, current global 2, the local
crops, past global 1, past global 2, future global 1, future global 2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tcore.pipelines.config import PhotometricConfig, PipelineConfig, SamplingConfig, ViewConfig

# Columns of a view's photometric row.
PHOTO_FIELDS = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur_sigma",
                "solarize")
# The colour-jitter operations, numbered as in a view's `jitter_order` row (torchvision's
# ColorJitter numbering: its `fn_idx = torch.randperm(4)` indexes this tuple).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@dataclass
class SampleParams:
    frames: np.ndarray          # [3] int64: past, current, future frame index
    boxes: np.ndarray           # [V, 4] float32 (y0, x0, y1, x1) in pixels, V = 6 + n_local
    flips: np.ndarray           # [V] bool, horizontal flip (local crops only)
    photometric: np.ndarray     # [V, 7] float32, columns PHOTO_FIELDS
    jitter_order: np.ndarray    # [V, 4] int64, a permutation of range(4) indexing JITTER_OPS

    def as_dict(self) -> dict:
        return {"frames": self.frames.tolist(), "boxes": self.boxes.tolist(),
                "flips": self.flips.tolist(), "photometric": self.photometric.tolist(),
                "jitter_order": self.jitter_order.tolist()}


def sample_rng(*entropy: int) -> np.random.Generator:
    """A generator from integers (base seed, shard, sample counter...); stable across runs."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(e) for e in entropy])))


# --- section 1: sandwich sampling -------------------------------------------------------

def sandwich_ranges(T: int, cfg: SamplingConfig):
    """(cs, ce, offsets) of METHOD.md section 1, with int() truncation as the reference."""
    cs, ce = int(cfg.current_range[0] * T), int(cfg.current_range[1] * T)
    past = (int(cfg.past_offset_range[1] * T), int(cfg.past_offset_range[0] * T))
    future = (int(cfg.future_offset_range[0] * T), int(cfg.future_offset_range[1] * T))
    return cs, ce, past, future


def draw_frame_triple(rng: np.random.Generator, T: int, cfg: SamplingConfig) -> np.ndarray:
    if T < 1:
        raise ValueError(f"a clip needs at least one frame (T = {T})")
    cs, ce, (past_far, past_near), (future_near, future_far) = sandwich_ranges(T, cfg)
    if cs < ce:
        c = int(rng.integers(cs, ce))                  # U{cs .. ce-1}
        ps, pe = c - past_far, c - past_near
        fs, fe = c + future_near, c + future_far
        if ps < pe <= c <= fs < fe:
            p = int(rng.integers(ps, pe + 1))          # inclusive
            f = int(rng.integers(fs, min(fe, T - 1) + 1))
            return np.array([p, c, f], dtype=np.int64)
    r = int(rng.integers(0, T))                        # fallback: one frame for all three
    return np.array([r, r, r], dtype=np.int64)


def frame_triple_distribution(T: int, cfg: SamplingConfig) -> dict[tuple[int, int, int], float]:
    """The exact probability of each (p, c, f) under section 1 (for tests and stats)."""
    cs, ce, (past_far, past_near), (future_near, future_far) = sandwich_ranges(T, cfg)
    probs: dict[tuple[int, int, int], float] = {}
    fallback = 0.0
    if cs < ce:
        for c in range(cs, ce):
            ps, pe, fs, fe = c - past_far, c - past_near, c + future_near, c + future_far
            if ps < pe <= c <= fs < fe:
                f_hi = min(fe, T - 1)
                # f range may be empty if fs > T-1: rng.integers would then fail; the
                # config validation (ranges within [0, 1]) keeps fs <= T-1 for c < ce.
                for p in range(ps, pe + 1):
                    for f in range(fs, f_hi + 1):
                        probs[(p, c, f)] = probs.get((p, c, f), 0.0) + \
                            1.0 / (ce - cs) / (pe - ps + 1) / (f_hi - fs + 1)
            else:
                fallback += 1.0 / (ce - cs)
    else:
        fallback = 1.0
    for r in range(T if fallback > 0 else 0):
        probs[(r, r, r)] = probs.get((r, r, r), 0.0) + fallback / T
    return probs


# --- section 2: crop geometry -----------------------------------------------------------

def random_resized_box(rng: np.random.Generator, height: int, width: int,
                       scale: tuple[float, float], ratio: tuple[float, float]):
    """torchvision RandomResizedCrop.get_params, as (y0, x0, h, w).

    `low + (high - low) * rng.random()` is `rng.uniform(low, high)`'s own arithmetic on the
    same double (the same stream, tested), at a third of its call cost: this runs ten
    times per sample in stage A."""
    area = height * width
    log_low = math.log(ratio[0])
    log_span = math.log(ratio[1]) - log_low
    scale_low, scale_span = scale[0], scale[1] - scale[0]
    random = rng.random
    for _ in range(10):
        target_area = area * (scale_low + scale_span * random())
        aspect = math.exp(log_low + log_span * random())
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y0 = int(rng.integers(0, height - h + 1))
            x0 = int(rng.integers(0, width - w + 1))
            return y0, x0, h, w
    # Fallback of torchvision: central crop with the aspect clamped to the range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def central_box(height: int, width: int, aspect: tuple[float, float] = (3 / 4, 4 / 3)):
    """The fixed past/future geometry of section 2, as (y0, x0, h, w)."""
    ratio = width / height
    if aspect[0] <= ratio <= aspect[1]:
        return 0, 0, height, width
    if ratio > aspect[1]:
        h, w = height, min(width, int(round(height * aspect[1])))
    else:
        h, w = min(height, int(round(width / aspect[0]))), width
    # torchvision CenterCrop rounding of the offsets.
    return int(round((height - h) / 2.0)), int(round((width - w) / 2.0)), h, w


def _corners(box) -> list[float]:
    y0, x0, h, w = box
    return [float(y0), float(x0), float(y0 + h), float(x0 + w)]


# --- section 2: photometric draws -------------------------------------------------------

# Uniform draws per view, in this order (each is one double of the generator's stream).
_PHOTO_DRAWS = ("jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
                "blur_sigma", "solarize")


def draw_photometric(rng: np.random.Generator, cfgs: list[PhotometricConfig],
                     views: ViewConfig) -> np.ndarray:
    """[V, 7] rows [brightness, contrast, saturation, hue, grayscale, blur_sigma, solarize],
    one per view config.

    Every uniform is drawn whether or not its flag fires, so the stream of draws has a fixed
    length per view (a change of one probability does not shift the other views' draws).
    Drawn for all views at once: `rng.random` yields the doubles `rng.uniform` would, one per
    call in the same order, and low + (high - low) * u is `uniform`'s own arithmetic, so the
    rows are those of one `uniform` call per draw (tested).
    """
    u = rng.random((len(cfgs), len(_PHOTO_DRAWS)))
    # The per-config numbers once per distinct config (three: global 1, global 2, local),
    # then spread over the views.
    ordered = list({id(c): c for c in cfgs}.values())
    position = {id(c): k for k, c in enumerate(ordered)}
    which = np.array([position[id(c)] for c in cfgs], dtype=np.intp)
    low = np.array([[1 - c.brightness, 1 - c.contrast, 1 - c.saturation, -c.hue]
                    for c in ordered])[which]
    high = np.array([[1 + c.brightness, 1 + c.contrast, 1 + c.saturation, c.hue]
                     for c in ordered])[which]
    factors = low + (high - low) * u[:, 1:5]
    fired = u[:, [0, 5, 6, 8]] < np.array(
        [[c.jitter_p, c.grayscale_p, c.blur_p, c.solarize_p] for c in ordered])[which]
    jitter, gray, blur, solarize = fired.T
    sigma_low, sigma_high = views.blur_sigma
    sigma = sigma_low + (sigma_high - sigma_low) * u[:, 7]
    factors = np.where(jitter[:, None], factors, np.array([1.0, 1.0, 1.0, 0.0]))
    return np.concatenate([factors, gray[:, None], np.where(blur, sigma, 0.0)[:, None],
                           solarize[:, None]], axis=1).astype(np.float32)


# --- one sample ---------------------------------------------------------------------------

def draw_sample_params(seed: int | np.random.Generator, T: int, height: int, width: int,
                       config: PipelineConfig) -> SampleParams:
    """Every random parameter of one sample from its seed, its T and its frame size."""
    rng = seed if isinstance(seed, np.random.Generator) else sample_rng(seed)
    views = config.views
    frames = draw_frame_triple(rng, max(int(T), 1), config.sampling)
    boxes = [_corners(random_resized_box(rng, height, width, views.global_scale, views.ratio))
             for _ in range(2)]
    boxes += [_corners(random_resized_box(rng, height, width, views.local_scale, views.ratio))
              for _ in range(views.n_local)]
    central = _corners(central_box(height, width, views.central_aspect))
    boxes += [central] * 4
    flips = np.zeros(len(boxes), dtype=bool)
    # rng.uniform() is rng.random(): one double per local crop, in order
    flips[2:2 + views.n_local] = rng.random(views.n_local) < views.local_flip_p
    photo_cfgs = ([views.global_1, views.global_2] + [views.local] * views.n_local
                  + [views.global_1, views.global_2] * 2)
    photometric = draw_photometric(rng, photo_cfgs, views)
    # torchvision's ColorJitter applies its four operations in a uniformly random order per
    # image. Drawn for every view (jittered or not) after every other draw, so the draws above
    # are the same as before the order existed.
    # (`permuted` along rows draws what one `permutation` per row would, in order; tested)
    jitter_order = rng.permuted(np.tile(np.arange(len(JITTER_OPS), dtype=np.int64),
                                        (len(photo_cfgs), 1)), axis=1)
    return SampleParams(frames=frames, boxes=np.asarray(boxes, dtype=np.float32),
                        flips=flips, photometric=photometric, jitter_order=jitter_order)


def jitter_sequence(row, order) -> list[int]:
    """The jitter operations a view applies, in order: those of `order` whose factor is not
    the identity (torchvision skips an operation whose range is 0, and a view whose jitter did
    not fire has identity factors)."""
    brightness, contrast, saturation, hue = (float(v) for v in row[:4])
    active = (brightness != 1.0, contrast != 1.0, saturation != 1.0, hue != 0.0)
    return [int(op) for op in order if active[int(op)]]


def view_slices(n_local: int) -> dict[str, slice]:
    """Where each output lives in the per-sample view order."""
    return {"global_crops": slice(0, 2), "local_crops": slice(2, 2 + n_local),
            "past_crops": slice(2 + n_local, 4 + n_local),
            "future_crops": slice(4 + n_local, 6 + n_local)}
