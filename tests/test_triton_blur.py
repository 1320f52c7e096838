"""The colour stage's CUDA blur (`pipelines/triton_blur.py`) against the convolution path it
replaces on CUDA, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, which must
be set before Triton is imported: hence a fresh process). tests/test_gpu.py runs the same
kernels compiled for a GPU."""
import json
import os
import subprocess
import sys

_SCRIPT = r"""
import json
import numpy as np
import torch
from tcore.pipelines import triton_blur
from tcore.pipelines.torch_photometric import _blur_by_convolution, gaussian_kernels

rng = np.random.default_rng(0)
report = {"random": [], "halves": None}
# Shapes: tiles cut at both edges (20 x 70 with 8 x 64 tiles), the smallest crop the
# reflected border allows (height 5 for 9 taps), one channel and a wide crop. (A short
# filter: the 3 taps below.)
for n, c, h, w, size in [(2, 3, 20, 70, 9), (3, 3, 5, 9, 9), (2, 1, 17, 130, 9)]:
    x = torch.from_numpy(rng.integers(0, 256, (n, c, h, w), dtype=np.uint8))
    sigmas = torch.from_numpy(rng.uniform(0.1, 2.0, n).astype(np.float32))
    windows = torch.from_numpy(rng.choice(np.arange(1, size + 1, 2), n).astype(np.int64))
    taps = gaussian_kernels(sigmas, windows, size)
    got = triton_blur.separable_blur(x, taps)
    want = _blur_by_convolution(x, taps)
    diff = (got.int() - want.int()).abs()
    report["random"].append({"shape": [n, c, h, w, size], "max": int(diff.max()),
                             "fraction": float((diff > 0).float().mean()),
                             "changed": float((want != x).float().mean()),
                             "dtype": str(got.dtype), "got_shape": list(got.shape)})
# Taps (0.5, 0, 0.5) both ways: every sum is exact in float32 and many end in .5, so the
# two must agree bit for bit, ties rounded to even as torch.round does.
x = torch.from_numpy(rng.integers(0, 256, (2, 3, 12, 20), dtype=np.uint8))
taps = torch.tensor([[0.5, 0.0, 0.5]] * 2)
got = triton_blur.separable_blur(x, taps)
want = _blur_by_convolution(x, taps)
exact = (x[:, :, :-2, :-2].float() + x[:, :, 2:, :-2] + x[:, :, :-2, 2:] + x[:, :, 2:, 2:]) / 4
report["halves"] = {"equal": bool(torch.equal(got, want)),
                    "ties": float((exact.frac() == 0.5).float().mean())}
# Crops switched off come out unchanged, the others blurred as when all are on.
x = torch.from_numpy(rng.integers(0, 256, (2, 1, 12, 20), dtype=np.uint8))
taps = gaussian_kernels(torch.full((2,), 1.5), torch.full((2,), 9, dtype=torch.int64), 9)
switched_on = torch.tensor([False, True])
got = triton_blur.separable_blur(x, taps, switched_on)
every = triton_blur.separable_blur(x, taps)
report["switched"] = {"off_unchanged": bool(torch.equal(got[~switched_on], x[~switched_on])),
                      "on_blurred": bool(torch.equal(got[switched_on], every[switched_on])),
                      "blur_changes": bool(not torch.equal(every[~switched_on], x[~switched_on]))}
print(json.dumps(report))
"""


def test_triton_blur_gives_the_convolutions_pixels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for case in report["random"]:
        assert case["dtype"] == "torch.uint8" and case["got_shape"] == case["shape"][:4], case
        # A float32 sum in another order can round the other way at a rounding edge.
        assert case["max"] <= 1 and case["fraction"] < 1e-3, case
    assert max(case["changed"] for case in report["random"]) > 0.5    # the blur did blur
    assert report["halves"]["ties"] > 0.1, report["halves"]
    assert report["halves"]["equal"], report["halves"]
    assert report["switched"] == {"off_unchanged": True, "on_blurred": True,
                                  "blur_changes": True}, report["switched"]
