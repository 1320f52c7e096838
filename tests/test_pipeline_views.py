"""Stage B's colour jitter (views.color_jitter = "torchvision") against torchvision on PIL
images, on fed uint8 images (no decode, no resize): the HSV hue shift, brightness, contrast,
saturation and grayscale bit for bit, in the drawn order (all 24 orders)."""
import itertools

import numpy as np
import pytest
from nvidia.dali import fn, pipeline_def, types
from PIL import Image
import torchvision.transforms.functional as TF

from colour_images import colour_test_image
from tcore.pipelines.config import PhotometricConfig, ViewConfig
from tcore.pipelines.sampling import jitter_sequence
from tcore.pipelines.torchvision_loader import _photometric as baseline_photometric
from tcore.pipelines.views import (FAST_HUE_DEGREES, FAST_SATURATION, ROW_WIDTH, SWITCHES,
                                   _photometric, blur_windows, build_views_pipeline,
                                   jitter_columns, pil_hue_shift, view_rows)


@pipeline_def(enable_conditionals=True, num_threads=1, device_id=None, prefetch_queue_depth=1,
              exec_async=False, exec_pipelined=False)
def _jitter_pipeline(views: ViewConfig, size: int, cfg: PhotometricConfig | None = None):
    image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
    rows, switches, windows = _view_inputs()
    cfg = cfg or PhotometricConfig(jitter_p=1.0, blur_p=0.0, solarize_p=0.0)
    return _photometric(image, rows, switches, windows, cfg, views, size * size)


def _view_inputs():
    """One view's fed row, switches and blur window (what `views_pipeline` subscripts)."""
    return (fn.external_source(name="rows", dtype=types.FLOAT, ndim=1),
            fn.external_source(name="switches", dtype=types.BOOL, ndim=1),
            fn.external_source(name="windows", dtype=types.INT32, ndim=0))


@pipeline_def(num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
              exec_pipelined=False)
def _hue_pipeline():
    image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
    shift = fn.external_source(name="shift", dtype=types.FLOAT, ndim=0)
    return pil_hue_shift(image, shift)


def _run(pipe, feeds: dict) -> list[np.ndarray]:
    in_graph = {node.name for node in pipe._ops}     # DALI prunes inputs nothing reads
    for name, values in feeds.items():
        if name in in_graph:
            pipe.feed_input(name, values)
    return [np.array(out) for out in pipe.run()[0]]


def _row(brightness, contrast, saturation, hue, gray=0.0):
    return np.array([brightness, contrast, saturation, hue, gray, 0.0, 0.0], dtype=np.float32)


@pytest.mark.parametrize("hue", [0.08, -0.1, 0.5, -0.5, 0.003])
def test_hue_shift_is_pils_bit_for_bit(hue):
    """TF.adjust_hue on a PIL image: 8-bit HSV, H += uint8(int32(hue * 255)). (An
    all-2^24-colours check at several hues also gives 0 differences; too slow for the suite.)"""
    image = colour_test_image(96)
    pipe = _hue_pipeline(batch_size=1)
    pipe.build()
    shift = jitter_columns(_row(1.0, 1.0, 1.0, hue), np.arange(4))[0]   # the fed shift
    out = _run(pipe, {"image": [image], "shift": [np.float32(shift)]})[0]
    want = np.array(TF.adjust_hue(Image.fromarray(image), hue))
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, want), np.abs(out.astype(int) - want).max()


def _feeds(rows, orders) -> dict:
    """Feeds for `_view_inputs`, one view per sample, built by `view_rows` as the loader does."""
    full, switches, windows = view_rows(np.stack(rows), np.stack(orders), blur_kernel=9)
    return {"rows": list(full), "switches": list(switches), "windows": list(windows)}


def test_jitter_applies_each_views_drawn_order():
    """One sample per order of the 24: DALI equals torchvision (PIL images) with the same
    order pixel for pixel; against the fixed order b, c, s, h it does not."""
    image = colour_test_image(64, seed=1)
    orders = [np.array(p) for p in itertools.permutations(range(4))]
    row = _row(1.35, 0.65, 1.2, 0.08)
    views = ViewConfig(color_jitter="torchvision")
    pipe = _jitter_pipeline(views, 64, batch_size=len(orders))
    pipe.build()
    outs = _run(pipe, {"image": [image] * len(orders), **_feeds([row] * len(orders), orders)})
    matched, fixed = [], []
    for out, order in zip(outs, orders):
        want = np.array(baseline_photometric(Image.fromarray(image), row, order, 128))
        matched.append(np.abs(out.astype(int) - want).mean())
        other = np.array(baseline_photometric(Image.fromarray(image), row, np.arange(4), 128))
        fixed.append(np.abs(out.astype(int) - other).mean())
    # Bit-exact (measured 0 for every order); a wrong order differs by 2-11 levels on average.
    assert max(matched) == 0.0, matched
    assert sorted(fixed)[1] > 1.5 and max(fixed) > 8.0, fixed


def test_jitter_skips_identity_factors_and_grays_after():
    """A view whose jitter did not fire (identity factors) is unchanged; hue alone is PIL's
    exactly; grayscale (PIL's integer luma) comes after the jitter."""
    image = colour_test_image(48, seed=2)
    rows = [_row(1.0, 1.0, 1.0, 0.0), _row(1.0, 1.0, 1.0, -0.07),
            _row(1.2, 1.0, 1.0, 0.06, gray=1.0), _row(1.0, 1.0, 1.0, 0.0, gray=1.0)]
    orders = [np.array([3, 1, 0, 2])] * len(rows)
    pipe = _jitter_pipeline(ViewConfig(color_jitter="torchvision"), 48, batch_size=len(rows))
    pipe.build()
    outs = _run(pipe, {"image": [image] * len(rows), **_feeds(rows, orders)})
    assert np.array_equal(outs[0], image)
    assert np.array_equal(outs[1], np.array(TF.adjust_hue(Image.fromarray(image), -0.07)))
    for out, row, order in zip(outs[2:], rows[2:], orders[2:]):
        assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])
        want = np.array(baseline_photometric(Image.fromarray(image), row, order, 128))
        assert np.array_equal(out, want)


@pytest.mark.parametrize("color_jitter", ["torchvision", "fast"])
def test_grayscale_without_colour_jitter_still_grays(color_jitter):
    """A view kind configured with jitter_p 0 but grayscale_p > 0 keeps the graph's colour
    stage: a view that drew grayscale comes out as PIL's gray levels ("fast": DALI's
    saturation 0, each pixel's channels within one level of each other, where the input's
    differ by ~130 on average), one that did not is unchanged."""
    image = colour_test_image(32, seed=5)
    cfg = PhotometricConfig(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0, solarize_p=0.0)
    rows = [_row(1.0, 1.0, 1.0, 0.0, gray=1.0), _row(1.0, 1.0, 1.0, 0.0)]
    pipe = _jitter_pipeline(ViewConfig(color_jitter=color_jitter), 32, cfg, batch_size=2)
    pipe.build()
    gray, untouched = _run(pipe, {"image": [image] * 2,
                                  **_feeds(rows, [np.arange(4)] * 2)})
    assert np.array_equal(untouched, image)
    assert (gray.max(-1).astype(int) - gray.min(-1)).max() <= 1
    if color_jitter == "torchvision":
        want = np.array(TF.rgb_to_grayscale(Image.fromarray(image), num_output_channels=3))
        assert np.array_equal(gray, want)


def test_jitter_columns_encode_the_order_around_hue():
    b, c, s = (np.float32(v) for v in (1.1, 0.9, 1.05))
    row = _row(b, c, s, 0.04)
    ident = [1, 0, 0]
    # Order saturation, hue, brightness, contrast: [shift, hue on, 3 slots before, 3 after].
    assert jitter_columns(row, np.array([2, 3, 0, 1])).tolist() == \
        [10, 1] + [s, 1, 0] + ident * 2 + [b, 0, 0] + [c, 0, 1] + ident
    assert jitter_columns(row, np.array([3, 0, 1, 2])).tolist() == \
        [10, 1] + ident * 3 + [b, 0, 0] + [c, 0, 1] + [s, 1, 0]
    # Hue 0 (not jittered, or configured off) and contrast 1: skipped, the rest in order.
    assert jitter_columns(_row(b, 1.0, s, 0.0), np.array([2, 3, 1, 0])).tolist() == \
        [0, 0] + [s, 1, 0] + [b, 0, 0] + ident * 4
    # A negative hue wraps: int32(-0.04 * 255) = -10 -> 246.
    assert jitter_columns(_row(1.0, 1.0, 1.0, -0.04), np.arange(4))[0] == 246


def _columns_one_view(row, order) -> list[float]:
    """The definition, one view at a time: `jitter_sequence`, split at the hue shift."""
    sequence = jitter_sequence(row, order)
    split = sequence.index(3) if 3 in sequence else len(sequence)
    base = {0: (0.0, 0.0), 1: (0.0, 1.0), 2: (1.0, 0.0)}      # (with_luma, with_mean)

    def slots(ops):
        out = [[float(row[op]), *base[op]] for op in ops]
        return out + [[1.0, 0.0, 0.0]] * (3 - len(out))

    shift = int(np.int32(float(row[3]) * 255)) % 256
    return [shift, float(3 in sequence)] + [v for slot in slots(sequence[:split])
                                            + slots(sequence[split + 1:]) for v in slot]


def test_jitter_columns_of_a_whole_batch_equal_the_per_view_definition():
    """The vectorised columns ([n, V, ...] at once, as the loader calls them) against the
    per-view definition, on drawn rows with every mix of identity factors and orders."""
    rng = np.random.default_rng(0)
    rows = np.stack([_row(*rng.uniform(0.6, 1.4, 3), rng.uniform(-0.1, 0.1)) for _ in range(600)])
    for column, identity in enumerate((1.0, 1.0, 1.0, 0.0)):
        rows[rng.random(len(rows)) < 0.3, column] = identity
    orders = np.stack([rng.permutation(4) for _ in range(len(rows))])
    batch = jitter_columns(rows.reshape(50, 12, 7), orders.reshape(50, 12, 4))
    assert batch.shape == (50, 12, 20) and batch.dtype == np.float32
    want = np.array([_columns_one_view(r, o) for r, o in zip(rows, orders)], np.float32)
    assert np.array_equal(batch.reshape(600, 20), want)
    full, switches, windows = view_rows(rows.reshape(50, 12, 7), orders.reshape(50, 12, 4), 9)
    one, one_switches, one_windows = view_rows(rows[:12], orders[:12], 9)
    assert np.array_equal(full[0], one) and np.array_equal(switches[0], one_switches)
    assert np.array_equal(windows[0], one_windows)


@pipeline_def(enable_conditionals=True, num_threads=1, device_id=None, prefetch_queue_depth=1,
              exec_async=False, exec_pipelined=False)
def _fast_jitter_pair(size: int):
    """The "fast" graph as built, and the same operations written plainly with fn.hsv's own
    uint8 output (the graph takes hsv in float and casts, which is cheaper on the CPU)."""
    image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
    rows, switches, windows = _view_inputs()
    cfg = PhotometricConfig(jitter_p=1.0, blur_p=0.0, solarize_p=0.0)
    built = _photometric(image, rows, switches, windows, cfg, ViewConfig(color_jitter="fast"),
                         size * size)
    plain = fn.brightness_contrast(image, brightness=rows[0])
    center = fn.reductions.mean(fn.color_space_conversion(plain, image_type=types.RGB,
                                                          output_type=types.GRAY))
    plain = fn.brightness_contrast(plain, contrast=rows[1], contrast_center=center)
    plain = fn.hsv(plain, hue=rows[3] * 360.0, saturation=rows[2] * (1.0 - rows[4]))
    return built, plain


def test_fast_jitter_equals_dalis_plain_operators():
    rng = np.random.default_rng(3)
    rows = [_row(b, c, s, h, g) for b, c, s, h, g in
            zip(rng.uniform(0.6, 1.4, 12), rng.uniform(0.6, 1.4, 12), rng.uniform(0.8, 1.2, 12),
                rng.uniform(-0.1, 0.1, 12), [0.0] * 9 + [1.0] * 3)]
    # Hue alone (brightness, contrast and saturation configured off): still rotated.
    rows += [_row(1.0, 1.0, 1.0, 0.07), _row(1.0, 1.0, 1.0, -0.05)]
    images = [colour_test_image(64, seed=k) for k in range(len(rows))]
    pipe = _fast_jitter_pair(64, batch_size=len(rows))
    pipe.build()
    pipe.feed_input("image", images)
    feeds = _feeds(rows, [np.arange(4)] * len(rows))
    pipe.feed_input("rows", feeds["rows"])
    pipe.feed_input("switches", feeds["switches"])
    built, plain = pipe.run()
    for k in range(len(rows)):
        assert np.array_equal(np.array(built[k]), np.array(plain[k])), k


@pipeline_def(num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
              exec_pipelined=False)
def _blur_pair():
    image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
    sigma = fn.external_source(name="sigma", dtype=types.FLOAT, ndim=0)
    window = fn.external_source(name="window", dtype=types.INT32, ndim=0)
    narrowed = fn.gaussian_blur(image, window_size=window, sigma=sigma)
    return narrowed, fn.gaussian_blur(image, window_size=9, sigma=sigma)


def test_narrowed_blur_window_keeps_the_full_kernels_pixels():
    """Small sigmas skip the taps beyond 4 sigma: same uint8 pixels as the 9-tap kernel but
    for the odd rounding edge (one level)."""
    rng = np.random.default_rng(4)
    sigmas = np.concatenate([[0.1, 0.25, 0.26, 0.5, 0.51, 0.75, 0.76, 2.0],
                             rng.uniform(0.1, 2.0, 8)]).astype(np.float32)
    pipe = _blur_pair(batch_size=len(sigmas))
    pipe.build()
    pipe.feed_input("image", [colour_test_image(96, seed=k) for k in range(len(sigmas))])
    pipe.feed_input("sigma", list(sigmas))
    pipe.feed_input("window", list(blur_windows(sigmas, 9)))
    narrowed, full = pipe.run()
    differing = 0
    for k in range(len(sigmas)):
        diff = np.abs(np.array(narrowed[k]).astype(int) - np.array(full[k]).astype(int))
        assert diff.max() <= 1, sigmas[k]
        differing += int((diff > 0).sum())
    assert differing <= len(sigmas) * 96 * 96 * 3 // 10000    # at most 0.01% of the values


def test_view_rows_decide_each_views_branches():
    """The host decides which per-sample branches run: nothing for an identity row, the
    colour branch alone for grayscale, blur only for a drawn sigma (window narrowed to
    radius ceil(4 sigma)), the torchvision slots only where a factor is not 1."""
    rows = np.stack([_row(1.0, 1.0, 1.0, 0.0), _row(1.0, 1.0, 1.0, 0.0, gray=1.0),
                     _row(1.2, 1.0, 0.9, 0.05), _row(1.0, 1.0, 1.0, 0.0)])
    rows[3, 5], rows[3, 6] = 0.2, 1.0          # blur sigma 0.2, solarize
    full, switches, windows = view_rows(rows, np.tile(np.arange(4), (4, 1)), blur_kernel=9)
    on = {name: switches[:, k].tolist() for k, name in enumerate(SWITCHES)}
    assert full.shape == (4, ROW_WIDTH) and full.dtype == np.float32
    assert on["jitter"] == [False, False, True, False]
    assert on["colour"] == [False, True, True, False]
    assert on["gray"] == [False, True, False, False]
    assert on["blur"] == [False, False, False, True] and windows[3] == 3
    assert on["solarize"] == [False, False, False, True]
    assert on["hue"] == [False, False, True, False]
    # Order b, c, s, h with contrast 1.0 (no-op, dropped): slot 0 brightness, slot 1
    # saturation, then the hue shift; no slot after it.
    assert [on[f"slot{k}"][2] for k in range(6)] == [True, True, False, False, False, False]
    assert full[2, FAST_HUE_DEGREES] == np.float32(0.05) * np.float32(360.0)
    assert full[1, FAST_SATURATION] == 0.0      # grayscale: saturation 0


@pytest.mark.parametrize("colour_in_graph", [True, False])
def test_only_a_graph_with_the_colour_stage_is_converted_for_conditionals(colour_in_graph):
    """The per-sample `if`s are the colour stage's: the graph that hands uint8 views to the
    torch colour stage builds without DALI's AutoGraph conversion (whose generated source
    files a killed process leaves in the temp folder), the in-graph one with it."""
    pipe = build_views_pipeline("video", ViewConfig(), batch_size=2, device_id=None,
                                num_threads=1, prefetch=1, out_dtype=types.FLOAT,
                                photometric_in_graph=colour_in_graph)
    assert pipe._conditionals_enabled is colour_in_graph
    assert ("photometric" in pipe.feed_names) is colour_in_graph
