"""Procedurally generated videos: the built-in dataset for the demo, the tests and the
label-propagation check.

`make_synthetic(out)` writes
- `out/train/<class>/<class>_<i>.<ext>`: videos in several containers/codecs (mp4/H.264,
  webm/VP9, avi/MJPEG), the class being the motion pattern of the objects;
- `out/davis/`: a held-out part in the DAVIS-2017 layout (JPEG frames, palette PNG instance
  masks with the standard DAVIS palette, `ImageSets/2017/val.txt`).

Every frame is a textured background (panning slowly) with textured objects pasted in a fixed
depth order, so objects occlude each other; object masks are the exact pixels each object
owns in the rendered frame (hard edges, no anti-aliasing). Each video draws from its own
random generator seeded by (seed, part, index), so output is deterministic per seed and
adding videos does not change the earlier ones.
"""
from __future__ import annotations

import io
import json
import math
import re
from fractions import Fraction
from dataclasses import dataclass
from pathlib import Path

import numpy as np
try:  # see preprocess/video.py: training without PyAV must still import the CLI
    import av
    from av.video.reformatter import VideoReformatter
except ImportError:
    av = None
from PIL import Image

from tcore.preprocess.files import check_output_path, make_output_directory, write_atomically
from tcore.preprocess.video import require_av

# Class = motion pattern shared by every object of a video.
MOTION_CLASSES = ("drift", "orbit", "pulse", "swing")

# (file extension, PyAV container format, encoder, pixel format); cycled over the videos so
# that the shard builder meets several containers and codecs.
CONTAINERS = (
    # MPEG-4 part 2 in mp4: x264 output was seen to vary between runs (threads=1 and all).
    ("mp4", "mp4", "mpeg4", "yuv420p"),
    ("webm", "webm", "libvpx-vp9", "yuv420p"),
    ("avi", "avi", "mjpeg", "yuvj420p"),
)

SYNTH_FPS = 24
SYNTH_RECORD = "synth.json"  # parameters of the dataset in a directory; marks it complete


def davis_palette() -> list[int]:
    """The standard DAVIS / PASCAL VOC 256-colour palette as a flat [r, g, b, ...] list."""
    palette = []
    for index in range(256):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.extend((r, g, b))
    return palette


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: random values on a coarse grid, bilinearly upsampled."""
    grid = rng.random((height // cell + 2, width // cell + 2)).astype(np.float32)
    image = Image.fromarray(grid, mode="F").resize(
        ((width // cell + 2) * cell, (height // cell + 2) * cell), Image.BILINEAR)
    return np.asarray(image)[:height, :width]


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """An RGB uint8 texture: two random colours mixed by multi-scale noise, plus stripes."""
    mix = 0.6 * _smooth_noise(rng, height, width, 16) + 0.4 * _smooth_noise(rng, height, width, 4)
    angle = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    stripes = 0.5 + 0.5 * np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * rng.uniform(0.2, 0.6))
    mix = np.clip(0.75 * mix + 0.25 * stripes, 0, 1)[..., None]
    color_a = rng.uniform(0, 255, 3).astype(np.float32)
    color_b = rng.uniform(0, 255, 3).astype(np.float32)
    return (color_a * mix + color_b * (1 - mix)).astype(np.uint8)


@dataclass
class _Object:
    texture: np.ndarray  # [h, w, 3] at scale 1
    ellipse: bool
    center: np.ndarray  # (x, y) at t = 0, in pixels
    velocity: np.ndarray  # pixels / frame
    radius: float  # orbit / swing amplitude in pixels
    phase: float
    speed: float  # radians / frame


def _make_objects(rng: np.random.Generator, count: int, width: int, height: int) -> list[_Object]:
    objects = []
    for _ in range(count):
        obj_h = int(rng.uniform(0.25, 0.45) * height)
        obj_w = int(rng.uniform(0.2, 0.4) * width)
        objects.append(_Object(
            texture=_texture(rng, obj_h, obj_w),
            ellipse=bool(rng.random() < 0.5),
            center=np.array([rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height]),
            velocity=rng.uniform(-1.0, 1.0, 2) * min(width, height) * 0.02,
            radius=rng.uniform(0.12, 0.3) * min(width, height),
            phase=rng.uniform(0, 2 * math.pi),
            speed=rng.uniform(0.08, 0.2) * rng.choice([-1, 1]),
        ))
    return objects


def _bounce(position: float, low: float, high: float) -> float:
    """Reflect a coordinate moving linearly back into [low, high]."""
    span = high - low
    offset = (position - low) % (2 * span)
    return low + (offset if offset <= span else 2 * span - offset)


def _pose(obj: _Object, motion: str, t: int, width: int, height: int) -> tuple[float, float, float]:
    """Centre (x, y) and scale of an object at frame t under a motion pattern."""
    x, y = obj.center
    scale = 1.0
    if motion == "drift":
        x = _bounce(x + obj.velocity[0] * t, 0.1 * width, 0.9 * width)
        y = _bounce(y + obj.velocity[1] * t, 0.1 * height, 0.9 * height)
    elif motion == "orbit":
        angle = obj.phase + obj.speed * t
        x, y = x + obj.radius * math.cos(angle), y + obj.radius * math.sin(angle)
    elif motion == "pulse":
        scale = 1.0 + 0.45 * math.sin(obj.phase + abs(obj.speed) * t)
        x, y = x + 0.3 * obj.velocity[0] * t, y + 0.3 * obj.velocity[1] * t
    elif motion == "swing":
        x = x + 1.3 * obj.radius * math.sin(obj.phase + obj.speed * t)
    else:
        raise ValueError(f"unknown motion pattern {motion!r}")
    return x, y, scale


def _paste(canvas: np.ndarray, ids: np.ndarray, obj: _Object, obj_id: int,
           x: float, y: float, scale: float) -> None:
    """Draw one object (nearest-neighbour texture lookup, hard edge) and mark its pixels."""
    tex_h, tex_w = obj.texture.shape[:2]
    half_h, half_w = tex_h * scale / 2, tex_w * scale / 2
    top, bottom = max(0, int(math.floor(y - half_h))), min(canvas.shape[0], int(math.ceil(y + half_h)))
    left, right = max(0, int(math.floor(x - half_w))), min(canvas.shape[1], int(math.ceil(x + half_w)))
    if top >= bottom or left >= right:
        return
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32) + 0.5
    u, v = (xx - x) / half_w, (yy - y) / half_h  # in [-1, 1] inside the box
    inside = (u * u + v * v <= 1.0) if obj.ellipse else ((np.abs(u) <= 1.0) & (np.abs(v) <= 1.0))
    tex_x = np.clip(((u + 1) / 2 * tex_w).astype(np.int64), 0, tex_w - 1)
    tex_y = np.clip(((v + 1) / 2 * tex_h).astype(np.int64), 0, tex_h - 1)
    region = canvas[top:bottom, left:right]
    region[inside] = obj.texture[tex_y[inside], tex_x[inside]]
    ids[top:bottom, left:right][inside] = obj_id


def render_video(rng: np.random.Generator, motion: str, frames: int, width: int, height: int,
                 objects: int) -> tuple[np.ndarray, np.ndarray]:
    """Render one video: RGB frames [T, H, W, 3] uint8 and object ids [T, H, W] uint8
    (0 = background, k = k-th object, later objects drawn on top)."""
    pan = max(4, min(width, height) // 8)
    background = _texture(rng, height + 2 * pan, width + 2 * pan)
    pan_velocity = rng.uniform(-0.5, 0.5, 2)
    scene = _make_objects(rng, objects, width, height)
    video = np.empty((frames, height, width, 3), np.uint8)
    ids = np.zeros((frames, height, width), np.uint8)
    for t in range(frames):
        # The camera pans slowly over a larger background, bouncing at its edges.
        off_x = int(_bounce(pan + pan_velocity[0] * t, 0, 2 * pan))
        off_y = int(_bounce(pan + pan_velocity[1] * t, 0, 2 * pan))
        video[t] = background[off_y:off_y + height, off_x:off_x + width]
        for obj_id, obj in enumerate(scene, start=1):
            x, y, scale = _pose(obj, motion, t, width, height)
            _paste(video[t], ids[t], obj, obj_id, x, y, scale)
    return video, ids


def encode_video(frames: np.ndarray, fmt: str, codec: str, pix_fmt: str, fps: int = SYNTH_FPS) -> bytes:
    """Encode RGB frames into a container in memory, with bit-exact muxer/encoder settings."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        # One encoder thread: with more, output can vary from run to run.
        stream.options = {"mpeg4": {"qmin": "3", "qmax": "3", "threads": "1"},
                          "libvpx-vp9": {"crf": "24", "b": "0", "deadline": "realtime",
                                         "cpu-used": "8", "row-mt": "0", "threads": "1"},
                          "mjpeg": {"qmin": "3", "qmax": "3", "threads": "1"}}[codec]
        # Convert to the encoder's pixel format here, single-threaded: the implicit conversion
        # inside encode() may slice the work over threads, and its bytes then vary run to run.
        reformatter = VideoReformatter()
        for index, image in enumerate(frames):
            frame = reformatter.reformat(av.VideoFrame.from_ndarray(image, format="rgb24"),
                                         format=pix_fmt, threads=1)
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(data))


def _image_bytes(image: Image.Image, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **save_args)
    return buffer.getvalue()


def parse_size(size) -> tuple[int, int]:
    """(width, height) from (w, h) or "WxH"; ValueError saying what is wrong otherwise."""
    if isinstance(size, str):
        match = re.fullmatch(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*", size)
        if match is None:
            raise ValueError(f"expected WxH such as 160x128, got {size!r}")
        size = (int(match[1]), int(match[2]))
    width, height = int(size[0]), int(size[1])
    if width < 16 or height < 16:
        raise ValueError(f"synthetic video size must be at least 16x16, got {width}x{height}")
    return width, height


def make_synthetic(out, seed: int = 0, videos: int = 24, frames: int = 48, size=(160, 128),
                   objects: int = 3, davis_videos: int = 3, davis_frames: int = 16,
                   davis_size=(160, 96), davis_objects: int = 2) -> dict:
    """Write the synthetic dataset under `out` and return a summary dict
    (`train_dir`, `davis_dir`, `classes`, `videos` (relative paths), `davis_videos`, and
    `reused`: True when `out` already held it).

    `size` / `davis_size` are (width, height) or "WxH". `out/synth.json` records the
    parameters: a complete dataset with the same parameters is reused as is; a directory
    with other parameters or unrelated content is refused (ValueError)."""
    require_av("tcore data synth")
    out = check_output_path(out)
    width, height = parse_size(size)
    davis_width, davis_height = parse_size(davis_size)
    for name, value, low in (("seed", seed, 0), ("videos", videos, 0), ("frames", frames, 1),
                             ("davis_videos", davis_videos, 0), ("davis_frames", davis_frames, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if videos == 0 and davis_videos == 0:
        raise ValueError("videos and davis_videos are both 0: the dataset would be empty")
    params = {"seed": seed, "videos": videos, "frames": frames, "size": [width, height], "objects": objects,
              "davis_videos": davis_videos, "davis_frames": davis_frames,
              "davis_size": [davis_width, davis_height], "davis_objects": davis_objects}
    summary = _summary(out, videos, davis_videos)
    # Reused only when every file is still there: one deleted or emptied since is made again
    # (with the rest: the output is byte-identical for a given seed).
    summary["reused"] = (_reuse_or_refuse(out, params)
                         and _all_files_there(out, summary, davis_frames))
    if summary["reused"]:
        return summary
    make_output_directory(out)
    _write_atomic(out / SYNTH_RECORD, json.dumps({"params": params, "complete": False}).encode())
    for index, relative in enumerate(summary["videos"]):
        motion = MOTION_CLASSES[index % len(MOTION_CLASSES)]
        _, fmt, codec, pix_fmt = CONTAINERS[index % len(CONTAINERS)]
        rng = np.random.default_rng([seed, 0, index])
        video, _ = render_video(rng, motion, frames, width, height, objects)
        _write_atomic(out / relative, encode_video(video, fmt, codec, pix_fmt))

    davis = out / "davis"
    names = summary["davis_videos"]
    palette = davis_palette()
    for index, name in enumerate(names):
        rng = np.random.default_rng([seed, 1, index])
        motion = MOTION_CLASSES[index % len(MOTION_CLASSES)]
        video, ids = render_video(rng, motion, davis_frames, davis_width, davis_height, davis_objects)
        for t in range(davis_frames):
            frame_path, mask_path = _davis_frame_files(davis, name, t)
            _write_atomic(frame_path,
                          _image_bytes(Image.fromarray(video[t]), format="JPEG", quality=95))
            mask = Image.fromarray(ids[t], mode="P")
            mask.putpalette(palette)
            _write_atomic(mask_path, _image_bytes(mask, format="PNG"))
    if davis_videos:
        _write_atomic(_davis_split_file(davis), "".join(f"{name}\n" for name in names).encode())
    _write_atomic(out / SYNTH_RECORD, json.dumps({"params": params, "complete": True}).encode())
    return summary


def _train_path(index: int) -> str:
    motion = MOTION_CLASSES[index % len(MOTION_CLASSES)]
    ext = CONTAINERS[index % len(CONTAINERS)][0]
    return f"train/{motion}/{motion}_{index:03d}.{ext}"


def _summary(out: Path, videos: int, davis_videos: int) -> dict:
    return {"train_dir": str(out / "train"), "davis_dir": str(out / "davis"),
            "classes": sorted({MOTION_CLASSES[i % len(MOTION_CLASSES)] for i in range(videos)}),
            "videos": [_train_path(i) for i in range(videos)],
            "davis_videos": [f"synth{i:02d}" for i in range(davis_videos)]}


def _davis_frame_files(davis: Path, name: str, t: int) -> tuple[Path, Path]:
    """Frame t of a DAVIS-layout video: its JPEG and its palette PNG."""
    return (davis / "JPEGImages" / "480p" / name / f"{t:05d}.jpg",
            davis / "Annotations" / "480p" / name / f"{t:05d}.png")


def _davis_split_file(davis: Path) -> Path:
    return davis / "ImageSets" / "2017" / "val.txt"


def _all_files_there(out: Path, summary: dict, davis_frames: int) -> bool:
    """Every file make_synthetic writes for `summary`, there and not empty."""
    davis = out / "davis"
    paths = [out / relative for relative in summary["videos"]]
    for name in summary["davis_videos"]:
        for t in range(davis_frames):
            paths += _davis_frame_files(davis, name, t)
    if summary["davis_videos"]:
        paths.append(_davis_split_file(davis))
    return all(path.is_file() and path.stat().st_size > 0 for path in paths)


def _reuse_or_refuse(out: Path, params: dict) -> bool:
    """True when `out` already holds a complete dataset made with `params` (it is then
    reused as is); refuses a directory holding other content rather than mixing datasets."""
    record = out / SYNTH_RECORD
    if record.is_file():
        try:
            previous = json.loads(record.read_text())
        except ValueError as err:  # not JSON, or not text
            raise ValueError(f"{record}: not valid JSON ({err}); choose another directory") from err
        if not isinstance(previous, dict) or not isinstance(previous.get("params"), dict):
            raise ValueError(f"{record}: not a synthetic dataset record (no `params` object); "
                             f"choose another directory")
        if previous["params"] != params:
            raise ValueError(f"{out} holds a synthetic dataset made with other options "
                             f"({previous['params']}); choose another directory")
        return previous.get("complete") is True
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no synthetic dataset; choose an empty or new directory")
    return False
