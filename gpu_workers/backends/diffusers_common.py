"""What the diffusers backends share: one resident ``DiffusionPipeline``, one call per batch.

A batch of compatible jobs runs as ONE pipeline call, with one seeded generator per
output so an output depends only on its own seed. Progress and cancellation go through
``callback_on_step_end``; when every job of the call is canceled the call stops between
steps. Subclasses say what their kind adds to the call and how an output becomes an
``ItemResult``.

torch and diffusers are imported when a method needs them, never at import time, so
the API and the registry can import the backends on machines without them.
"""

from __future__ import annotations

import abc
import gc
import inspect
import time
from typing import TYPE_CHECKING, Any

from vramq.jobs.errors import JobCanceled, JobError, MissingExtra

from .base import Backend, ItemResult, WorkItem

if TYPE_CHECKING:
    # The defining module: mypy reads ``diffusers.DiffusionPipeline`` as diffusers' dummy object.
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline


class _AllCanceled(Exception):
    """Raised from the step callback to abandon a call whose every job was canceled."""


class DiffusersBackend(Backend):
    """A ``DiffusionPipeline`` loaded from ``entry.weights``, run one call per batch."""

    extra: str
    """The extra that installs this backend's dependencies (for ``MissingExtra``)."""
    output_type: str
    """The pipeline's ``output_type``: the form ``item_result`` gets each output in."""
    output_field: str
    """The attribute of the pipeline's result that holds the outputs, one per generator."""
    prompt_tokenizer: str
    """The pipeline attribute holding the tokenizer that ``max_sequence_length`` bounds."""

    def __init__(self, entry, device: str):
        super().__init__(entry, device)
        self.pipe: DiffusionPipeline | None = None
        """The loaded pipeline; benchmarks call it with ``pipeline_kwargs(items)``."""
        self.load_seconds: float | None = None
        self._params: dict[str, inspect.Parameter] = {}

    def _torch(self):
        """Import torch and diffusers, or say which extra installs them."""
        try:
            import diffusers  # noqa: F401
            import torch
        except ImportError:
            raise MissingExtra("diffusers", self.extra) from None
        return torch

    # --- lifecycle -----------------------------------------------------------------

    def load(self) -> None:
        torch = self._torch()
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
        self.check_pipeline(pipe)
        self.pipe = pipe
        self.load_seconds = time.perf_counter() - started

    def check_pipeline(self, pipe) -> None:
        """Raise ``ConfigError`` if ``pipe`` cannot serve this kind; ``self._params`` is set."""

    def unload(self) -> None:
        self.pipe = None
        self._params = {}
        gc.collect()
        if str(self.device).startswith("cuda"):
            self._torch().cuda.empty_cache()

    # --- batching ------------------------------------------------------------------

    def outputs_per_job(self, inp: dict[str, Any]) -> int:
        """How many outputs (each with its own generator, seeded ``seed + k``) one job gets."""
        return 1

    def kind_kwargs(self, inp: dict[str, Any]) -> dict[str, Any]:
        """Pipeline arguments beyond the shared ones, for a call of jobs like ``inp``.

        Raises ``JobError`` (``invalid_input``) when the pipeline cannot do what they ask.
        """
        return {}

    def pipeline_kwargs(self, items: list[WorkItem]) -> dict[str, Any]:
        """Everything ``run_batch`` passes to the pipeline except the step callback.

        Fresh generators each call, so ``self.pipe(**backend.pipeline_kwargs(items))``
        renders exactly what ``run_batch(items)`` renders. Raises ``JobError``
        (``invalid_input``) when the items ask for something this pipeline cannot do.
        """
        torch = self._torch()
        if self.pipe is None:
            raise RuntimeError("load() must run before the first batch")
        if len({self.batch_key(item.input) for item in items}) != 1:
            raise ValueError("items of one call must have equal batch keys")
        first = items[0].input
        kwargs = self.kind_kwargs(first)
        prompts, negatives, generators = [], [], []
        for item in items:
            inp = item.input
            for k in range(self.outputs_per_job(inp)):
                prompts.append(inp["prompt"])
                negatives.append(inp.get("negative_prompt"))
                generators.append(torch.Generator(self.device).manual_seed(inp["seed"] + k))
        kwargs.update(
            prompt=prompts,
            width=first["width"],
            height=first["height"],
            num_inference_steps=first["steps"],
            guidance_scale=first["guidance"],
            generator=generators,
            output_type=self.output_type,
        )
        if first.get("negative_prompt") is not None:
            if "negative_prompt" not in self._params:
                raise JobError(f"model {self.entry.id!r} does not take a negative_prompt", code="invalid_input")
            kwargs["negative_prompt"] = negatives
        limit = getattr(getattr(self.pipe, self.prompt_tokenizer, None), "model_max_length", None)
        default = self._params.get("max_sequence_length")
        if limit and default is not None and isinstance(default.default, int) and limit < default.default:
            # Padding the prompt past what its tokenizer holds only costs time.
            kwargs["max_sequence_length"] = limit
        return kwargs

    # --- running -------------------------------------------------------------------

    @abc.abstractmethod
    def item_result(self, inp: dict[str, Any], outputs) -> ItemResult:
        """One job's result from its ``outputs_per_job(inp)`` outputs of the call."""

    def run_batch(self, items: list[WorkItem]) -> list[ItemResult | BaseException]:
        torch = self._torch()
        canceled = [item.is_canceled() for item in items]
        if all(canceled):
            return [JobCanceled("canceled") for _ in items]
        try:
            kwargs = self.pipeline_kwargs(items)
        except JobError as exc:
            return [JobError(str(exc), code=exc.code) for _ in items]
        pipe = self.pipe
        assert pipe is not None  # pipeline_kwargs refuses to run before load()
        steps = kwargs["num_inference_steps"]

        def on_step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            for i, item in enumerate(items):
                item.on_progress((step + 1) / steps)
                canceled[i] = canceled[i] or item.is_canceled()
            if all(canceled):
                # Not ``pipe._interrupt``: pipelines that honour it skip the remaining
                # steps but still run the VAE decode (Wan's costs as much as many steps)
                # for outputs nobody will get.
                raise _AllCanceled
            return {}  # no tensors changed

        try:
            with torch.inference_mode():
                # DiffusionPipeline declares no __call__: each pipeline class has its own.
                # (unused-ignore: without diffusers installed the pipeline's type is Any.)
                call = pipe(**kwargs, callback_on_step_end=on_step_end)  # type: ignore[operator, unused-ignore]
                outputs = getattr(call, self.output_field)
        except _AllCanceled:
            return [JobCanceled("canceled") for _ in items]

        results: list[ItemResult | BaseException] = []
        start = 0
        for i, item in enumerate(items):
            n = self.outputs_per_job(item.input)
            mine, start = outputs[start : start + n], start + n
            # A cancel that lands during decoding still wins over the finished outputs.
            if canceled[i] or item.is_canceled():
                results.append(JobCanceled("canceled"))
            else:
                results.append(self.item_result(item.input, mine))
        return results
