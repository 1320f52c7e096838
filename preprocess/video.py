"""Read T uniformly spaced frames from a video and encode them as one clip.

Frame choice: `round(linspace(0, n-1, T))` over the n decoded frames (numpy rounding, half to
even), so a video with fewer than T frames repeats frames. n is first counted from the
demuxed packets (cheap, no decoding); if decoding yields a different number of frames the
selection is redone with the true count.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
try:  # PyAV reads and writes source videos; a GPU machine that only trains may lack it
    import av
    from av.video.frame import PictureType
    from av.video.reformatter import ColorRange, Colorspace, VideoReformatter
except ImportError:
    av = None

from tcore.preprocess.errors import BadInput, check_nonempty_file


def require_av(what: str) -> None:
    """Fail clearly, before any work, where PyAV is missing (the GPU machines lack it)."""
    if av is None:
        raise ModuleNotFoundError(f"{what} needs PyAV (the `av` package) to read and write videos, "
                           "and it is not installed: `pip install av`, or build on a machine "
                           "that has it and copy the output", name="av")

# codec name -> (container format, file extension / manifest clip_ext, encoder)
# MJPEG goes in Matroska: DALI's CPU video decoder reads it from mkv (tested in
# tests/test_preprocess_dali.py).
VIDEO_CODECS = {
    "vp9": ("webm", "webm", "libvpx-vp9"),
    "h264": ("mp4", "mp4", "libx264"),
    "mjpeg": ("matroska", "mkv", "mjpeg"),
}
# Not a clip: the T frames as separate JPEG images ("jpegs", one component holding them
# back to back, their sizes in the sample's json): the loader decodes only the three it
# draws, with nvJPEG on a GPU, instead of a clip from its start.
FRAME_CODECS = ("jpegs",)
DEFAULT_CRF = {"vp9": 30, "h264": 23}
CLIP_FPS = 10  # nominal rate of the stored clips; the loader indexes frames, not times
CLIP_TIME_BASE = Fraction(1, CLIP_FPS)
VP9_SPEED = 8  # libvpx cpu-used in realtime mode (0..8); 8 is ~2x faster than 6 at -0.1 dB PSNR


@dataclass
class Clip:
    frames: list  # T av.VideoFrame, already resized, yuv420p
    width: int
    height: int
    source_fps: float
    source_duration: float
    source_frames: int
    frame_indices: list[int]


def uniform_indices(n: int, t: int) -> list[int]:
    """T frame indices spread uniformly over n frames (repeats when n < T)."""
    return [int(i) for i in np.round(np.linspace(0, n - 1, t))]


def output_size(width: int, height: int, short_side: int, allow_upscale: bool = False) -> tuple[int, int]:
    """Size with the short side at `short_side` (aspect kept, both sides even, rounded down).
    The source is never enlarged unless `allow_upscale`; `short_side` 0 keeps its size."""
    short = min(width, height)
    target = short if short_side <= 0 or (short_side > short and not allow_upscale) else short_side
    scale = target / short
    # Round down to even sizes (yuv420p needs them), so the source is never exceeded.
    return max(2, int(width * scale + 1e-6) // 2 * 2), max(2, int(height * scale + 1e-6) // 2 * 2)


# AVColorSpace values swscale converts from; others (unspecified, ...) are taken as BT.601.
_KNOWN_COLORSPACES = {1, 4, 5, 6, 7, 9}


def _resize(frame, width: int, height: int):
    """Resize to limited-range BT.601 yuv420p, the input every encoder gets.

    Full-range sources (MJPEG's yuvj420p) must be converted explicitly: relabelling them
    as yuv420p would brighten and wash out the clip."""
    full_range = frame.color_range == ColorRange.JPEG or frame.format.name.startswith("yuvj")
    source_space = frame.colorspace if frame.colorspace in _KNOWN_COLORSPACES else None
    out = VideoReformatter().reformat(
        frame, width, height, format="yuv420p", interpolation="AREA", threads=1,
        src_color_range=ColorRange.JPEG if full_range else ColorRange.MPEG,
        dst_color_range=ColorRange.MPEG, src_colorspace=source_space, dst_colorspace=Colorspace.ITU601)
    out.color_range = ColorRange.MPEG
    return out


# FFmpeg demuxers that turn text into video frames (ANSI art, subtitles drawn as pictures).
TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})


def _is_image_demuxer(name: str) -> bool:
    """FFmpeg's image-file demuxers: image2, image2pipe and the `<codec>_pipe` family."""
    return any(part in ("image2", "image2pipe") or part.endswith("_pipe") for part in name.split(","))


def _open(path: str):
    check_nonempty_file(path)
    try:
        container = av.open(path, mode="r")
    except EOFError as err:
        raise BadInput("container ends right after its header: no video data (zero frames or truncated)") from err
    except av.FFmpegError as err:
        # FFmpeg's reason without the path it appends (failures.jsonl names the source).
        reason = getattr(err, "strerror", None) or str(err)
        hint = ("; a file cut off before its index, or not a video"
                if isinstance(err, av.InvalidDataError) else "")
        raise BadInput(f"not a readable video container (FFmpeg: {reason}{hint})") from err
    if _is_image_demuxer(container.format.name):
        # FFmpeg reads a still image (whatever its file name) as a one-frame "video";
        # it would become a clip of T identical frames.
        name = container.format.name
        container.close()
        raise BadInput(f"not a video: a still image (FFmpeg reads it with the {name} image "
                       "demuxer; folders of images are built with --kind image)")
    if container.format.name in TEXT_DEMUXERS:
        # FFmpeg's fallback for text it cannot place: a README.txt or a list of paths would
        # become a "video" of terminal text.
        name = container.format.name
        container.close()
        raise BadInput(f"not a video: text (FFmpeg reads it with its {name} demuxer, which "
                       "renders text files as video)")
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams})
        container.close()
        if not kinds:
            raise BadInput("container holds no streams (empty or zero-frame file)")
        raise BadInput(f"no video stream (streams: {', '.join(kinds)}; audio-only or not a video)")
    return container


def _count_packets(path: str) -> int:
    """The video stream's packets that hold data (after checking that the stream has all the
    packets its header declares)."""
    with _open(path) as container:
        stream = container.streams.video[0]
        declared = stream.frames or 0        # 0 where the container does not say (Matroska)
        packets = with_data = 0
        try:
            for packet in container.demux(stream):
                if packet.size == 0 and packet.dts is None:
                    continue                 # the end-of-stream packet PyAV adds
                packets += 1
                with_data += bool(packet.size)
        except av.FFmpegError as err:
            raise BadInput(f"corrupt or truncated video while demuxing: {err}") from err
    _check_all_packets_there(packets, declared)
    return with_data


def _check_all_packets_there(packets: int, declared: int) -> None:
    """A cut-off AVI still demuxes and decodes cleanly up to the cut, and FFmpeg takes its
    duration from what it found, not from the header, so the duration check cannot see it;
    the header's frame count (AVI's dwLength, MP4's sample count) can. Empty packets count:
    AVI marks a repeated frame with one. Tolerance as for durations: 5%, at least 3."""
    if declared and packets < declared - max(3, 0.05 * declared):
        raise BadInput(f"truncated video: {packets} of the {declared} frames its header "
                       "declares")


def _decode_selected(path: str, indices: list[int], short_side: int, allow_upscale: bool):
    """Decode the whole stream, keeping the (resized) frames at `indices`; returns
    (kept frames by index, decoded frame count, size, fps, duration)."""
    wanted = set(indices)
    kept = {}
    count = 0
    size = None
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        # The video stream's own duration when the container has one (mp4), counted from
        # the stream's start; in Matroska (webm/mkv) the track's DURATION tag FFmpeg writes,
        # counted from time 0; else the container's, which also spans other streams (an
        # audio track longer than the video) and, in Matroska, counts from time 0 too.
        own_duration = stream.duration is not None and stream.time_base is not None
        tagged = None if own_duration else matroska_track_duration(stream)
        origin = 0.0
        if own_duration:
            duration = float(stream.duration * stream.time_base)
            if stream.start_time is not None:
                origin = float(stream.start_time * stream.time_base)
        elif tagged is not None:
            duration, own_duration = tagged, True
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        shared_duration = not own_duration and len(container.streams) > 1
        last_time = None
        try:
            for frame in container.decode(stream):
                if size is None:
                    size = output_size(frame.width, frame.height, short_side, allow_upscale)
                if count in wanted:
                    kept[count] = _resize(frame, *size)
                if frame.time is not None:
                    last_time = frame.time if last_time is None else max(last_time, frame.time)
                count += 1
        except av.FFmpegError as err:
            raise BadInput(f"corrupt or truncated video: decoding failed after {count} frames ({err})") from err
    if count and last_time is not None and duration > 0 and fps > 0:
        _check_not_truncated(last_time - origin + 1 / fps, duration, fps, shared_duration)
    return kept, count, size, fps, duration


def matroska_track_duration(stream) -> float | None:
    """Seconds of a Matroska track's DURATION tag ("00:00:10.000000000", written by FFmpeg's
    muxer, so by most downloaders), or None where there is none or it does not parse. Not
    mkvmerge's DURATION-eng: FFmpeg copies that from a source it re-muxes, stale."""
    text = (stream.metadata or {}).get("DURATION")
    try:
        hours, minutes, seconds = str(text).split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None


def _check_not_truncated(end_seconds: float, declared_seconds: float, fps: float,
                         shared_duration: bool) -> None:
    """A cut-off file (e.g. a partial download of a WebM) often still demuxes and decodes
    cleanly up to the cut; its header's duration gives it away. `end_seconds` is where the
    last frame ends, counted from the same origin as the declared duration. Tolerance: 5%
    (at least 3 frames); 10% (at least 1 s) when the declared duration also covers other
    streams, whose audio track may run a little longer than the video."""
    tolerance = max(1.0, 0.1 * declared_seconds) if shared_duration else max(3 / fps, 0.05 * declared_seconds)
    if end_seconds < declared_seconds - tolerance:
        raise BadInput(f"truncated video: frames end at {end_seconds:.2f} s of the "
                       f"{declared_seconds:.2f} s the container declares")


def read_clip(path: str, frames: int, short_side: int, allow_upscale: bool = False) -> Clip:
    """The T uniformly spaced frames of a video, resized; raises BadInput with a readable
    reason for anything that is not a decodable video."""
    estimate = _count_packets(path)
    if estimate == 0:
        raise BadInput("video stream has no frames")
    indices = uniform_indices(estimate, frames)
    kept, count, size, fps, duration = _decode_selected(path, indices, short_side, allow_upscale)
    if count == 0:
        raise BadInput("no decodable frames in the video stream")
    if count != estimate:
        # Packet count and decoded frames disagree (dropped or hidden frames): choose again
        # with the decoded count so the spacing is exactly uniform.
        indices = uniform_indices(count, frames)
        kept, count2, size, fps, duration = _decode_selected(path, indices, short_side, allow_upscale)
        if count2 != count:
            raise BadInput(f"decoding is not repeatable ({count} then {count2} frames)")
    return Clip([kept[i] for i in indices], size[0], size[1], fps, duration, count, indices)


def mjpeg_qscale(quality: int) -> int:
    """Map a JPEG-style quality (1..100, higher is better) to MJPEG's qscale (2..31)."""
    return int(np.clip(round(2 + (100 - quality) * 29 / 99), 2, 31))


def encode_clip(frames: list, codec: str, gop: int, crf: int | None = None, quality: int = 90,
                vp9_speed: int = VP9_SPEED) -> bytes:
    """Encode frames (yuv420p av.VideoFrame, equal sizes) as one clip in memory.

    Settings are bit-exact and single-threaded so the same frames give the same bytes."""
    if codec not in VIDEO_CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(VIDEO_CODECS)}")
    fmt, _, encoder = VIDEO_CODECS[codec]
    crf = DEFAULT_CRF.get(codec) if crf is None else crf
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt, options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=CLIP_FPS)
        stream.width, stream.height = frames[0].width, frames[0].height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        stream.codec_context.gop_size = gop
        # Tag what _resize produced (BT.601; limited range, full range for MJPEG) so that
        # decoders need not guess.
        stream.codec_context.colorspace = Colorspace.ITU601
        stream.codec_context.color_range = ColorRange.JPEG if codec == "mjpeg" else ColorRange.MPEG
        if codec == "vp9":
            # No alt-ref (hidden) frames: every packet is one shown frame, which keeps frame
            # counting and seeking simple for the loader's decoder.
            # Realtime mode is ~8x faster than "good" at similar size on short clips; it is
            # deterministic as long as every frame carries the same pts and time base.
            stream.options = {"crf": str(crf), "b": "0", "deadline": "realtime", "cpu-used": str(vp9_speed),
                              "auto-alt-ref": "0", "lag-in-frames": "0", "row-mt": "0",
                              "threads": "1", "g": str(gop), "keyint_min": str(gop)}
        elif codec == "h264":
            stream.options = {"crf": str(crf), "preset": "veryfast", "bf": "0", "threads": "1",
                              "g": str(gop), "keyint_min": str(gop), "sc_threshold": "0"}
        else:
            # Fixed quantiser through the rate control's bounds (the qscale flag would need a
            # per-frame quality that PyAV does not expose).
            qscale = str(mjpeg_qscale(quality))
            stream.options = {"qmin": qscale, "qmax": qscale, "threads": "1"}
        for index, frame in enumerate(frames):
            if codec == "mjpeg":
                frame = _full_range(frame)
            # A decoded frame keeps its picture type; an "I" would force a keyframe.
            frame.pict_type = PictureType.NONE
            frame.pts = index
            frame.time_base = CLIP_TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _full_range(frame):
    """yuv420p (limited range, as _resize makes it) -> yuvj420p, the range JPEG uses."""
    frame = VideoReformatter().reformat(frame, format="yuvj420p", threads=1,
                                        src_color_range=ColorRange.MPEG,
                                        dst_color_range=ColorRange.JPEG)
    frame.color_range = ColorRange.JPEG
    return frame


def encode_jpeg_frames(frames: list, quality: int = 90) -> list[bytes]:
    """Each frame (yuv420p av.VideoFrame) as a standalone baseline JPEG (FFmpeg's MJPEG
    encoder: 4:2:0, full range, the MJPEG path's fixed quantiser), deterministic bytes."""
    context = av.CodecContext.create("mjpeg", "w")
    context.width, context.height = frames[0].width, frames[0].height
    context.pix_fmt = "yuvj420p"
    context.time_base = CLIP_TIME_BASE
    context.color_range = ColorRange.JPEG
    context.flags |= av.codec.context.Flags.bitexact
    qscale = str(mjpeg_qscale(quality))
    context.options = {"qmin": qscale, "qmax": qscale, "threads": "1"}
    images = []
    for index, frame in enumerate(frames):
        frame = _full_range(frame)
        frame.pict_type = PictureType.NONE
        frame.pts = index
        frame.time_base = CLIP_TIME_BASE
        images.extend(bytes(packet) for packet in context.encode(frame))
    images.extend(bytes(packet) for packet in context.encode(None))
    if len(images) != len(frames):
        raise RuntimeError(f"JPEG encoder gave {len(images)} images for {len(frames)} frames")
    return images


def split_jpeg_frames(data: bytes, sizes) -> list[bytes]:
    """The JPEG images of a "jpegs" component, from the byte sizes in the sample's json."""
    if not all(type(s) is int and s > 0 for s in sizes):
        raise BadInput(f"frame sizes {sizes!r} are not positive integers")
    if sum(sizes) != len(data):
        raise BadInput(f"frame sizes add up to {sum(sizes)} bytes, the component has {len(data)}")
    bounds = np.cumsum([0, *sizes])
    return [data[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def probe_clip(data: bytes) -> tuple[int, int, int]:
    """(frame count, width, height) of an encoded clip, decoding every frame; raises
    BadInput when it does not decode."""
    if not data:
        raise BadInput("empty clip")
    count, width, height = 0, 0, 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            if not container.streams.video:
                raise BadInput("clip holds no video stream")
            for frame in container.decode(video=0):
                count += 1
                width, height = frame.width, frame.height
    except av.FFmpegError as err:
        raise BadInput(f"clip does not decode after {count} frames ({err})") from err
    return count, width, height
