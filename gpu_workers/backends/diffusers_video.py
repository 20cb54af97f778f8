"""Text-to-video with a diffusers pipeline (Wan 2.1 and other ``DiffusionPipeline``s).

Jobs of the same size, frame count, steps, guidance, and either all or none with a
negative prompt share one pipeline call (``diffusers_common``), one generator per
video; each video is encoded to H.264 MP4 in memory with PyAV.

The pipeline's shape rules are checked before the call, because diffusers rounds a bad
frame count or size with only a log warning: ``num_frames`` must be
``k * vae_scale_factor_temporal + 1`` (Wan: ``4k + 1``) and width and height multiples
of the VAE's spatial factor times the patch size (Wan: 16).

torch, diffusers and PyAV are imported when a method needs them, never at import time,
so the API and the registry can import this module on machines without them.
"""

from __future__ import annotations

import io
from collections.abc import Hashable
from fractions import Fraction
from typing import Any

from vramq.jobs.errors import ConfigError, JobError, MissingExtra

from .base import Artifact, ItemResult
from .diffusers_common import DiffusersBackend

H264_PRESET = "veryfast"
"""libx264 speed preset: close to ``ultrafast`` in time, much smaller files."""
H264_CRF = 23
"""libx264 constant rate factor (its default; lower is better and bigger)."""


def _av():
    """Import PyAV, or say which extra installs it."""
    try:
        import av
    except ImportError:
        raise MissingExtra("av", "video") from None
    return av


class DiffusersVideoBackend(DiffusersBackend):
    """A text-to-video ``DiffusionPipeline`` loaded from ``entry.weights``."""

    extra = "video"
    output_type = "np"
    output_field = "frames"
    # Wan's UMT5 tokenizer; the tiny model's holds 32 tokens, real Wan's 512.
    prompt_tokenizer = "tokenizer"

    def load(self) -> None:
        self._torch()  # a missing diffusers is reported before a missing PyAV
        _av()  # fail at start-up, not on the first finished video
        super().load()

    def check_pipeline(self, pipe) -> None:
        if "num_frames" not in self._params or "callback_on_step_end" not in self._params:
            raise ConfigError(f"model {self.entry.id!r}: {type(pipe).__name__} is not a text-to-video pipeline")

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

    def kind_kwargs(self, inp: dict[str, Any]) -> dict[str, Any]:
        problem = self.shape_error(inp)
        if problem:
            raise JobError(problem, code="invalid_input")
        # No true_cfg_scale: Wan reads a negative prompt under plain classifier-free
        # guidance, i.e. guidance > 1 (the catalog's video default is 5.0).
        return {"num_frames": inp["num_frames"]}

    def item_result(self, inp: dict[str, Any], outputs) -> ItemResult:
        [video] = outputs
        return _item_result(_to_uint8(video), inp["fps"], inp["seed"])


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
