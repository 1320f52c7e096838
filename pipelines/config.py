"""Every number of the data pipeline, with the reference implementation's value as default.

METHOD.md sections 1-3 are the source of each default. `PipelineConfig.validate()` runs when
a loader is built, so a bad value fails at start-up with the name of the offending field:
a PipelineConfigError whose message starts with the key (`views.n_local`), to which a caller
prefixes its own path (`data.pipeline.` in a training config).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
COLOR_JITTER_MODES = ("torchvision", "fast")


class PipelineConfigError(ValueError):
    """A PipelineConfig value that cannot be used; the message starts with its key."""


@dataclass
class SamplingConfig:
    """Sandwich sampling (METHOD.md section 1): fractions of the clip length T."""
    current_range: tuple[float, float] = (0.3, 0.7)
    past_offset_range: tuple[float, float] = (0.15, 0.25)
    future_offset_range: tuple[float, float] = (0.15, 0.25)

    def validate(self) -> None:
        for name in ("current_range", "past_offset_range", "future_offset_range"):
            low, high = getattr(self, name)
            if not 0.0 <= low <= high <= 1.0:
                raise PipelineConfigError(f"sampling.{name} = {(low, high)}: need "
                                          "0 <= low <= high <= 1")
        if self.current_range[0] - self.past_offset_range[1] < 0:
            raise PipelineConfigError(
                "sampling: current_range[0] - past_offset_range[1] must be >= 0 "
                f"(got {self.current_range[0]} - {self.past_offset_range[1]})")
        if self.current_range[1] + self.future_offset_range[1] > 1:
            raise PipelineConfigError(
                "sampling: current_range[1] + future_offset_range[1] must be <= 1 "
                f"(got {self.current_range[1]} + {self.future_offset_range[1]})")


@dataclass
class PhotometricConfig:
    """One view's colour pipeline: jitter (p) -> grayscale (p) -> blur (p) -> solarize (p)."""
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    solarize_p: float = 0.0

    def validate(self, where: str) -> None:
        for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise PipelineConfigError(f"{where}.{name} = {value}: a probability must lie "
                                          "in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise PipelineConfigError(f"{where}.{name} must lie in [0, 1]")
        if not 0.0 <= self.hue <= 0.5:
            raise PipelineConfigError(f"{where}.hue must lie in [0, 0.5]")


def _global_1() -> PhotometricConfig:
    # Effective blur probability of global crop 1 is 0.0 (METHOD.md section 2).
    return PhotometricConfig(blur_p=0.0, solarize_p=0.0)


def _global_2() -> PhotometricConfig:
    # Effective blur 0.9, solarize 0.2 on global crop 2.
    return PhotometricConfig(blur_p=0.9, solarize_p=0.2)


def _local() -> PhotometricConfig:
    return PhotometricConfig(blur_p=0.5, solarize_p=0.0)


@dataclass
class ViewConfig:
    """Crop geometry and the photometric pipeline of each kind of view (METHOD.md section 2)."""
    global_size: int = 224
    local_size: int = 96
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    local_flip_p: float = 0.5
    central_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    blur_kernel: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_threshold: int = 128
    global_1: PhotometricConfig = field(default_factory=_global_1)
    global_2: PhotometricConfig = field(default_factory=_global_2)
    local: PhotometricConfig = field(default_factory=_local)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # "torchvision" (the reference's): ColorJitter on PIL images bit for bit (random per-view
    # order of brightness / contrast / saturation / hue, PIL's 8-bit HSV hue shift and its
    # blends). "fast": a fixed order, DALI's blends and its linear hue rotation about the gray
    # axis (not the reference's pixels; no torch.compile at start-up; README).
    color_jitter: str = "torchvision"

    def validate(self) -> None:
        if self.color_jitter not in COLOR_JITTER_MODES:
            raise PipelineConfigError(f"views.color_jitter = {self.color_jitter!r}: must be one "
                                      f"of {list(COLOR_JITTER_MODES)}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) <= 0:
                raise PipelineConfigError(f"views.{name} = {getattr(self, name)}: a crop size "
                                          "must be > 0")
        if self.n_local < 0:
            raise PipelineConfigError(f"views.n_local = {self.n_local}: must be >= 0")
        for name in ("global_scale", "local_scale", "ratio", "central_aspect", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise PipelineConfigError(f"views.{name} = {(low, high)}: need 0 < low <= high")
        for name in ("global_scale", "local_scale"):
            if getattr(self, name)[1] > 1:
                raise PipelineConfigError(f"views.{name} = {getattr(self, name)}: crop scales "
                                          "are fractions of the frame area (<= 1)")
        if not 0 <= self.solarize_threshold <= 256:
            raise PipelineConfigError(f"views.solarize_threshold = {self.solarize_threshold}: "
                                      "must lie in [0, 256] (256: never solarize)")
        if self.blur_kernel % 2 != 1:
            raise PipelineConfigError(f"views.blur_kernel = {self.blur_kernel}: must be odd")
        if not 0 <= self.local_flip_p <= 1:
            raise PipelineConfigError("views.local_flip_p must lie in [0, 1]")
        for name in ("global_1", "global_2", "local"):
            getattr(self, name).validate(f"views.{name}")


@dataclass
class MaskConfig:
    """Block-wise masking of the current frame's global crops (METHOD.md section 3)."""
    patch_size: int = 16
    mask_sample_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    min_block_patches: int = 4
    # Per-block cap: fraction * img // patch * img // patch, evaluated left to right. T-CoRe
    # passes the whole grid (196 at 224 / 16), so a block is bounded only by what remains
    # (METHOD.md: area U(4, remaining)); DINOv2, which it adapts, passes 0.5.
    max_block_fraction: float = 1.0
    min_aspect: float = 0.3
    block_tries: int = 10

    def validate(self, image_size: int) -> None:
        if self.patch_size < 1:
            raise PipelineConfigError(f"masks.patch_size = {self.patch_size}: must be >= 1")
        if image_size % self.patch_size:
            raise PipelineConfigError(f"views.global_size = {image_size}: not a multiple of "
                                      f"masks.patch_size ({self.patch_size})")
        if not 0 <= self.mask_sample_probability <= 1:
            raise PipelineConfigError("masks.mask_sample_probability must lie in [0, 1]")
        low, high = self.mask_ratio
        if not 0 <= low <= high <= 1:
            raise PipelineConfigError(f"masks.mask_ratio = {(low, high)}: need "
                                      "0 <= low <= high <= 1")
        if not 0 < self.min_aspect <= 1:
            raise PipelineConfigError("masks.min_aspect must lie in (0, 1]")


@dataclass
class PipelineConfig:
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    # webdataset reader's initial_fill: the window its random draws come from (README "Data
    # order"); a data set no larger than it is held in memory (pipelines/stage_a.py)
    shuffle_buffer: int = 1024
    # Each epoch's reading order cuts every shard into runs of this many samples and
    # permutes the runs of all shards together, so the buffer draws from ~shuffle_buffer /
    # pass_chunk shards at once (README "Data order"); 0 permutes whole shards.
    pass_chunk: int = 64
    # Batches in flight in stage B (its pipelined depth), `build_loader(prefetch=None)`'s
    # value: deeper smooths uneven batches at the cost of memory and start-up.
    prefetch: int = 2
    skip_bad_samples: bool = False
    # CPU only: stage B as this many independent pipelines fed round-robin, the threads
    # split between them (pipelines/lanes.py); 0 = one lane per thread.
    cpu_lanes: int = 0
    # Where video clips are decoded when the loader runs on a GPU: "gpu" (NVDEC through DALI's
    # mixed decoder), "cpu" (libavcodec on the pipeline's threads; the three frames are then
    # copied to the GPU for the views) or "auto": the CPU threads for the codecs DALI's CPU
    # decoder reads (VP9, VP8, MJPEG), NVDEC for the others (H.264, HEVC). On an H100, NVDEC
    # measured ~62 clips/s for 426x320 VP9 clips, a per-clip cost that extra threads or
    # pipelines did not reduce, and 16 CPU threads ~390 (docs/PERFORMANCE.md). The CPU
    # backend always decodes on the CPU.
    video_decoder: str = "auto"
    # Where the colour stage (jitter, grayscale, blur, solarize, normalisation) runs: "dali"
    # (in stage B's graph), "torch" (pipelines/torch_photometric.py, on the loader's device,
    # over all crops of a batch at once; views.color_jitter = "torchvision" only) or "auto":
    # torch with the torchvision jitter, dali with the fast one. In DALI the torchvision
    # jitter is ~250 operators per view: on an H100 it capped the loader at ~85 samples/s
    # (torch: 705), on 2 CPU cores at 20 samples/s (torch, compiled: 35; docs/PERFORMANCE.md).
    photometric: str = "auto"
    # With photometric = torch: fuse its steps with torch.compile (compiled at the first
    # batch; eager, with a warning, where compiling fails) instead of ~100 separate passes.
    photometric_compile: bool = True
    # With photometric = torch on a GPU: replay each view group's colour stage as a CUDA graph
    # (pipelines/colour_graphs.py; captured at the first batch of each shape) instead of
    # launching its kernels one by one from Python. On an H200 (2026-11-28) the loader ran
    # 1.29x as fast with it (3,358 against 2,612 samples/s, JPEG frames, batch 64) and a GPU
    # test found the same batches as launched; no effect on the CPU.
    photometric_graphs: bool = True
    # With photometric = torch on a GPU: compile the colour stage (and the normalisation) for
    # each crop shape it meets, two or three a run, with the sizes as constants in its
    # kernels, instead of once for any shape: the kernels of a graph for any shape divide
    # each pixel's index by sizes known only at run time (64-bit integer divisions) and
    # cannot be tiled for the crop size. Each shape then compiles at its first batch, and
    # more than 8 shapes in a process (torch.compile's limit) would run the stage eagerly,
    # with a warning. Not yet measured on a GPU: off until a lease has. No effect on the
    # CPU, whose colour stage works on subsets of varying size.
    photometric_static_shapes: bool = False
    # Where stage A (the shard reader and the host's draws, pipelines/stage_a.py) runs:
    # "thread" (in the training process), "process" (a process of its own, so its Python does
    # not hold the GIL the training loop needs to launch kernels) or "auto": a process when
    # the loader feeds a GPU, a thread on the CPU (2 cores, where a process only adds its
    # start-up and the pickling).
    producer: str = "auto"
    # Batches a thread of the loader makes ahead of next() (pipelines/ahead.py): waiting for
    # stage B, copying its views out, the colour stage, uploading masks and labels and feeding
    # stage B the next batch, while the training thread runs the step. 0: next() does that
    # work itself, in the training thread. Each batch ahead holds one more batch of views in
    # memory. On an H200 (2026-11-28) it cut the compiled ViT-S/16 step's wait in next() from
    # 8-9 to 2-3 ms but gained nothing end to end beyond noise: the device was the limit.
    assemble_ahead: int = 0

    def resolved_producer(self, on_gpu: bool) -> str:
        if self.producer != "auto":
            return self.producer
        return "process" if on_gpu else "thread"

    def resolved_photometric(self) -> str:
        if self.photometric != "auto":
            return self.photometric
        return "torch" if self.views.color_jitter == "torchvision" else "dali"

    def validate(self) -> "PipelineConfig":
        _check_types(self)
        self.sampling.validate()
        self.views.validate()
        self.masks.validate(self.views.global_size)
        if self.shuffle_buffer < 1:
            raise PipelineConfigError("shuffle_buffer must be >= 1")
        if self.pass_chunk < 0:
            raise PipelineConfigError(f"pass_chunk = {self.pass_chunk}: need >= 0 (0 = whole "
                                      "shards)")
        if self.prefetch < 1:
            raise PipelineConfigError(f"prefetch = {self.prefetch}: need >= 1 batch in flight")
        if self.cpu_lanes < 0:
            raise PipelineConfigError(f"cpu_lanes = {self.cpu_lanes}: need >= 0 "
                                      "(0 = one per thread)")
        if self.assemble_ahead < 0:
            raise PipelineConfigError(f"assemble_ahead = {self.assemble_ahead}: need >= 0 "
                                      "(0 = next() makes each batch itself)")
        if self.video_decoder not in ("auto", "gpu", "cpu"):
            raise PipelineConfigError(f"video_decoder = {self.video_decoder!r}: must be "
                                      "'auto', 'gpu' or 'cpu'")
        if self.producer not in ("auto", "thread", "process"):
            raise PipelineConfigError(f"producer = {self.producer!r}: must be 'auto', "
                                      "'thread' or 'process'")
        if self.photometric not in ("auto", "dali", "torch"):
            raise PipelineConfigError(f"photometric = {self.photometric!r}: must be 'auto', "
                                      "'dali' or 'torch'")
        if self.photometric == "torch" and self.views.color_jitter != "torchvision":
            raise PipelineConfigError("photometric = 'torch' implements views.color_jitter = "
                                      f"'torchvision' only (got {self.views.color_jitter!r})")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "PipelineConfig":
        """Build from a (possibly partial, possibly OmegaConf-converted) nested dict."""
        return _from_dict(cls, values or {})


def _from_dict(kind, values: dict, where: str = ""):
    """`kind` from a nested dict; a key it lacks is named with its path (`views.nlocal`)."""
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise PipelineConfigError(f"{where}{unknown[0]}: unknown key ({kind.__name__} has "
                                  f"{', '.join(sorted(known))})")
    defaults = kind()
    kwargs = {}
    for name, value in values.items():
        current = getattr(defaults, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise PipelineConfigError(f"{where}{name} = {value!r}: expected a mapping of "
                                          f"{type(current).__name__} keys")
            kwargs[name] = _from_dict(type(current), value, f"{where}{name}.")
        elif isinstance(current, tuple) and isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return kind(**kwargs)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_types(config, where: str = "") -> None:
    """Every field of the type of its default (a flag, an integer, a number, a string, a pair
    of numbers, ...), so a wrong type is named here, not met as a TypeError in the graph."""
    defaults = type(config)()
    for f in fields(config):
        value, default, key = getattr(config, f.name), getattr(defaults, f.name), where + f.name
        if is_dataclass(default):
            if not isinstance(value, type(default)):
                raise PipelineConfigError(f"{key} = {value!r}: expected a {type(default).__name__}")
            _check_types(value, key + ".")
            continue
        if isinstance(default, bool):
            ok, wanted = isinstance(value, bool), "true or false"
        elif isinstance(default, int):
            ok, wanted = _number(value) and isinstance(value, int), "an integer"
        elif isinstance(default, float):
            ok, wanted = _number(value), "a number"
        elif isinstance(default, tuple):
            ok = isinstance(value, (tuple, list)) and len(value) == len(default) \
                and all(_number(item) for item in value)
            wanted = f"a list of {len(default)} numbers"
        else:
            ok, wanted = isinstance(value, type(default)), f"a {type(default).__name__}"
        if not ok:
            raise PipelineConfigError(f"{key} = {value!r}: must be {wanted}")
