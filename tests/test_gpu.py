"""What only a CUDA GPU can check: fused AdamW, bf16 and fp16 (with the gradient scaler) train
steps, `tcore train` on the GPU, the DALI GPU graph (NVDEC, GPU views) against the CPU
graph from the same drawn parameters, and label propagation on the GPU against the CPU.

Skipped without CUDA. The DALI tests also need DALI's CUDA build and a shard set: they use
TCORE_GPU_SHARDS (scripts/gpu_check.sh sets it to its synthetic VP9 shards), because the
GPU machine has no PyAV to build shards with. `scripts/gpu_check.sh` runs this file there.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tcore.config import load_config
from tcore.distributed import DistInfo
from tcore.synthetic_batch import make_synthetic_batch
from tcore.train import Trainer

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
SHARDS = os.environ.get("TCORE_GPU_SHARDS")              # VP9 clips
FRAME_SHARDS = os.environ.get("TCORE_GPU_FRAME_SHARDS")  # `--codec jpegs`
LOSS_TERMS = ("total", "dino", "koleo", "patch_past", "patch_future", "past_future")


def _has_dali_cuda() -> bool:
    try:
        from nvidia.dali.backend import GetCudaVersion  # noqa: F401  (present in CUDA builds)
        return True
    except Exception:
        return False


needs_dali = pytest.mark.skipif(not (SHARDS and _has_dali_cuda()),
                                reason="needs DALI's CUDA build and TCORE_GPU_SHARDS")
needs_frames = pytest.mark.skipif(not (FRAME_SHARDS and _has_dali_cuda()),
                                  reason="needs DALI's CUDA build and TCORE_GPU_FRAME_SHARDS")


def _trainer(precision: str, *overrides: str) -> Trainer:
    torch.manual_seed(0)
    cfg = load_config("tiny_cpu", [f"train.precision={precision}", "train.device=cuda",
                                   *overrides])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    return Trainer(cfg, loader=None, info=info)


def _batch(cfg, seed: int = 0):
    views = cfg.data.pipeline.views
    return make_synthetic_batch(4, "cuda", n_local=int(views.n_local),
                                global_size=int(views.global_size),
                                local_size=int(views.local_size),
                                seed=seed)


def test_optimizer_uses_fused_adamw_on_cuda():
    from tcore.optim import ListedAdamW

    trainer = _trainer("bf16")
    assert trainer.optimizer.defaults["fused"] is True
    assert isinstance(trainer.optimizer, ListedAdamW)
    before = [p.detach().clone() for p in trainer.model.student.parameters()]
    losses, _ = trainer.step(100, _batch(trainer.cfg))  # past warm-up: lr > 0
    assert torch.isfinite(losses["total"]).item()
    after = list(trainer.model.student.parameters())
    moved = sum(not torch.equal(a, b) for a, b in zip(before, after))
    assert moved > len(before) // 2, f"only {moved} of {len(before)} tensors moved"
    trainer.step(101, _batch(trainer.cfg))       # the states exist: ListedAdamW's own step
    assert len(trainer.optimizer._listed) == len(trainer.optimizer.param_groups)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_step_matches_fp32(precision):
    """Same weights, same batch: every loss term within 5% of fp32; fp16 runs its scaler."""
    reference = _trainer("fp32")
    mixed = _trainer(precision)
    mixed.model.load_state_dict(reference.model.state_dict())
    batch = _batch(reference.cfg)
    ref_losses, _ = reference.step(100, batch)
    losses, _ = mixed.step(100, batch)
    assert mixed.scaler.is_enabled() == (precision == "fp16")
    if precision == "fp16":
        assert mixed.scaler.get_scale() > 0
    for name in LOSS_TERMS:
        got, want = float(losses[name]), float(ref_losses[name])
        assert math.isfinite(got), name
        assert math.isclose(got, want, rel_tol=0.05, abs_tol=1e-3), (name, got, want)


def test_compiled_step_on_cuda_matches_eager_for_every_masked_token_count():
    """`train.compile=true` through Triton (the CPU tests reach only Inductor's C++ code):
    batches whose masked-token counts differ, the one size the graph holds symbolic
    (tcore.train.compile_inputs), give eager's losses."""
    eager = _trainer("fp32")
    compiled = _trainer("fp32", "train.compile=true")
    compiled.model.load_state_dict(eager.model.state_dict())
    batches = [_batch(eager.cfg, seed) for seed in (0, 1, 2, 5)]
    assert len({b["mask_indices"].numel() for b in batches}) >= 2
    for it, batch in enumerate(batches, start=100):
        want, _ = eager.step(it, batch)
        got, _ = compiled.step(it, batch)
        for name in LOSS_TERMS:
            assert got[name].item() == pytest.approx(want[name].item(), rel=1e-3, abs=1e-4), \
                (it, name)


def test_train_steps_on_a_high_priority_stream_give_the_default_streams_losses():
    """`train.step_stream=high_priority`: the step runs on a stream above the default
    priority, waits for the batch made before it, and its losses, read after the block on
    the caller's stream, are the default stream's (same weights, same batches)."""
    from tcore.step_stream import step_stream

    losses = {}
    for kind in ("default", "high_priority"):
        trainer = _trainer("fp32")
        batches = [_batch(trainer.cfg, seed) for seed in (0, 1, 2)]   # on the caller's stream
        with step_stream(kind, torch.device("cuda")) as stream:
            priority = torch.cuda.current_stream().priority
            steps = [trainer.step(it, batch)[0] for it, batch in enumerate(batches, start=100)]
        if kind == "high_priority":
            assert stream is not None and priority < 0, priority
            assert torch.cuda.current_stream() != stream        # the caller's again after it
        else:
            assert stream is None and priority == 0
        losses[kind] = [{name: got[name].item() for name in LOSS_TERMS} for got in steps]
    # Not bit for bit: attention's backward may sum with atomics in any order. A batch read
    # before it was made would be off by far more.
    for want, got in zip(losses["default"], losses["high_priority"]):
        for name in LOSS_TERMS:
            assert got[name] == pytest.approx(want[name], rel=1e-4, abs=1e-5), name


def test_profile_timeline_sees_each_streams_work_on_cuda(tmp_path):
    """`--profile`'s timeline on real CUDA events: work on two streams, each stream's busy
    time, the device's busy time no more than the wall time, and the host's final wait."""
    from tcore.bench.model import profile_steps

    a = torch.randn(4096, 4096, device="cuda")
    side = torch.cuda.Stream()

    def step():
        a @ a                      # the current stream
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.tanh(a @ a)
        torch.cuda.current_stream().wait_stream(side)

    profile = profile_steps(step, torch.device("cuda"), tmp_path, steps=3)
    timeline = profile["timeline"]
    assert len(timeline["streams"]) >= 2, timeline["streams"]
    assert all(s["busy_ms"] > 0 and s["activities"] >= 3 for s in timeline["streams"].values())
    assert 0 < timeline["device_busy_ms"] <= timeline["wall_ms"] * 1.01
    assert timeline["launches"], "no kernel launches seen on the host"
    assert timeline["blocking"], "profile_steps ends with a device synchronisation"
    assert "device busy" in (tmp_path / "timeline.txt").read_text()


@needs_dali
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_tcore_train_runs_on_the_gpu(tmp_path, precision):
    """`tcore train` from GPU-decoded shards: finite losses, a checkpoint, the export. The
    fp16 run trains on the high-priority stream (`train.step_stream`), checkpoint included."""
    run = tmp_path / precision
    stream = "high_priority" if precision == "fp16" else "default"
    command = [sys.executable, "-P", "-m", "tcore.cli", "train", "--config", "tiny_cpu",
               "--data", SHARDS, "--output", str(run), "--max-steps", "4", "--no-progress",
               "train.device=cuda", f"train.precision={precision}", "train.log_every=1",
               f"train.step_stream={stream}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(row["loss/total"]) for row in rows
                        if "loss/total" in row), rows[-1]
    assert (run / "teacher_backbone.safetensors").exists()


@needs_dali
@pytest.mark.parametrize("jitter,decoder", [("fast", "gpu"), ("torchvision", "gpu"),
                                            ("torchvision", "cpu")])
def test_dali_gpu_views_match_the_cpu_graph(jitter, decoder):
    """Same seed, so stage A draws the same samples and parameters on both devices; the GPU
    graph (NVDEC decode, or CPU decode with `video_decoder=cpu`; GPU resize and colour ops)
    must give the CPU graph's views up to decoder colour conversion and float rounding."""
    _compare_gpu_with_cpu(SHARDS, jitter, decoder)


@needs_frames
def test_dali_gpu_views_match_the_cpu_graph_on_jpeg_frames():
    """JPEG-frame shards: nvJPEG on the GPU against libjpeg on the CPU, same views."""
    _compare_gpu_with_cpu(FRAME_SHARDS, "torchvision", "gpu")


@pytest.mark.skipif(not _has_dali_cuda(), reason="needs DALI's CUDA build")
def test_dali_gpu_views_match_the_cpu_graph_on_image_shards(tmp_path):
    """Image shards (nvJPEG on the GPU), built here with PIL alone: smooth synthetic
    pictures, so the comparison sees the decoders and the views, not JPEG noise."""
    import numpy as np
    from PIL import Image

    from tcore.preprocess.shards import build_shards

    y, x = np.mgrid[0:240, 0:320]
    for i in range(8):
        folder = tmp_path / "src" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = np.stack([(x + 20 * i) % 256, (y * 2 + 10 * i) % 256, (x + y) // 3 % 256], -1)
        Image.fromarray(picture.astype(np.uint8)).save(folder / f"img{i}.jpg", quality=95)
    build_shards(tmp_path / "src", tmp_path / "shards", kind="image", short_side=240,
                 samples_per_shard=4, progress=False)
    _compare_gpu_with_cpu(str(tmp_path / "shards"), "torchvision", "gpu")


@pytest.mark.skipif(not ((SHARDS or FRAME_SHARDS) and _has_dali_cuda()),
                    reason="needs DALI's CUDA build and TCORE_GPU_SHARDS or TCORE_GPU_FRAME_SHARDS")
def test_gpu_batches_stay_intact_behind_a_busy_training_stream():
    """The loader copies out of DALI's buffers on a stream of its own, runs the colour stage
    on another, and hands the tensors to the training stream, which waits for that stream
    on the device: with long work queued between batches, as a train step would, every
    batch still equals the CPU loader's. The training stream here is the high-priority one
    (`train.step_stream`), whose work the device runs first: the hardest case for the
    hand-over (the default stream's is every other GPU loader test's)."""
    from tcore.step_stream import step_stream
    from tcore.pipelines.config import PipelineConfig
    from tcore.pipelines.loader import build_loader

    shards = FRAME_SHARDS or SHARDS
    loaders = {}
    for device in ("cpu", "cuda"):
        # The CPU leg eager, as in _compare_gpu_with_cpu: a C++ compile takes a minute.
        config = PipelineConfig(photometric_compile=device == "cuda")
        config.views.color_jitter = "torchvision"
        loaders[device] = build_loader([shards], batch_size=4, device=device, config=config,
                                       seed=7, infinite=True, num_threads=4)
    busy = torch.randn(4096, 4096, device="cuda")
    gpu_batches = []
    iterator = iter(loaders["cuda"])
    with step_stream("high_priority", torch.device("cuda")):
        for _ in range(5):
            gpu_batches.append(next(iterator))
            for _ in range(30):            # ~tens of ms of queued work, like a train step
                busy = torch.tanh(busy @ busy * 1e-4)
    cpu_iterator = iter(loaders["cpu"])
    cpu_batches = [next(cpu_iterator) for _ in range(5)]
    for loader in loaders.values():
        loader.close()
    for gpu, cpu in zip(gpu_batches, cpu_batches):
        assert torch.equal(gpu["masks"].cpu(), cpu["masks"])
        for key in ("global_crops", "local_crops", "past_crops", "future_crops"):
            diff = (gpu[key].float().cpu() - cpu[key].float()).abs()
            assert float(diff.mean()) < 0.05 and float(diff.quantile(0.99)) < 0.3, key


@pytest.mark.skipif(not ((SHARDS or FRAME_SHARDS) and _has_dali_cuda()),
                    reason="needs DALI's CUDA build and TCORE_GPU_SHARDS or TCORE_GPU_FRAME_SHARDS")
def test_colour_stage_replayed_as_cuda_graphs_gives_the_launched_stages_batches():
    """`photometric_graphs` (the default): each crop shape's colour stage captured once,
    then every batch's crops and parameters copied into the graph and replayed, gives the
    batches the launched stage gives, over a whole epoch whose last batch is smaller (a shape of its own), with
    work queued on the training stream between batches."""
    import itertools

    from tcore.pipelines.config import PipelineConfig
    from tcore.pipelines.loader import build_loader

    shards = FRAME_SHARDS or SHARDS
    epochs = {}
    for graphed in (False, True):
        # graphed: the default on a GPU since the H200 measured it
        config = PipelineConfig() if graphed else PipelineConfig(photometric_graphs=False)
        config.views.color_jitter = "torchvision"
        loader = build_loader([shards], batch_size=6, device="cuda", config=config, seed=5,
                              infinite=False, num_threads=4)
        assert (loader.colour_graphs is not None) == graphed
        busy = torch.randn(2048, 2048, device="cuda")
        batches = []
        for batch in itertools.islice(loader, 40):
            batches.append({k: v.cpu() for k, v in batch.items() if torch.is_tensor(v)})
            for _ in range(10):
                busy = torch.tanh(busy @ busy * 1e-3)
        if graphed:
            sizes = {b["labels"].numel() for b in batches}
            # batches of 6, and the epoch's remainder last (4 for the carried sets of 16 and 64)
            assert sizes == {6, loader.samples_per_epoch % 6} - {0}, sizes
            # a global (224 px) and a local (96 px) shape per batch size
            assert loader.colour_graphs.captured_shapes == 2 * len(sizes)
        loader.close()
        epochs[graphed] = batches
    assert len(epochs[True]) == len(epochs[False])
    for launched, replayed in zip(epochs[False], epochs[True]):
        for key in launched:
            assert torch.equal(launched[key], replayed[key]), key


@pytest.mark.skipif(not ((SHARDS or FRAME_SHARDS) and _has_dali_cuda()),
                    reason="needs DALI's CUDA build and TCORE_GPU_SHARDS or TCORE_GPU_FRAME_SHARDS")
def test_batches_made_ahead_in_a_thread_on_cuda_are_the_ones_next_makes():
    """`assemble_ahead`: the loader's thread makes the batches (its current stream is not
    the training one); each batch, copied on the training stream as soon as next() returns
    it, that stream busy and the device synchronised between batches, is the batch next()
    makes itself, over a whole one-pass epoch. The thread captures the colour stage's graphs
    only for its first batch (a device-wide sync from the training thread would invalidate a
    capture): the epoch's smaller last batch runs as launched."""
    import itertools
    import threading

    from tcore.pipelines.config import PipelineConfig
    from tcore.pipelines.loader import build_loader

    shards = FRAME_SHARDS or SHARDS
    epochs = {}
    for ahead in (0, 2):
        config = PipelineConfig(assemble_ahead=ahead)
        config.views.color_jitter = "torchvision"
        loader = build_loader([shards], batch_size=6, device="cuda", config=config, seed=5,
                              infinite=False, num_threads=4)
        busy = torch.randn(2048, 2048, device="cuda")
        batches = []
        for batch in itertools.islice(loader, 40):
            # copied on the training stream at once: that stream must wait for the batch
            batches.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
            for _ in range(10):            # and is busy while the next batches are made
                busy = torch.tanh(busy @ busy * 1e-3)
            torch.cuda.synchronize()       # as a logged loss or a timing window does
        if ahead:
            # a global and a local shape for the batches of 6; the last batch's not captured
            assert loader.colour_graphs.captured_shapes == 2
        loader.close()
        epochs[ahead] = [{k: v.cpu() for k, v in b.items()} for b in batches]
    assert not [t for t in threading.enumerate() if t.name == "tcore-loader-ahead"]
    assert len(epochs[2]) == len(epochs[0]) > 1
    for made_by_next, made_ahead in zip(epochs[0], epochs[2]):
        for key in made_by_next:
            assert torch.equal(made_by_next[key], made_ahead[key]), key


def _compare_gpu_with_cpu(shards: str, jitter: str, decoder: str) -> None:
    from tcore.pipelines.config import PipelineConfig
    from tcore.pipelines.loader import build_loader

    batches = {}
    for device in ("cpu", "cuda"):
        # The CPU leg eager: its pixels are the compiled ones (tests/test_torch_photometric.py)
        # and a C++ compile would take a minute of the GPU check's time.
        config = PipelineConfig(video_decoder=decoder, photometric_compile=device == "cuda")
        config.views.color_jitter = jitter
        loader = build_loader([shards], batch_size=4, device=device, config=config, seed=3,
                              infinite=False, num_threads=4)
        batch = next(iter(loader))
        batches[device] = {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()}
        loader.close()
    cpu, gpu = batches["cpu"], batches["cuda"]
    for key in ("frame_indices", "labels", "masks"):
        assert torch.equal(cpu[key], gpu[key]), key
    report = {}
    for key in ("global_crops", "local_crops", "past_crops", "future_crops"):
        assert cpu[key].shape == gpu[key].shape and gpu[key].dtype == cpu[key].dtype, key
        diff = (cpu[key].float() - gpu[key].float()).abs()
        report[key] = (float(diff.mean()), float(diff.quantile(0.99)))
    print("GPU vs CPU views, mean and p99 |difference| (normalised units):", report)
    for key, (mean, p99) in report.items():
        # One grey level is ~0.017 after ImageNet normalisation.
        assert mean < 0.05 and p99 < 0.3, (key, mean, p99)


@pytest.mark.skipif(not _has_dali_cuda(), reason="tcore.pipelines imports DALI")
def test_colour_stage_blur_on_cuda_runs_triton_kernels_with_the_cpus_pixels():
    """`gaussian_blur` on CUDA is `triton_blur`'s two kernels (no convolution or padding
    kernel runs), and its pixels are the CPU convolution's within a level at a rounding edge,
    rarely: a batch's crops at 224 and at 96, per-crop sigmas and narrowed windows, about half
    of them switched off (those come out unchanged)."""
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from tcore.pipelines.torch_photometric import gaussian_blur

    rng = np.random.default_rng(3)
    for n, size in ((16, 224), (64, 96)):
        crops = torch.from_numpy(rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8))
        sigmas = torch.from_numpy(rng.uniform(0.1, 2.0, n).astype(np.float32))
        windows = torch.from_numpy(rng.choice([3, 5, 7, 9], n).astype(np.int64))
        switched_on = torch.from_numpy(rng.random(n) < 0.5)
        switched_on[:2] = torch.tensor([True, False])
        on_cpu = gaussian_blur(crops, sigmas, windows, 9, switched_on)
        args = (crops.cuda(), sigmas.cuda(), windows.cuda(), 9, switched_on.cuda())
        gaussian_blur(*args)                                                # Triton compiles
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            on_cuda = gaussian_blur(*args)
            torch.cuda.synchronize()
        kernels = [event.key for event in prof.key_averages()]
        assert any("blur_pass" in name for name in kernels), kernels
        assert not any("conv" in name.lower() or "reflection" in name.lower()
                       for name in kernels), kernels
        diff = (on_cuda.cpu().int() - on_cpu.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-4, size
        assert torch.equal(on_cuda.cpu()[~switched_on], crops[~switched_on])
        assert float((on_cpu != crops)[switched_on].float().mean()) > 0.5   # it did blur


@pytest.mark.skipif(not _has_dali_cuda(), reason="tcore.pipelines imports DALI")
def test_torch_colour_stage_compiled_on_cuda_gives_pils_pixels():
    """The fused (Triton) colour stage on the GPU: PIL's hue shift on all 2^24 colours at two
    shifts (computed, and with RGB -> HSV from tables as the dense stage does it), and the
    jitter in all 24 orders equal to the eager CPU stage (itself PIL's, see
    tests/test_torch_photometric.py), bit for bit: no approximate division (an opaque eager
    op there), no fused multiply-add (emulate_precision_casts)."""
    import itertools

    import numpy as np
    import torchvision.transforms.functional as TF
    from PIL import Image

    from tcore.pipelines import torch_photometric as tp
    from tcore.pipelines.config import ViewConfig
    from tcore.pipelines.views import jitter_columns, view_rows

    codes = np.arange(1 << 24, dtype=np.uint32)
    colours = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)
    image = colours.reshape(4096, 4096, 3)
    hue_shift = tp._kernel("pil_hue_shift", True, torch.device("cuda"))
    # the dense stage's: RGB -> HSV from tables, HSV -> RGB computed
    half_tables = tp._kernel("pil_hue_shift_hsv_tables", True, torch.device("cuda"))
    tables = tp._rgb_to_hsv_tables_on(torch.device("cuda"))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].cuda()
    for hue in (0.08, -0.31):
        shift = jitter_columns(np.array([1, 1, 1, hue, 0, 0, 0], np.float32), np.arange(4))[0]
        shift = torch.tensor([shift], device="cuda")
        want = np.array(TF.adjust_hue(Image.fromarray(image), hue))
        for got in (hue_shift(x, shift), half_tables(x, shift, *tables)):
            assert np.array_equal(got[0].permute(1, 2, 0).cpu().numpy(), want), hue
    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.integers(0, 256, (48, 3, 64, 64), dtype=np.uint8))
    # Blend factors 1.2 and 1.35 are among those where a fused multiply-add would move
    # pixels by a level (a CPU emulation over every (base, x) pair found hundreds).
    rows = np.array([[1.3, 0.7, 1.25, -0.07, float(k % 4 == 0), 0.0, 0.0] for k in range(24)]
                    + [[1.2, 1.35, 1.2, 0.0, 0.0, 0.0, 0.0] for _ in range(24)], np.float32)
    orders = np.array(list(itertools.permutations(range(4))) * 2)
    full, switches, windows = view_rows(rows, orders, blur_kernel=9)
    eager = tp.apply_photometric(crops, full, switches, windows, ViewConfig())
    fused = tp.apply_photometric(crops.cuda(), full, switches, windows, ViewConfig(),
                                 compile_=True)
    assert not tp._COMPILE_FAILED
    assert torch.equal(fused.cpu(), eager)


@pytest.mark.skipif(not _has_dali_cuda(), reason="tcore.pipelines imports DALI")
def test_dense_colour_stage_compiled_on_cuda_equals_the_cpu_subset_path():
    """The loader's GPU colour stage (`dense`: every step over every crop in one compiled
    graph, the blur opaque to it) against the subset path, on crops that take every step
    both ways, and at two crop counts with the same graph: bit for bit against the subset
    path on CUDA; against the CPU's, bit for bit where no blur ran and within one level
    where it did (the blur is `triton_blur`'s kernels there, oneDNN's depthwise convolution
    on the CPU: a sum a few ulp apart can round the other way). The graph compiled for each
    crop count (`static_shapes`) gives the same pixels."""
    import itertools

    from colour_images import every_step_batch

    from tcore.pipelines import torch_photometric as tp
    from tcore.pipelines.config import ViewConfig

    images, full, switches, windows = every_step_batch(64)
    on_cpu = tp.apply_photometric(images, full, switches, windows, ViewConfig())
    on_cuda = tp.apply_photometric(images.cuda(), full, switches, windows, ViewConfig()).cpu()
    blurred = torch.from_numpy(switches[:, tp.SW["blur"]].astype(bool))
    assert torch.equal(on_cuda[~blurred], on_cpu[~blurred])
    level_diff = (on_cuda[blurred].int() - on_cpu[blurred].int()).abs()
    assert int(level_diff.max()) <= 1 and float((level_diff > 0).float().mean()) < 1e-4
    # compiled once for any number of crops, and (`photometric_static_shapes`) per number
    for static_shapes, count in itertools.product((False, True), (len(images), 9)):
        got = tp.apply_photometric(images[:count].cuda(), full[:count], switches[:count],
                                   windows[:count], ViewConfig(), compile_=True, dense=True,
                                   static_shapes=static_shapes)
        assert not tp._COMPILE_FAILED
        assert torch.equal(got.cpu(), on_cuda[:count]), (static_shapes, count)


def _davis_on(device: str, data, out) -> tuple[dict, "np.ndarray"]:
    """`tcore eval davis`'s evaluation of a seeded random ViT-Tiny on `device`: results and
    the predicted label maps of the one sequence."""
    import numpy as np

    from tcore.eval import davis
    from tcore.eval.checkpoint import random_backbone
    from tcore.eval.io import read_label_png

    backbone = random_backbone("vit_tiny", seed=0, device=device)
    results = davis.evaluate_davis(backbone, data, out, size=None, progress=False)
    predictions = np.stack([read_label_png(path)
                            for path in sorted((out / "predictions" / "squares").glob("*.png"))])
    return results, predictions


def test_davis_evaluation_on_cuda_gives_the_cpu_results(tmp_path):
    """Label propagation on the GPU (`tcore eval`'s default there) against the CPU: a seeded
    random backbone on textured moving objects, features in float32 on both (no TF32), so
    the predicted labels agree but where a near tie among the top-k neighbours falls the
    other way, and the scores with them."""
    import numpy as np
    from davis_files import textured_frames, write_davis

    labels = np.zeros((8, 64, 96), dtype=np.uint8)
    for t in range(len(labels)):                     # objects of a few patches, one moving
        labels[t, 16:48, 4 + 3 * t:36 + 3 * t] = 1
        labels[t, 8:40, 60:92] = 2
    data = write_davis(tmp_path / "davis", {"squares": labels},
                       {"squares": textured_frames(labels)})
    cpu, cpu_labels = _davis_on("cpu", data, tmp_path / "cpu")
    gpu, gpu_labels = _davis_on("cuda", data, tmp_path / "cuda")
    assert gpu["settings"] == cpu["settings"]
    assert (gpu_labels == cpu_labels).mean() > 0.99
    assert abs(gpu["summary"]["J&F-Mean"] - cpu["summary"]["J&F-Mean"]) < 0.02
