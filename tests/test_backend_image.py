"""The diffusers image backend against a real tiny FLUX pipeline built for the session."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("torch")

from PIL import Image

from vramq.gpu_workers.backends import WorkItem, backend_class
from vramq.gpu_workers.tiny import MARKER, make_tiny_flux
from vramq.jobs.catalog import ModelEntry
from vramq.jobs.errors import ConfigError, JobCanceled


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    return make_tiny_flux(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="module")
def backend(tiny_flux_dir):
    entry = ModelEntry(
        id="tiny-flux", kind="image", backend="diffusers", weights=tiny_flux_dir, dtype="float32", max_batch=4
    )
    b = backend_class(entry)(entry, "cpu")
    b.load()
    yield b
    b.unload()


def job(prompt="a cat", *, seed=0, num_images=1, width=64, height=64, steps=4, guidance=0.0, negative_prompt=None):
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": guidance,
        "seed": seed,
        "num_images": num_images,
    }


def item(inp, progress=None, is_canceled=lambda: False) -> WorkItem:
    return WorkItem(
        job_id=f"job-{inp['seed']}",
        input=inp,
        on_progress=progress.append if progress is not None else (lambda f: None),
        is_canceled=is_canceled,
    )


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode(data), dtype=np.int16)


@pytest.mark.e2e
def test_make_tiny_is_idempotent_and_reloads(tiny_flux_dir):
    from diffusers import FluxPipeline

    marker = tiny_flux_dir / MARKER
    before = marker.stat().st_mtime_ns
    assert make_tiny_flux(tiny_flux_dir) == tiny_flux_dir
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text()) == {"architecture": "flux", "seed": 0}
    assert not [p for p in tiny_flux_dir.parent.iterdir() if p.name.startswith(".")]  # no temp dir left

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae_scale_factor == 8
    # Arbitrary text, unseen words and characters included, pads/truncates to the max.
    prompt = "A Zebra-striped xylophone!! 42 café 🎉 " * 20
    assert len(pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids) == 77
    t5 = pipe.tokenizer_2
    assert t5.model_max_length == 32
    assert len(t5(prompt, padding="max_length", max_length=32, truncation=True).input_ids) == 32
    assert len(t5("hi", padding="max_length", max_length=32, truncation=True).input_ids) == 32


@pytest.mark.e2e
def test_batch_gives_each_item_its_images(backend):
    # Not square, so a swapped width and height shows.
    a = job("a red fox", seed=1, width=96, height=64)
    b = job("a lighthouse", seed=7, num_images=2, width=96, height=64)
    results = backend.run_batch([item(a), item(b)])
    assert [len(r.artifacts) for r in results] == [1, 2]
    for r, seed in zip(results, (1, 7), strict=False):
        for k, (art, out) in enumerate(zip(r.artifacts, r.output["images"], strict=False)):
            assert art.name == f"image-{k}.png" and art.content_type == "image/png"
            assert out == {
                "url": {"$artifact": art.name},
                "content_type": "image/png",
                "width": 96,
                "height": 64,
                "seed": seed + k,
            }
            # Not encoded yet: the PNG is made on the job's thread when it is stored,
            # not on the batcher's (gpu_workers.backends.base.Artifact.data).
            assert callable(art.source)
            image = decode(art.data)
            assert image.format == "PNG" and image.size == (96, 64)


@pytest.mark.e2e
def test_seed_decides_the_image(backend):
    def png(seed):
        return backend.run_batch([item(job(seed=seed))])[0].artifacts[0].data

    assert png(5) == png(5)
    assert png(5) != png(6)
    # One generator per image: the image for a seed does not depend on its batch-mates
    # (up to rounding: a different batch size may change the order of float sums).
    two = backend.run_batch([item(job(seed=5, num_images=2))])[0].artifacts
    for art, seed in zip(two, (5, 6), strict=False):
        diff = np.abs(pixels(art.data) - pixels(png(seed)))
        assert diff.max() <= 2
    assert np.abs(pixels(two[0].data) - pixels(two[1].data)).mean() > 10


@pytest.mark.e2e
def test_pipeline_kwargs_render_what_run_batch_renders(backend):
    items = [item(job(seed=3, num_images=2)), item(job("a boat", seed=9))]
    direct = backend.pipe(**backend.pipeline_kwargs(items)).images
    batched = [a.data for r in backend.run_batch(items) for a in r.artifacts]
    assert [decode(d).tobytes() for d in batched] == [im.tobytes() for im in direct]


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
    results = backend.run_batch(
        [item(job(seed=1, steps=4), gone, is_canceled=lambda: len(gone) >= 1), item(job(seed=2, steps=4), kept)]
    )
    assert isinstance(results[0], JobCanceled)
    assert len(results[1].artifacts) == 1 and decode(results[1].artifacts[0].data).size == (64, 64)
    assert kept == [0.25, 0.5, 0.75, 1.0]


@pytest.mark.e2e
def test_negative_prompt_runs_true_cfg(backend):
    inp = job(negative_prompt="blurry", guidance=2.0, num_images=2)
    kwargs = backend.pipeline_kwargs([item(inp)])
    assert kwargs["negative_prompt"] == ["blurry", "blurry"] and kwargs["true_cfg_scale"] == 2.0
    [result] = backend.run_batch([item(inp)])
    assert len(result.artifacts) == 2


@pytest.mark.e2e
def test_batch_key_groups_compatible_jobs(backend):
    key = backend.batch_key
    assert key(job("x", seed=1)) == key(job("y", seed=2, num_images=3))
    assert key(job(width=64)) != key(job(width=128))
    assert key(job(height=64)) != key(job(height=128))
    assert key(job(steps=4)) != key(job(steps=8))
    assert key(job(guidance=0.0)) != key(job(guidance=3.5))
    assert key(job()) != key(job(negative_prompt="blurry"))
    assert backend.batch_cost(job(num_images=3)) == 3


def test_unknown_backend_pair_is_a_config_error():
    # The catalog would reject this pair; construct without validation to reach the registry.
    entry = ModelEntry.model_construct(id="m", kind="image", backend="nope", weights=Path("/nowhere"))
    with pytest.raises(ConfigError, match="'image' with backend 'nope'"):
        backend_class(entry)


def test_the_image_backend_is_found_by_kind_and_backend():
    # That importing it loads no model library is checked in tests/test_layers.py.
    entry = ModelEntry(id="m", kind="image", backend="diffusers", weights=Path("/nowhere"))
    assert backend_class(entry).__name__ == "DiffusersImageBackend"
