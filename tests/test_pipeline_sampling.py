"""Statistics of the pipeline's parameter stage (METHOD.md sections 1-3), drawn exactly as
the DALI loader draws them (`draw_sample_params` from per-sample seeds), thousands at a time.
No decoding here: test_pipeline_loader.py checks that the decoded frames ARE these draws."""
import math
from collections import Counter

import numpy as np
import pytest
import torch

from tcore.pipelines.config import MaskConfig, PipelineConfig, PipelineConfigError, SamplingConfig
from tcore.pipelines.masks import (_add_block, attempt_uniforms, batch_masks, block_mask,
                                   mask_tensors, rows_to_mask)
from tcore.pipelines.sampling import (BOX_TRIES, central_box, draw_sample_params,
                                      drawn_frames, frame_triple_distribution,
                                      params_from_uniforms, random_boxes, sample_rng,
                                      sample_uniforms)

DRAWS = 4000
# Total-variation tolerance: with K support points and n draws the expected TV distance is
# about sqrt(K / (2 pi n)); 0.1 is > 3x that for K = 72, n = 4000 (~0.05), and a wrong
# offset range (which moves whole thirds of the mass) gives TV >= 0.3.
TV_TOLERANCE = 0.1


def _draw_triples(T: int, config=None, n=DRAWS, height=128, width=160):
    config = config or PipelineConfig()
    return [tuple(draw_sample_params(sample_rng(7, 0, i), T, height, width, config).frames)
            for i in range(n)]


def _tv(counts: Counter, probs: dict, n: int) -> float:
    keys = set(counts) | set(probs)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probs.get(k, 0.0)) for k in keys)


def test_expected_distribution_by_hand():
    # T = 20: c uniform on 6..13, p = c - {3,4,5}, f = c + {3,4,5}, all independent.
    probs = frame_triple_distribution(20, SamplingConfig())
    expected = {(c - dp, c, c + df): 1 / 72 for c in range(6, 14) for dp in (3, 4, 5)
                for df in (3, 4, 5)}
    assert probs.keys() == expected.keys()
    assert all(math.isclose(probs[k], 1 / 72) for k in probs)
    # T = 8: c in 2..4, p in c-2..c-1, f in c+1..c+2.
    probs = frame_triple_distribution(8, SamplingConfig())
    assert sorted(probs) == sorted((c - dp, c, c + df) for c in range(2, 5) for dp in (1, 2)
                                   for df in (1, 2))
    # T = 3: the offsets truncate to 0, so the range test fails: fallback, one frame.
    assert frame_triple_distribution(3, SamplingConfig()) == pytest.approx(
        {(r, r, r): 1 / 3 for r in range(3)})
    assert frame_triple_distribution(1, SamplingConfig()) == {(0, 0, 0): 1.0}


@pytest.mark.parametrize("T", [20, 8, 3, 1])
def test_frame_triples_match_section_1(T):
    triples = _draw_triples(T)
    counts = Counter(triples)
    probs = frame_triple_distribution(T, SamplingConfig())
    assert set(counts) <= set(probs), "a triple outside the support was drawn"
    assert _tv(counts, probs, len(triples)) < TV_TOLERANCE
    p, c, f = np.array(triples).T
    assert np.all((p <= c) & (c <= f) & (f < T))


def test_fallback_when_current_range_is_empty():
    config = PipelineConfig(sampling=SamplingConfig(current_range=(0.5, 0.5),
                                                    past_offset_range=(0.1, 0.2),
                                                    future_offset_range=(0.1, 0.2)))
    counts = Counter(_draw_triples(10, config, n=2000))
    assert all(p == c == f for p, c, f in counts)
    assert _tv(counts, frame_triple_distribution(10, config.sampling), 2000) < TV_TOLERANCE


@pytest.mark.parametrize("bad", [dict(current_range=(0.1, 0.7)),
                                 dict(current_range=(0.3, 0.9)),
                                 dict(past_offset_range=(0.3, 0.2))])
def test_sampling_ranges_validated_at_start(bad):
    with pytest.raises(ValueError, match="sampling"):
        PipelineConfig(sampling=SamplingConfig(**bad)).validate()


def _views_stats(n=1500, height=128, width=160):
    config = PipelineConfig()
    params = [draw_sample_params(sample_rng(3, 0, i), 20, height, width, config)
              for i in range(n)]
    return config, params


def test_crop_geometry_statistics():
    config, params = _views_stats()
    height, width = 128, 160
    boxes = np.stack([p.boxes for p in params])                  # [n, V, 4]
    h, w = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    scale, aspect = h * w / (height * width), w / h
    assert np.all(boxes[..., :2] >= 0) and np.all(boxes[..., 2] <= height) \
        and np.all(boxes[..., 3] <= width)
    # Integer rounding of h and w moves scale / aspect a little past the nominal ranges.
    glob, local = np.s_[:, 0:2], np.s_[:, 2:10]
    assert scale[glob].min() >= 0.32 * 0.9 and scale[glob].max() <= 1.0
    assert scale[local].min() >= 0.05 * 0.8 and scale[local].max() <= 0.32 * 1.15
    for part in (glob, local):
        assert aspect[part].min() >= 0.75 * 0.9 and aspect[part].max() <= 4 / 3 * 1.1
    # Means of the scale draws: uniform on the ranges (means 0.185 and 0.66), pulled down
    # for global crops, whose large wide draws do not fit the frame and are redrawn.
    assert abs(scale[local].mean() - 0.185) < 0.02
    assert 0.5 < scale[glob].mean() < 0.66
    # Past and future: one fixed central box for all 4 crops (160 / 128 = 1.25 is in range).
    central = boxes[:, 10:14]
    assert np.all(central == np.array([0, 0, height, width]))
    flips = np.stack([p.flips for p in params])
    assert not flips[:, :2].any() and not flips[:, 10:].any()
    assert abs(flips[:, 2:10].mean() - 0.5) < 0.03


@pytest.mark.parametrize("size, box", [((100, 100), (0, 0, 100, 100)),
                                       ((100, 200), (0, 33, 100, 133)),
                                       ((200, 100), (33, 0, 133, 100)),
                                       ((320, 570), (0, 71, 320, 427)),
                                       ((320, 568), (0, 70, 320, 427))])
def test_central_box(size, box):
    """The reference's centring: offsets floored ((570 - 427) / 2 = 71.5 -> 71, where
    torchvision's CenterCrop rounds half to even, to 72)."""
    assert central_box(*size) == box


def test_photometric_probabilities():
    config, params = _views_stats(n=2000)
    photo = np.stack([p.photometric for p in params])            # [n, V, 7]
    n = photo.shape[0]
    jitter = (photo[..., 0:3] != 1).any(-1) | (photo[..., 3] != 0)
    def close(rate, p, draws):
        return abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / draws) + 1e-9
    assert close(jitter.mean(), 0.8, jitter.size)
    assert close(photo[..., 4].mean(), 0.2, jitter.size)
    # Effective blur: global 1 never, global 2 0.9, local 0.5 (past/future mirror global).
    blurred = photo[..., 5] > 0
    assert not blurred[:, [0, 10, 12]].any()
    assert close(blurred[:, [1, 11, 13]].mean(), 0.9, 3 * n)
    assert close(blurred[:, 2:10].mean(), 0.5, 8 * n)
    sigmas = photo[..., 5][blurred]
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0
    solarized = photo[..., 6] > 0
    assert not solarized[:, [0, 10, 12]].any() and not solarized[:, 2:10].any()
    assert close(solarized[:, [1, 11, 13]].mean(), 0.2, 3 * n)
    factors = photo[jitter]
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4
    assert factors[:, 2].min() >= 0.8 and factors[:, 2].max() <= 1.2
    assert np.abs(factors[:, 3]).max() <= 0.1


def test_jitter_order_is_uniform_over_the_24_permutations():
    """torchvision's randperm(4): every order of (brightness, contrast, saturation, hue)
    equally likely, per view, independently of the view kind."""
    from scipy.stats import chisquare
    config, params = _views_stats(n=1500)
    orders = np.concatenate([p.jitter_order for p in params])        # [n * V, 4]
    assert np.all(np.sort(orders, axis=1) == np.arange(4))
    counts = Counter(map(tuple, orders.tolist()))
    assert len(counts) == 24
    observed = np.array(list(counts.values()))
    # 21000 draws (fixed seeds), 23 degrees of freedom: uniform draws pass p > 0.001
    # (statistic < 49.7) 999 times in 1000; one order drawn twice as often (statistic ~ 875)
    # or six orders never drawn ("hue never first") fail.
    assert chisquare(observed).pvalue > 1e-3, counts
    # The first operation is each of the four equally often, in global and local views alike.
    for part in (np.s_[:, 0:2], np.s_[:, 2:10]):
        first = np.stack([p.jitter_order for p in params])[part][..., 0].ravel()
        assert chisquare(np.bincount(first, minlength=4)).pvalue > 1e-3


def test_color_jitter_mode_is_validated():
    config = PipelineConfig()
    assert config.views.color_jitter == "torchvision"      # the reference's, by default
    config.views.color_jitter = "fast"
    config.validate()
    config.views.color_jitter = "exact"
    with pytest.raises(ValueError, match="views.color_jitter"):
        config.validate()
    assert PipelineConfig.from_dict({"views": {"color_jitter": "torchvision"}}) \
        .views.color_jitter == "torchvision"


def test_lanes_and_video_decoder_are_validated():
    assert PipelineConfig().cpu_lanes == 0                  # one lane per thread
    assert PipelineConfig.from_dict({"cpu_lanes": 2}).validate().cpu_lanes == 2
    with pytest.raises(ValueError, match="cpu_lanes"):
        PipelineConfig.from_dict({"cpu_lanes": -1}).validate()
    assert PipelineConfig().video_decoder == "auto"
    assert PipelineConfig.from_dict({"video_decoder": "cpu"}).validate().video_decoder == "cpu"
    with pytest.raises(ValueError, match="video_decoder"):
        PipelineConfig.from_dict({"video_decoder": "nvdec"}).validate()


def test_producer_and_prefetch_are_validated():
    config = PipelineConfig()
    assert (config.producer, config.prefetch) == ("auto", 2)
    assert (config.resolved_producer(on_gpu=True), config.resolved_producer(on_gpu=False)) \
        == ("process", "thread")
    assert PipelineConfig(producer="thread").resolved_producer(on_gpu=True) == "thread"
    with pytest.raises(ValueError, match="producer"):
        PipelineConfig.from_dict({"producer": "fork"}).validate()
    with pytest.raises(ValueError, match="prefetch"):
        PipelineConfig.from_dict({"prefetch": 0}).validate()


def test_auto_video_decoder_sends_only_what_the_cpu_cannot_read_to_nvdec():
    from tcore.pipelines.manifest import ShardSet, decodes_video_on_gpu

    def shard_set(kind, *codecs):
        return ShardSet(kind=kind, codecs=list(codecs))

    assert not decodes_video_on_gpu(shard_set("video", "vp9"), True, "auto")
    assert decodes_video_on_gpu(shard_set("video", "vp9", "h264"), True, "auto")
    assert decodes_video_on_gpu(shard_set("video", "vp9"), True, "gpu")
    assert not decodes_video_on_gpu(shard_set("video", "h264"), True, "cpu")
    assert not decodes_video_on_gpu(shard_set("video", "h264"), False, "gpu")  # CPU loader
    assert not decodes_video_on_gpu(shard_set("frames", "jpegs"), True, "gpu")


def test_photometric_backend_is_validated_and_resolved():
    config = PipelineConfig()
    assert config.photometric == "auto" and config.photometric_compile
    assert config.resolved_photometric() == "torch"          # torchvision jitter
    config.views.color_jitter = "fast"
    assert config.resolved_photometric() == "dali"
    assert PipelineConfig.from_dict({"photometric": "dali", "views": {"color_jitter": "torchvision"}}
                                    ).validate().resolved_photometric() == "dali"
    with pytest.raises(ValueError, match="photometric"):
        PipelineConfig.from_dict({"photometric": "cuda"}).validate()
    with pytest.raises(ValueError, match="torchvision"):
        PipelineConfig.from_dict({"photometric": "torch",
                                  "views": {"color_jitter": "fast"}}).validate()
    # The threshold must mean the same in DALI's lookup table and on torch's uint8 views.
    for threshold in (-1, 257):
        with pytest.raises(ValueError, match="solarize_threshold"):
            PipelineConfig.from_dict({"views": {"solarize_threshold": threshold}}).validate()
    assert PipelineConfig.from_dict({"views": {"solarize_threshold": 256}}).validate()


def test_params_are_a_pure_function_of_the_seed():
    config = PipelineConfig()
    a = draw_sample_params(sample_rng(1, 2, 3), 20, 128, 160, config)
    b = draw_sample_params(sample_rng(1, 2, 3), 20, 128, 160, config)
    assert a.as_dict() == b.as_dict()


# --- masks (section 3) -------------------------------------------------------------------

def test_mask_count_ladder():
    cfg = PipelineConfig().masks
    n_crops, grid, n_tokens = 64, 14, 196
    ladder = np.linspace(0.1, 0.5, 33)
    totals, masked_crops = [], []
    for b in range(60):
        masks = batch_masks(sample_rng(5, b), n_crops, grid, cfg)
        counts = masks.sum(1)
        masked_crops.append((counts > 0).sum())
        totals.append(counts.sum())
        # Each masked crop i holds at most int(N * r_{i+1}) patches: sorted, they respect the
        # ladder's upper ends.
        nonzero = np.sort(counts[counts > 0])
        assert np.all(nonzero <= (n_tokens * ladder[-len(nonzero):]).astype(int))
    assert set(masked_crops) == {32}            # int(64 * 0.5), the rest empty
    expected = sum(n_tokens * (ladder[i] + ladder[i + 1]) / 2 for i in range(32)) - 16
    assert abs(np.mean(totals) / expected - 1) < 0.03


def test_mask_blocks_are_rectangles_within_aspect_range():
    cfg = PipelineConfig().masks
    areas = []
    for i in range(1500):
        rows = [0] * 14
        added = _add_block(attempt_uniforms(sample_rng(9, i)), rows, 14, 98, cfg)
        if not added:
            continue
        mask = rows_to_mask(rows, 14)
        rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == added == h * w          # one filled rectangle
        # Rounding of sqrt(area * aspect) widens the aspect range a little for small blocks.
        assert 0.3 / 2 <= h / w <= 2 / 0.3
        assert h < 14 and w < 14                     # a block never spans the whole grid
        areas.append(added)
    assert min(areas) >= 2 and max(areas) <= 98
    assert len(areas) > 1400


def test_block_mask_reaches_its_count():
    """Every crop gets exactly its drawn count (METHOD.md: blocks are repeated until the
    count is reached; a block whose 10 tries fail is drawn again, not the end of the crop:
    ending there left 7% of crops a patch or so short), over the paper's ladder of counts;
    a grid no block fits ends empty instead of looping."""
    cfg = PipelineConfig().masks
    for count in (19, 60, 97):
        counts = [block_mask(sample_rng(4, count, i), 14, count, cfg).sum() for i in range(300)]
        assert counts == [count] * 300, count
    assert block_mask(sample_rng(4), 1, 1, cfg).sum() == 0


def test_mask_tensors_contract():
    masks = batch_masks(sample_rng(1), 8, 14, PipelineConfig().masks)
    out = mask_tensors(masks)
    assert out["masks"].dtype == torch.bool and out["masks"].shape == (8, 196)
    assert out["n_masked"].item() == out["masks"].sum().item() == out["mask_indices"].numel()
    flat = out["masks"].flatten()
    assert flat[out["mask_indices"]].all()
    crop_of = out["mask_indices"] // 196
    per_crop = out["masks"].sum(1)
    assert torch.allclose(out["mask_weights"], 1.0 / per_crop[crop_of].float())
    # Each masked crop's weights sum to 1.
    assert torch.allclose(torch.zeros(8).index_add_(0, crop_of, out["mask_weights"]),
                          (per_crop > 0).float())


def _photometric_one_view(u, cfg, views) -> np.ndarray:
    """The definition, one view, from its nine uniforms in the documented order."""
    u_jitter, u_b, u_c, u_s, u_h, u_gray, u_blur, u_sigma, u_solarize = u
    uniform = lambda low, high, v: low + (high - low) * v
    jitter = u_jitter < cfg.jitter_p
    factors = (uniform(1 - cfg.brightness, 1 + cfg.brightness, u_b),
               uniform(1 - cfg.contrast, 1 + cfg.contrast, u_c),
               uniform(1 - cfg.saturation, 1 + cfg.saturation, u_s),
               uniform(-cfg.hue, cfg.hue, u_h))
    sigma = uniform(views.blur_sigma[0], views.blur_sigma[1], u_sigma)
    b, c, s, h = factors if jitter else (1.0, 1.0, 1.0, 0.0)
    return np.array([b, c, s, h, float(u_gray < cfg.grayscale_p),
                     sigma if u_blur < cfg.blur_p else 0.0,
                     float(u_solarize < cfg.solarize_p)], np.float32)


def test_photometric_rows_follow_the_definition_view_by_view():
    """All views of a batch at once give each view's definition from its own uniforms, for
    the reference's view configs and for odd ones."""
    from tcore.pipelines.config import PhotometricConfig
    from tcore.pipelines.sampling import photometric_rows

    views = PipelineConfig().views
    odd = PhotometricConfig(jitter_p=0.3, brightness=0.9, contrast=0.0, saturation=1.0,
                            hue=0.5, grayscale_p=0.7, blur_p=0.2, solarize_p=0.6)
    cfgs = [views.global_1, views.global_2] + [views.local] * 8 + [odd, views.global_2] * 2
    u = np.random.default_rng(0).random((300, len(cfgs), 9))
    got = photometric_rows(u, cfgs, views)
    assert got.dtype == np.float32 and got.shape == (300, len(cfgs), 7)
    want = np.stack([[_photometric_one_view(u[b, v], c, views) for v, c in enumerate(cfgs)]
                     for b in range(300)])
    assert np.array_equal(got, want)


def _torchvision_box(u_tries, u_offsets, height, width, scale, ratio):
    """RandomResizedCrop.get_params written the plain way, one box, its uniforms in place of
    torch's draws (a randint is floor(u * positions))."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for u_scale, u_aspect in u_tries:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_aspect)
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return (math.floor(u_offsets[0] * (height - h + 1)),
                    math.floor(u_offsets[1] * (width - w + 1)), h, w)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def test_random_boxes_are_torchvisions_get_params_for_every_crop_at_once():
    """The batch's boxes, vectorised, are the plain loop's for each crop, frame sizes mixed
    (some too narrow or too wide for any try: the central fallback), crops of two scales."""
    rng = np.random.default_rng(1)
    sizes = [(128, 160), (320, 426), (90, 1000), (1000, 90), (17, 23), (240, 240)]
    height = np.array([h for h, _ in sizes] * 50)
    width = np.array([w for _, w in sizes] * 50)
    scale = np.array([(0.32, 1.0)] * 2 + [(0.05, 0.32)] * 3 + [(0.9, 1.0)])
    u_tries = rng.random((len(height), len(scale), BOX_TRIES, 2))
    u_offsets = rng.random((len(height), len(scale), 2))
    got = random_boxes(u_tries, u_offsets, height, width, scale, (3 / 4, 4 / 3))
    fallbacks = 0
    for b in range(len(height)):
        for c in range(len(scale)):
            want = _torchvision_box(u_tries[b, c], u_offsets[b, c], int(height[b]),
                                    int(width[b]), scale[c], (3 / 4, 4 / 3))
            assert tuple(got[b, c].astype(int)) == want, (b, c)
            fallbacks += sizes[b % len(sizes)][0] in (90, 1000) and scale[c][0] == 0.9
    assert fallbacks == 100       # the 0.9-1.0 crops of the 90 x 1000 and 1000 x 90 frames


@pytest.mark.parametrize("height, width, box", [
    (10, 1000, (0, 493, 10, 13)),       # too wide for any try: full height, w = 10 * 4/3
    (1000, 10, (493, 0, 13, 10)),       # too tall: full width, h = 10 / (3/4)
])
def test_random_boxes_fall_back_to_a_central_crop_of_clamped_aspect(height, width, box):
    """torchvision's fallback after 10 failed tries: the central crop whose aspect is the
    frame's clamped into the ratio range."""
    u = np.random.default_rng(5).random((5, 1, BOX_TRIES + 1, 2))
    got = random_boxes(u[:, :, :BOX_TRIES], u[:, :, BOX_TRIES], np.full(5, height),
                       np.full(5, width), np.array([(0.9, 1.0)]), (3 / 4, 4 / 3))
    assert np.all(got[:, 0] == box)


def test_a_batch_draws_what_each_sample_draws_alone():
    """Stage A draws a batch's parameters at once (`params_from_uniforms`), the baseline
    loader sample by sample (`draw_sample_params`): the same parameters, whatever the
    batch's mix of T and frame sizes."""
    config = PipelineConfig()
    shapes = [(20, 128, 160), (8, 320, 426), (1, 90, 1000), (40, 1000, 90), (3, 17, 23)] * 6
    seeds = [sample_rng(11, 0, i) for i in range(len(shapes))]
    u = np.stack([sample_uniforms(rng, config.views.n_local) for rng in seeds])
    T, height, width = zip(*shapes)
    frames = [drawn_frames(row, t, config) for row, t in zip(u, T)]
    batch = params_from_uniforms(u, frames, height, width, config)
    for i, (T, height, width) in enumerate(shapes):
        alone = draw_sample_params(sample_rng(11, 0, i), T, height, width, config)
        assert batch[i].as_dict() == alone.as_dict(), i
    assert params_from_uniforms(u[:0], [], [], [], config) == []


# --- the configuration's numbers and knobs -------------------------------------------------

def test_defaults_are_method_md_numbers():
    """Every default a paper reproduction depends on, as METHOD.md sections 1-3 state it (the
    statistics above only bound the draws, so a narrowed range would pass them)."""
    config = PipelineConfig()
    s, v, m = config.sampling, config.views, config.masks
    assert (s.current_range, s.past_offset_range, s.future_offset_range) == \
        ((0.3, 0.7), (0.15, 0.25), (0.15, 0.25))
    assert (v.global_size, v.local_size, v.n_local) == (224, 96, 8)
    assert (v.global_scale, v.local_scale, v.ratio) == ((0.32, 1.0), (0.05, 0.32), (3 / 4, 4 / 3))
    assert (v.local_flip_p, v.central_aspect) == (0.5, (3 / 4, 4 / 3))
    assert (v.blur_kernel, v.blur_sigma, v.solarize_threshold) == (9, (0.1, 2.0), 128)
    assert (v.mean, v.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    # jitter p, brightness, contrast, saturation, hue, grayscale p, blur p (effective), solarize p
    for view, blur, solarize in ((v.global_1, 0.0, 0.0), (v.global_2, 0.9, 0.2),
                                 (v.local, 0.5, 0.0)):
        assert (view.jitter_p, view.brightness, view.contrast, view.saturation, view.hue,
                view.grayscale_p, view.blur_p, view.solarize_p) == \
            (0.8, 0.4, 0.4, 0.2, 0.1, 0.2, blur, solarize)
    assert (m.patch_size, m.mask_sample_probability, m.mask_ratio) == (16, 0.5, (0.1, 0.5))
    assert (m.min_block_patches, m.min_aspect, m.block_tries, m.max_block_fraction) == \
        (4, 0.3, 10, 1.0)


def test_jitter_factors_span_their_ranges():
    """The drawn factors reach both ends of brightness / contrast 1 -+ 0.4, saturation
    1 -+ 0.2, hue -+ 0.1 (U on the range: with ~22000 jittered views the extreme draws lie
    within 0.01 of the ends, except with probability < 1e-20)."""
    config, params = _views_stats(n=2000)
    photo = np.stack([p.photometric for p in params]).reshape(-1, 7)
    jittered = photo[(photo[:, 0:3] != 1).any(-1) | (photo[:, 3] != 0)]
    for column, low, high in ((0, 0.6, 1.4), (1, 0.6, 1.4), (2, 0.8, 1.2), (3, -0.1, 0.1)):
        values = jittered[:, column]
        assert low - 1e-6 <= values.min() < low + 0.01, column
        assert high - 0.01 < values.max() <= high + 1e-6, column
    sigmas = photo[:, 5][photo[:, 5] > 0]
    assert 0.1 <= sigmas.min() < 0.11 and 1.99 < sigmas.max() <= 2.0


def test_past_and_future_offsets_follow_their_own_ranges():
    """Unequal past and future ranges (the defaults are equal, which would hide a swap):
    T = 20, c in {10, 11}, p = c - {6, 7, 8}, f = c + {2, 3, 4}."""
    sampling = SamplingConfig(current_range=(0.5, 0.6), past_offset_range=(0.3, 0.4),
                              future_offset_range=(0.1, 0.2))
    config = PipelineConfig(sampling=sampling).validate()
    p, c, f = np.array(_draw_triples(20, config, n=300)).T
    assert set(c) == {10, 11}
    assert set(c - p) == {6, 7, 8} and set(f - c) == {2, 3, 4}


@pytest.mark.parametrize("ranges", [
    # past fits (0.3 - 0.1 >= 0), the future does not (0.8 + 0.3 > 1)
    dict(current_range=(0.3, 0.8), past_offset_range=(0.1, 0.1), future_offset_range=(0.1, 0.3)),
    # the future fits (0.5 + 0.1 <= 1), the past does not (0.2 - 0.3 < 0)
    dict(current_range=(0.2, 0.5), past_offset_range=(0.1, 0.3), future_offset_range=(0.1, 0.1)),
])
def test_each_side_of_the_sandwich_is_checked_with_its_own_range(ranges):
    with pytest.raises(ValueError, match="sampling: current_range"):
        PipelineConfig(sampling=SamplingConfig(**ranges)).validate()


def test_flip_probability_and_crop_aspect_are_the_configured_ones():
    """views.local_flip_p and views.ratio drive the draws; central_aspect only the
    past / future box."""
    for flip_p in (0.0, 1.0):
        config = PipelineConfig()
        config.views.local_flip_p = flip_p
        flips = np.stack([draw_sample_params(sample_rng(2, i), 20, 128, 160, config).flips
                          for i in range(50)])
        assert np.all(flips[:, 2:10] == bool(flip_p)) and not flips[:, :2].any() \
            and not flips[:, 10:].any()
    def boxes(**views):
        config = PipelineConfig()
        for name, value in views.items():
            setattr(config.views, name, value)
        boxes = np.stack([draw_sample_params(sample_rng(2, i), 20, 128, 160, config).boxes
                          for i in range(200)])
        return boxes, boxes[:, :10, 2] - boxes[:, :10, 0], boxes[:, :10, 3] - boxes[:, :10, 1]

    # square random crops (global and local), up to rounding of h and w; the past / future
    # box stays the whole 160 x 128 frame (1.25 lies in central_aspect)
    square, h, w = boxes(ratio=(1.0, 1.0))
    assert np.all(np.abs(h - w) <= 1)
    assert np.all(square[:, 10:] == np.array([0, 0, 128, 160]))
    # a central square of the frame; the random crops keep their aspect range
    central, h, w = boxes(central_aspect=(1.0, 1.0))
    assert np.all(central[:, 10:] == np.array([0, 16, 128, 144]))
    assert (w / h).min() < 0.8 and (w / h).max() > 1.25


def test_bad_view_and_mask_values_are_refused_naming_their_key():
    for values, key in (({"views": {"local": {"jitter_p": 1.5}}}, "views.local.jitter_p"),
                        ({"views": {"global_2": {"solarize_p": -0.1}}},
                         "views.global_2.solarize_p"),
                        ({"views": {"global_1": {"brightness": 1.5}}}, "views.global_1.brightness"),
                        ({"views": {"local": {"hue": 0.6}}}, "views.local.hue"),
                        ({"views": {"global_scale": [1.0, 0.32]}}, "views.global_scale"),
                        ({"views": {"local_scale": [0.05, 1.5]}}, "views.local_scale"),
                        ({"views": {"blur_kernel": 8}}, "views.blur_kernel"),
                        ({"views": {"local_flip_p": 2.0}}, "views.local_flip_p"),
                        ({"views": {"n_local": -1}}, "views.n_local"),
                        ({"views": {"global_size": 0}}, "views.global_size"),
                        ({"views": {"global_size": 200}}, "views.global_size"),
                        ({"masks": {"mask_sample_probability": 1.5}},
                         "masks.mask_sample_probability"),
                        ({"masks": {"mask_ratio": [0.5, 0.1]}}, "masks.mask_ratio"),
                        ({"masks": {"min_aspect": 0.0}}, "masks.min_aspect")):
        with pytest.raises(PipelineConfigError) as info:
            PipelineConfig.from_dict(values).validate()
        assert str(info.value).startswith(key), (values, str(info.value))


def test_masked_crops_are_shuffled_and_each_draws_within_its_ladder_step():
    cfg = PipelineConfig().masks
    # Which crops are masked is shuffled: every position of 8 is masked about half the time
    # (300 seeded batches: binomial sd 0.029, tolerance 0.15 > 5 sd; unshuffled gives 1 / 0).
    masked = np.stack([batch_masks(sample_rng(6, b), 8, 14, cfg).any(1) for b in range(300)])
    assert masked.sum(1).tolist() == [4] * 300
    assert np.all(np.abs(masked.mean(0) - 0.5) < 0.15)
    # One masked crop of 2: its ratio is U(0.1, 0.5), so its count spreads over
    # int(196 * 0.1) = 19 .. 97, not one end of the step.
    counts = np.array([batch_masks(sample_rng(8, b), 2, 14, cfg).sum() for b in range(300)])
    assert counts.min() < 25 and counts.max() > 85 and len(set(counts.tolist())) > 40
    # int() truncation of the number of masked crops: int(6 * 0.3) = 1.
    odd = MaskConfig(mask_sample_probability=0.3)
    assert (batch_masks(sample_rng(1), 6, 14, odd).any(1)).sum() == 1


@pytest.mark.parametrize("grid, count, fraction, cap", [
    (7, 24, 1.0, 24),    # the default, T-CoRe's: the whole grid, so only the 24 remaining bound it
    (7, 24, 0.5, 21),    # DINOv2's 0.5 * 112 // 16 * 112 // 16, left to right (not 0.5 * 49 = 24)
    (14, 150, 1.0, 150),  # above half the grid: the default's cap is what remains...
    (14, 150, 0.5, 98),   # ...where half the grid would cap the block
])
def test_block_cap_is_the_left_to_right_expression(grid, count, fraction, cap):
    """The first block of a mask is the one `_add_block` draws with the cap from the same
    generator (the cap sets the drawn area), at 112 / 16 (the tiny presets) and 224 / 16."""
    cfg = MaskConfig(max_block_fraction=fraction)
    for seed in range(40):
        mask = block_mask(sample_rng(12, seed), grid, count, cfg)
        rows = [0] * grid
        assert _add_block(attempt_uniforms(sample_rng(12, seed)), rows, grid, cap, cfg) > 0
        first = rows_to_mask(rows, grid)
        assert np.all(mask[first]), seed
