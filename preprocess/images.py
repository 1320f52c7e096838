"""Image samples for `--kind image`: keep the original JPEG bytes when they can be used as
they are, else re-encode."""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from tcore.preprocess.errors import BadInput, check_nonempty_file
from tcore.preprocess.video import output_size


@dataclass
class PreparedImage:
    data: bytes  # JPEG bytes
    width: int
    height: int
    reencoded: bool
    source_width: int
    source_height: int


EXIF_ORIENTATION = 0x0112


def _without_exif(raw: bytes) -> bytes | None:
    """The JPEG with its Exif APP1 segment(s) left out, every other byte (the compressed
    pixels included) unchanged; None when its header cannot be walked."""
    if raw[:2] != b"\xff\xd8":
        return None
    parts, pos = [raw[:2]], 2
    while pos + 4 <= len(raw) and raw[pos] == 0xFF:
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xDA:  # start of scan: the rest is image data
            parts.append(raw[pos:])
            return b"".join(parts)
        else:
            end = pos + 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")
            if end <= pos + 3 or end > len(raw):
                return None
            if not (marker == 0xE1 and raw[pos + 4:pos + 10] == b"Exif\x00\x00"):
                parts.append(raw[pos:end])
            pos = end
    return None


def _eight_bit(image: Image.Image) -> Image.Image:
    """Grey images of more than 8 bits scaled to 8 (Pillow's convert would clip them at 255,
    a white image): integer modes (16-bit PNG/TIFF) from 0..65535, float mode from 0..1."""
    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    values = np.asarray(image, dtype=np.float64)
    values = values * 255 if image.mode == "F" else values / 257
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def prepare_image(path: str, short_side: int, quality: int = 90, allow_upscale: bool = False) -> PreparedImage:
    """JPEG bytes of an image. The original file is kept when it is a baseline-decodable
    RGB/grey JPEG whose short side is already within `short_side` (0 = no limit), less any
    Exif block with an orientation tag; anything else (PNG, CMYK, too large, ...) is decoded,
    resized to the short side and re-encoded. Pixels are stored as PIL reads them, never
    rotated by the EXIF orientation."""
    check_nonempty_file(path)
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # decode fully: truncated files fail here
            source_format, mode = image.format, image.mode
            width, height = image.size
            target = output_size(width, height, short_side, allow_upscale) if short_side > 0 else (width, height)
            fits = short_side <= 0 or min(width, height) <= short_side
            keep = source_format == "JPEG" and mode in ("RGB", "L") and fits and not allow_upscale
            if keep and image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                # DALI's decoder applies the orientation tag, PIL (the reference) does not:
                # drop the tag so both see the stored pixels; re-encode if that fails.
                raw = _without_exif(raw)
                keep = raw is not None
            if keep:
                return PreparedImage(raw, width, height, False, width, height)
            if short_side <= 0 or (not fits) or allow_upscale:
                size_out = target
            else:
                size_out = (width, height)
            rgb = _eight_bit(image).convert("RGB")
            if size_out != (width, height):
                rgb = rgb.resize(size_out, Image.BICUBIC, reducing_gap=3.0)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"not a decodable image ({err})") from err
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return PreparedImage(buffer.getvalue(), rgb.width, rgb.height, True, width, height)
