"""Text-to-image with a diffusers pipeline (FLUX and other ``DiffusionPipeline``s).

Jobs of the same size, steps, guidance, and either all or none with a negative prompt
share one pipeline call (``diffusers_common``), one generator per image; each image
is encoded as PNG.

torch, diffusers and PIL are imported when a method needs them, never at import time,
so the API and the registry can import this module on machines without them.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Hashable
from typing import Any

from .base import Artifact, ItemResult
from .diffusers_common import DiffusersBackend


class DiffusersImageBackend(DiffusersBackend):
    """A text-to-image ``DiffusionPipeline`` loaded from ``entry.weights``."""

    extra = "image"
    output_type = "pil"
    output_field = "images"
    # FLUX's T5 tokenizer; the tiny models' holds 32 tokens, real FLUX's the default 512.
    prompt_tokenizer = "tokenizer_2"

    def batch_key(self, inp: dict[str, Any]) -> Hashable:
        # Everything one pipeline call shares; prompts, seeds and counts may differ.
        has_negative = inp.get("negative_prompt") is not None
        return (inp["width"], inp["height"], inp["steps"], inp["guidance"], has_negative)

    def batch_cost(self, inp: dict[str, Any]) -> int:
        return inp["num_images"]

    def outputs_per_job(self, inp: dict[str, Any]) -> int:
        return inp["num_images"]

    def kind_kwargs(self, inp: dict[str, Any]) -> dict[str, Any]:
        if inp.get("negative_prompt") is not None and "true_cfg_scale" in self._params:
            # FLUX ignores the negative prompt unless true CFG is on (scale > 1);
            # ``guidance`` is the one scale the job gives, so it drives both.
            return {"true_cfg_scale": inp["guidance"]}
        return {}

    def item_result(self, inp: dict[str, Any], outputs) -> ItemResult:
        return _item_result(outputs, inp["seed"])


def _item_result(images: list, seed: int) -> ItemResult:
    outputs, artifacts = [], []
    for k, image in enumerate(images):
        name = f"image-{k}.png"
        # Encoded when stored, on the job's thread, not on the batcher's (Artifact.data).
        artifacts.append(Artifact(name, functools.partial(_png, image), "image/png"))
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


def _png(image) -> bytes:
    buf = io.BytesIO()
    # Fast over small: compress_level 1 encodes several times faster than the default.
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()
