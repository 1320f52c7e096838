"""Stage B: the DALI decode + augment graph, a pure function of its fed inputs.

Inputs (fed per sample through `external_source`, names in FEED_NAMES): the encoded clip or
image bytes (JPEG-frame shards: the three drawn JPEGs, sliced out on the host), the frame
triple, and the per-view boxes, flips and photometric rows drawn by
`sampling.draw_sample_params`, with the per-view switches and blur windows `view_rows`
derives from them on the host (so the graph's per-sample `if`s need no scalar arithmetic,
which would be CPU work in every iteration, in the GPU graph too). Outputs: one tensor per
view, [3, S, S], in the per-sample view order of `sampling`. Nothing here is random, which
is why stage B needs no checkpoint. With `frame_sizes` a last output holds each sample's
decoded (height, width) per decoded frame, [k, 2] float32, for the loader to compare with
the sizes its boxes were drawn for.

The same graph runs on the CPU (`device_id=None`: `cpu` video / image decoder) and on a GPU
(`mixed` decoders: NVDEC / nvJPEG, then every op on the GPU).
"""
from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from tcore.pipelines.config import ViewConfig

FRAME_JPEG_FEEDS = ("past_jpeg", "current_jpeg", "future_jpeg")   # JPEG-frame shards only
FEED_NAMES = ("data", "frames", "boxes", "flips", "photometric", "switches",
              "blur_windows") + FRAME_JPEG_FEEDS

# Gaussian blur with sigma 0 would mean "derive sigma from the window" in DALI; a tiny sigma
# makes the 9-tap kernel an exact identity instead (exp(-1 / 2e-6) == 0 in float32).
NO_BLUR_SIGMA = 1e-3
BLUR_DRAWN = 0.01      # drawn sigmas are >= 0.1; rows without blur carry NO_BLUR_SIGMA
# Columns appended to each fed photometric row (after sampling.PHOTO_FIELDS) by
# `jitter_columns`: the 8-bit hue shift, whether the hue shift applies, then 6 linear slots
# (3 before the hue shift, 3 after it) of 3 columns each: (alpha, with_luma, with_mean) of
# `_pil_enhance`.
JITTER_HUE_SHIFT, JITTER_HUE_ON, JITTER_SLOTS = 7, 8, 9
# Then the "fast" jitter's arguments: DALI's hue in degrees and the saturation with grayscale
# folded in (0 for a gray view).
FAST_HUE_DEGREES = JITTER_SLOTS + 6 * 3
FAST_SATURATION = FAST_HUE_DEGREES + 1
ROW_WIDTH = FAST_SATURATION + 1
# Per-view switches, one bool column each: which per-sample branches of the graph run.
SWITCHES = ("jitter", "colour", "blur", "solarize", "hue", "gray",
            "slot0", "slot1", "slot2", "slot3", "slot4", "slot5")
SW = {name: k for k, name in enumerate(SWITCHES)}
_IDENTITY_SLOT = (1.0, 0.0, 0.0)


def _solarize_table(threshold: int):
    keys = list(range(256))
    return keys, [k if k < threshold else 255 - k for k in keys]


def _photometric(image, row, switch, blur_window, cfg_probs, views: ViewConfig, pixels: int,
                 on_gpu: bool = False):
    """jitter -> grayscale -> blur -> solarize on one uint8 HWC view of `pixels` pixels,
    per-sample params: the view's fed row, switches and blur window (`view_rows`)."""
    colour, blur, solarize = _enabled(cfg_probs)
    if colour and views.color_jitter == "fast":
        image = _fast_jitter(image, row, switch, on_gpu)
    elif colour:
        image = _torchvision_jitter(image, row, switch, pixels, on_gpu)
    # Per-sample `if`s (DALI conditionals split and merge the batch): a view that did not
    # draw blur or solarize skips that work instead of running it as an identity.
    if blur and switch[SW["blur"]]:
        image = fn.gaussian_blur(image, window_size=blur_window, sigma=row[5])
    if solarize and switch[SW["solarize"]]:
        keys, values = _solarize_table(views.solarize_threshold)
        image = fn.lookup_table(image, keys=keys, values=values, dtype=types.UINT8)
    return image


def blur_windows(sigmas: np.ndarray, kernel: int) -> np.ndarray:
    """The configured kernel, narrowed to radius ceil(4 sigma) for small sigmas: the taps
    dropped weigh < exp(-8) of the centre tap, so the uint8 pixels are the full kernel's
    (1 of ~3M values off by one level at a rounding edge), at less CPU."""
    radius = np.minimum(np.ceil(np.asarray(sigmas, np.float32) * np.float32(4.0)), kernel // 2)
    return (radius * 2 + 1).astype(np.int32)


def _brightness(image, row):
    return fn.brightness_contrast(image, brightness=row[0])


def _contrast(image, row, on_gpu):
    # torchvision's contrast blends with the mean gray level of the image, not with
    # mid-range: compute that centre per sample, as PIL does, from the uint8 luma image.
    gray = fn.color_space_conversion(image, image_type=types.RGB, output_type=types.GRAY)
    center = fn.reductions.mean(gray)
    if on_gpu:
        center = center.cpu()     # argument inputs live on the CPU (dynamic executor)
    return fn.brightness_contrast(image, contrast=row[1], contrast_center=center)


def _fast_jitter(image, row, switch, on_gpu):
    """views.color_jitter = "fast": brightness, contrast, then saturation + hue + grayscale
    in one linear transform (DALI's hue: a rotation about the gray axis)."""
    if switch[SW["jitter"]]:
        # Brightness alone first: torchvision clamps to 0..255 between its adjustments.
        image = _contrast(_brightness(image, row), row, on_gpu)
    if switch[SW["colour"]]:
        # Saturation (a blend with luma) and hue act on chroma only, so DALI's single linear
        # transform covers both, and grayscale after jitter is saturation 0.
        hue, saturation = row[FAST_HUE_DEGREES], row[FAST_SATURATION]
        if on_gpu:
            image = fn.hsv(image, hue=hue, saturation=saturation)
        else:
            # Float out, then the saturating cast: the same pixels (checked on 7.8M random
            # values) at 0.8x the CPU time of fn.hsv's own uint8 output.
            image = fn.cast(fn.hsv(image, hue=hue, saturation=saturation, dtype=types.FLOAT),
                            dtype=types.UINT8)
    return image


# PIL's convert("L"): (19595 R + 38470 G + 7471 B + 2^15) >> 16, here as a 3x3 matrix so the
# gray level comes out in all three channels. Every partial sum is an integer < 2^24, so
# coord_transform's float32 arithmetic is exact, and so is the division by 2^16.
_PIL_LUMA_M = [19595.0, 38470.0, 7471.0] * 3
_PIL_LUMA_T = [32768.0] * 3


def _pil_luma3(image):
    """PIL's integer luma of a uint8 HWC image, in all 3 channels, as float32 HWC."""
    total = fn.coord_transform(image, M=_PIL_LUMA_M, T=_PIL_LUMA_T, dtype=types.FLOAT)
    return dmath.floor(total * (1.0 / 65536.0))


def _pil_enhance(image, alpha, with_luma, with_mean, pixels, on_gpu):
    """torchvision's adjust_brightness / adjust_contrast / adjust_saturation on a PIL image,
    bit-exact, as one per-sample operation: PIL's ImageEnhance blends the image with a
    degenerate image, base + alpha (x - base) in float32, clamped and truncated to uint8. The
    base is black (brightness), the rounded mean luma (contrast, ImageStat), or the luma
    (saturation): base = with_luma * L + with_mean * mean(L), per-sample 0/1 weights. alpha = 1
    with weights 0 is an exact identity (an unused slot)."""
    x = _f32(image)
    luma = fn.coord_transform(image, M=_PIL_LUMA_M[:3], T=_PIL_LUMA_T[:1], dtype=types.FLOAT)
    luma = dmath.floor(luma * (1.0 / 65536.0))                        # H x W x 1
    total = fn.reductions.sum(fn.cast(luma, dtype=types.INT32), dtype=types.INT64)
    mean = _f32(dmath.floor(_f64(total) / float(pixels) + 0.5))      # int(mean + 0.5)
    if on_gpu:
        alpha, with_luma, with_mean = alpha.gpu(), with_luma.gpu(), with_mean.gpu()
    base = with_luma * luma + with_mean * mean
    # floor, then the saturating cast: PIL's clamp and truncation.
    return fn.cast(dmath.floor(base + alpha * (x - base)), dtype=types.UINT8)


def _torchvision_jitter(image, row, switch, pixels, on_gpu):
    """views.color_jitter = "torchvision": ColorJitter's operations in the view's drawn order
    (uint8 between them: clamped to 0..255 and truncated as PIL does), then grayscale.

    The order is fed as columns (see `jitter_columns`): three linear slots (brightness,
    contrast or saturation, or an exact identity) before the hue shift, the hue shift if it
    applies (a per-sample `if`: DALI conditionals split and merge the batch), three slots
    after it. The HSV graph exists once per view."""
    def slot(image, k):
        col = JITTER_SLOTS + 3 * k
        if switch[SW[f"slot{k}"]]:     # unused slots (alpha 1) skip the work
            image = _pil_enhance(image, row[col], row[col + 1], row[col + 2], pixels, on_gpu)
        return image

    for k in range(3):
        image = slot(image, k)
    if switch[SW["hue"]]:
        shift = row[JITTER_HUE_SHIFT]
        if on_gpu:
            shift = shift.gpu()
        image = pil_hue_shift(image, shift)
    for k in range(3, 6):
        image = slot(image, k)
    if switch[SW["gray"]]:
        image = fn.cast(_pil_luma3(image), dtype=types.UINT8)     # PIL's "L", as RGB
    return image


def _f32(x):
    return fn.cast(x, dtype=types.FLOAT)


def _f64(x):
    return fn.cast(x, dtype=types.FLOAT64)


def pil_hue_shift(image, shift):
    """torchvision's `adjust_hue` on a PIL image, bit-exact: PIL's RGB -> HSV (8-bit H, S, V),
    H += shift (mod 256; shift = uint8(int32(hue * 255)), computed on the host), HSV -> RGB.

    PIL computes in a mix of float and double and truncates; the casts below reproduce each
    rounding (checked against PIL on all 2^24 colours at several shifts). torchvision's tensor
    `_rgb2hsv` / `_hsv2rgb` follow the same formulas without the 8-bit quantisation of H and S.
    uint8 HWC in, uint8 HWC out; `shift` is a per-sample float scalar on the image's device."""
    x = _f32(image)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    v = dmath.max(dmath.max(r, g), b)
    chroma = v - dmath.min(dmath.min(r, g), b)
    cr = dmath.max(chroma, 1.0)            # gray pixels: S = 0 makes H irrelevant
    rc, gc, bc = (v - r) / cr, (v - g) / cr, (v - b) / cr
    is_r = r == v
    is_g = (r != v) & (g == v)
    is_b = (r != v) & (g != v)
    # h = bc - gc (float), 2.0 + rc - bc or 4.0 + gc - rc (double, stored as float); one
    # mask is 1 per pixel, so the sum is exact.
    rc64, gc64, bc64 = _f64(rc), _f64(gc), _f64(bc)
    h = is_r * (bc - gc) + is_g * _f32(rc64 + 2.0 - bc64) + is_b * _f32(gc64 + 4.0 - rc64)
    y = _f64(h) / 6.0 + 1.0                # in [5/6, 11/6]: fmod(y, 1) = y - (y >= 1), exact
    h = _f64(_f32(y - (y >= 1.0)))
    hue = dmath.floor(h * 255.0)
    sat = dmath.floor(_f64(chroma / dmath.max(v, 1.0)) * 255.0)
    hue = hue + shift
    hue = hue - (hue >= 256.0) * 256.0
    # HSV -> RGB: i = floor(6 H / 255) in 0..6, f (float), p, q, t rounded half up.
    h6 = hue * 6.0 / 255.0
    i = dmath.floor(h6)
    fs = _f64(_f32(h6 - i) * _f32(sat))
    v64 = _f64(v)
    p = dmath.floor(v64 * (255.0 - sat) / 255.0 + 0.5)
    q = dmath.floor(v64 * (255.0 - fs) / 255.0 + 0.5)
    t = dmath.floor(v64 * (255.0 - sat + fs) / 255.0 + 0.5)
    c = [i == k for k in range(7)]
    c0 = c[0] | c[6]                       # H = 255 gives i = 6, i.e. 0 (mod 6)
    red = (c0 | c[5]) * v64 + c[1] * q + (c[2] | c[3]) * p + c[4] * t
    green = c0 * t + (c[1] | c[2]) * v64 + c[3] * q + (c[4] | c[5]) * p
    blue = (c0 | c[1]) * p + c[2] * t + (c[3] | c[4]) * v64 + c[5] * q
    rgb = fn.stack(red, green, blue, axis=2)
    return fn.cast(fn.reshape(rgb, layout="HWC"), dtype=types.UINT8)


def _inside(boxes, height_width):
    """The fed boxes [V, 4] (y0, x0, y1, x1) clamped into a decoded frame of `height_width`
    (float [2]): starts to at most H-1 / W-1, ends to at most H / W. A frame smaller than
    its .json says (a bad sample, which the loader then names from `frame_sizes`) would
    otherwise make fn.resize read outside it (a segfault). The boxes of a good sample are
    whole pixels inside the frame, so min() returns them unchanged, bit for bit."""
    return dmath.min(boxes, fn.cat(height_width - 1.0, height_width))


@pipeline_def(enable_conditionals=True)
def views_pipeline(kind: str, views: ViewConfig, on_gpu: bool, out_dtype,
                   decode_video_on_gpu: bool = True, photometric_in_graph: bool = True,
                   frame_sizes: bool = False):
    """Every view of a batch from the fed inputs. With `photometric_in_graph=False` the
    views leave as uint8 (cropped, resized, flipped) for `torch_photometric` to finish;
    with `frame_sizes` the decoded frames' sizes follow the views (see the module doc)."""
    data = fn.external_source(name="data", dtype=types.UINT8, ndim=1, no_copy=False)
    frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
    boxes = fn.external_source(name="boxes", dtype=types.FLOAT, ndim=2)
    flips = fn.external_source(name="flips", dtype=types.INT32, ndim=1)
    photometric = fn.external_source(name="photometric", dtype=types.FLOAT, ndim=2)
    switches = fn.external_source(name="switches", dtype=types.BOOL, ndim=2)
    windows = fn.external_source(name="blur_windows", dtype=types.INT32, ndim=1)
    decoder_device = "mixed" if on_gpu else "cpu"
    # Each frame with the boxes clamped into its decoded size (`_inside`), a CPU tensor: the
    # decoded clip's shape (NVDEC's: metadata the dynamic executor hands to the CPU), or for
    # JPEGs their headers' (fn.peek_image_shape), which no decode has to finish first.
    if kind == "video":
        # pad_mode "none": a frame index past what the clip decodes (a damaged clip, a wrong
        # "frames" in its .json) is an error naming the sample, not a black frame.
        clip = fn.decoders.video(data, device="cpu" if on_gpu and not decode_video_on_gpu
                                 else decoder_device, frames=frames, pad_mode="none")
        height_width = clip.shape(dtype=types.FLOAT)[1:3]     # F, H, W, C
        if on_gpu and not decode_video_on_gpu:
            # libavcodec on the CPU threads, then only the three decoded frames cross to the GPU.
            clip = clip.gpu()
        inside = _inside(boxes, height_width)
        past, current, future = ((clip[k], inside) for k in range(3))
        sizes = height_width
    elif kind == "frames":
        # Only the three drawn JPEG frames were cut out on the host: three image decodes.
        jpegs = [fn.external_source(name=name, dtype=types.UINT8, ndim=1)
                 for name in FRAME_JPEG_FEEDS]
        shapes = [fn.peek_image_shape(jpeg, dtype=types.FLOAT)[0:2] for jpeg in jpegs]
        past, current, future = (
            (fn.decoders.image(jpeg, device=decoder_device, output_type=types.RGB),
             _inside(boxes, height_width)) for jpeg, height_width in zip(jpegs, shapes))
        sizes = fn.stack(*shapes)
    else:
        height_width = fn.peek_image_shape(data, dtype=types.FLOAT)[0:2]
        image = fn.decoders.image(data, device=decoder_device, output_type=types.RGB)
        past = current = future = (image, _inside(boxes, height_width))
        sizes = height_width

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
    for v, ((frame, inside), size, probs) in enumerate(plan):
        # Crops 1 and 2 of the past (and of the future) frame share the central box: resize
        # once per frame, the most expensive op of the graph.
        shared = v - 2 - n_local if v >= 2 + n_local else None
        key = ("central", shared // 2) if shared is not None else v
        if key not in resized:
            resized[key] = fn.resize(frame, roi_start=inside[v, 0:2], roi_end=inside[v, 2:4],
                                     size=[size, size], interp_type=types.INTERP_CUBIC,
                                     antialias=True)
        if not photometric_in_graph:
            outputs.append(fn.crop_mirror_normalize(resized[key], mirror=flips[v],
                                                    dtype=types.UINT8, output_layout="CHW"))
            continue
        crop = _photometric(resized[key], photometric[v], switches[v], windows[v], probs, views,
                            size * size, on_gpu)
        outputs.append(fn.crop_mirror_normalize(
            crop, mirror=flips[v], mean=mean, std=std, dtype=out_dtype, output_layout="CHW"))
    if frame_sizes:
        outputs.append(sizes)
    return tuple(outputs)


def jitter_columns(rows, orders) -> np.ndarray:
    """Views' drawn jitter orders as the graph's columns (see JITTER_* above), for any leading
    shape: rows [..., 7] (PHOTO_FIELDS), orders [..., 4] -> [..., 2 + 6 * 3] float32.

    Per view: the operations of its order whose factor is not the identity
    (`sampling.jitter_sequence`), the linear ones before the hue shift in slots 0-2 and those
    after it in slots 3-5, unused slots the identity (1, 0, 0)."""
    rows = np.asarray(rows, dtype=np.float32)
    orders = np.asarray(orders, dtype=np.int64)
    lead = rows.shape[:-1]
    rows, orders = rows.reshape(-1, rows.shape[-1]), orders.reshape(-1, orders.shape[-1])
    factors = rows[:, :4]
    active = np.take_along_axis(factors != np.array([1, 1, 1, 0], np.float32), orders, 1)
    is_hue = active & (orders == 3)                   # by position in the drawn order
    after_hue = (np.cumsum(is_hue, axis=1) - is_hue) > 0
    linear = active & ~is_hue
    pre, post = linear & ~after_hue, linear & after_hue
    slot = np.where(pre, np.cumsum(pre, axis=1) - 1, np.where(post, np.cumsum(post, axis=1) + 2, -1))
    # (alpha, with_luma, with_mean) of `_pil_enhance` per position: the factor, and the
    # base: black (brightness), the mean luma (contrast) or the luma (saturation).
    values = np.stack([np.take_along_axis(factors, orders, 1),
                       (orders == 2).astype(np.float32), (orders == 1).astype(np.float32)], -1)
    slots = np.tile(np.array(_IDENTITY_SLOT, np.float32), (len(rows), 6, 1))
    for position in range(orders.shape[1]):
        views = np.flatnonzero(slot[:, position] >= 0)
        slots[views, slot[views, position]] = values[views, position]
    # PIL shifts its 8-bit H by uint8(int32(hue * 255)) (torchvision's PIL adjust_hue).
    shift = (factors[:, 3].astype(np.float64) * 255).astype(np.int32) % 256
    columns = np.concatenate([shift[:, None].astype(np.float32),
                              is_hue.any(axis=1, keepdims=True).astype(np.float32),
                              slots.reshape(len(rows), -1)], axis=1)
    return columns.reshape(*lead, columns.shape[-1])


def view_rows(photometric: np.ndarray, jitter_order: np.ndarray, blur_kernel: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-view graph inputs from drawn rows [..., V, 7] and jitter orders [..., V, 4] (one
    sample, or a whole batch at once): rows [..., V, ROW_WIDTH] float32 (PHOTO_FIELDS,
    `jitter_columns`, the "fast" hue and saturation), switches [..., V, len(SWITCHES)] bool and
    blur windows [..., V] int32.

    Everything the graph would otherwise compute per view with scalar DALI operators is done
    here in numpy, in float32 as the graph would."""
    drawn = np.asarray(photometric, dtype=np.float32)
    b, c, s, h, gray, sigma, solarize = np.moveaxis(drawn, -1, 0)
    slots = jitter_columns(drawn, jitter_order)
    rows = drawn.copy()
    rows[..., 5] = np.where(sigma > 0, sigma, np.float32(NO_BLUR_SIGMA))
    fast = np.stack([h * np.float32(360.0), s * (np.float32(1.0) - gray)], axis=-1)
    rows = np.concatenate([rows, slots, fast], axis=-1).astype(np.float32)
    jittered = (b != 1.0) | (c != 1.0) | (s != 1.0) | (h != 0.0)
    switches = np.concatenate(
        [np.stack([jittered, jittered | (gray > 0), rows[..., 5] > BLUR_DRAWN, solarize > 0,
                   slots[..., JITTER_HUE_ON - JITTER_HUE_SHIFT] > 0, gray > 0], axis=-1),
         slots[..., JITTER_SLOTS - JITTER_HUE_SHIFT::3] != 1.0], axis=-1)
    return rows, switches, blur_windows(rows[..., 5], blur_kernel)


def feed_arrays(samples_data, params, blur_kernel: int, photometric: bool = True
                ) -> dict[str, list[np.ndarray] | np.ndarray]:
    """Inputs for `Pipeline.feed_input`, from encoded bytes + SampleParams of a non-empty
    batch (without the per-view photometric inputs when the graph has no colour stage): the
    encoded samples as a list, every fixed-shape input as one array with the batch first.
    DALI takes such an array in one call, where a list costs it ~7 us of Python per sample
    and input."""
    arrays = {"data": list(samples_data)}
    if not params:
        return arrays
    arrays.update(frames=np.stack([p.frames for p in params]).astype(np.int32),
                  boxes=np.stack([p.boxes for p in params]).astype(np.float32),
                  flips=np.stack([p.flips for p in params]).astype(np.int32))
    if photometric:
        rows, switches, windows = view_rows(np.stack([p.photometric for p in params]),
                                            np.stack([p.jitter_order for p in params]),
                                            blur_kernel)
        arrays.update(photometric=rows, switches=switches, blur_windows=windows)
    return arrays


def frame_feeds(samples_data, frame_offsets, params) -> dict[str, list[np.ndarray]]:
    """The past / current / future JPEG inputs of the frames graph: the three drawn frames
    sliced (views, no copy) out of each sample's T back-to-back JPEGs."""
    return {name: [data[bounds[p.frames[k]]:bounds[p.frames[k] + 1]]
                   for data, bounds, p in zip(samples_data, frame_offsets, params)]
            for k, name in enumerate(FRAME_JPEG_FEEDS)}


def build_views_pipeline(kind: str, views: ViewConfig, batch_size: int, device_id,
                         num_threads: int, prefetch: int, out_dtype, seed: int = 0,
                         decode_video_on_gpu: bool = True, photometric_in_graph: bool = True,
                         frame_sizes: bool = False):
    pipe = views_pipeline(kind=kind, views=views, on_gpu=device_id is not None,
                          out_dtype=out_dtype, decode_video_on_gpu=decode_video_on_gpu,
                          photometric_in_graph=photometric_in_graph, frame_sizes=frame_sizes,
                          # Only the colour stage branches per sample; without it the graph
                          # needs no AutoGraph conversion (faster to build, and a killed
                          # process leaves none of its generated files in the temp folder).
                          enable_conditionals=photometric_in_graph,
                          batch_size=batch_size, num_threads=num_threads,
                          device_id=device_id, prefetch_queue_depth=prefetch, seed=seed,
                          exec_async=True, exec_pipelined=True,
                          # GPU -> CPU (contrast centre) needs DALI's dynamic executor.
                          **({"exec_dynamic": True} if device_id is not None else {}))
    pipe.build()
    # DALI prunes the inputs no operator reads (the photometric rows when every probability
    # is 0, the frames of image shards): feed exactly those left in the graph.
    in_graph = {node.name for node in pipe._ops}
    pipe.feed_names = [name for name in FEED_NAMES if name in in_graph]
    return pipe


def _enabled(cfg) -> tuple[bool, bool, bool]:
    return (cfg.jitter_p > 0 or cfg.grayscale_p > 0, cfg.blur_p > 0, cfg.solarize_p > 0)
