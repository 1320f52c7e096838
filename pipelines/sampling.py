"""Every random choice of a sample, drawn on the host from one seed.

`draw_sample_params(seed, T, height, width, config)` is a pure function: the DALI loader and
the torchvision baseline both call it, so a resumed run redraws exactly the same parameters
and the two loaders can be compared pixel by pixel from the same draw. A sample's seed gives
a fixed number of uniforms (`sample_uniforms`), and every parameter is a function of them
(`params_from_uniforms`), which stage A evaluates for a whole batch at once.

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


FRAME_UNIFORMS = 4     # current, past, future, fallback


def frame_triple(u, T: int, cfg: SamplingConfig) -> np.ndarray:
    """(p, c, f) of section 1 from a sample's four frame uniforms (current, past, future,
    fallback): each index is low + floor(u * count), uniform on its range."""
    if T < 1:
        raise ValueError(f"a clip needs at least one frame (T = {T})")
    u_current, u_past, u_future, u_fallback = (float(v) for v in u)
    cs, ce, (past_far, past_near), (future_near, future_far) = sandwich_ranges(T, cfg)
    if cs < ce:
        c = cs + int(u_current * (ce - cs))                # U{cs .. ce-1}
        ps, pe = c - past_far, c - past_near
        fs, fe = c + future_near, c + future_far
        if ps < pe <= c <= fs < fe:
            p = ps + int(u_past * (pe - ps + 1))          # inclusive
            f_last = min(fe, T - 1)
            f = fs + int(u_future * (f_last - fs + 1))
            return np.array([p, c, f], dtype=np.int64)
    r = int(u_fallback * T)                                # fallback: one frame for all three
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

BOX_TRIES = 10      # torchvision RandomResizedCrop's tries before its central fallback


def random_boxes(u_tries: np.ndarray, u_offsets: np.ndarray, height: np.ndarray,
                 width: np.ndarray, scale: np.ndarray, ratio: tuple[float, float]) -> np.ndarray:
    """torchvision RandomResizedCrop.get_params for every crop of a batch at once: [B, C, 4]
    (y0, x0, h, w) as float64.

    u_tries [B, C, BOX_TRIES, 2] (scale, log-aspect) and u_offsets [B, C, 2] (y0, x0) are the
    crops' uniforms, height and width [B] the frames', scale [C, 2] each crop's range. The
    first of the tries whose box fits wins; where none fits, torchvision's fallback, the
    central crop with the frame's aspect clamped into `ratio`. Offsets are
    floor(u * positions), uniform on the positions, as its randint."""
    frame_h = height.astype(np.float64)[:, None, None]
    frame_w = width.astype(np.float64)[:, None, None]
    low, high = scale[:, 0][None, :, None], scale[:, 1][None, :, None]
    target_area = frame_h * frame_w * (low + (high - low) * u_tries[..., 0])
    log_low = math.log(ratio[0])
    aspect = np.exp(log_low + (math.log(ratio[1]) - log_low) * u_tries[..., 1])
    w = np.rint(np.sqrt(target_area * aspect))     # Python's round(): half to even
    h = np.rint(np.sqrt(target_area / aspect))
    fits = (w > 0) & (w <= frame_w) & (h > 0) & (h <= frame_h)
    first = fits.argmax(-1)[..., None]
    h = np.take_along_axis(h, first, -1)[..., 0]
    w = np.take_along_axis(w, first, -1)[..., 0]
    frame_h, frame_w = frame_h[..., 0], frame_w[..., 0]
    y0 = np.floor(u_offsets[..., 0] * (frame_h - h + 1))
    x0 = np.floor(u_offsets[..., 1] * (frame_w - w + 1))
    # torchvision's fallback after BOX_TRIES misses
    frame_ratio = frame_w / frame_h
    narrow, wide = frame_ratio < min(ratio), frame_ratio > max(ratio)
    fallback_w = np.where(wide, np.rint(frame_h * max(ratio)), frame_w)
    fallback_h = np.where(narrow, np.rint(frame_w / min(ratio)), frame_h)
    found = fits.any(-1)
    h, w = np.where(found, h, fallback_h), np.where(found, w, fallback_w)
    y0 = np.where(found, y0, np.floor((frame_h - fallback_h) / 2))
    x0 = np.where(found, x0, np.floor((frame_w - fallback_w) / 2))
    return np.stack([y0, x0, h, w], axis=-1)


def central_box(height: int, width: int, aspect: tuple[float, float] = (3 / 4, 4 / 3)):
    """The fixed past/future geometry of section 2, as (y0, x0, h, w)."""
    ratio = width / height
    if aspect[0] <= ratio <= aspect[1]:
        return 0, 0, height, width
    if ratio > aspect[1]:
        h, w = height, min(width, int(round(height * aspect[1])))
    else:
        h, w = min(height, int(round(width / aspect[0]))), width
    # Offsets floored, as the reference's FixedResizedCrop centres its box (torchvision's
    # CenterCrop rounds half to even instead: one pixel apart for some sizes, e.g. 570 wide).
    return (height - h) // 2, (width - w) // 2, h, w


def _corners(boxes: np.ndarray) -> np.ndarray:
    """(y0, x0, h, w) -> (y0, x0, y1, x1) along the last axis."""
    return np.concatenate([boxes[..., :2], boxes[..., :2] + boxes[..., 2:]], axis=-1)


# --- section 2: photometric draws -------------------------------------------------------

# Uniform draws per view, in this order.
_PHOTO_DRAWS = ("jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur",
                "blur_sigma", "solarize")


def photometric_rows(u: np.ndarray, cfgs: list[PhotometricConfig], views: ViewConfig
                     ) -> np.ndarray:
    """[..., V, 7] rows [brightness, contrast, saturation, hue, grayscale, blur_sigma,
    solarize], one per view config, from uniforms [..., V, 9] (`_PHOTO_DRAWS` per view).

    Every uniform is drawn whether or not its flag fires, so a change of one probability
    does not move any other draw; a factor is low + (high - low) * u."""
    # The per-config numbers once per distinct config (three: global 1, global 2, local),
    # then spread over the views.
    ordered = list({id(c): c for c in cfgs}.values())
    position = {id(c): k for k, c in enumerate(ordered)}
    which = np.array([position[id(c)] for c in cfgs], dtype=np.intp)
    low = np.array([[1 - c.brightness, 1 - c.contrast, 1 - c.saturation, -c.hue]
                    for c in ordered])[which]
    high = np.array([[1 + c.brightness, 1 + c.contrast, 1 + c.saturation, c.hue]
                     for c in ordered])[which]
    factors = low + (high - low) * u[..., 1:5]
    fired = u[..., [0, 5, 6, 8]] < np.array(
        [[c.jitter_p, c.grayscale_p, c.blur_p, c.solarize_p] for c in ordered])[which]
    jitter, gray, blur, solarize = np.moveaxis(fired, -1, 0)
    sigma_low, sigma_high = views.blur_sigma
    sigma = sigma_low + (sigma_high - sigma_low) * u[..., 7]
    factors = np.where(jitter[..., None], factors, np.array([1.0, 1.0, 1.0, 0.0]))
    return np.concatenate([factors, gray[..., None], np.where(blur, sigma, 0.0)[..., None],
                           solarize[..., None]], axis=-1).astype(np.float32)


# --- every draw of a sample, for a batch at once ----------------------------------------

def _uniform_layout(n_local: int) -> dict[str, tuple[int, ...]]:
    """The shapes a sample's uniforms are cut into, in stream order."""
    crops, views = 2 + n_local, 6 + n_local
    # The frame uniforms first: `drawn_frames` reads them off a sample's row alone.
    return {"frames": (FRAME_UNIFORMS,), "box_tries": (crops, BOX_TRIES, 2),
            "box_offsets": (crops, 2), "flips": (n_local,),
            "photometric": (views, len(_PHOTO_DRAWS)), "jitter_order": (views, len(JITTER_OPS))}


def uniforms_per_sample(n_local: int) -> int:
    return sum(math.prod(shape) for shape in _uniform_layout(n_local).values())


def sample_uniforms(seed: int | np.random.Generator, n_local: int) -> np.ndarray:
    """Every uniform one sample's parameters are made of, in one call: a fixed number per
    sample (whatever the draws turn out to be), so each sample is its own seed's stream."""
    rng = seed if isinstance(seed, np.random.Generator) else sample_rng(seed)
    return rng.random(uniforms_per_sample(n_local))


def _split_uniforms(u: np.ndarray, n_local: int) -> dict[str, np.ndarray]:
    """[B, K] -> the named parts, each [B, *shape]."""
    parts, start = {}, 0
    for name, shape in _uniform_layout(n_local).items():
        size = math.prod(shape)
        parts[name] = u[:, start:start + size].reshape(len(u), *shape)
        start += size
    return parts


def drawn_frames(u: np.ndarray, T: int, config: PipelineConfig) -> np.ndarray:
    """One sample's (p, c, f) from its uniforms, as `params_from_uniforms` draws them: stage A
    needs a sample's frames before its batch is complete, to keep only their JPEGs."""
    return frame_triple(u[:FRAME_UNIFORMS], max(int(T), 1), config.sampling)


def params_from_uniforms(u: np.ndarray, frames, height, width, config: PipelineConfig
                         ) -> list[SampleParams]:
    """The parameters of B samples from their uniforms [B, K] (`sample_uniforms`), their
    frame triples ([B, 3], `drawn_frames` of the same uniforms, which the caller has
    already needed) and frame height and width ([B] each): every step vectorised over the
    batch, since stage A draws a batch of 64 samples' 14 views on one core, and per-sample
    Python was most of its time."""
    views = config.views
    n_local = views.n_local
    if len(frames) == 0:
        return []
    u = np.asarray(u, dtype=np.float64).reshape(len(frames), uniforms_per_sample(n_local))
    parts = _split_uniforms(u, n_local)
    height, width = np.asarray(height, dtype=np.int64), np.asarray(width, dtype=np.int64)
    scale = np.array([views.global_scale] * 2 + [views.local_scale] * n_local)
    random = _corners(random_boxes(parts["box_tries"], parts["box_offsets"], height, width,
                                   scale, views.ratio))
    central = {}      # one central box per frame size in the batch
    for size in set(zip(height.tolist(), width.tolist())):
        central[size] = _corners(np.array(central_box(*size, views.central_aspect), float))
    central_boxes = np.stack([central[size] for size in zip(height.tolist(), width.tolist())])
    boxes = np.concatenate([random, np.repeat(central_boxes[:, None], 4, axis=1)],
                           axis=1).astype(np.float32)
    flips = np.zeros(boxes.shape[:2], dtype=bool)
    flips[:, 2:2 + n_local] = parts["flips"] < views.local_flip_p
    photo_cfgs = ([views.global_1, views.global_2] + [views.local] * n_local
                  + [views.global_1, views.global_2] * 2)
    photometric = photometric_rows(parts["photometric"], photo_cfgs, views)
    # torchvision's ColorJitter applies its four operations in a uniformly random order per
    # image: the order that sorts four uniforms is a uniform permutation.
    jitter_order = np.argsort(parts["jitter_order"], axis=-1).astype(np.int64)
    return [SampleParams(frames=frames[i], boxes=boxes[i], flips=flips[i],
                         photometric=photometric[i], jitter_order=jitter_order[i])
            for i in range(len(frames))]


def draw_sample_params(seed: int | np.random.Generator, T: int, height: int, width: int,
                       config: PipelineConfig) -> SampleParams:
    """Every random parameter of one sample from its seed, its T and its frame size (what
    `params_from_uniforms` gives it in any batch)."""
    u = sample_uniforms(seed, config.views.n_local)
    return params_from_uniforms(u[None], [drawn_frames(u, T, config)], [height], [width],
                                config)[0]


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
