"""The GPU variant of stage B, checked without a GPU: DALI builds a pipeline's Python graph
(every operator, its device and inputs) before it needs CUDA, so the GPU branches of
`views.py` are exercised here and their placement is checked: decoders on `mixed` (NVDEC /
nvJPEG), every per-view image operator on the GPU. Whether the kernels then run is for the
GPU check (scripts/gpu_check.sh)."""
from collections import Counter

import pytest
from nvidia.dali import types

from tcore.pipelines.config import ViewConfig
from tcore.pipelines.views import views_pipeline

IMAGE_OPS = ("Resize", "Hsv", "GaussianBlur", "CropMirrorNormalize", "LookupTable")


def _python_graph(kind: str, color_jitter: str, decode_video_on_gpu: bool = True):
    pipe = views_pipeline(kind=kind, views=ViewConfig(color_jitter=color_jitter), on_gpu=True,
                          out_dtype=types.FLOAT, decode_video_on_gpu=decode_video_on_gpu,
                          batch_size=2, num_threads=1, device_id=0,
                          prefetch_queue_depth=1, exec_dynamic=True)
    pipe._build_graph()     # the Python graph only: no CUDA needed until build()
    placed = Counter((getattr(node._op, "schema_name", type(node._op).__name__), node._op.device)
                     for node in pipe._ops)
    return pipe, placed


@pytest.mark.parametrize("kind,decoder,decodes", [("video", "decoders__Video", 1),
                                                  ("frames", "decoders__Image", 3),
                                                  ("image", "decoders__Image", 1)])
@pytest.mark.parametrize("color_jitter", ["fast", "torchvision"])
def test_gpu_graph_decodes_on_mixed_and_augments_on_the_gpu(kind, decoder, decodes, color_jitter):
    pipe, placed = _python_graph(kind, color_jitter)
    assert placed[(decoder, "mixed")] == decodes   # JPEG frames: past, current, future
    assert not any(name == decoder and device != "mixed" for name, device in placed)
    for name, device in placed:
        if name in IMAGE_OPS:
            assert device == "gpu", (name, device)
    # 2 current global + 8 local + 2 past + 2 future views, all returned on the GPU.
    assert len(pipe._graph_outputs) == 14
    assert {out.device for out in pipe._graph_outputs} == {"gpu"}
    assert placed[("CropMirrorNormalize", "gpu")] == 14


def test_video_decoder_cpu_decodes_on_the_cpu_and_augments_on_the_gpu():
    """`video_decoder=cpu` on a GPU: libavcodec decodes, every view operator stays on the GPU."""
    pipe, placed = _python_graph("video", "fast", decode_video_on_gpu=False)
    assert placed[("decoders__Video", "cpu")] == 1
    assert not any(name == "decoders__Video" and device != "cpu" for name, device in placed)
    for name, device in placed:
        if name in IMAGE_OPS:
            assert device == "gpu", (name, device)
    assert {out.device for out in pipe._graph_outputs} == {"gpu"}
