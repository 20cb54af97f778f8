"""Text-to-video with a diffusers pipeline (Wan 2.1 and other ``DiffusionPipeline``s).

One pipeline stays resident; a batch of compatible jobs (same size, frame count,
steps, guidance, and either all or none with a negative prompt) runs as ONE pipeline
call, with one seeded generator per video so a video depends only on its own seed.
Progress and cancellation go through ``callback_on_step_end``; when every job of the
call is canceled the call stops between steps. Each video is encoded to H.264 MP4 in
memory with PyAV.

The pipeline's shape rules are checked before the call, because diffusers rounds a bad
frame count or size with only a log warning: ``num_frames`` must be
``k * vae_scale_factor_temporal + 1`` (Wan: ``4k + 1``) and width and height multiples
of the VAE's spatial factor times the patch size (Wan: 16).

torch, diffusers and PyAV are imported when a method needs them, never at import time,
so the API and the registry can import this module on machines without them.
"""

from __future__ import annotations

import gc
import inspect
import io
import time
from fractions import Fraction
from typing import Any, Hashable

from jobs.errors import ConfigError, JobCanceled, JobError, MissingExtra

from .base import Artifact, Backend, ItemResult, WorkItem

H264_PRESET = "veryfast"
"""libx264 speed preset: close to ``ultrafast`` in time, much smaller files."""
H264_CRF = 23
"""libx264 constant rate factor (its default; lower is better and bigger)."""


def _torch():
    """Import torch and diffusers, or say which extra installs them."""
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError:
        raise MissingExtra("diffusers", "video") from None
    return torch


def _av():
    """Import PyAV, or say which extra installs it."""
    try:
        import av
    except ImportError:
        raise MissingExtra("av", "video") from None
    return av


class _AllCanceled(Exception):
    """Raised from the step callback to abandon a call whose every job was canceled."""


class DiffusersVideoBackend(Backend):
    """A text-to-video ``DiffusionPipeline`` loaded from ``entry.weights``."""

    def __init__(self, entry, device: str):
        super().__init__(entry, device)
        self.pipe = None
        """The loaded pipeline; benchmarks call it with ``pipeline_kwargs(items)``."""
        self.load_seconds: float | None = None
        self._params: dict[str, inspect.Parameter] = {}

    # --- lifecycle -----------------------------------------------------------------

    def load(self) -> None:
        torch = _torch()
        _av()  # fail at start-up, not on the first finished video
        from diffusers import DiffusionPipeline
        from diffusers.pipelines import pipeline_utils

        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        # A worker's log is for jobs; loading bars from every component only bury them.
        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        started = time.perf_counter()
        # diffusers renamed ``torch_dtype`` to ``dtype`` and warns on the old name;
        # use whichever this version reads.
        dtype_arg = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
        dtype = getattr(torch, self.entry.dtype)
        pipe = DiffusionPipeline.from_pretrained(str(self.entry.weights), **{dtype_arg: dtype})
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self._params = dict(inspect.signature(pipe.__call__).parameters)
        if "num_frames" not in self._params or "callback_on_step_end" not in self._params:
            raise ConfigError(f"model {self.entry.id!r}: {type(pipe).__name__} is not a text-to-video pipeline")
        self.pipe = pipe
        self.load_seconds = time.perf_counter() - started

    def unload(self) -> None:
        self.pipe = None
        self._params = {}
        gc.collect()
        if str(self.device).startswith("cuda"):
            _torch().cuda.empty_cache()

    # --- batching ------------------------------------------------------------------

    def batch_key(self, inp: dict[str, Any]) -> Hashable:
        # Everything one pipeline call shares; prompts, seeds and fps may differ
        # (fps only matters to the encoder).
        has_negative = inp.get("negative_prompt") is not None
        return (inp["width"], inp["height"], inp["num_frames"], inp["steps"], inp["guidance"], has_negative)

    def batch_cost(self, inp: dict[str, Any]) -> int:
        return 1

    def shape_error(self, inp: dict[str, Any]) -> str | None:
        """Why this pipeline cannot render ``inp``'s frame count or size, or None."""
        pipe = self.pipe
        temporal = getattr(pipe, "vae_scale_factor_temporal", None)
        n = inp["num_frames"]
        if temporal and (n - 1) % temporal:
            # The VAE keeps the first frame and compresses the rest by ``temporal``.
            below = (n - 1) // temporal * temporal + 1
            return (
                f"num_frames must be {temporal}k+1 for model {self.entry.id!r} "
                f"(got {n}; nearest {below} or {below + temporal})"
            )
        spatial = getattr(pipe, "vae_scale_factor_spatial", None)
        patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
        if spatial:
            multiple = spatial * (patch[-1] if isinstance(patch, (list, tuple)) else patch or 1)
            if inp["width"] % multiple or inp["height"] % multiple:
                return (
                    f"width and height must be multiples of {multiple} for model {self.entry.id!r} "
                    f"(got {inp['width']}x{inp['height']})"
                )
        return None

    def pipeline_kwargs(self, items: list[WorkItem]) -> dict[str, Any]:
        """Everything ``run_batch`` passes to the pipeline except the step callback.

        Fresh generators each call, so ``self.pipe(**backend.pipeline_kwargs(items))``
        renders exactly what ``run_batch(items)`` renders. Raises ``JobError``
        (``invalid_input``) when the items ask for something this pipeline cannot do.
        """
        torch = _torch()
        if self.pipe is None:
            raise RuntimeError("load() must run before the first batch")
        if len({self.batch_key(item.input) for item in items}) != 1:
            raise ValueError("items of one call must have equal batch keys")
        first = items[0].input
        problem = self.shape_error(first)
        if problem:
            raise JobError(problem, code="invalid_input")
        kwargs: dict[str, Any] = {
            "prompt": [item.input["prompt"] for item in items],
            "width": first["width"],
            "height": first["height"],
            "num_frames": first["num_frames"],
            "num_inference_steps": first["steps"],
            "guidance_scale": first["guidance"],
            "generator": [torch.Generator(self.device).manual_seed(item.input["seed"]) for item in items],
            "output_type": "np",
        }
        if first.get("negative_prompt") is not None:
            if "negative_prompt" not in self._params:
                raise JobError(f"model {self.entry.id!r} does not take a negative_prompt", code="invalid_input")
            # Wan reads it only under classifier-free guidance, i.e. guidance > 1
            # (the catalog's video default is 5.0).
            kwargs["negative_prompt"] = [item.input["negative_prompt"] for item in items]
        limit = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", None)
        default = self._params.get("max_sequence_length")
        if limit and default is not None and isinstance(default.default, int) and limit < default.default:
            # Padding the prompt past what its tokenizer holds only costs time (the
            # tiny model's tokenizer holds 32 tokens; real Wan's UMT5 holds 512).
            kwargs["max_sequence_length"] = limit
        return kwargs

    # --- running -------------------------------------------------------------------

    def run_batch(self, items: list[WorkItem]) -> list[ItemResult | BaseException]:
        torch = _torch()
        canceled = [item.is_canceled() for item in items]
        if all(canceled):
            return [JobCanceled("canceled") for _ in items]
        try:
            kwargs = self.pipeline_kwargs(items)
        except JobError as exc:
            return [JobError(str(exc), code=exc.code) for _ in items]
        steps = kwargs["num_inference_steps"]

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            for i, item in enumerate(items):
                item.on_progress((step + 1) / steps)
                canceled[i] = canceled[i] or item.is_canceled()
            if all(canceled):
                # Not ``pipe._interrupt``: Wan's interrupt skips the remaining steps
                # but still runs the VAE decode, which costs as much as many steps.
                raise _AllCanceled
            return {}  # no tensors changed

        try:
            with torch.inference_mode():
                videos = self.pipe(**kwargs, callback_on_step_end=on_step_end).frames
        except _AllCanceled:
            return [JobCanceled("canceled") for _ in items]

        results: list[ItemResult | BaseException] = []
        for i, item in enumerate(items):
            # A cancel that lands during decoding still wins over the finished video.
            if canceled[i] or item.is_canceled():
                results.append(JobCanceled("canceled"))
            else:
                results.append(_item_result(_to_uint8(videos[i]), item.input["fps"], item.input["seed"]))
        return results


def _to_uint8(video) -> Any:
    """Frames as the pipeline returns them (floats in [0, 1]) -> ``(F, H, W, 3)`` uint8."""
    import numpy as np

    return (np.clip(np.asarray(video), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_mp4(frames, fps: int) -> bytes:
    """Encode ``(F, H, W, 3)`` uint8 RGB frames as H.264 (yuv420p) in an MP4, in memory.

    yuv420p halves the chroma planes, so width and height must be even.
    """
    av = _av()
    count, height, width, _ = frames.shape
    if width % 2 or height % 2:
        raise ValueError(f"H.264 yuv420p needs even width and height, got {width}x{height}")
    buf = io.BytesIO()
    # No ``movflags=+faststart``: ffmpeg implements it by reopening the output file by
    # name, which an in-memory output does not have.
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.options = {"preset": H264_PRESET, "crf": str(H264_CRF)}
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frames[index], format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))  # flush the frames the encoder still holds
    return buf.getvalue()


def _item_result(frames, fps: int, seed: int) -> ItemResult:
    count, height, width, _ = frames.shape
    data = encode_mp4(frames, fps)
    output = {
        "video": {
            "url": {"$artifact": "video.mp4"},
            "content_type": "video/mp4",
            "width": width,
            "height": height,
            "frames": count,
            "fps": fps,
            "seed": seed,
        }
    }
    return ItemResult(output=output, artifacts=[Artifact("video.mp4", data, "video/mp4")])
