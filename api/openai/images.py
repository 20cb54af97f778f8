"""``/images/generations``: an image job, waited on; each image as a signed vramq link
(``url``, valid ``VRAMQ_LINK_TTL`` seconds) or inline (``b64_json``, a PNG).

``size`` (``WxH``) must fit the model's limits (``max_width``, ``max_height``,
``min_side``, ``size_multiple``); ``n`` is at most its ``max_num_images``; ``seed`` is
vramq's extension (the n images get seeds ``seed``, ``seed + 1``, …).
"""

from __future__ import annotations

from typing import Any

from ..guards import json_body
from . import bp
from .bodies import image_request, image_response
from .waiting import entry_of, failure, services, submit, wait


def image_keys(output: dict[str, Any]) -> list[str]:
    """The object keys of a finished image job's PNGs (its stored output)."""
    return [image["url"]["$object"] for image in output["images"]]


@bp.post("/images/generations")
def generate_images():
    model, inp, fmt = image_request(json_body())
    entry_of(model, "image", "/images/generations")
    job = submit(model, inp)
    row, data = wait(job.id)
    if data["status"] != "succeeded" or data["output"] is None:
        raise failure(data)
    store = services().store
    return image_response(data, fmt, image_keys(row.output or {}), store.get)
