"""Text-to-image with a diffusers pipeline (FLUX and other ``DiffusionPipeline``s).

One pipeline stays resident; a batch of compatible jobs (same size, steps, guidance,
and either all or none with a negative prompt) runs as ONE pipeline call, with one
seeded generator per image so an image depends only on its own seed. Progress and
cancellation go through ``callback_on_step_end``: when every job of the call is
canceled the pipeline is interrupted between steps.

torch, diffusers and PIL are imported when a method needs them, never at import time,
so the API and the registry can import this module on machines without them.
"""

from __future__ import annotations

import gc
import inspect
import io
import time
from typing import Any, Hashable

from jobs.errors import JobCanceled, JobError, MissingExtra

from .base import Artifact, Backend, ItemResult, WorkItem


def _torch():
    """Import torch and diffusers, or say which extra installs them."""
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError:
        raise MissingExtra("diffusers", "image") from None
    return torch


class DiffusersImageBackend(Backend):
    """A text-to-image ``DiffusionPipeline`` loaded from ``entry.weights``."""

    def __init__(self, entry, device: str):
        super().__init__(entry, device)
        self.pipe = None
        """The loaded pipeline; benchmarks call it with ``pipeline_kwargs(items)``."""
        self.load_seconds: float | None = None
        self._params: dict[str, inspect.Parameter] = {}

    # --- lifecycle -----------------------------------------------------------------

    def load(self) -> None:
        torch = _torch()
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
        # Everything one pipeline call shares; prompts, seeds and counts may differ.
        has_negative = inp.get("negative_prompt") is not None
        return (inp["width"], inp["height"], inp["steps"], inp["guidance"], has_negative)

    def batch_cost(self, inp: dict[str, Any]) -> int:
        return inp["num_images"]

    def pipeline_kwargs(self, items: list[WorkItem]) -> dict[str, Any]:
        """Everything ``run_batch`` passes to the pipeline except the step callback.

        Fresh generators each call, so ``self.pipe(**backend.pipeline_kwargs(items))``
        renders exactly what ``run_batch(items)`` renders. Raises ``JobError``
        (``invalid_input``) when the items ask for something this pipeline lacks.
        """
        torch = _torch()
        if self.pipe is None:
            raise RuntimeError("load() must run before the first batch")
        if len({self.batch_key(item.input) for item in items}) != 1:
            raise ValueError("items of one call must have equal batch keys")
        first = items[0].input
        prompts, negatives, generators = [], [], []
        for item in items:
            inp = item.input
            for k in range(inp["num_images"]):
                prompts.append(inp["prompt"])
                negatives.append(inp.get("negative_prompt"))
                generators.append(torch.Generator(self.device).manual_seed(inp["seed"] + k))
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "width": first["width"],
            "height": first["height"],
            "num_inference_steps": first["steps"],
            "guidance_scale": first["guidance"],
            "generator": generators,
            "output_type": "pil",
        }
        if first.get("negative_prompt") is not None:
            if "negative_prompt" not in self._params:
                raise JobError(f"model {self.entry.id!r} does not take a negative_prompt", code="invalid_input")
            kwargs["negative_prompt"] = negatives
            if "true_cfg_scale" in self._params:
                # FLUX ignores the negative prompt unless true CFG is on (scale > 1);
                # ``guidance`` is the one scale the job gives, so it drives both.
                kwargs["true_cfg_scale"] = first["guidance"]
        limit = getattr(getattr(self.pipe, "tokenizer_2", None), "model_max_length", None)
        default = self._params.get("max_sequence_length")
        if limit and default is not None and isinstance(default.default, int) and limit < default.default:
            # Padding the T5 prompt past what its tokenizer holds only costs time
            # (the tiny models use 32 tokens; real FLUX holds the default 512).
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
                # FluxPipeline (and most diffusers pipelines) skip the remaining
                # steps once ``interrupt`` is true; the call then returns early.
                pipe._interrupt = True
            return {}  # no tensors changed

        with torch.inference_mode():
            images = self.pipe(**kwargs, callback_on_step_end=on_step_end).images

        results: list[ItemResult | BaseException] = []
        start = 0
        for i, item in enumerate(items):
            n = item.input["num_images"]
            mine, start = images[start : start + n], start + n
            # A cancel that lands during decoding still wins over the finished images.
            if canceled[i] or item.is_canceled():
                results.append(JobCanceled("canceled"))
            else:
                results.append(_item_result(mine, item.input["seed"]))
        return results


def _item_result(images: list, seed: int) -> ItemResult:
    outputs, artifacts = [], []
    for k, image in enumerate(images):
        name = f"image-{k}.png"
        buf = io.BytesIO()
        # Fast over small: compress_level 1 encodes several times faster than the default.
        image.save(buf, format="PNG", optimize=False, compress_level=1)
        artifacts.append(Artifact(name, buf.getvalue(), "image/png"))
        outputs.append(
            {
                "url": {"$artifact": name},
                "content_type": "image/png",
                "width": image.width,
                "height": image.height,
                "seed": seed + k,
            }
        )
    return ItemResult(output={"images": outputs}, artifacts=artifacts)
