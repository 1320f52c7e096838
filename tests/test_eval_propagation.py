"""Label propagation against a direct dense computation with plain loops."""
import math

import numpy as np
import pytest
import torch
from reference_paths import OFFICIAL_TINY

from tcore.eval.propagation import context_frames, propagate_labels, radius_mask


def dense_reference(features, first_labels, topk, radius, temperature, context):
    """The CRW rule written out naively: for each target frame and each location, score every
    context location (first frame unrestricted; previous frames, clamped at frame 0, only
    within the radius), keep the k best, softmax, weighted sum of their labels."""
    feats = features.astype(np.float64)
    n_frames, height, width, _ = feats.shape
    labels = np.zeros((n_frames, height, width, first_labels.shape[-1]))
    labels[0] = first_labels
    for t in range(1, n_frames):
        frames = [0] + [max(0, t - context + j) for j in range(context)]
        for y in range(height):
            for x in range(width):
                scored = []
                for slot, f in enumerate(frames):
                    for yy in range(height):
                        for xx in range(width):
                            score = float(feats[t, y, x] @ feats[f, yy, xx])
                            if slot > 0 and math.hypot(yy - y, xx - x) >= radius:
                                score += -1e10
                            scored.append((score / temperature, labels[f, yy, xx]))
                scored.sort(key=lambda item: -item[0])
                best = scored[:topk]
                top = max(s for s, _ in best)
                weights = np.array([math.exp(s - top) for s, _ in best])
                weights /= weights.sum()
                labels[t, y, x] = sum(w * lab for w, (_, lab) in zip(weights, best))
    return labels


def random_video(seed, frames=6, height=4, width=5, dim=8, classes=3):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(frames, height, width, dim))
    feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
    first = np.eye(classes)[rng.integers(0, classes, size=(height, width))]
    return feats.astype(np.float32), first.astype(np.float32)


@pytest.mark.parametrize("topk,radius,context", [(3, 2.0, 2), (5, 20.0, 4), (1, 1.5, 3)])
def test_matches_dense_loops(topk, radius, context):
    feats, first = random_video(seed=topk)
    expected = dense_reference(feats, first, topk, radius, 0.7, context)
    got = propagate_labels(torch.from_numpy(feats), torch.from_numpy(first), topk=topk,
                           radius=radius, temperature=0.7, context=context, chunk_size=7)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    feats, first = random_video(seed=11, frames=5, height=6, width=6)
    kwargs = dict(topk=4, radius=3.0, temperature=0.7, context=3)
    small = propagate_labels(torch.from_numpy(feats), torch.from_numpy(first), chunk_size=5,
                             **kwargs)
    whole = propagate_labels(torch.from_numpy(feats), torch.from_numpy(first), chunk_size=10_000,
                             **kwargs)
    torch.testing.assert_close(small, whole)


def test_soft_labels_stay_distributions():
    feats, first = random_video(seed=3, frames=8)
    out = propagate_labels(torch.from_numpy(feats), torch.from_numpy(first), topk=5, radius=20,
                           temperature=0.7, context=20)
    torch.testing.assert_close(out.sum(-1), torch.ones(out.shape[:-1]))
    torch.testing.assert_close(out[0], torch.from_numpy(first))


def test_context_is_first_frame_plus_previous_frames_clamped_at_zero():
    assert context_frames(1, 3) == [0, 0, 0, 0]
    assert context_frames(2, 3) == [0, 0, 0, 1]
    assert context_frames(7, 3) == [0, 4, 5, 6]
    with pytest.raises(ValueError, match="frame 0 is given"):
        context_frames(0, 3)


def test_radius_mask_is_strict_euclidean():
    near = radius_mask(3, 3, 1.5)
    centre = near[4].reshape(3, 3)
    assert centre.all()  # distances 0, 1 and sqrt(2) < 1.5
    corner = near[0].reshape(3, 3)
    assert corner.tolist() == [[True, True, False], [True, True, False], [False, False, False]]
    assert not radius_mask(1, 3, 2.0)[0, 2]  # distance 2 is not < 2


def test_bad_arguments_are_errors():
    feats, first = random_video(seed=0)
    with pytest.raises(ValueError, match="topk"):
        propagate_labels(torch.from_numpy(feats), torch.from_numpy(first), topk=10_000)
    with pytest.raises(ValueError, match="do not match"):
        propagate_labels(torch.from_numpy(feats), torch.from_numpy(first[:2]))


# ----------------------------------------------------------------------------- features
def test_features_are_row_major_unit_maps():
    from tcore.eval.features import extract_features

    def encode(images):  # token = (row, col, 1) of each 16x16 patch, row-major
        b, _, h, w = images.shape
        rows, cols = torch.meshgrid(torch.arange(h // 16), torch.arange(w // 16), indexing="ij")
        tokens = torch.stack([rows, cols, torch.ones_like(rows)], -1).float().reshape(1, -1, 3)
        return tokens.expand(b, -1, -1) * 5.0

    frames = np.zeros((5, 40, 60, 3), dtype=np.uint8)
    feats = extract_features(encode, frames, (32, 48), patch=16, batch_size=2, device="cpu")
    assert feats.shape == (5, 2, 3, 3)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(5, 2, 3))
    expected = torch.tensor([1.0, 2.0, 1.0]) / math.sqrt(6.0)  # cell (1, 2)
    torch.testing.assert_close(feats[3, 1, 2], expected)
    with pytest.raises(ValueError, match="multiples of the patch"):
        extract_features(encode, frames, (40, 48), patch=16, device="cpu")


def test_frames_are_imagenet_normalised_rgb_resized_bilinearly():
    from tcore.eval.features import extract_features, prepare_frames

    # uniform colour (R, G, B) = (200, 100, 50): one token per patch, its mean per channel
    frames = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    frames[..., :] = (200, 100, 50)
    feats = extract_features(lambda x: torch.nn.functional.avg_pool2d(x, 16).flatten(2).transpose(1, 2),
                             frames, (32, 32), patch=16, device="cpu")
    expected = (torch.tensor([200.0, 100.0, 50.0]) / 255 - torch.tensor([0.485, 0.456, 0.406])) \
        / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(feats[0, 1, 1], expected / expected.norm())
    # bilinear, half-pixel centres (cv2 INTER_LINEAR): 2 pixels -> 4 interpolate between them
    ramp = np.zeros((1, 1, 2, 3), dtype=np.uint8)
    ramp[0, 0, 1] = 255
    red = prepare_frames(ramp, (1, 4))[0, 0, 0] * 0.229 + 0.485
    torch.testing.assert_close(red, torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_reference_backbone_patch_tokens_match_the_fixture():
    from tcore.eval.checkpoint import load_eval_backbone
    from tcore.eval.features import backbone_patch_encoder
    path = OFFICIAL_TINY
    fixture = torch.load(path, weights_only=True)
    backbone = load_eval_backbone(path, arch="vit_tiny")
    patch = backbone_patch_encoder(backbone)(fixture["inputs"]["image_rect"])
    expected = fixture["outputs"]["patch_rect"]
    torch.testing.assert_close(patch, expected.reshape(patch.shape), rtol=1e-4, atol=1e-4)


def test_labels_are_read_out_at_the_input_size_then_resized_by_nearest():
    """The reference's read-out (dump_predictions, then convert_davis): soft labels upsampled
    bilinearly to the network's input size, the argmax there, then the id map resized to the
    annotation's size by nearest neighbour (source pixel floor(i * in / out)). Here an input
    of 16 x 32 against an annotation of 16 x 27, with a soft boundary between two labels:
    the argmax at the annotation's size moves the boundary pixels."""
    import torch.nn.functional as F

    from tcore.eval.segment import hard_labels

    rng = np.random.default_rng(3)
    soft = torch.from_numpy(rng.random((2, 4, 3)).astype(np.float32))
    soft = soft / soft.sum(-1, keepdim=True)
    input_size, out_size = (16, 32), (16, 27)
    up = F.interpolate(soft.permute(2, 0, 1)[None], size=input_size, mode="bilinear",
                       align_corners=False)[0].argmax(0).numpy()
    rows = np.floor(np.arange(out_size[0]) * input_size[0] / out_size[0]).astype(int)
    cols = np.floor(np.arange(out_size[1]) * input_size[1] / out_size[1]).astype(int)
    expected = up[rows][:, cols]
    got = hard_labels(soft, input_size, out_size).numpy()
    assert got.shape == out_size and (got == expected).all()
    at_annotation = F.interpolate(soft.permute(2, 0, 1)[None], size=out_size, mode="bilinear",
                                  align_corners=False)[0].argmax(0).numpy()
    assert (at_annotation != expected).any()       # the example tells the two orders apart
    # Input and annotation of one size: the argmax at that size, nothing resized.
    same = hard_labels(soft, out_size, out_size).numpy()
    assert (same == at_annotation).all()


# cv2.resize(ramp, INTER_NEAREST) of OpenCV 5.0.0 (2026-11-29) at the output pixels where
# torch's float32 "nearest" takes a neighbouring source pixel: (size, out) -> {pixel: source}
OPENCV_NEAREST = {
    (896, 1280): {90: 62, 170: 118, 180: 125, 330: 230, 340: 237, 350: 244, 360: 251, 650: 454,
                  660: 461, 670: 468, 680: 475, 690: 482, 700: 489, 710: 496, 720: 503,
                  730: 510},
    (880, 910): {91: 87, 182: 175, 273: 263, 364: 351, 455: 439, 546: 527, 637: 615, 728: 703,
                 819: 791},
    (400, 96): {30: 125, 54: 225, 60: 250}}


def test_davis_read_out_takes_opencvs_nearest_indices_not_torchs():
    import torch.nn.functional as F

    from tcore.eval.segment import opencv_nearest_sources

    for (size, out), sources in OPENCV_NEAREST.items():
        ours = opencv_nearest_sources(size, out)
        ramp = torch.arange(float(size)).reshape(1, 1, size, 1)
        torchs = F.interpolate(ramp, size=(out, 1), mode="nearest")[0, 0, :, 0].long().numpy()
        assert {i: int(ours[i]) for i in sources} == sources
        assert all(abs(torchs[i] - sources[i]) == 1 for i in sources)
        elsewhere = np.setdiff1d(np.arange(out), list(sources))
        assert (ours[elsewhere] == torchs[elsewhere]).all()


def test_vip_read_out_resizes_as_pils_nearest_and_davis_as_opencvs():
    """The released code's two scorers resize the id map from the network's input size to the
    annotation's differently: DAVIS's convert_davis with OpenCV's INTER_NEAREST (source pixel
    floor(i * in / out)), VIP's scorer with PIL's NEAREST (floor((i + 0.5) * in / out)). With
    `centred_nearest` the map is PIL's own resize of the argmax, pixel for pixel, also where
    (i + 0.5) * in / out is a whole number (64 -> 96), which PIL rounds down."""
    import torch.nn.functional as F
    from PIL import Image

    from tcore.eval.segment import hard_labels, pil_nearest_sources

    rng = np.random.default_rng(5)
    soft = torch.from_numpy(rng.random((5, 7, 4)).astype(np.float32))
    input_size, out_size = (20, 28), (23, 61)            # enlarged, as VIP's annotations are
    up = F.interpolate(soft.permute(2, 0, 1)[None], size=input_size, mode="bilinear",
                       align_corners=False)[0].argmax(0).numpy().astype(np.uint8)
    pil = np.asarray(Image.fromarray(up).resize(out_size[::-1], Image.NEAREST))
    centred = hard_labels(soft, input_size, out_size, centred_nearest=True).numpy()
    assert centred.shape == out_size and (centred == pil).all()
    floored = hard_labels(soft, input_size, out_size).numpy()
    assert (floored != pil).any()                        # the example tells the two apart
    for at_input, size in (((20, 28), (13, 17)), ((64, 32), (96, 48))):
        up = F.interpolate(soft.permute(2, 0, 1)[None], size=at_input, mode="bilinear",
                           align_corners=False)[0].argmax(0).numpy().astype(np.uint8)
        pil = np.asarray(Image.fromarray(up).resize(size[::-1], Image.NEAREST))
        assert (hard_labels(soft, at_input, size, centred_nearest=True).numpy() == pil).all()
    ramp = torch.arange(64.0).reshape(1, 1, 64, 1)          # torch's own centred nearest
    exact = F.interpolate(ramp, size=(96, 1), mode="nearest-exact")[0, 0, :, 0].long().numpy()
    assert (exact != pil_nearest_sources(64, 96)).any()   # is not PIL's
