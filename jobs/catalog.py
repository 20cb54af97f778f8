"""The model catalog: which models exist, how they run, and what input they accept.

A catalog is a TOML file with one ``[[models]]`` table per model. It is validated in
full when loaded, so a bad entry stops start-up with a message naming the entry and
the field. Each entry also yields the pydantic model that validates a job's input for
that model, with the entry's limits as the bounds and its defaults filled in.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from .errors import ConfigError, InputError

KINDS = ("text", "image", "video", "speech")
BACKENDS = {"text": ("vllm", "echo"), "image": ("diffusers",), "video": ("diffusers",), "speech": ("faster_whisper",)}
NO_WEIGHTS = ("echo",)
"""Backends that load no weights: ``echo`` does no work (it exists to measure the queue)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageLimits(_Strict):
    max_width: int = Field(1024, ge=16)
    max_height: int = Field(1024, ge=16)
    min_side: int = Field(64, ge=16)
    size_multiple: int = Field(16, ge=1)
    max_steps: int = Field(50, ge=1)
    max_num_images: int = Field(4, ge=1)
    max_guidance: float = Field(20.0, ge=0)
    max_prompt_chars: int = Field(2000, ge=1)


class VideoLimits(_Strict):
    max_width: int = Field(1024, ge=16)
    max_height: int = Field(1024, ge=16)
    min_side: int = Field(64, ge=16)
    size_multiple: int = Field(16, ge=1)
    max_frames: int = Field(121, ge=1)
    frame_step: int = Field(1, ge=1)
    """``num_frames`` must be ``k * frame_step + 1`` (4 for Wan: its VAE packs 4 frames)."""
    max_fps: int = Field(60, ge=1)
    max_steps: int = Field(50, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)


class TextLimits(_Strict):
    max_context: int = Field(4096, ge=16)
    max_tokens: int = Field(2048, ge=1)
    max_prompt_chars: int = Field(100_000, ge=1)
    max_messages: int = Field(256, ge=1)
    max_stop: int = Field(8, ge=0)


class SpeechLimits(_Strict):
    max_audio_seconds: float = Field(3600.0, gt=0)
    max_audio_bytes: int = Field(100 * 1024 * 1024, ge=1)


Limits = ImageLimits | VideoLimits | TextLimits | SpeechLimits
"""An entry's limits: the class that its kind names in ``LIMITS``."""
LIMITS: dict[str, type[Limits]] = {
    "image": ImageLimits,
    "video": VideoLimits,
    "text": TextLimits,
    "speech": SpeechLimits,
}


class Price(_Strict):
    """What a job of the model costs; see jobs.pricing for the rules."""

    tokens_per_gpu_second: float | None = Field(None, gt=0)
    """None: from the VRAM the model ties up (``pricing.RATE_PER_GB`` per GB)."""
    min_tokens: int = Field(100, ge=0)
    """The least a job costs, however short."""
    seconds_per_unit: float | None = Field(None, gt=0)
    """The estimate's prior, GPU-seconds per unit of work, until recent runs calibrate it."""


class ModelEntry(_Strict):
    """One model of the catalog."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")
    kind: Literal["text", "image", "video", "speech"]
    backend: Literal["vllm", "diffusers", "faster_whisper", "echo"]
    weights: Path | None = None
    """The model's folder (or file); None only for a backend in ``NO_WEIGHTS``."""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    limits: dict[str, Any] = Field(default_factory=dict)
    defaults: dict[str, Any] = Field(default_factory=dict)
    max_batch: int = Field(1, ge=1, le=256)
    max_wait_ms: int = Field(10, ge=0, le=10_000)
    price: Price = Price()
    description: str = ""

    @model_validator(mode="after")
    def _check(self) -> ModelEntry:
        if self.backend not in BACKENDS[self.kind]:
            raise ValueError(f"backend {self.backend!r} cannot serve kind {self.kind!r}")
        if (self.weights is None) != (self.backend in NO_WEIGHTS):
            raise ValueError(
                f"backend {self.backend!r} "
                + ("loads no weights: leave weights out" if self.weights is not None else "needs weights")
            )
        LIMITS[self.kind].model_validate(self.limits)  # raises with the field named
        unknown = set(self.defaults) - set(INPUT_FIELDS[self.kind])
        if unknown:
            raise ValueError(f"defaults name unknown input fields: {sorted(unknown)}")
        try:  # the defaults must themselves be valid input under the limits
            _build_input_model(self).model_validate(_REQUIRED_SAMPLE[self.kind])
        except ValidationError as exc:
            bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValueError(f"defaults break the limits: {bad}") from None
        return self

    @property
    def limit(self) -> Limits:
        """The entry's limits as a typed object (unset limits take their defaults)."""
        return LIMITS[self.kind].model_validate(self.limits)

    @cached_property
    def input_model(self) -> type[BaseModel]:
        return _build_input_model(self)

    def validate_input(self, raw: Any) -> dict[str, Any]:
        """Validate a job's ``input`` for this model; return it with defaults filled in.

        Raises ``InputError`` whose ``errors`` name each bad field as ``["input", field]``.
        """
        if not isinstance(raw, dict):
            raise InputError("input must be an object", [{"loc": ["input"], "msg": "must be an object"}])
        try:
            parsed = self.input_model.model_validate(raw)
        except ValidationError as exc:
            raise InputError(
                f"input is not valid for model {self.id!r}",
                [{"loc": ["input", *map(_loc, e["loc"])], "msg": self._explain(e)} for e in exc.errors()],
            ) from None
        return parsed.model_dump()

    def _explain(self, err: ErrorDetails) -> str:
        """Pydantic's message, plus the name of the catalog limit that was passed."""
        field = err["loc"][0] if err["loc"] else None
        limit = LIMIT_OF.get(field) if isinstance(field, str) else None
        if err["type"] in ("less_than_equal", "string_too_long", "too_long") and limit:
            return f"{err['msg']} (limit {limit} of model {self.id})"
        if err["type"] == "greater_than_equal" and field in ("width", "height"):
            return f"{err['msg']} (limit min_side of model {self.id})"
        return err["msg"]

    def public(self) -> dict[str, Any]:
        """The entry as ``GET /v1/models`` shows it (without placement facts)."""
        return {
            "id": self.id,
            "kind": self.kind,
            "backend": self.backend,
            "description": self.description,
            "price": self.price.model_dump(exclude_none=True),
            "limits": self.limit.model_dump(),
            "defaults": _effective_defaults(self),
            "max_batch": self.max_batch,
        }


def _loc(part: Any) -> Any:
    return part if isinstance(part, (int, str)) else str(part)


# --- input schemas per kind ---------------------------------------------------------

INPUT_FIELDS: dict[str, tuple[str, ...]] = {
    "image": ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "num_images"),
    "video": ("prompt", "negative_prompt", "width", "height", "num_frames", "fps", "steps", "guidance", "seed"),
    "text": ("prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop"),
    "speech": ("audio", "language", "task"),
}

_BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "image": {"width": 512, "height": 512, "steps": 4, "guidance": 0.0, "num_images": 1},
    "video": {"width": 256, "height": 256, "num_frames": 17, "fps": 8, "steps": 10, "guidance": 5.0},
    "text": {"max_tokens": 256, "temperature": 1.0, "top_p": 1.0},
    "speech": {"task": "transcribe"},
}

SEED_MAX = 2**32 - 1

#: Which catalog limit bounds which input field (named in error messages).
LIMIT_OF: dict[str, str] = {
    "width": "max_width",
    "height": "max_height",
    "steps": "max_steps",
    "num_images": "max_num_images",
    "prompt": "max_prompt_chars",
    "negative_prompt": "max_prompt_chars",
    "num_frames": "max_frames",
    "fps": "max_fps",
    "max_tokens": "max_tokens",
    "messages": "max_messages",
    "stop": "max_stop",
    "guidance": "max_guidance",
}


def _effective_defaults(entry: ModelEntry) -> dict[str, Any]:
    """Built-in defaults lowered to the entry's limits, then the entry's own defaults."""
    limits = entry.limit.model_dump()
    out: dict[str, Any] = {}
    for name, value in _BUILTIN_DEFAULTS[entry.kind].items():
        cap = limits.get(LIMIT_OF.get(name, ""))
        out[name] = min(value, cap) if isinstance(value, (int, float)) and cap is not None else value
    return {**out, **entry.defaults}


def _integral(v: Any) -> Any:
    """A JSON number with no fraction (``64.0``) as the integer it is: JSON has one
    number type, and JSON Schema's ``integer`` (what /openapi.json says) includes it.
    Strings, booleans and fractions stay refused (the fields are strict)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


Integer = Annotated[int, BeforeValidator(_integral)]
"""An integer input field: strict, but ``64.0`` is ``64``."""
Seed = Annotated[int, Field(ge=0, le=SEED_MAX, strict=True), BeforeValidator(_integral)]
"""A seed: the bounds on the integer itself, before the validator, so that the JSON schema
of ``Seed | None`` has them as ``minimum``/``maximum``."""

_REQUIRED_SAMPLE: dict[str, dict[str, str]] = {
    "image": {"prompt": "x"},
    "video": {"prompt": "x"},
    "text": {"prompt": "x"},
    "speech": {"audio": "file_x"},
}


SpeechTask = Literal["transcribe", "translate"]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


def _build_input_model(entry: ModelEntry) -> type[BaseModel]:
    lim = entry.limit  # the class its kind names in LIMITS
    d = _effective_defaults(entry)
    cfg = ConfigDict(extra="forbid", validate_default=True)
    if isinstance(lim, (ImageLimits, VideoLimits)):

        def side(name: str, maximum: int) -> tuple[Any, Any]:
            return (Integer, Field(d[name], ge=lim.min_side, le=maximum, multiple_of=lim.size_multiple, strict=True))

        # ``(type, Field)`` each; typed Any, as ``**fields`` also meets create_model's
        # other keyword parameters.
        fields: dict[str, Any] = {
            "prompt": (str, Field(min_length=1, max_length=lim.max_prompt_chars)),
            "negative_prompt": (str | None, Field(d.get("negative_prompt"), max_length=lim.max_prompt_chars)),
            "width": side("width", lim.max_width),
            "height": side("height", lim.max_height),
            "steps": (Integer, Field(d["steps"], ge=1, le=lim.max_steps, strict=True)),
            "guidance": (float, Field(d["guidance"], ge=0, le=getattr(lim, "max_guidance", 20.0))),
            "seed": (Seed | None, Field(d.get("seed"))),
        }
        if isinstance(lim, ImageLimits):
            fields["num_images"] = (Integer, Field(d["num_images"], ge=1, le=lim.max_num_images, strict=True))
            return create_model("ImageInput", __config__=cfg, **fields)
        fields["num_frames"] = (Integer, Field(d["num_frames"], ge=1, le=lim.max_frames, strict=True))
        fields["fps"] = (Integer, Field(d["fps"], ge=1, le=lim.max_fps, strict=True))

        video = lim

        def frame_rule(v: int) -> int:
            if (v - 1) % video.frame_step:
                k = (v - 1) // video.frame_step
                raise ValueError(
                    f"must be {video.frame_step}k+1, e.g. {k * video.frame_step + 1} or "
                    f"{(k + 1) * video.frame_step + 1} (limit frame_step of model {entry.id})"
                )
            return v

        # Values typed Any: pydantic annotates ``__validators__`` as plain functions, but
        # takes (and documents) decorated ones like these.
        validators: dict[str, Any] = {"frames": field_validator("num_frames")(frame_rule)}
        return create_model("VideoInput", __config__=cfg, **fields, __validators__=validators)
    if isinstance(lim, TextLimits):
        validators = {"one_of": model_validator(mode="after")(_prompt_xor_messages)}
        model = create_model(
            "TextInput",
            __config__=cfg,
            prompt=(str | None, Field(None, min_length=1, max_length=lim.max_prompt_chars)),
            messages=(list[Message] | None, Field(None, min_length=1, max_length=lim.max_messages)),
            max_tokens=(Integer, Field(d["max_tokens"], ge=1, le=lim.max_tokens, strict=True)),
            temperature=(float, Field(d["temperature"], ge=0, le=2)),
            top_p=(float, Field(d["top_p"], gt=0, le=1)),
            seed=(Seed | None, Field(d.get("seed"))),
            stop=(list[str] | None, Field(d.get("stop"), max_length=lim.max_stop)),
            __validators__=validators,
        )
        return model
    return create_model(
        "SpeechInput",
        __config__=cfg,
        audio=(str, Field(min_length=1)),
        language=(str | None, Field(d.get("language"), min_length=2, max_length=8)),
        task=(SpeechTask, Field(d["task"])),
        __validators__={"audio_ref": field_validator("audio")(_audio_ref)},
    )


def _prompt_xor_messages(m: Any) -> Any:
    """``m``: a ``TextInput`` (a model made at run time, so typed Any here)."""
    if (m.prompt is None) == (m.messages is None):
        raise ValueError("give exactly one of prompt or messages")
    return m


def _audio_ref(v: str) -> str:
    if not (v.startswith("file_") or v.startswith("data:audio/")):
        raise ValueError("must be a file_… id or a data:audio/…;base64 URI")
    return v


# --- loading ------------------------------------------------------------------------


class Catalog:
    """The models a deployment serves, by id."""

    def __init__(self, entries: list[ModelEntry], source: str = "<memory>"):
        self.source = source
        self.models: dict[str, ModelEntry] = {}
        for e in entries:
            if e.id in self.models:
                raise ConfigError(f"{source}: model id {e.id!r} appears twice")
            self.models[e.id] = e

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.models.values())

    def __len__(self) -> int:
        return len(self.models)

    def get(self, model_id: str) -> ModelEntry | None:
        return self.models.get(model_id)


def load_catalog(path: str | Path, models_dir: str | Path | None = None) -> Catalog:
    """Load and validate a catalog file.

    Relative ``weights`` paths resolve against ``models_dir`` when given, else against
    the catalog file's folder.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"catalog file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = Path(models_dir) if models_dir else path.parent
    raw_models = doc.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise ConfigError(f"{path}: needs at least one [[models]] table")
    entries: list[ModelEntry] = []
    for i, raw in enumerate(raw_models):
        name = raw.get("id", f"#{i + 1}") if isinstance(raw, dict) else f"#{i + 1}"
        try:
            entry = ModelEntry.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(entry)'}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"{path}: model {name}: {problems}") from None
        if entry.weights is not None and not entry.weights.is_absolute():
            entry = entry.model_copy(update={"weights": (base / entry.weights).resolve()})
        entries.append(entry)
    return Catalog(entries, source=str(path))


TINY_CATALOG = Path(__file__).parent / "catalogs" / "tiny.toml"
"""Tiny random-weight models of the real architectures, and ``echo``: fast tests."""
SMALL_CATALOG = Path(__file__).parent / "catalogs" / "small.toml"
"""Two real models small enough for a CPU (``vramq models make-small``)."""


def load_embedded_catalog(models_dir: str | Path, small: bool = True) -> Catalog:
    """The embedded default: the tiny catalog, and the small one beside it unless ``small``
    is False; weights under ``models_dir``."""
    entries = list(load_catalog(TINY_CATALOG, models_dir=models_dir))
    if small:
        entries += list(load_catalog(SMALL_CATALOG, models_dir=models_dir))
    return Catalog(entries, source=f"{TINY_CATALOG}" + (f" + {SMALL_CATALOG}" if small else ""))
