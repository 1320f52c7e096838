"""Baseline loader, the way the reference does it: PyTorch DataLoader workers, PyAV decode on
the CPU, PIL / torchvision transforms. It exists to be measured against and to cross-check
the DALI pipeline, not as a second product.

It shares everything random with the DALI loader: `sampling.draw_sample_params` draws the
frames, boxes, flips and photometric factors, `masks.batch_masks` the masks, and
`baseline_views` applies a SampleParams to decoded frames, so the two loaders' views can be
compared pixel by pixel from the same parameters. Samples are read by offset through the
shards' DALI index files.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing

import av
import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tcore.pipelines.arguments import check_dtype, check_seed, torch_device_name
from tcore.pipelines.config import PipelineConfig
from tcore.pipelines.loader import distributed_shard
from tcore.pipelines.stage_a import BadSampleError, frame_offsets, sample_frames
from tcore.pipelines.manifest import ShardSet, load_shard_set
from tcore.pipelines.masks import batch_masks, mask_tensors
from tcore.pipelines.sampling import (SampleParams, draw_sample_params, jitter_sequence,
                                      sample_rng, view_slices)

BASELINE_STREAM = 0x7476   # keeps the baseline's sample seeds apart from the DALI loader's
MASK_STREAM = 0x6D61736B


# --- reading samples by index ---------------------------------------------------------------

def index_entries(tar: str, index: str) -> list[dict]:
    """[{ext: (offset, size)}, ...] per sample of one shard, with its key."""
    entries = []
    with open(index) as handle:
        for line in handle.read().split("\n")[1:]:
            parts = line.split()
            if not parts:
                continue
            sample = {"tar": tar, "components": {}}
            for i in range(0, len(parts) - 3, 4):
                ext, offset, size, name = parts[i], int(parts[i + 1]), int(parts[i + 2]), \
                    parts[i + 3]
                sample["components"][ext] = (offset, size)
                sample["key"] = name[: -len(ext) - 1]
            entries.append(sample)
    return entries


def read_component(entry: dict, extensions) -> tuple[str, bytes]:
    for ext in extensions:
        if ext in entry["components"]:
            offset, size = entry["components"][ext]
            with open(entry["tar"], "rb") as handle:
                handle.seek(offset)
                data = handle.read(size)
            if len(data) != size:
                raise BadSampleError(f"sample {entry['tar']}:{entry['key']}: .{ext} truncated")
            return ext, data
    raise BadSampleError(f"sample {entry['tar']}:{entry['key']}: no component among "
                         f"{list(extensions)}")


# --- decoding and views ----------------------------------------------------------------------

def yuv420_to_rgb_like_dali(frame: av.VideoFrame) -> Image.Image:
    """BT.601 limited-range YUV 4:2:0 -> RGB with bilinear (centred) chroma upsampling, which
    reproduces DALI's CPU video decoder to within 1 level (swscale's default differs by ~2
    levels on average, up to 50 at colour edges). Slower than `frame.to_image()`; used to
    compare the two loaders' views, not in the baseline's timed path."""
    if frame.format.name != "yuv420p":
        return frame.to_image()
    height, width = frame.height, frame.width
    planes = frame.to_ndarray().astype(np.float32)
    luma = planes[:height]
    chroma = planes[height:].reshape(2, height // 2, width // 2)
    chroma = torch.nn.functional.interpolate(torch.from_numpy(chroma)[None], size=(height, width),
                                             mode="bilinear", align_corners=False)[0].numpy()
    y = (luma - 16) * (255 / 219)
    u, v = (chroma - 128) * (255 / 224)
    rgb = np.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], -1)
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8))


def decode_frames(data: bytes, indices, source: str, dali_colors: bool = False
                  ) -> list[Image.Image]:
    """The frames at `indices` of an encoded clip (decoded in order, stopping early).
    dali_colors: convert YUV to RGB exactly as DALI does (see yuv420_to_rgb_like_dali)."""
    wanted = sorted(set(int(i) for i in indices))
    found = {}
    try:
        with av.open(io.BytesIO(data)) as container:
            for k, frame in enumerate(container.decode(video=0)):
                if k in found or k not in wanted:
                    if k > wanted[-1]:
                        break
                    continue
                found[k] = yuv420_to_rgb_like_dali(frame) if dali_colors else frame.to_image()
                if len(found) == len(wanted):
                    break
    except (av.error.FFmpegError, ValueError) as error:
        raise BadSampleError(f"sample {source} cannot be decoded: {error}") from None
    missing = [k for k in wanted if k not in found]
    if missing:
        raise BadSampleError(f"sample {source}: frames {missing} are missing "
                             f"({len(found)} decoded)")
    return [found[int(i)] for i in indices]


def _photometric(image: Image.Image, row, order, threshold: int, blur_kernel: int = 9
                 ) -> Image.Image:
    """torchvision's ColorJitter (its operations in the drawn order; an identity factor is
    skipped, as ColorJitter does for a range of 0), then grayscale, blur (`blur_kernel`
    taps, `views.blur_kernel`), solarize."""
    brightness, contrast, saturation, hue, gray, sigma, solarize = [float(v) for v in row]
    adjust = (lambda im: TF.adjust_brightness(im, brightness),
              lambda im: TF.adjust_contrast(im, contrast),
              lambda im: TF.adjust_saturation(im, saturation),
              lambda im: TF.adjust_hue(im, hue))
    for op in jitter_sequence(row, order):
        image = adjust[op](image)
    if gray:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if sigma > 0:
        image = TF.gaussian_blur(image, kernel_size=blur_kernel, sigma=sigma)
    if solarize:
        image = TF.solarize(image, threshold)
    return image


def baseline_views(frames: list[Image.Image], params: SampleParams,
                   config: PipelineConfig) -> list[torch.Tensor]:
    """Every view of one sample ([3,S,S] float32, normalised) in the per-sample view order,
    from (past, current, future) PIL frames and the drawn parameters."""
    views = config.views
    past, current, future = frames
    n_local = views.n_local
    sources = [current] * (2 + n_local) + [past, past, future, future]
    sizes = [views.global_size] * 2 + [views.local_size] * n_local + [views.global_size] * 4
    out = []
    for v, (frame, size) in enumerate(zip(sources, sizes)):
        y0, x0, y1, x1 = [int(round(float(c))) for c in params.boxes[v]]
        crop = TF.resized_crop(frame, y0, x0, y1 - y0, x1 - x0, [size, size],
                               interpolation=TF.InterpolationMode.BICUBIC)
        if params.flips[v]:
            crop = TF.hflip(crop)
        crop = _photometric(crop, params.photometric[v], params.jitter_order[v],
                            views.solarize_threshold, views.blur_kernel)
        out.append(TF.normalize(TF.to_tensor(crop), views.mean, views.std))
    return out


# --- the dataset -----------------------------------------------------------------------------

class ShardSamples(IterableDataset):
    """This rank's samples, split over the DataLoader workers, in a per-epoch shuffled order."""

    def __init__(self, shard_set: ShardSet, config: PipelineConfig, seed: int, shard_id: int,
                 num_shards: int, infinite: bool):
        self.config = config
        self.seed = seed
        self.shard_id = shard_id
        self.infinite = infinite
        self.extensions = shard_set.extensions
        self.kind = shard_set.kind
        everything = [e for tar, index in zip(shard_set.tars, shard_set.indices)
                      for e in index_entries(tar, index)]
        n = len(everything)
        self.entries = everything[n * shard_id // num_shards: n * (shard_id + 1) // num_shards]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, counter = 0, 0
        while True:
            order = sample_rng(self.seed, self.shard_id, epoch).permutation(len(self.entries))
            for position in order[worker::workers]:
                rng = sample_rng(self.seed, self.shard_id, BASELINE_STREAM, worker, counter)
                counter += 1
                item = self.load(self.entries[position], rng)
                if item is not None:
                    yield item
            epoch += 1
            if not self.infinite:
                return

    def load(self, entry: dict, rng) -> dict | None:
        source = f"{entry['tar']}:{entry['key']}"
        try:
            _, data = read_component(entry, self.extensions)
            _, meta_bytes = read_component(entry, ["json"])
            meta = json.loads(meta_bytes)
            params = draw_sample_params(rng, sample_frames(meta), int(meta["height"]),
                                        int(meta["width"]), self.config)
            if self.kind == "video":
                frames = decode_frames(data, params.frames, source)
            elif self.kind == "frames":
                bounds = frame_offsets(meta, len(data), source)
                frames = [Image.open(io.BytesIO(data[bounds[k]:bounds[k + 1]])).convert("RGB")
                          for k in params.frames]
            else:
                frames = [Image.open(io.BytesIO(data)).convert("RGB")] * 3
        except (BadSampleError, json.JSONDecodeError, KeyError, OSError) as error:
            if self.config.skip_bad_samples:
                return None
            raise BadSampleError(f"sample {source}: {error}") from None
        return {"views": baseline_views(frames, params, self.config), "params": params,
                "label": int(meta.get("label", -1)), "source": source,
                "mask_seed": int(rng.integers(0, 2**62)), "T": sample_frames(meta)}


class BaselineCollate:
    """Crop-major stacking and the batch's masks (seeded by its first sample's draw)."""

    def __init__(self, config: PipelineConfig, return_params: bool):
        self.config = config
        self.return_params = return_params

    def __call__(self, items: list[dict]) -> dict:
        views = self.config.views
        n = len(items)
        batch = {}
        for name, where in view_slices(views.n_local).items():
            batch[name] = torch.stack([items[b]["views"][v] for v in range(where.start, where.stop)
                                       for b in range(n)]) if where.stop > where.start else \
                torch.empty((0, 3, views.local_size, views.local_size))
        grid = views.global_size // self.config.masks.patch_size
        masks = batch_masks(sample_rng(items[0]["mask_seed"], MASK_STREAM), 2 * n, grid,
                            self.config.masks)
        batch.update(mask_tensors(masks))
        batch["frame_indices"] = torch.from_numpy(np.stack([i["params"].frames for i in items]))
        batch["labels"] = torch.tensor([i["label"] for i in items], dtype=torch.int64)
        if self.return_params:
            batch["params"] = [i["params"] for i in items]
            batch["sources"] = [i["source"] for i in items]
            batch["frame_counts"] = [i["T"] for i in items]
        return batch


class BaselineLoader:
    def __init__(self, loader: DataLoader, device, dtype, batches: int, infinite: bool):
        self.loader = loader
        self.device = torch.device(device)
        self.dtype = dtype
        self.batches = batches
        self.infinite = infinite
        self._iterator = None
        self._count = 0

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)
        self._count += 1
        for name, value in batch.items():
            if torch.is_tensor(value):
                value = value.to(self.device, non_blocking=True)
                batch[name] = value.to(self.dtype) if value.is_floating_point() and \
                    name != "mask_weights" else value
        return batch

    def close(self) -> None:
        self._iterator = None


def _worker_context():
    """The fork server's context, with this module preloaded in the server: its workers then
    fork with torch, PyAV and PIL already imported instead of importing them at every pass's
    start. Takes effect when the process's fork server starts (its first pass)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", __name__])
    return context


def build_baseline_loader(manifests, batch_size: int, device: str = "cpu",
                          config: PipelineConfig | None = None, seed: int = 0, shard_id=None,
                          num_shards=None, num_workers: int = 2, prefetch: int = 2,
                          infinite: bool = True, dtype: torch.dtype = torch.float32,
                          return_params: bool = False) -> BaselineLoader:
    """Same arguments and batches as `loader.build_loader` (num_workers instead of threads);
    no exact resume. One pass (infinite=False) ends when the workers run out of samples:
    each worker's last batch may be partial, so it can yield a few more than len() batches."""
    config = (config or PipelineConfig()).validate()
    check_seed(seed)
    check_dtype(dtype)
    shard_set = load_shard_set(manifests)
    shard_id, num_shards = distributed_shard(shard_id, num_shards)
    device = torch_device_name(device)
    dataset = ShardSamples(shard_set, config, seed, shard_id, num_shards, infinite)
    # Workers from a fork server, not forked from the caller: a process that already runs
    # threads (DALI's, torch's: `bench data --loader both`, a test session) can leave a lock
    # held in a forked child, and under Python 3.12 such workers hung (tests/test_pipeline_loader).
    context = _worker_context() if num_workers else None
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        collate_fn=BaselineCollate(config, return_params),
                        prefetch_factor=prefetch if num_workers else None,
                        persistent_workers=False, pin_memory=torch.device(device).type == "cuda",
                        multiprocessing_context=context)
    batches = math.ceil(len(dataset.entries) / batch_size)
    return BaselineLoader(loader, device, dtype, batches, infinite)
