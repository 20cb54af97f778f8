"""How much GPU memory a model needs: weights + KV cache + activations, plus 20 % headroom.

    need = (weights + kv_cache + activations) * 1.2      headroom = 0.2 * (w + kv + act)

**Weights** are parameters x bytes per parameter (fp32 4, bf16/fp16 2, fp8/int8 1,
int4 0.5). The parameters are counted, in order of preference, from

* safetensors headers (8-byte little-endian length + JSON; no tensor is read). A
  floating-point tensor counts at the serving dtype; an integer or fp8 tensor (I8, U8,
  I32, F8_*: quantised or packed int4 weights) counts at its stored bytes;
* a CTranslate2 ``model.bin`` (its variable headers are walked, data skipped): weights
  are the file's size, re-priced for float variables if the serving dtype differs;
* the architecture in ``config.json``: an exact closed formula for Llama / Mistral /
  Qwen2 decoders, otherwise a ``fallback_count`` the caller passes
  (``vramq.gpu_workers.vram``: the model built on PyTorch's ``meta`` device, no memory,
  and its unique parameters summed; without one such a config is a ``ConfigError``). A
  ``quantization_config`` (``bits``, or ``quant_method: fp8``) sets the bytes per parameter.

**KV cache** (text only) = 2 (K, V) x layers x kv_heads x head_dim x tokens x kv bytes,
with head_dim = hidden_size / num_attention_heads unless the config gives ``head_dim``,
kv_heads = num_key_value_heads (default num_attention_heads), tokens = seqs x context.

**Activations** are first-order formulas, meant to be calibrated on a GPU (``b`` is the
activation dtype's bytes, 2 when the weights are fp8/int8/int4):

* text: T = min(seqs*context, 8192) tokens per forward step (vLLM's chunked-prefill
  budget, ``max_num_batched_tokens``: a long prompt is prefilled in chunks of at most
  that); act = T*(4*hidden + 2*intermediate)*b + seqs*vocab*4 (fp32 logits).
* image (FLUX-type diffusers pipeline): transformer tokens = batch*((W/16)*(H/16) + 512
  text tokens), act = tokens*hidden*b*12 with hidden = num_attention_heads *
  attention_head_dim; plus the VAE decode, batch*W*H*block_out_channels[0]*b*4. The two
  run one after the other, so summing them is a conservative bound.
* video (Wan-type): as image with latent frames = (frames-1)//4 + 1 multiplying the
  image tokens, and the VAE term multiplied by frames.
* speech (Whisper): batch * (1500*d_model*b*8 + decoder KV), decoder KV = 2 x
  decoder_layers x d_model x (448 self + 1500 cross positions) x beam 5 x b.

Pure Python (the API prices models with it, ``pricing``): nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .catalog import ImageLimits, TextLimits, VideoLimits
from .errors import ConfigError

if TYPE_CHECKING:
    from .catalog import ModelEntry

DTYPE_BYTES: dict[str, float] = {
    "fp32": 4,
    "float32": 4,
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "float16": 2,
    "fp8": 1,
    "int8": 1,
    "int4": 0.5,
}
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HEADROOM = 0.2
GB = 10**9

STEP_TOKENS = 8192  # vLLM's max_num_batched_tokens with chunked prefill
IMAGE_TEXT_TOKENS = 512  # T5 tokens the FLUX / Wan transformers attend to
VIDEO_DEFAULTS = (832, 480, 81)  # Wan 2.1's width, height, frames
IMAGE_DEFAULT_SIDE = 1024
WHISPER_ENCODER_POSITIONS, WHISPER_DECODER_POSITIONS, WHISPER_BEAM = 1500, 448, 5

_LLAMA_LIKE = {"llama", "mistral", "qwen2"}
_FLOAT_TENSORS = {"F64", "F32", "F16", "BF16"}
_FLOATS = ("fp32", "bf16", "fp16")
_CT2_TYPES = {0: ("fp32", 4), 1: ("int8", 1), 2: ("int16", 2), 3: ("int32", 4), 4: ("fp16", 2), 5: ("bf16", 2)}


def dtype_bytes(name: str) -> float:
    """Bytes per element of ``name`` (``"bf16"``, ``"float32"``, ``"int4"``...)."""
    try:
        return DTYPE_BYTES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dtype {name!r}; allowed: {', '.join(DTYPE_BYTES)}") from None


def _act_bytes(dtype: str) -> float:
    """Activations are computed in the float dtype; quantised weights compute in 16 bits."""
    return dtype_bytes(dtype) if dtype in _FLOATS else 2


def _short(name: str) -> str:
    dtype_bytes(name)
    return _SHORT.get(name, name)


def _gb(n: int) -> float:
    return round(n / GB, 3)


@dataclass(frozen=True)
class Estimate:
    """The bytes a model needs, by part; ``components`` holds a pipeline's params per component."""

    params: int
    weights_bytes: int
    kv_cache_bytes: int
    activations_bytes: int
    headroom_bytes: int
    dtype: str
    kv_dtype: str | None
    kv_tokens: int
    source: str
    components: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activations_bytes + self.headroom_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "weights_gb": _gb(self.weights_bytes),
            "kv_cache_gb": _gb(self.kv_cache_bytes),
            "activations_gb": _gb(self.activations_bytes),
            "headroom_gb": _gb(self.headroom_bytes),
            "total_gb": _gb(self.total_bytes),
            "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "kv_tokens": self.kv_tokens,
            "source": self.source,
            "components": dict(self.components),
        }


# --- reading weights ------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor name -> dtype, shape, data_offsets)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header of {n} bytes")
            header: dict[str, Any] = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file: {exc}") from None
    header.pop("__metadata__", None)
    return header


def _safetensors_files(d: Path) -> list[Path]:
    """The weight files of one model folder: the index's shards, else the plain files
    (``model.fp16.safetensors``-style variants only when there is nothing else)."""
    for index in d.glob("*.safetensors.index.json"):
        return sorted({d / name for name in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(d.glob("*.safetensors"))
    plain = [f for f in files if f.name.count(".") == 1]
    return plain or files


def _count_safetensors(files: list[Path], per_param: float) -> tuple[int, float]:
    params, nbytes = 0, 0.0
    for f in files:
        for t in read_safetensors_header(f).values():
            n = math.prod(t["shape"])
            params += n
            start, end = t["data_offsets"]
            nbytes += n * per_param if t["dtype"] in _FLOAT_TENSORS else end - start
    return params, nbytes


def read_ct2(path: Path) -> tuple[str, dict[str, tuple[tuple[int, ...], int]], list[str]]:
    """Walk a CTranslate2 ``model.bin``: (spec name, {variable: (shape, type id)}, alias names)."""
    with open(path, "rb") as f:

        def take(fmt: str) -> tuple[Any, ...]:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        def string() -> str:
            (n,) = take("H")
            return f.read(n)[:-1].decode()

        try:
            (version,) = take("I")
            spec = ""
            if version >= 2:
                spec = string()
                take("I")  # spec revision
            variables: dict[str, tuple[tuple[int, ...], int]] = {}
            for _ in range(take("I")[0]):
                name = string()
                shape = take("I" * take("B")[0])
                type_id, nbytes = take("BI")
                variables[name] = (shape, type_id if version >= 4 else {4: 0, 1: 1, 2: 4}.get(type_id, 0))
                f.seek(nbytes, 1)
            aliases = [string() for _ in range(2 * take("I")[0])][::2] if version >= 3 else []
        except (struct.error, UnicodeDecodeError):
            raise ConfigError(f"{path}: not a CTranslate2 model file this estimator can read") from None
    return spec, variables, aliases


# --- counting parameters from a config --------------------------------------------------


def _get(cfg: dict[str, Any], key: str, where: object) -> int:
    if cfg.get(key) is None:
        raise ConfigError(f"{where}: config has no {key!r}")
    value: int = cfg[key]
    return value


def _llama_params(cfg: dict[str, Any], where: object) -> int:
    """Exact count for Llama / Mistral / Qwen2 decoders (gated MLP, RMSNorm)."""
    h, inter = _get(cfg, "hidden_size", where), _get(cfg, "intermediate_size", where)
    layers, heads = _get(cfg, "num_hidden_layers", where), _get(cfg, "num_attention_heads", where)
    vocab = _get(cfg, "vocab_size", where)
    kv_heads, hd = cfg.get("num_key_value_heads") or heads, cfg.get("head_dim") or h // heads
    q, kv = heads * hd, kv_heads * hd
    attn = h * q + 2 * h * kv + q * h
    if cfg.get("model_type") == "qwen2":
        attn += q + 2 * kv  # Qwen2: biases on q, k, v
    elif cfg.get("attention_bias"):
        attn += q + 2 * kv + h
    mlp = 3 * h * inter + (2 * inter + h if cfg.get("mlp_bias") else 0)
    embeddings = vocab * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attn + mlp + 2 * h) + h


FallbackCount = Callable[[dict[str, Any], object, "str | None"], int]
"""``(config, where, class name hint) -> parameters`` for an architecture with no closed
formula (``vramq.gpu_workers.vram.meta_params``, which imports torch)."""


def config_params(
    cfg: dict[str, Any],
    where: object = "config",
    class_hint: str | None = None,
    *,
    fallback_count: FallbackCount | None = None,
) -> int:
    """Parameter count from a config: closed formula for Llama-likes, ``fallback_count``
    otherwise (refused with ``ConfigError`` without one: this module never imports torch)."""
    if cfg.get("model_type") in _LLAMA_LIKE:
        return _llama_params(cfg, where)
    if fallback_count is None:
        raise ConfigError(f"{where}: no weight files, and counting this architecture from its config needs torch")
    return fallback_count(cfg, where, class_hint)


def _quant_bytes(cfg: dict[str, Any]) -> tuple[float, str] | None:
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "fp8":
        return 1, "fp8"
    if q.get("bits"):
        return q["bits"] / 8, "int4" if q["bits"] <= 4 else "int8"
    return None


# --- activations ------------------------------------------------------------------------


def _diffusion_activations(cfg: dict[str, Any], b: float, batch: int, w: int, h: int, frames: int | None) -> float:
    """One diffusers component's term: the denoiser's tokens or the VAE decode (else 0)."""
    if cfg.get("attention_head_dim") and cfg.get("num_attention_heads"):
        latent_frames = (frames - 1) // 4 + 1 if frames else 1
        tokens = batch * (latent_frames * (w // 16) * (h // 16) + IMAGE_TEXT_TOKENS)
        heads: int = cfg["num_attention_heads"]
        head_dim: int = cfg["attention_head_dim"]
        return tokens * heads * head_dim * b * 12
    if str(cfg.get("_class_name", "")).startswith("Autoencoder"):
        channels: int = (cfg.get("block_out_channels") or [cfg.get("base_dim") or 128])[0]
        return batch * (frames or 1) * w * h * channels * b * 4
    return 0


def _speech_activations(d_model: int, decoder_layers: int, b: float, batch: int) -> float:
    encoder = WHISPER_ENCODER_POSITIONS * d_model * b * 8
    decoder_kv = (
        2 * decoder_layers * d_model * (WHISPER_DECODER_POSITIONS + WHISPER_ENCODER_POSITIONS) * WHISPER_BEAM * b
    )
    return batch * (encoder + decoder_kv)


# --- the estimate -----------------------------------------------------------------------


def _load_json(path: Path) -> dict[str, Any]:
    try:
        cfg: dict[str, Any] = json.loads(path.read_text())
        return cfg
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None


def _infer_kind(cfg: dict[str, Any], where: object) -> str:
    name = str(cfg.get("_class_name", ""))
    archs = cfg.get("architectures") or []
    if name:
        return "video" if any(s in name for s in ("Wan", "Video", "3D")) else "image"
    if cfg.get("model_type") == "whisper" or any("Whisper" in a for a in archs):
        return "speech"
    if cfg.get("model_type") in _LLAMA_LIKE or any(a.endswith("ForCausalLM") for a in archs):
        return "text"
    raise ConfigError(f"{where}: cannot tell which kind of model this is; pass kind=")


_Part = tuple[str, dict[str, Any], Path | None, str | None]


def _model_parts(path: Path) -> tuple[list[_Part], dict[str, Any] | None]:
    """The configs to count: [(component, config, folder holding its weights or None, class
    name from model_index.json)], and the pipeline's model_index.json (None if not one)."""
    if path.is_file():
        return [("model", _load_json(path), None, None)], None
    if (path / "model_index.json").is_file():
        index = _load_json(path / "model_index.json")
        parts: list[_Part] = [
            (name, _load_json(path / name / "config.json"), path / name, spec[1])
            for name, spec in index.items()
            if isinstance(spec, list) and spec and spec[0] and (path / name / "config.json").is_file()
        ]
        if not parts:
            raise ConfigError(f"{path}: model_index.json names no component with a config.json")
        return parts, index
    if (path / "config.json").is_file():
        return [("model", _load_json(path / "config.json"), path, None)], None
    raise ConfigError(f"{path}: no config.json, model_index.json or model.bin")


def estimate(
    path: str | Path,
    *,
    kind: str | None = None,
    dtype: str | None = None,
    kv_dtype: str = "fp16",
    context: int | None = None,
    seqs: int | None = None,
    batch: int = 1,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    fallback_count: FallbackCount | None = None,
) -> Estimate:
    """Estimate the VRAM a model needs to serve the given load (see the module docstring).

    ``path`` is a ``config.json`` (counted from the config alone) or a model folder:
    transformers (config.json + safetensors), diffusers pipeline (model_index.json, the
    components summed) or CTranslate2 (model.bin + config.json). ``source`` is
    ``"safetensors"`` only when every component was counted from its weight files.
    A component with neither weight files nor a closed formula is counted by
    ``fallback_count``; without one it raises ConfigError (see ``config_params``).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model path does not exist: {path}")
    if kind not in (None, "text", "image", "video", "speech"):
        raise ConfigError(f"unknown kind {kind!r}: text, image, video or speech")
    if path.is_dir() and (path / "model.bin").is_file() and not (path / "model_index.json").exists():
        return _estimate_ct2(path, read_ct2(path / "model.bin"), dtype, kind or "speech", batch)
    parts, index = _model_parts(path)
    kind = kind or _infer_kind(index or parts[0][1], path)
    if dtype is None:
        found = [c.get("torch_dtype") or c.get("dtype") for _, c, _, _ in parts]
        dtype = next((d for d in found if d in DTYPE_BYTES), "bf16")
    dtype = _short(dtype)
    act_b = _act_bytes(dtype)

    # Weights, component by component.
    params, nbytes, components, from_weights, label = 0, 0.0, {}, True, dtype
    for name, cfg, folder, hint in parts:
        quant = _quant_bytes(cfg)
        per_param, label = quant if quant else (dtype_bytes(dtype), label)
        files = _safetensors_files(folder) if folder else []
        if files:
            n, b = _count_safetensors(files, per_param)
        else:
            from_weights = False
            n = config_params(cfg, folder / "config.json" if folder else path, hint, fallback_count=fallback_count)
            b = n * per_param
        params, nbytes, components[name] = params + n, nbytes + b, n

    kv, kv_tokens, act = 0, 0, 0.0
    if kind == "text":
        cfg = parts[0][1]
        heads, hidden = _get(cfg, "num_attention_heads", path), _get(cfg, "hidden_size", path)
        head_dim = cfg.get("head_dim") or hidden // heads
        context, seqs = context or _get(cfg, "max_position_embeddings", path), seqs or 1
        kv_tokens, kv_dtype = seqs * context, _short(kv_dtype)
        kv = int(
            2
            * _get(cfg, "num_hidden_layers", path)
            * (cfg.get("num_key_value_heads") or heads)
            * head_dim
            * kv_tokens
            * dtype_bytes(kv_dtype)
        )
        step_tokens = min(kv_tokens, STEP_TOKENS)
        act = (
            step_tokens * (4 * hidden + 2 * _get(cfg, "intermediate_size", path)) * act_b
            + seqs * _get(cfg, "vocab_size", path) * 4
        )
    elif kind in ("image", "video"):
        if kind == "video":
            w, h, f = width or VIDEO_DEFAULTS[0], height or VIDEO_DEFAULTS[1], frames or VIDEO_DEFAULTS[2]
        else:
            w, h, f = width or IMAGE_DEFAULT_SIDE, height or IMAGE_DEFAULT_SIDE, None
        act = sum(_diffusion_activations(cfg, act_b, batch, w, h, f) for _, cfg, _, _ in parts)
    else:
        cfg = parts[0][1]
        act = _speech_activations(_get(cfg, "d_model", path), _get(cfg, "decoder_layers", path), act_b, batch)

    return _finish(
        params,
        nbytes,
        kv,
        act,
        label,
        kv_dtype if kind == "text" else None,
        kv_tokens,
        "safetensors" if from_weights else "config",
        components if index else {},
    )


def _estimate_ct2(
    path: Path,
    ct2: tuple[str, dict[str, tuple[tuple[int, ...], int]], list[str]],
    dtype: str | None,
    kind: str,
    batch: int,
) -> Estimate:
    """A CTranslate2 model: weights = model.bin's size, float variables re-priced when the
    compute dtype differs from the stored one (CTranslate2 converts them when loading).
    Params are the stored variables' elements (the converter stores equal tensors once)."""
    _, variables, aliases = ct2
    stored: dict[str, int] = {}
    for shape, type_id in variables.values():
        name = _CT2_TYPES.get(type_id, ("fp32", 4))[0]
        stored[name] = stored.get(name, 0) + math.prod(shape)
    dtype = _short(dtype) if dtype else max(stored, key=lambda n: stored[n], default="fp32")
    dtype = dtype if dtype in DTYPE_BYTES else "fp32"
    nbytes = float((path / "model.bin").stat().st_size)
    for shape, type_id in variables.values():
        name, size = _CT2_TYPES.get(type_id, ("fp32", 4))
        if name in _FLOATS and dtype in _FLOATS:
            nbytes += math.prod(shape) * (dtype_bytes(dtype) - size)
    act = 0.0
    if kind == "speech":
        emb = variables.get("decoder/embeddings/weight")
        if emb is None:
            raise ConfigError(f"{path}: model.bin is not a Whisper model (no decoder/embeddings/weight)")
        layers = {n.split("/")[1] for n in [*variables, *aliases] if n.startswith("decoder/layer_")}
        act = _speech_activations(emb[0][1], len(layers), _act_bytes(dtype), batch)
    return _finish(sum(stored.values()), nbytes, 0, act, dtype, None, 0, "ctranslate2", {})


def _finish(
    params: int,
    nbytes: float,
    kv: int,
    act: float,
    dtype: str,
    kv_dtype: str | None,
    kv_tokens: int,
    source: str,
    components: dict[str, int],
) -> Estimate:
    weights, act = round(nbytes), round(act)
    headroom = round(HEADROOM * (weights + kv + act))
    return Estimate(
        params=params,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        activations_bytes=act,
        headroom_bytes=headroom,
        dtype=dtype,
        kv_dtype=kv_dtype,
        kv_tokens=kv_tokens,
        source=source,
        components=components,
    )


def estimate_entry(
    entry: ModelEntry, models_dir: Path | None = None, *, fallback_count: FallbackCount | None = None
) -> Estimate:
    """Estimate a catalog entry at its limits (max context x max_batch sequences, largest
    images or videos at max_batch, max_batch audio chunks); ``fallback_count`` as in
    ``estimate``. A backend that loads no weights (``echo``) needs nothing: all zeros."""
    if entry.weights is None:
        return Estimate(
            params=0,
            weights_bytes=0,
            kv_cache_bytes=0,
            activations_bytes=0,
            headroom_bytes=0,
            dtype=_short(entry.dtype),
            kv_dtype=None,
            kv_tokens=0,
            source="no weights",
        )
    weights = Path(entry.weights)
    if not weights.is_absolute() and models_dir is not None:
        weights = Path(models_dir) / weights
    lim = entry.limit
    kw: dict[str, Any] = {"kind": entry.kind, "dtype": entry.dtype, "fallback_count": fallback_count}
    # An entry's limits are the class its kind names (catalog.LIMITS): text, image, video.
    if isinstance(lim, TextLimits):
        kw.update(context=lim.max_context, seqs=entry.max_batch)
    elif isinstance(lim, (ImageLimits, VideoLimits)):
        kw.update(width=lim.max_width, height=lim.max_height, batch=entry.max_batch)
        if isinstance(lim, VideoLimits):
            kw["frames"] = lim.max_frames
    else:
        kw["batch"] = entry.max_batch
    return estimate(weights, **kw)
