"""The torch colour stage (`pipelines/torch_photometric.py`, `photometric = "torch"`) against
PIL / torchvision (jitter, hue, grayscale: bit for bit), DALI's gaussian_blur (one level at a
rounding edge at most), and the DALI graph's views through the whole loader."""
import itertools
import os
import subprocess
import sys

import numpy as np
import torch
import torchvision.transforms.functional as TF
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from colour_images import as_chw, colour_test_image, every_step_batch, photometric_row
from tcore.pipelines.config import PipelineConfig, ViewConfig
from tcore.pipelines import torch_photometric
from tcore.pipelines.loader import build_loader
from tcore.pipelines.torch_photometric import (apply_photometric, gaussian_blur, normalize,
                                               pil_hue_shift)
from tcore.pipelines.sampling import SampleParams
from tcore.pipelines.torchvision_loader import _photometric as baseline_photometric
from tcore.pipelines.torchvision_loader import baseline_views
from tcore.pipelines.views import ROW_WIDTH, SW, SWITCHES, jitter_columns, view_rows

ONE_LEVEL = 1.0 / (255 * min(ViewConfig().std)) + 1e-6   # one gray level, normalised


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


def test_hue_shift_is_pils_bit_for_bit():
    """Every hue at once, one crop each: TF.adjust_hue on a PIL image, pixel for pixel."""
    image = colour_test_image(96)
    hues = [0.08, -0.1, 0.5, -0.5, 0.003, 0.25]
    shifts = [jitter_columns(photometric_row(1, 1, 1, h), np.arange(4))[0] for h in hues]  # 8-bit shift
    out = pil_hue_shift(as_chw([image] * len(hues)), torch.tensor(shifts))
    for crop, hue in zip(out, hues):
        want = np.array(TF.adjust_hue(Image.fromarray(image), hue))
        assert np.array_equal(_hwc(crop), want), (hue, np.abs(_hwc(crop).astype(int) - want).max())


def test_hue_shift_is_pils_on_every_colour():
    """All 2^24 colours in one picture, at two shifts: the compiled lookup-table kernel (the
    subset path's on the CPU), the compiled kernel with only RGB -> HSV from tables (the
    dense stage's, the GPU's) and the arithmetic the tables are built from give
    TF.adjust_hue's PIL pixels, every one."""
    codes = np.arange(1 << 24, dtype=np.uint32)
    image = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
    image = image.reshape(4096, 4096, 3)
    tables = torch_photometric.pil_hsv_tables()
    with_tables = torch_photometric._kernel("pil_hue_shift_tables", True, torch.device("cpu"))
    half_tables = torch_photometric._kernel("pil_hue_shift_hsv_tables", True,
                                            torch.device("cpu"))
    x = torch.from_numpy(image).permute(2, 0, 1)[None]
    for hue in (0.08, -0.31):
        shift = torch.tensor([jitter_columns(photometric_row(1, 1, 1, hue), np.arange(4))[0]])
        want = np.array(TF.adjust_hue(Image.fromarray(image), hue))
        assert np.array_equal(_hwc(with_tables(x, shift, *tables)[0]), want), hue
        assert np.array_equal(_hwc(half_tables(x, shift, *tables[:2])[0]), want), hue
        assert not torch_photometric._COMPILE_FAILED
        assert np.array_equal(_hwc(pil_hue_shift(x, shift)[0]), want), hue


def test_jitter_applies_each_crops_drawn_order_bit_for_bit():
    """24 crops, one per jitter order, plus grayscale after it: the baseline's PIL pixels."""
    image = colour_test_image(64, seed=1)
    orders = [np.array(p) for p in itertools.permutations(range(4))]
    rows = [photometric_row(1.35, 0.65, 1.2, 0.08, gray=float(k % 5 == 0)) for k in range(len(orders))]
    full, switches, windows = view_rows(np.stack(rows), np.stack(orders), blur_kernel=9)
    out = apply_photometric(as_chw([image] * len(orders)), full, switches, windows, ViewConfig())
    for crop, row, order in zip(out, rows, orders):
        want = np.array(baseline_photometric(Image.fromarray(image), row, order, 128))
        assert np.array_equal(_hwc(crop), want), order
    # The order matters: a fixed b, c, s, h order gives other pixels for most crops.
    fixed = np.array(baseline_photometric(Image.fromarray(image), rows[1], np.arange(4), 128))
    assert sum(not np.array_equal(_hwc(c), fixed) for c in out[1:5]) >= 3


def test_identity_views_are_untouched_and_solarize_inverts_the_top_half():
    image = colour_test_image(48, seed=2)
    rows = np.stack([photometric_row(1, 1, 1, 0), photometric_row(1, 1, 1, 0, solarize=1.0)])
    full, switches, windows = view_rows(rows, np.tile(np.arange(4), (2, 1)), blur_kernel=9)
    out = apply_photometric(as_chw([image] * 2), full, switches, windows, ViewConfig())
    assert torch.equal(out[0], as_chw([image])[0])
    want = np.where(image >= 128, 255 - image, image)
    assert np.array_equal(_hwc(out[1]), want)
    # The configured threshold, on both paths (per-step and dense).
    for dense in (False, True):
        out = apply_photometric(as_chw([image] * 2), full, switches, windows,
                                ViewConfig(solarize_threshold=200), dense=dense)
        assert np.array_equal(_hwc(out[1]), np.where(image >= 200, 255 - image, image)), dense


@pipeline_def(batch_size=4, num_threads=1, device_id=None, prefetch_queue_depth=1,
              exec_async=False, exec_pipelined=False)
def _blur_pipeline():
    image = fn.external_source(name="image", dtype=types.UINT8, ndim=3, layout="HWC")
    window = fn.external_source(name="window", dtype=types.INT32, ndim=0)
    sigma = fn.external_source(name="sigma", dtype=types.FLOAT, ndim=0)
    return fn.gaussian_blur(image, window_size=window, sigma=sigma)


def test_blur_matches_dalis_gaussian_blur():
    """Per-crop sigma and window (narrowed as `views.blur_windows` does) against DALI's own
    gaussian_blur on the same crops: at most one level apart, and rarely."""
    images = [colour_test_image(80, seed=s) for s in range(4)]
    sigmas = np.array([0.1, 0.6, 1.3, 2.0], np.float32)
    full, switches, windows = view_rows(
        np.stack([photometric_row(1, 1, 1, 0, sigma=s) for s in sigmas]), np.tile(np.arange(4), (4, 1)),
        blur_kernel=9)
    pipe = _blur_pipeline()
    pipe.build()
    pipe.feed_input("image", images)
    pipe.feed_input("window", list(windows.astype(np.int32)))
    pipe.feed_input("sigma", list(full[:, 5]))
    want = [np.array(out) for out in pipe.run()[0]]
    got = gaussian_blur(as_chw(images), torch.from_numpy(full[:, 5]),
                        torch.from_numpy(windows.astype(np.int64)), 9)
    for crop, expected, sigma in zip(got, want, sigmas):
        diff = np.abs(_hwc(crop).astype(int) - expected)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (sigma, diff.max(), (diff > 0).mean())
    assert not np.array_equal(_hwc(got[3]), images[3])     # sigma 2 blurs


def test_baseline_blurs_with_the_configured_kernel():
    """`views.blur_kernel` reaches the baseline loader's views as it reaches the loader's
    colour stage: with a 3-tap kernel and sigma 2 the two stay within a level (with the
    9-tap kernel instead the blur spreads much wider: many levels apart)."""
    size, views = 48, ViewConfig(blur_kernel=3, n_local=0, global_size=48)
    image = colour_test_image(size, seed=6)
    rows = np.stack([photometric_row(1, 1, 1, 0, sigma=2.0)] * 6)
    params = SampleParams(frames=np.zeros(3, np.int64),
                          boxes=np.tile(np.array([0, 0, size, size], np.float32), (6, 1)),
                          flips=np.zeros(6, bool), photometric=rows,
                          jitter_order=np.tile(np.arange(4), (6, 1)))
    config = PipelineConfig(views=views)
    # Boxes of the whole picture at its own size: PIL's resize hands the picture back.
    baseline = baseline_views([Image.fromarray(image)] * 3, params, config)[0]
    full, switches, windows = view_rows(rows[:1], params.jitter_order[:1], views.blur_kernel)
    ours = normalize(apply_photometric(as_chw([image]), full, switches, windows, views), views,
                     torch.float32)[0]
    assert float((ours - baseline).abs().max()) <= ONE_LEVEL

def test_normalize_is_imagenet_normalisation():
    image = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(image, ViewConfig(), torch.float16)
    want = [(1 - m) / s for m, s in zip(ViewConfig().mean, ViewConfig().std)]
    assert out.dtype == torch.float16
    assert torch.allclose(out[0, :, 0, 0].float(), torch.tensor(want), atol=2e-3)


def test_loader_gives_the_dali_graphs_views(synth_shards):
    """The whole loader on the CPU, `photometric = torch` (eager, and compiled as by default)
    against `dali` (the torchvision jitter, blur and solarize forced on some views so every
    step is exercised): the same frames and masks, views equal but for one level at the
    blur's rounding edges."""
    batches = {}
    for mode, compile_ in (("dali", False), ("torch", False), ("torch", True)):
        config = PipelineConfig(photometric=mode, photometric_compile=compile_)
        config.views.color_jitter = "torchvision"
        config.views.global_2.solarize_p = 1.0
        config.views.local.blur_p = 1.0
        loader = build_loader([str(synth_shards)], batch_size=4, device="cpu", config=config,
                              seed=5, infinite=False, num_threads=2)
        batches[mode, compile_] = next(iter(loader))
        loader.close()
    assert not torch_photometric._COMPILE_FAILED      # the compiled leg really compiled
    dali = batches["dali", False]
    for ours in (batches["torch", False], batches["torch", True]):
        for key in ("frame_indices", "labels", "masks", "mask_indices"):
            assert torch.equal(dali[key], ours[key]), key
        for key in ("global_crops", "local_crops", "past_crops", "future_crops"):
            assert ours[key].dtype == dali[key].dtype and ours[key].shape == dali[key].shape
            diff = (ours[key] - dali[key]).abs()
            assert float(diff.max()) <= ONE_LEVEL, (key, float(diff.max()))
            assert float((diff > 1e-4).float().mean()) < 1e-3, key


def test_compiled_steps_equal_the_eager_ones():
    """The fused (torch.compile, C++ on the CPU) jitter, hue and grayscale give the eager
    pixels, here on all 24 orders."""
    image = colour_test_image(64, seed=3)
    orders = [np.array(p) for p in itertools.permutations(range(4))]
    rows = [photometric_row(1.3, 0.7, 1.25, -0.07, gray=float(k % 4 == 0)) for k in range(len(orders))]
    full, switches, windows = view_rows(np.stack(rows), np.stack(orders), blur_kernel=9)
    images = as_chw([image] * len(orders))
    eager = apply_photometric(images, full, switches, windows, ViewConfig(), compile_=False)
    fused = apply_photometric(images, full, switches, windows, ViewConfig(), compile_=True)
    assert not torch_photometric._COMPILE_FAILED
    assert torch.equal(eager, fused)


def test_dense_colour_stage_equals_the_subset_path():
    """Every step on every crop, each kept by its switch (`dense`): the subset path's pixels."""
    images, full, switches, windows = every_step_batch(48)
    for name in ("jitter", "hue", "gray", "blur", "solarize"):
        column = switches[:, SW[name]]
        assert column.any() and not column.all(), name        # both ways in the batch
    assert windows[switches[:, SW["blur"]]].min() < 9 and windows.max() == 9
    subset = apply_photometric(images, full, switches, windows, ViewConfig())
    dense = apply_photometric(images, full, switches, windows, ViewConfig(), dense=True)
    assert torch.equal(dense, subset)
    assert not torch.equal(dense, images)


def test_subset_path_leaves_its_input_alone_and_equals_each_crop_run_alone():
    """The subset path moves crops in blocks (gathers, runs of consecutive crops written
    back, later steps in place in its own copy): its input stays as it was, and every crop
    comes out as it does when it is the batch's only crop (no gathering at all). Untouched
    crops are mixed in, so that every step, the first included, takes a subset."""
    images, full, switches, windows = every_step_batch(40)
    plain_rows, plain_switches, plain_windows = view_rows(
        np.stack([photometric_row(1, 1, 1, 0)] * 36), np.tile(np.arange(4), (36, 1)), 9)
    order = np.random.default_rng(0).permutation(len(images) + 36)
    images = torch.cat([images, as_chw([colour_test_image(40, seed=99)] * 36)])[order]
    full, switches, windows = (np.concatenate(pair)[order] for pair in (
        (full, plain_rows), (switches, plain_switches), (windows, plain_windows)))
    assert 0 < switches[:, SW["slot0"]].sum() < len(images) / 2
    before = images.clone()
    out = apply_photometric(images, full, switches, windows, ViewConfig())
    assert torch.equal(images, before)
    assert not torch.equal(out, images)
    for i in range(len(images)):
        alone = apply_photometric(images[i:i + 1], full[i:i + 1], switches[i:i + 1],
                                  windows[i:i + 1], ViewConfig())
        assert torch.equal(alone[0], out[i]), i


def test_dense_colour_stage_compiled_equals_eager():
    """The dense stage as one compiled graph (C++ on the CPU) gives the eager pixels, and the
    same graph serves another number of crops (the blur is opaque to the compiler)."""
    images, full, switches, windows = every_step_batch(32)
    eager = apply_photometric(images, full, switches, windows, ViewConfig(), dense=True)
    fused = apply_photometric(images, full, switches, windows, ViewConfig(), compile_=True,
                              dense=True)
    assert not torch_photometric._COMPILE_FAILED
    assert torch.equal(fused, eager)
    fewer = apply_photometric(images[:7], full[:7], switches[:7], windows[:7], ViewConfig(),
                              compile_=True, dense=True)
    assert torch.equal(fewer, eager[:7])


def test_colour_stage_compiled_for_each_shape_gives_the_eager_pixels():
    """`static_shapes` (the GPU's `photometric_static_shapes`): compiled with the sizes as
    constants, a graph for each input shape (another number of crops compiles its own,
    where the graph for any shape serves both), and the dense stage so compiled gives the
    eager pixels."""
    from torch._dynamo.utils import counters

    images, full, switches, windows = every_step_batch(32)
    eager = apply_photometric(images, full, switches, windows, ViewConfig(), dense=True)
    fused = apply_photometric(images, full, switches, windows, ViewConfig(), compile_=True,
                              dense=True, static_shapes=True)
    assert not torch_photometric._COMPILE_FAILED
    assert torch.equal(fused, eager)
    graphs = []
    for count in (len(images), 7):
        before = counters["stats"]["unique_graphs"]
        # a copy, not a view of the whole batch: the loader's crops are tensors of their own
        normalize(images[:count].clone(), ViewConfig(), torch.float32, compile_=True,
                  static_shapes=True)
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs == [1, 1]


def test_dense_colour_stage_with_no_crops_or_nothing_switched_on():
    empty = torch.zeros((0, 3, 16, 16), dtype=torch.uint8)
    out = apply_photometric(empty, np.zeros((0, ROW_WIDTH), np.float32),
                            np.zeros((0, len(SWITCHES)), bool), np.zeros(0, np.int32),
                            ViewConfig(), dense=True)
    assert out.shape == empty.shape and out.dtype == torch.uint8
    images = as_chw([colour_test_image(24, seed=k) for k in range(3)])
    full, switches, windows = view_rows(np.stack([photometric_row(1, 1, 1, 0)] * 3),
                                        np.tile(np.arange(4), (3, 1)), blur_kernel=9)
    assert not switches.any()
    out = apply_photometric(images, full, switches, windows, ViewConfig(), dense=True)
    assert torch.equal(out, images)


def test_a_compiler_that_fails_falls_back_to_eager_with_a_warning(tmp_path):
    """No working C++ compiler (CXX pointing nowhere, in a child process): the first call
    warns once and every call computes the eager result."""
    script = (
        "import warnings, torch\n"
        "from tcore.pipelines import torch_photometric as tp\n"
        "x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    first = tp._kernel('pil_luma', True, x.device)(x)\n"
        "    second = tp._kernel('pil_luma', True, x.device)(x)\n"
        "assert torch.equal(first, tp.pil_luma(x)) and torch.equal(second, first)\n"
        "ours = [w for w in caught if 'torch_photometric' in str(w.message)]\n"
        "assert len(ours) == 1 and 'running eagerly' in str(ours[0].message), caught\n"
        "print('fell back:', tp._COMPILE_FAILED['cpu'][:60])\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fell back: InductorError" in done.stdout


def test_a_recompile_limit_falls_back_to_eager_and_eager_errors_surface():
    """In a child process with Dynamo's recompile limit at 1: the second shape fails to
    compile (a plain Exception, not a TorchDynamoException), the eager pixels come back and
    the CPU warns once. A call that fails eagerly too raises its own error and leaves
    compiling on."""
    script = (
        "import warnings, torch, torch._dynamo\n"
        "torch._dynamo.config.recompile_limit = 1\n"
        "from tcore.pipelines import torch_photometric as tp\n"
        "bad = torch.zeros(3, dtype=torch.uint8)\n"
        "try:\n"
        "    tp._kernel('pil_luma', True, bad.device)(bad)\n"
        "except IndexError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('the eager IndexError was swallowed')\n"
        "assert not tp._COMPILE_FAILED, tp._COMPILE_FAILED\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for n in (5, 1, 3, 7):\n"
        "        x = torch.randint(0, 256, (n, 3, 16 + n, 16), dtype=torch.uint8)\n"
        "        assert torch.equal(tp._kernel('pil_luma', True, x.device)(x), tp.pil_luma(x))\n"
        "ours = [w for w in caught if 'torch_photometric' in str(w.message)]\n"
        "assert len(ours) == 1 and 'on cpu' in str(ours[0].message), ours\n"
        "print('fell back:', tp._COMPILE_FAILED['cpu'][:60])\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fell back: FailOnRecompileLimitHit" in done.stdout
