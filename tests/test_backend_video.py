"""The diffusers video backend against a real tiny Wan 2.1 pipeline built for the module."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("torch")
av = pytest.importorskip("av")

from vramq.gpu_workers.backends import WorkItem, backend_class  # noqa: E402
from vramq.gpu_workers.backends.diffusers_video import encode_mp4  # noqa: E402
from vramq.gpu_workers.tiny import MARKER  # noqa: E402
from vramq.gpu_workers.tiny_video import make_tiny_video  # noqa: E402
from vramq.jobs.catalog import ModelEntry  # noqa: E402
from vramq.jobs.errors import JobCanceled, JobError  # noqa: E402


@pytest.fixture(scope="module")
def tiny_wan_dir(tmp_path_factory) -> Path:
    return make_tiny_video(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="module")
def backend(tiny_wan_dir):
    entry = ModelEntry(
        id="tiny-wan", kind="video", backend="diffusers", weights=tiny_wan_dir, dtype="float32", max_batch=4
    )
    b = backend_class(entry)(entry, "cpu")
    b.load()
    yield b
    b.unload()


def job(
    prompt="a cat", *, seed=0, width=64, height=64, num_frames=9, fps=8, steps=4, guidance=0.0, negative_prompt=None
):
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "num_frames": num_frames,
        "fps": fps,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
    }


def item(inp, progress=None, is_canceled=lambda: False) -> WorkItem:
    return WorkItem(
        job_id=f"job-{inp['seed']}",
        input=inp,
        on_progress=progress.append if progress is not None else (lambda f: None),
        is_canceled=is_canceled,
    )


def decode(data: bytes) -> tuple[av.video.stream.VideoStream, list[np.ndarray]]:
    """The MP4's video stream and its frames as ``(H, W, 3)`` int16 RGB arrays."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24").astype(np.int16) for f in container.decode(stream)]
    return stream, frames


def first_frame(result) -> np.ndarray:
    return decode(result.artifacts[0].data)[1][0]


@pytest.mark.e2e
def test_make_tiny_video_is_idempotent_and_reloads(tiny_wan_dir):
    from diffusers import DiffusionPipeline, WanPipeline

    marker = tiny_wan_dir / MARKER
    before = marker.stat().st_mtime_ns
    assert make_tiny_video(tiny_wan_dir) == tiny_wan_dir
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text()) == {"architecture": "wan2.1", "seed": 0}
    assert not [p for p in tiny_wan_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left

    pipe = DiffusionPipeline.from_pretrained(tiny_wan_dir)
    assert isinstance(pipe, WanPipeline)
    # The real Wan 2.1 scale factors, which the frame-count and size rules come from.
    assert (pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial) == (4, 8)
    assert tuple(pipe.transformer.config.patch_size) == (1, 2, 2)
    prompt = "A Zebra-striped xylophone!! 42 café 🎉 " * 20
    tok = pipe.tokenizer
    assert tok.model_max_length == 32
    assert len(tok(prompt, padding="max_length", max_length=32, truncation=True).input_ids) == 32


@pytest.mark.e2e
def test_batch_gives_each_item_its_video(backend):
    # Not square, so a swapped width and height shows; fps is the encoder's alone.
    a = job("a red fox", seed=1, width=96, height=64, fps=8)
    b = job("a lighthouse", seed=7, width=96, height=64, fps=12)
    results = backend.run_batch([item(a), item(b)])
    for r, inp in zip(results, (a, b), strict=True):
        [art] = r.artifacts
        assert art.name == "video.mp4" and art.content_type == "video/mp4"
        assert r.output == {
            "video": {
                "url": {"$artifact": "video.mp4"},
                "content_type": "video/mp4",
                "width": 96,
                "height": 64,
                "frames": 9,
                "fps": inp["fps"],
                "seed": inp["seed"],
            }
        }
        stream, frames = decode(art.data)
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == inp["fps"]
        assert len(frames) == 9
        assert frames[0].shape == (64, 96, 3)


@pytest.mark.e2e
def test_seed_decides_the_video(backend):
    def frame(seed):
        return first_frame(backend.run_batch([item(job(seed=seed))])[0])

    # "Within rounding" twice over: a different batch size may change the order of
    # float sums, and x264 does not promise identical bytes for identical frames
    # (later frames of a tiny video were seen to differ by a few levels between calls).
    assert np.abs(frame(5) - frame(5)).mean() < 1.0
    # One generator per video: a video does not depend on its batch-mates.
    pair = backend.run_batch([item(job(seed=5)), item(job("a boat", seed=6))])
    assert np.abs(first_frame(pair[0]) - frame(5)).mean() < 1.0
    # Random weights make low-contrast noise: seeds differ by ~5 levels on average.
    assert np.abs(frame(5) - frame(6)).mean() > 3


@pytest.mark.e2e
def test_pipeline_kwargs_render_what_run_batch_renders(backend):
    from vramq.gpu_workers.backends.diffusers_video import _to_uint8

    items = [item(job(seed=3)), item(job("a boat", seed=9))]
    direct = backend.pipe(**backend.pipeline_kwargs(items)).frames
    batched = backend.run_batch(items)
    for video, result in zip(direct, batched, strict=True):
        ours = np.stack(decode(result.artifacts[0].data)[1])
        theirs = np.stack(decode(encode_mp4(_to_uint8(video), 8))[1])
        assert np.abs(ours - theirs).mean() < 1.0  # x264's leeway, see above


@pytest.mark.e2e
def test_progress_is_reported_every_step(backend):
    progress = []
    backend.run_batch([item(job(steps=5), progress)])
    assert progress == [0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.e2e
def test_cancel_stops_the_pipeline_between_steps(backend):
    progress = []
    [result] = backend.run_batch([item(job(steps=8), progress, is_canceled=lambda: len(progress) >= 1)])
    assert isinstance(result, JobCanceled)
    assert 1 <= len(progress) < 8


@pytest.mark.e2e
def test_partial_cancel_finishes_the_others(backend):
    gone, kept = [], []
    results = backend.run_batch([item(job(seed=1), gone, is_canceled=lambda: len(gone) >= 1), item(job(seed=2), kept)])
    assert isinstance(results[0], JobCanceled)
    assert len(decode(results[1].artifacts[0].data)[1]) == 9
    assert kept == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "change, rule",
    [({"num_frames": 8}, "num_frames must be 4k+1"), ({"width": 72}, "multiples of 16")],
)
def test_shapes_the_model_cannot_render_are_invalid_input(backend, change, rule):
    progress = []
    results = backend.run_batch([item(job(seed=1, **change), progress), item(job(seed=2, **change))])
    for r in results:
        assert isinstance(r, JobError) and r.code == "invalid_input"
        assert rule in str(r)
    assert progress == []  # refused before the pipeline ran


@pytest.mark.e2e
def test_negative_prompt_runs_guidance(backend):
    inp = job(negative_prompt="blurry", guidance=3.0)
    kwargs = backend.pipeline_kwargs([item(inp), item({**inp, "seed": 1})])
    assert kwargs["negative_prompt"] == ["blurry", "blurry"] and kwargs["guidance_scale"] == 3.0
    [result] = backend.run_batch([item(inp)])
    assert result.output["video"]["frames"] == 9


@pytest.mark.e2e
def test_batch_key_groups_compatible_jobs(backend):
    key = backend.batch_key
    assert key(job("x", seed=1, fps=8)) == key(job("y", seed=2, fps=24))
    assert key(job(width=64)) != key(job(width=128))
    assert key(job(height=64)) != key(job(height=128))
    assert key(job(num_frames=9)) != key(job(num_frames=17))
    assert key(job(steps=4)) != key(job(steps=8))
    assert key(job(guidance=0.0)) != key(job(guidance=5.0))
    assert key(job()) != key(job(negative_prompt="blurry"))
    assert backend.batch_cost(job()) == 1


def test_encode_mp4_round_trips_and_needs_even_sizes():
    ramp = np.linspace(0, 255, 48, dtype=np.uint8)
    frames = np.ascontiguousarray(np.broadcast_to(ramp[None, None, :, None], (5, 32, 48, 3)))
    stream, decoded = decode(encode_mp4(frames, 24))
    assert stream.average_rate == 24 and len(decoded) == 5
    assert np.abs(decoded[0] - frames[0]).max() <= 8  # lossy, and yuv420p halves chroma
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((1, 31, 48, 3), np.uint8), 24)


def test_the_video_backend_is_found_by_kind_and_backend():
    # That importing it loads no model library is checked in tests/test_layers.py.
    entry = ModelEntry(id="m", kind="video", backend="diffusers", weights=Path("/nowhere"))
    assert backend_class(entry).__name__ == "DiffusersVideoBackend"
