"""The colour stage of the views (jitter -> grayscale -> blur -> solarize -> normalise) in
torch, on a whole batch of crops at once: the path of `views.color_jitter = "torchvision"`
(`PipelineConfig.photometric`).

Why: in DALI that exact jitter is ~250 operators per view (PIL's 8-bit HSV hue shift, its
blends), and the GPU graph of 14 views came to 3,613 operators. On an H100 the graph ran at
~85 samples/s against ~700 with the fast jitter (docs/PERFORMANCE.md): the cost is DALI's per
operator overhead, not arithmetic. Here each step is one fused kernel over every crop of a
size (the crops that drew it, chosen on the host), so the cost is a few dozen launches a
batch; on the CPU the compiled steps also beat the DALI graph (35 against 20 samples/s).
`apply_photometric(dense=True)` instead runs the whole stage on every crop as one graph
(`colour_stage`, per-crop `torch.where`): for CUDA, where the Python calls and launches of the
subset path are the cost and compute is spare; on the CPU, where compute is the cost, the
subset path is cheaper. Both give the same pixels. On the CPU the hue shift (PIL's 8-bit HSV
round trip) goes through lookup tables built once from the same arithmetic
(`pil_hsv_tables`): per pixel that arithmetic was most of the stage's CPU time. The dense
stage reads the RGB -> HSV half from tables too (`pil_hue_shift_hsv_tables`), since that
half's exact float32 divisions would run as eager passes inside its graph.

Inputs are the views stage B cut (uint8, flipped, [N, 3, S, S]) and the per-view rows,
switches and blur windows of `views.view_rows`, the same numbers the DALI graph is fed, and
the arithmetic is the graph's (`views._pil_enhance`, `views.pil_hue_shift`): float32 /
float64 exactly where it is, so the pixels are PIL's. The blur is DALI's gaussian_blur
(separable, float32, reflect-101 borders, rounded to nearest); a pixel may differ from it by
one level at a rounding edge (the flip comes before the blur here, after it in the graph).
"""
from __future__ import annotations

import functools
import typing
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from tcore.pipelines import triton_blur
from tcore.pipelines.config import ViewConfig
from tcore.pipelines.views import JITTER_HUE_SHIFT, JITTER_SLOTS, SW
from tcore.preprocess.errors import TcoreWarning

_LUMA_WEIGHTS = (19595, 38470, 7471)   # PIL's convert("L"), see views._PIL_LUMA_M


def pil_luma(x: torch.Tensor) -> torch.Tensor:
    """PIL's integer luma of uint8 [N, 3, H, W] as int32 [N, 1, H, W]."""
    x = x.to(torch.int32)
    wr, wg, wb = _LUMA_WEIGHTS
    return (wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3] + 32768) >> 16


def pil_enhance(x: torch.Tensor, alpha: torch.Tensor, with_luma: torch.Tensor,
                with_mean: torch.Tensor) -> torch.Tensor:
    """PIL's ImageEnhance blend (brightness, contrast or saturation), per crop:
    floor(base + alpha (x - base)) in float32, clamped to uint8; base = with_luma * L +
    with_mean * round(mean L) with per-crop 0/1 weights (`views._pil_enhance`)."""
    luma = pil_luma(x)
    pixels = luma.shape[-2] * luma.shape[-1]
    total = luma.sum(dim=(1, 2, 3), dtype=torch.int64)
    # int(mean + 0.5) as integers: a compiler may turn a division by a constant into a
    # multiply by its reciprocal, which would move ties.
    mean = ((2 * total + pixels) // (2 * pixels)).to(torch.float32)
    view = (-1, 1, 1, 1)
    base = (with_luma.view(view) * luma.to(torch.float32)
            + with_mean.view(view) * mean.view(view))
    xf = x.to(torch.float32)
    out = torch.floor(base + alpha.view(view) * (xf - base))
    return out.clamp_(0, 255).to(torch.uint8)


# Two float32 results PIL relies on, computed by opaque operators that run eagerly inside
# compiled graphs, where a compiler could change them:
# - a float64 value rounded to float32 and read again as float64: torch 2.11's Inductor (on
#   the CPU, seen here) drops such a round trip as a no-op, which moved 0.16% of hue-shifted
#   pixels by up to 6 levels;
# - float32 division on CUDA: Triton's is approximate (div.full.f32), torch's eager kernel is
#   IEEE's. On the CPU compiled float32 division already is IEEE's, and stays fused.
@torch.library.custom_op("tcore::float32_rounded", mutates_args=())
def _float32_rounded(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


@_float32_rounded.register_fake
def _float32_rounded_shape(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.float32)


@torch.library.custom_op("tcore::float32_quotient", mutates_args=())
def _float32_quotient(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a / b


@_float32_quotient.register_fake
def _float32_quotient_shape(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(a)


def _f32_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The IEEE float32 quotient of float32 tensors of the same shape, compiled or not."""
    if a.device.type != "cuda":
        return a / b
    return _float32_quotient(a, b)


def pil_hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's adjust_hue on PIL images, per crop (uint8 [N, 3, H, W]; `shift` [N] the
    8-bit shift of `views.jitter_columns`): the arithmetic of `views.pil_hue_shift`."""
    hue, sat, v = _pil_rgb_to_hsv(x)
    hue = hue + shift.to(torch.float64).view(-1, 1, 1)
    hue = hue - (hue >= 256.0).to(torch.float64) * 256.0
    # Each channel to uint8 before stacking: the compiled kernel then writes bytes, not a
    # float64 stack that a second pass converts (3x8 bytes a pixel written and read again).
    return torch.stack([c.to(torch.uint8) for c in _pil_hsv_to_rgb(hue, sat, v)], dim=1)


def _pil_rgb_to_hsv(x: torch.Tensor):
    """PIL's RGB -> HSV of uint8 [N, 3, H, W]: float64 8-bit hue and saturation, float32 v
    (all integer valued), [N, H, W] each."""
    f32, f64 = torch.float32, torch.float64
    xf = x.to(f32)
    r, g, b = xf[:, 0], xf[:, 1], xf[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    cr = torch.clamp(chroma, min=1.0)
    rc, gc, bc = _f32_divide(v - r, cr), _f32_divide(v - g, cr), _f32_divide(v - b, cr)
    is_r = r == v
    is_g = (~is_r) & (g == v)
    rc64, gc64, bc64 = rc.to(f64), gc.to(f64), bc.to(f64)
    h = torch.where(is_r, bc - gc,
                    torch.where(is_g, (rc64 + 2.0 - bc64).to(f32), (gc64 + 4.0 - rc64).to(f32)))
    y = h.to(f64) / 6.0 + 1.0
    h = _float32_rounded(y - (y >= 1.0).to(f64)).to(f64)
    hue = torch.floor(h * 255.0)
    sat = torch.floor(_f32_divide(chroma, torch.clamp(v, min=1.0)).to(f64) * 255.0)
    return hue, sat, v


def _pil_hsv_to_rgb(hue: torch.Tensor, sat: torch.Tensor, v: torch.Tensor):
    """PIL's HSV -> RGB of 8-bit h, s, v (any float dtype; integer values): float64
    (red, green, blue), integer valued."""
    f32, f64 = torch.float32, torch.float64
    hue, sat, v64 = hue.to(f64), sat.to(f64), v.to(f64)
    h6 = hue * 6.0 / 255.0
    i = torch.floor(h6)
    fs = ((h6 - i).to(f32) * sat.to(f32)).to(f64)
    p = torch.floor(v64 * (255.0 - sat) / 255.0 + 0.5)
    q = torch.floor(v64 * (255.0 - fs) / 255.0 + 0.5)
    t = torch.floor(v64 * (255.0 - sat + fs) / 255.0 + 0.5)
    sector = torch.remainder(i, 6.0)           # H = 255 gives i = 6, i.e. sector 0
    s0, s1, s2, s3, s4, s5 = (sector == k for k in range(6))
    # (red, green, blue) by sector: v t p / q v p / p v t / p q v / t p v / v p q
    red = torch.where(s0 | s5, v64, torch.where(s1, q, torch.where(s4, t, p)))
    green = torch.where(s1 | s2, v64, torch.where(s0, t, torch.where(s3, q, p)))
    blue = torch.where(s3 | s4, v64, torch.where(s2, t, torch.where(s5, q, p)))
    return red, green, blue


@functools.cache
def pil_rgb_to_hsv_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's 8-bit RGB -> HSV as lookup tables (CPU, built once a process), each entry
    computed by `_pil_rgb_to_hsv` itself, so the values are its own:
    - hue [3 * 256 * 256] uint8 by (which channel is the maximum: r, g or b, in PIL's order
      of precedence; v minus the first other channel; v minus the second), the other
      channels being (g, b) for r, (r, b) for g, (g, r) for b: PIL's hue depends on
      nothing else, so one colour per entry gives it (entries no colour reaches hold
      whatever their colour gives, and are never read);
    - sat [256 * 256] uint8 by (chroma, v), likewise from one colour (v, v - chroma,
      v - chroma) each."""
    first = torch.arange(256, dtype=torch.int32).view(256, 1).expand(256, 256)
    second = torch.arange(256, dtype=torch.int32).view(1, 256).expand(256, 256)
    top = torch.full_like(first, 255)
    by_max = torch.stack([torch.stack([top, 255 - first, 255 - second]),     # r max
                          torch.stack([255 - first, top, 255 - second]),     # g max
                          torch.stack([255 - second, 255 - first, top])])    # b max
    hue = _pil_rgb_to_hsv(by_max.to(torch.uint8))[0].to(torch.uint8)
    chroma, value = first, second
    rest = torch.clamp(value - chroma, min=0)
    sat = _pil_rgb_to_hsv(torch.stack([value, rest, rest])[None].to(torch.uint8))[1]
    return hue.reshape(-1), sat.to(torch.uint8).reshape(-1)


@functools.cache
def pil_hsv_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PIL's 8-bit HSV conversions both ways as lookup tables (CPU, built once a process:
    ~0.5 s, 64 MB), so the pixels are `pil_hue_shift`'s: hue and sat as in
    `pil_rgb_to_hsv_tables`, and rgb [256^3] int32 by (h, s, v): red << 16 | green << 8 |
    blue, each entry computed by `_pil_hsv_to_rgb`."""
    rgb = torch.empty(256, 256 * 256, dtype=torch.int32)
    s_values = torch.arange(256, dtype=torch.float64).repeat_interleave(256)
    v_values = torch.arange(256, dtype=torch.float64).repeat(256)
    for h_value in range(256):       # a hue at a time: small temporaries
        red, green, blue = (c.to(torch.int32) for c in _pil_hsv_to_rgb(
            torch.full_like(s_values, h_value), s_values, v_values))
        rgb[h_value] = (red << 16) | (green << 8) | blue
    return (*pil_rgb_to_hsv_tables(), rgb.reshape(-1))


def _hsv_by_tables(x: torch.Tensor, hue_table: torch.Tensor, sat_table: torch.Tensor):
    """PIL's 8-bit hue, saturation and value of uint8 [N, 3, H, W] read from
    `pil_rgb_to_hsv_tables`: int32 [N, H, W] each."""
    xi = x.to(torch.int32)
    r, g, b = xi[:, 0], xi[:, 1], xi[:, 2]
    v = torch.maximum(torch.maximum(r, g), b)
    is_r = r == v
    is_g = (~is_r) & (g == v)
    case = torch.where(is_r, 0, torch.where(is_g, 1, 2))
    first = v - torch.where(is_g, r, g)
    second = v - torch.where(is_r | is_g, b, r)
    hue = hue_table[(case * 65536 + first * 256 + second).long()].to(torch.int32)
    chroma = v - torch.minimum(torch.minimum(r, g), b)
    sat = sat_table[(chroma * 256 + v).long()].to(torch.int32)
    return hue, sat, v


def pil_hue_shift_tables(x: torch.Tensor, shift: torch.Tensor, hue_table: torch.Tensor,
                         sat_table: torch.Tensor, rgb_table: torch.Tensor) -> torch.Tensor:
    """`pil_hue_shift` through `pil_hsv_tables` (the same pixels, 3-4x faster on the CPU:
    the float64 arithmetic is done once per possible input, not once per pixel)."""
    hue, sat, v = _hsv_by_tables(x, hue_table, sat_table)
    hue = (hue + shift.to(torch.int32).view(-1, 1, 1)) & 255
    rgb = rgb_table[((hue << 16) | (sat << 8) | v).long()]
    return torch.stack([((rgb >> bits) & 255).to(torch.uint8) for bits in (16, 8, 0)], dim=1)


def pil_hue_shift_hsv_tables(x: torch.Tensor, shift: torch.Tensor, hue_table: torch.Tensor,
                             sat_table: torch.Tensor) -> torch.Tensor:
    """`pil_hue_shift` with the RGB -> HSV half read from `pil_rgb_to_hsv_tables` (260 KB)
    and the HSV -> RGB half computed: the dense stage's, on every device. Why: the RGB ->
    HSV arithmetic needs IEEE float32 divisions and a float32 rounding that run as opaque
    eager operators inside compiled graphs (`_f32_divide`, `_float32_rounded`), which on
    CUDA cut the hue step into 5 eager passes and the planes they read and write; the HSV
    -> RGB half has none and compiles into one kernel. (The RGB table is 64 MB, too large
    to read at random from on the GPU.)"""
    hue, sat, v = _hsv_by_tables(x, hue_table, sat_table)
    hue = (hue + shift.to(torch.int32).view(-1, 1, 1)) & 255
    return torch.stack([c.to(torch.uint8) for c in _pil_hsv_to_rgb(hue, sat, v)], dim=1)


_DEVICE_HSV_TABLES: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _rgb_to_hsv_tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`pil_rgb_to_hsv_tables` on `device`, copied there once (not inside a CUDA graph's
    capture: `colour_graphs` calls the stage before it captures)."""
    key = str(device)
    if key not in _DEVICE_HSV_TABLES:
        _DEVICE_HSV_TABLES[key] = tuple(t.to(device) for t in pil_rgb_to_hsv_tables())
    return _DEVICE_HSV_TABLES[key]


def gaussian_kernels(sigmas: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """[N, size] float32 Gaussian taps (DALI's: exp(-x^2 / 2 sigma^2) over the view's window,
    normalised), zero outside each view's window so one `size`-tap convolution serves all."""
    x = torch.arange(size, dtype=torch.float32, device=sigmas.device) - size // 2
    taps = torch.exp(-(x * x)[None, :] / (2.0 * sigmas[:, None] * sigmas[:, None]))
    taps = taps * (x.abs()[None, :] <= (windows[:, None] // 2)).to(torch.float32)
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigmas: torch.Tensor, windows: torch.Tensor,
                  size: int, switched_on: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    """Separable blur per crop (rows, then columns, float32 between), reflect-101 borders:
    on CUDA two Triton kernels (`triton_blur`: there the convolutions and their padded copies
    cost 3.15 ms of device time a batch on an H200), elsewhere two depthwise convolutions.
    `switched_on` (bool [N], None: all): the crops to blur, the others returned unchanged
    (the Triton kernels do not blur them at all)."""
    taps = gaussian_kernels(sigmas, windows, size)
    if x.device.type == "cuda" and triton_blur.fits(x, size) and triton_blur.available():
        return triton_blur.separable_blur(x, taps, switched_on)
    blurred = _blur_by_convolution(x, taps)
    if switched_on is None:
        return blurred
    return torch.where(switched_on.view(-1, 1, 1, 1), blurred, x)


def _blur_by_convolution(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """`gaussian_blur` as depthwise convolutions over reflection-padded copies (taps [N, size])."""
    n, c, height, width = x.shape
    size = taps.shape[1]
    taps = taps.repeat_interleave(c, dim=0)                                       # [N*C, size]
    radius = size // 2
    y = x.to(torch.float32).reshape(1, n * c, height, width)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"),
                 taps.view(n * c, 1, size, 1), groups=n * c)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"),
                 taps.view(n * c, 1, 1, size), groups=n * c)
    return torch.round(y).clamp_(0, 255).to(torch.uint8).view(n, c, height, width)


# The blur as one opaque operator in compiled graphs, run eagerly inside them. Inductor wants a
# grouped convolution's groups (N * 3 here) static, so it would fix a graph to one number of
# crops; and eager, the Gaussian taps (exp, a division) are the subset path's to the bit.
_opaque_gaussian_blur = torch.library.custom_op("tcore::gaussian_blur", gaussian_blur,
                                                mutates_args=())


@_opaque_gaussian_blur.register_fake
def _blurred_shape(x: torch.Tensor, sigmas: torch.Tensor, windows: torch.Tensor, size: int,
                   switched_on: typing.Optional[torch.Tensor] = None) -> torch.Tensor:
    return x.new_empty(x.shape)       # contiguous, as gaussian_blur's output is


_BLUR_SIGMA = 5     # the sigma column of the rows (sampling.PHOTO_FIELDS)


def _enhance_slot(x: torch.Tensor, params: torch.Tensor, k: int) -> torch.Tensor:
    """Jitter slot `k` (`views.jitter_columns`) on every crop. No switch needed: a slot that
    is off holds alpha 1, and floor(base + 1 * (x - base)) is x exactly for integer x and base
    (all below 2^24 in float32), whatever the base."""
    col = JITTER_SLOTS + 3 * k
    return pil_enhance(x, params[:, col], params[:, col + 1], params[:, col + 2])


def _gray_rgb(luma: torch.Tensor) -> torch.Tensor:
    """PIL's "L" (int32 [N, 1, H, W]) as uint8 RGB."""
    return luma.expand(-1, 3, -1, -1).to(torch.uint8)


def _solarized(x: torch.Tensor, threshold: int) -> torch.Tensor:
    return torch.where(x >= threshold, 255 - x, x)


def _switched(switches: torch.Tensor, name: str, stepped: torch.Tensor, x: torch.Tensor
              ) -> torch.Tensor:
    """`stepped` on the crops whose switch `name` is on, `x` on the others."""
    return torch.where(switches[:, SW[name]].view(-1, 1, 1, 1), stepped, x)


def colour_stage(x: torch.Tensor, params: torch.Tensor, switches: torch.Tensor,
                 windows: torch.Tensor, blur_size: int, solarize_threshold: int,
                 hue_table: torch.Tensor, sat_table: torch.Tensor) -> torch.Tensor:
    """The whole colour stage (jitter in each crop's order, grayscale, blur, solarize) on every
    crop of uint8 [N, 3, S, S], each step kept per crop by its switch: the pixels of the subset
    path, without the host choosing subsets. Device tensors in: rows [N, ROW_WIDTH] float32,
    switches [N, len(SWITCHES)] bool, blur windows [N] int64, `pil_rgb_to_hsv_tables` (the
    hue step is `pil_hue_shift_hsv_tables`). Nothing here waits on the device
    or branches on a value, so it compiles to one graph. The jitter slots need no switch (see
    `_enhance_slot`); the other steps do: PIL's HSV round trip loses levels even at shift 0,
    and the blur's identity when off would rest on the row's sigma, not on its switch."""
    for k in range(3):
        x = _enhance_slot(x, params, k)
    shifted = pil_hue_shift_hsv_tables(x, params[:, JITTER_HUE_SHIFT], hue_table, sat_table)
    x = _switched(switches, "hue", shifted, x)
    for k in range(3, 6):
        x = _enhance_slot(x, params, k)
    x = _switched(switches, "gray", _gray_rgb(pil_luma(x)), x)
    # Crops without blur get sigma 1 for taps that go unused (0 would give NaN taps); the
    # blur passes them through unchanged (on CUDA without blurring them at all).
    sigmas = torch.where(switches[:, SW["blur"]], params[:, _BLUR_SIGMA], 1.0)
    x = _opaque_gaussian_blur(x, sigmas, windows, blur_size, switches[:, SW["blur"]])
    return _switched(switches, "solarize", _solarized(x, solarize_threshold), x)


_COMPILED: dict[tuple[str, str, bool], object] = {}
# Per device type, why compiling failed there (that device's steps then run eagerly).
_COMPILE_FAILED: dict[str, str] = {}


def _kernel(name: str, compile_: bool, device: torch.device, static_shapes: bool = False):
    """`name`'s function, compiled into fused kernels when asked (Triton on CUDA, C++ on the
    CPU; once per device type, at the first batch): eager, the hue shift alone is ~60
    full-size float64 passes over the batch's crops; fused it is one. On CUDA without
    multiply-add fusion (`emulate_precision_casts`): PIL rounds a product before adding it,
    and an FMA would not (one level off for some blend factors). `static_shapes`: a graph
    for each input shape met, with the sizes as constants in its kernels (index arithmetic
    by constants, sizes the compiler can tile for), rather than one graph for any shape,
    whose kernels divide by sizes passed at run time; for callers whose shapes repeat (the
    dense GPU stage: a few crop shapes a run), not the subset path, whose crop counts vary
    from batch to batch. If compiling fails on a device (no C++ compiler, say, or more
    recompilations than torch.compile's limit, 8 shapes) the eager functions serve there
    instead, with a warning."""
    function = globals()[name]
    if not compile_ or device.type in _COMPILE_FAILED:
        return function
    key = (name, device.type, static_shapes)
    if key not in _COMPILED:
        options = None
        if device.type == "cuda":
            import torch._inductor.config as inductor_config
            if not hasattr(inductor_config, "emulate_precision_casts"):
                return function      # an older torch: exact pixels first
            options = {"emulate_precision_casts": True}
        compiled = torch.compile(function, dynamic=not static_shapes, fullgraph=True,
                                 options=options)
        _COMPILED[key] = _with_eager_fallback(compiled, function, device.type)
    return _COMPILED[key]


def _with_eager_fallback(compiled, eager, device_type: str):
    def call(*args):
        if device_type in _COMPILE_FAILED:
            return eager(*args)
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise                  # not the compiler's doing: compiling stays on
        except Exception as error:
            # Not every compiler failure is a TorchDynamoException (a recompile limit hit
            # is a plain Exception). If the eager function fails too, that error is the
            # real one: it propagates, and compiling stays on.
            result = eager(*args)
            _COMPILE_FAILED[device_type] = f"{type(error).__name__}: {str(error)[:200]}"
            warnings.warn(f"torch_photometric: torch.compile failed on {device_type}, running "
                          f"eagerly there (data.pipeline.photometric_compile=false avoids the "
                          f"attempt): {_COMPILE_FAILED[device_type]}", TcoreWarning)
            return result
    return call


def _where_switched(x: torch.Tensor, on: np.ndarray, apply, dense_is_exact: bool = False,
                    owned: bool = False) -> torch.Tensor:
    """`apply(subset, index)` on the crops whose host-side switch is on; the rest unchanged.
    The index is known on the host, so nothing waits for the device. `dense_is_exact`: the
    step is an exact identity on the crops that are off, so when most are on it runs on all
    of them rather than gathering and scattering the subset (two copies). `owned`: `x` is
    this stage's own intermediate, so the subset's results are written into it in place
    rather than into a copy."""
    chosen = np.flatnonzero(on)
    if chosen.size == 0:
        return x
    if chosen.size == len(on) or (dense_is_exact and 2 * chosen.size >= len(on)):
        return apply(x, slice(None))
    index = _to_device(chosen, np.int64, x.device)
    stepped = apply(x.index_select(0, index), index)
    # Whole crops moved as blocks: `index_select` and slice copies are memcpy, where
    # `x[index]` and `out[index] = ...` go element by element (~20x slower on the CPU).
    out = x if owned else x.clone()
    for start, stop, first in _runs(chosen):
        out[start:stop] = stepped[first:first + stop - start]
    return out


def _runs(chosen: np.ndarray) -> list[tuple[int, int, int]]:
    """Sorted indices as runs of consecutive ones: (start, stop, position of start in
    `chosen`) for each."""
    breaks = np.flatnonzero(np.diff(chosen) != 1) + 1
    firsts = np.concatenate([[0], breaks])
    lasts = np.concatenate([breaks, [chosen.size]]) - 1
    return [(int(chosen[f]), int(chosen[l]) + 1, int(f)) for f, l in zip(firsts, lasts)]


def _to_device(array: np.ndarray, dtype, device: torch.device) -> torch.Tensor:
    """A host array on `device` without making the host wait for the device (pinned memory,
    asynchronous copy on the current stream)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=dtype))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def apply_photometric(images: torch.Tensor, rows: np.ndarray, switches: np.ndarray,
                      windows: np.ndarray, views: ViewConfig, compile_: bool = False,
                      dense: bool = False, static_shapes: bool = False) -> torch.Tensor:
    """The torchvision jitter in each crop's drawn order, grayscale, blur and solarize on
    uint8 [N, 3, S, S], from the crops' `view_rows` outputs (rows [N, ROW_WIDTH], switches
    [N, len(SWITCHES)], blur windows [N]); uint8 out. `compile_`: fuse (`_kernel`). `dense`:
    every step on every crop, one call (`colour_stage`; for CUDA), rather than each step on
    the crops that drew it (less compute: for the CPU); the same pixels. `static_shapes`
    (with `dense`): compiled for each crop shape rather than for any (`_kernel`)."""
    if dense:
        return _dense_photometric(images, rows, switches, windows, views, compile_,
                                  static_shapes)
    device = images.device
    enhance = _kernel("pil_enhance", compile_, device)
    if device.type == "cpu":
        # PIL's HSV round trip through lookup tables: its float64 arithmetic per pixel is
        # most of this stage's CPU time otherwise. (On CUDA, compute is spare: formulas.)
        hue_with_tables = _kernel("pil_hue_shift_tables", compile_, device)
        tables = pil_hsv_tables()

        def hue_shift(sub, shift):
            return hue_with_tables(sub, shift, *tables)
    else:
        hue_shift = _kernel("pil_hue_shift", compile_, device)
    luma = _kernel("pil_luma", compile_, device)
    params = _to_device(rows, np.float32, device)
    x = images

    def slot(k):
        col = JITTER_SLOTS + 3 * k
        return lambda sub, i: enhance(sub, params[i, col], params[i, col + 1],
                                      params[i, col + 2])

    def step(on: np.ndarray, apply, dense_is_exact: bool = False) -> None:
        nonlocal x
        # Every step returns a new tensor, so after the first one `x` is ours to write into
        # (unless it is a view that repeats memory, which no step returns today).
        owned = x is not images and x.is_contiguous()
        x = _where_switched(x, on, apply, dense_is_exact, owned)

    # A slot that is off holds (1, 0, 0), which `pil_enhance` passes through unchanged.
    for k in range(3):
        step(switches[:, SW[f"slot{k}"]], slot(k), dense_is_exact=True)
    step(switches[:, SW["hue"]], lambda sub, i: hue_shift(sub, params[i, JITTER_HUE_SHIFT]))
    for k in range(3, 6):
        step(switches[:, SW[f"slot{k}"]], slot(k), dense_is_exact=True)
    step(switches[:, SW["gray"]], lambda sub, i: _gray_rgb(luma(sub)))
    window_tensor = _to_device(windows, np.int64, device)
    step(switches[:, SW["blur"]], lambda sub, i: gaussian_blur(sub, params[i, _BLUR_SIGMA],
                                                               window_tensor[i],
                                                               views.blur_kernel))
    threshold = views.solarize_threshold
    step(switches[:, SW["solarize"]], lambda sub, i: _solarized(sub, threshold))
    return x


def _dense_photometric(images: torch.Tensor, rows: np.ndarray, switches: np.ndarray,
                       windows: np.ndarray, views: ViewConfig, compile_: bool,
                       static_shapes: bool) -> torch.Tensor:
    """`colour_stage` on all crops: three uploads and one (compiled) call per view group."""
    if len(images) == 0:
        return images          # nothing to do (and a convolution of zero groups fails)
    device = images.device
    return dense_colour_stage(images, _to_device(rows, np.float32, device),
                              _to_device(switches, np.bool_, device),
                              _to_device(windows, np.int64, device), views, compile_,
                              static_shapes)


def dense_colour_stage(images: torch.Tensor, rows: torch.Tensor, switches: torch.Tensor,
                       windows: torch.Tensor, views: ViewConfig, compile_: bool,
                       static_shapes: bool = False) -> torch.Tensor:
    """`colour_stage` on all crops from parameters already on the crops' device (for a
    CUDA graph, `pipelines/colour_graphs.py`, which must not upload inside its capture; the
    hue tables go to the device at a device's first call, which for a graph is a warm-up
    call before the capture)."""
    stage = _kernel("colour_stage", compile_, images.device, static_shapes)
    return stage(images, rows, switches, windows, views.blur_kernel, views.solarize_threshold,
                 *_rgb_to_hsv_tables_on(images.device))


def normalize(images: torch.Tensor, views: ViewConfig, dtype: torch.dtype,
              compile_: bool = False, static_shapes: bool = False) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> (x - 255 mean) / (255 std) in `dtype` (ImageNet normalisation;
    crop_mirror_normalize multiplies by 1 / std instead: the same up to an ulp)."""
    mean, std = _normalisation_constants(images.device, tuple(views.mean), tuple(views.std))
    return _kernel("_normalized", compile_, images.device, static_shapes)(images, mean, std,
                                                                           dtype)


_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalisation_constants(device: torch.device, mean: tuple, std: tuple):
    """255 mean and 255 std as [1, 3, 1, 1] float32 on `device`, made once (a fresh small
    tensor per batch would be a blocking copy to the GPU)."""
    key = (str(device), mean, std)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = tuple(torch.tensor([255.0 * v for v in values]).view(1, 3, 1, 1)
                                .to(device) for values in (mean, std))
    return _CONSTANTS[key]


def _normalized(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    return ((images.to(torch.float32) - mean) / std).to(dtype)
