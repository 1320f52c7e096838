"""The colour stage's Gaussian blur on CUDA as two small Triton kernels (rows, then columns).

Why: on an H200 (docs/PERFORMANCE.md, "The third H200 run") the blur was 3.15 ms of the
colour stage's 10.6 ms of device time a batch of 64, the step's own kernels waiting behind
it: each pass a generic depthwise convolution (281 us) over a reflection-padded copy (113 us)
for a 9-tap filter. Here each pass reads its input once, reflects indices instead of padding,
and writes its output once; the arithmetic is the convolution's (float32 taps, float32
between the passes, rounded to nearest-even into uint8), so the pixels are the same up to
float32 rounding of the sums: a level at a rounding edge, rarely (tested against the
convolution path on the CPU under Triton's interpreter, and on CUDA).
"""
from __future__ import annotations

import functools

import torch

# A tile of BLOCK_ROWS x BLOCK_COLS output pixels per program: wide along the row, where
# consecutive pixels are consecutive bytes.
BLOCK_ROWS = 8
BLOCK_COLS = 64


def fits(x: torch.Tensor, size: int) -> bool:
    """Whether the reflected borders are defined: a radius below both sides (as F.pad's
    reflect mode also requires)."""
    radius = size // 2
    return x.dim() == 4 and x.shape[-2] > radius and x.shape[-1] > radius


@functools.cache
def available() -> bool:
    """Whether Triton imports (torch's CUDA builds ship it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def separable_blur(x: torch.Tensor, taps: torch.Tensor,
                   switched_on: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, C, H, W] blurred with per-crop taps [N, size] float32 (odd size): rows pass,
    then columns pass, reflect-101 borders; uint8 out. `switched_on` (bool [N], None: all):
    the crops to blur; the others come out as they went in, and neither pass reads or writes
    their blurred pixels (the colour stage blurs half its local crops, say). `fits(x, size)`
    must hold. Runs on the tensors' device (CUDA; the CPU only under TRITON_INTERPRET=1, for
    the tests)."""
    import triton

    n, channels, height, width = x.shape
    size = taps.shape[1]
    x = x.contiguous()
    taps = taps.to(torch.float32).contiguous()
    if switched_on is None:
        switched_on = torch.ones(n, dtype=torch.bool, device=x.device)
    switched_on = switched_on.to(torch.int8).contiguous()   # a byte per crop, as Triton loads it
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    between = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    grid = (n * channels, triton.cdiv(height, BLOCK_ROWS), triton.cdiv(width, BLOCK_COLS))
    kernel = _kernel()
    for src, dst, along_rows, to_bytes in ((x, between, True, False),
                                           (between, out, False, True)):
        kernel[grid](src, x, dst, taps, switched_on, height, width, channels, SIZE=size,
                     ALONG_ROWS=along_rows, TO_BYTES=to_bytes, BLOCK_ROWS=BLOCK_ROWS,
                     BLOCK_COLS=BLOCK_COLS)
    return out


@functools.cache
def _kernel():
    """The Triton kernel, defined at its first use: importing Triton costs start-up time that
    CPU runs never need."""
    import triton
    import triton.language as tl

    @triton.jit
    def blur_pass(src, original, dst, taps, switched_on, height, width, channels,
                  SIZE: tl.constexpr, ALONG_ROWS: tl.constexpr, TO_BYTES: tl.constexpr,
                  BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
        plane = tl.program_id(0)                  # crop * channels + channel
        crop = plane // channels
        rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
        cols = tl.program_id(2) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)[None, :]
        inside = (rows < height) & (cols < width)
        switch = tl.load(switched_on + crop)
        blurred = switch != 0
        # A crop switched off: masked loads and stores, so no memory is touched for it
        # except, in the last pass, its own pixels copied through.
        blurring = inside & blurred
        base = plane.to(tl.int64) * height * width
        total = tl.zeros((BLOCK_ROWS, BLOCK_COLS), dtype=tl.float32)
        for k in tl.static_range(SIZE):
            weight = tl.load(taps + crop * SIZE + k)
            if ALONG_ROWS:
                at = rows + (k - SIZE // 2)
                at = tl.where(at < 0, -at, at)                          # reflect-101
                at = tl.where(at > height - 1, 2 * (height - 1) - at, at)
                offsets = at * width + cols
            else:
                at = cols + (k - SIZE // 2)
                at = tl.where(at < 0, -at, at)
                at = tl.where(at > width - 1, 2 * (width - 1) - at, at)
                offsets = rows * width + at
            value = tl.load(src + base + offsets, mask=blurring, other=0).to(tl.float32)
            total += weight * value
        here = base + rows * width + cols
        if TO_BYTES:
            # Round half to even (torch.round's rule), then clamp into a byte. Exact in
            # float32: the sums are far below 2^23.
            low = tl.floor(total)
            frac = total - low
            low_is_odd = (low - 2.0 * tl.floor(low * 0.5)) != 0.0
            rounded = tl.where((frac > 0.5) | ((frac == 0.5) & low_is_odd), low + 1.0, low)
            result = tl.minimum(tl.maximum(rounded, 0.0), 255.0).to(tl.uint8)
            unchanged = tl.load(original + here, mask=inside & (switch == 0), other=0)
            tl.store(dst + here, tl.where(blurred, result, unchanged), mask=inside)
        else:
            tl.store(dst + here, total, mask=blurring)

    return blur_pass
