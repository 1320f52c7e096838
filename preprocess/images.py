"""Image samples for `--kind image`: keep the original JPEG bytes when they can be used as
they are, else re-encode."""
from __future__ import annotations

import io
from dataclasses import dataclass

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


def prepare_image(path: str, short_side: int, quality: int = 90, allow_upscale: bool = False) -> PreparedImage:
    """JPEG bytes of an image. The original file is kept when it is a baseline-decodable
    RGB/grey JPEG whose short side is already within `short_side` (0 = no limit); anything
    else (PNG, CMYK, too large, ...) is decoded, resized to the short side and re-encoded."""
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
            if source_format == "JPEG" and mode in ("RGB", "L") and fits and not allow_upscale:
                return PreparedImage(raw, width, height, False, width, height)
            if short_side <= 0 or (not fits) or allow_upscale:
                size_out = target
            else:
                size_out = (width, height)
            rgb = image.convert("RGB")
            if size_out != (width, height):
                rgb = rgb.resize(size_out, Image.BICUBIC, reducing_gap=3.0)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadInput(f"not a decodable image ({err})") from err
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=quality)
    return PreparedImage(buffer.getvalue(), rgb.width, rgb.height, True, width, height)
