"""The VRAM estimator: known answers for real architectures, weights read from headers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramq.gpu_workers import vram
from vramq.gpu_workers.vram import estimate, estimate_entry
from vramq.jobs import vram as arithmetic
from vramq.jobs.catalog import TINY_CATALOG, load_catalog
from vramq.jobs.errors import ConfigError
from vramq.jobs.vram import Estimate, dtype_bytes

CONFIGS = Path(__file__).parent / "data" / "model-configs"


def cfg(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


# --- known answers: large language models -------------------------------------------------

LLMS = {  # file: (params, weights bf16 GB, KV fp16 bytes per token)
    "qwen2.5-0.5b-instruct": (0.494e9, 0.99, 12_288),
    "qwen2.5-7b-instruct": (7.616e9, 15.23, 57_344),
    "qwen2.5-72b-instruct": (72.7e9, 145.4, 327_680),
    "llama-3-70b": (70.6e9, 141.1, 327_680),
}


@pytest.mark.parametrize("name", LLMS)
def test_llm_known_answers(name):
    params, weights_gb, kv_per_token = LLMS[name]
    e = estimate(CONFIGS / f"{name}.json", context=1, seqs=1)
    assert e.params == pytest.approx(params, rel=1e-3)
    assert e.weights_bytes == 2 * e.params
    decimals = len(str(weights_gb).split(".")[1])  # as many as the published figure has
    assert round(e.weights_bytes / 1e9, decimals) == weights_gb
    assert e.kv_cache_bytes == kv_per_token
    assert (e.dtype, e.kv_dtype, e.kv_tokens, e.source) == ("bf16", "fp16", 1, "config")


def test_qwen_7b_kv_at_its_full_context():
    e = estimate(CONFIGS / "qwen2.5-7b-instruct.json")  # context = max_position_embeddings
    assert e.kv_tokens == 32_768
    assert e.kv_cache_bytes == 57_344 * 32_768
    assert e.to_json()["kv_cache_gb"] == 1.879


def test_llama_70b_at_200k_tokens_fp16_and_fp8_kv():
    fp16 = estimate(CONFIGS / "llama-3-70b.json", context=200_000)
    fp8 = estimate(CONFIGS / "llama-3-70b.json", context=200_000, kv_dtype="fp8")
    assert fp16.kv_cache_bytes == 327_680 * 200_000 and round(fp16.kv_cache_bytes / 1e9, 1) == 65.5
    assert fp8.kv_cache_bytes == fp16.kv_cache_bytes // 2 and round(fp8.kv_cache_bytes / 1e9, 1) == 32.8
    assert fp8.kv_dtype == "fp8"
    # Two sequences of 100K tokens hold as much KV cache as one of 200K.
    assert estimate(CONFIGS / "llama-3-70b.json", context=100_000, seqs=2).kv_cache_bytes == fp16.kv_cache_bytes


@pytest.mark.parametrize("name", LLMS)
def test_llm_closed_formula_matches_the_model_built_on_meta(name):
    c = cfg(name)
    assert arithmetic._llama_params(c, name) == vram.meta_params(c, name)


def test_text_activations_follow_the_documented_formula():
    c = cfg("qwen2.5-0.5b-instruct")
    e = estimate(CONFIGS / "qwen2.5-0.5b-instruct.json", context=4096, seqs=4)
    step_tokens = min(4 * 4096, max(4096, 8192))  # 8192
    expected = step_tokens * (4 * c["hidden_size"] + 2 * c["intermediate_size"]) * 2 + 4 * c["vocab_size"] * 4
    assert e.activations_bytes == expected


def test_quantization_config_sets_bytes_per_param(tmp_path):
    c = cfg("llama-3-70b")
    for qc, label, per_param in [
        ({"quant_method": "awq", "bits": 4}, "int4", 0.5),
        ({"quant_method": "fp8"}, "fp8", 1),
    ]:
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({**c, "quantization_config": qc}))
        e = estimate(path)
        assert e.weights_bytes == round(e.params * per_param) and e.dtype == label


def test_dtype_argument_and_config_dtype(tmp_path):
    assert estimate(CONFIGS / "qwen2.5-0.5b-instruct.json", dtype="float32").dtype == "fp32"
    e = estimate(CONFIGS / "qwen2.5-0.5b-instruct.json", dtype="fp32")
    assert e.weights_bytes == 4 * e.params
    no_dtype = {k: v for k, v in cfg("qwen2.5-0.5b-instruct").items() if k != "torch_dtype"}
    (tmp_path / "c.json").write_text(json.dumps({**no_dtype, "dtype": "float16"}))
    assert estimate(tmp_path / "c.json").dtype == "fp16"


# --- known answers: FLUX, Whisper -----------------------------------------------------------

COMPONENTS = {  # file: (params, relative tolerance)
    "flux.1-schnell-transformer": (11.9e9, 0.01),
    "t5-v1_1-xxl-encoder": (4.76e9, 0.01),
    "clip-vit-l-14-text": (123e6, 0.01),
    "flux.1-vae": (84e6, 0.01),
    "whisper-large-v3": (1.55e9, 0.01),
}


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_known_answers(name):
    params, rel = COMPONENTS[name]
    e = estimate(CONFIGS / f"{name}.json", kind="image" if "whisper" not in name else None)
    assert e.params == pytest.approx(params, rel=rel)
    assert e.weights_bytes == 2 * e.params and e.kv_dtype is None and e.kv_tokens == 0


def write_flux_pipeline(root: Path) -> Path:
    """A diffusers-style FLUX.1-schnell folder of configs only (no weights)."""
    parts = {
        "transformer": ("diffusers", "FluxTransformer2DModel", "flux.1-schnell-transformer"),
        "text_encoder": ("transformers", "CLIPTextModel", "clip-vit-l-14-text"),
        "text_encoder_2": ("transformers", "T5EncoderModel", "t5-v1_1-xxl-encoder"),
        "vae": ("diffusers", "AutoencoderKL", "flux.1-vae"),
    }
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "image_encoder": [None, None],
    }
    for name, (lib, cls, file) in parts.items():
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text((CONFIGS / f"{file}.json").read_text())
        index[name] = [lib, cls]
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def test_flux_pipeline_sums_its_components(tmp_path):
    e = estimate(write_flux_pipeline(tmp_path / "flux"))
    assert 16.8e9 <= e.params <= 16.9e9
    assert set(e.components) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert sum(e.components.values()) == e.params
    assert e.components["transformer"] == pytest.approx(11.9e9, rel=0.01)
    assert (e.source, e.dtype, e.kv_dtype, e.kv_tokens) == ("config", "bf16", None, 0)
    assert e.weights_bytes == 2 * e.params
    # 1024x1024: transformer tokens = 64*64 + 512, hidden = 24*128; VAE at 128 channels.
    expected = (4096 + 512) * 3072 * 2 * 12 + 1024 * 1024 * 128 * 2 * 4
    assert e.activations_bytes == expected
    assert estimate(tmp_path / "flux", batch=2).activations_bytes == 2 * expected


def test_whisper_activations(tmp_path):
    e = estimate(CONFIGS / "whisper-large-v3.json", batch=2)
    d, layers = 1280, 32
    per_item = 1500 * d * 2 * 8 + 2 * layers * d * (448 + 1500) * 5 * 2
    assert e.activations_bytes == 2 * per_item


# --- weights on disk --------------------------------------------------------------------


def test_tiny_qwen2_header_count_equals_config_count(models_dir):
    d = models_dir / "tiny-qwen2"
    e = estimate(d)
    c = json.loads((d / "config.json").read_text())
    assert e.source == "safetensors"
    assert e.params == arithmetic.config_params(c) == vram.meta_params(c, d)
    assert e.dtype == "fp32" and e.weights_bytes == 4 * e.params


@pytest.mark.parametrize("model, kind", [("tiny-flux", "image"), ("tiny-video", "video")])
def test_tiny_pipeline_components_match_their_configs(models_dir, model, kind):
    d = models_dir / model
    e = estimate(d)
    assert e == estimate(d, kind=kind)  # FluxPipeline -> image, WanPipeline -> video
    index = json.loads((d / "model_index.json").read_text())
    assert e.source == "safetensors"
    for name, n in e.components.items():
        c = json.loads((d / name / "config.json").read_text())
        assert n == arithmetic.config_params(c, name, index[name][1], fallback_count=vram.meta_params), name
    assert set(e.components) >= {"transformer", "vae", "text_encoder"}
    assert e.params == sum(e.components.values())
    assert e.activations_bytes > 0 and e.kv_tokens == 0


def test_tiny_whisper_ctranslate2(models_dir):
    d = models_dir / "tiny-whisper"
    e = estimate(d)
    assert e.source == "ctranslate2"
    assert e.weights_bytes == (d / "model.bin").stat().st_size
    assert e.dtype == "fp32" and e.kv_dtype is None
    assert 0 < e.params <= e.weights_bytes / 4 and e.activations_bytes > 0
    # Served in fp16, the float32 file's weights take half the room.
    assert estimate(d, dtype="fp16").weights_bytes == pytest.approx(e.weights_bytes / 2, rel=0.01)


def test_quantised_tensors_count_at_their_stored_bytes(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file(
        {
            "q": torch.zeros(3, 5, dtype=torch.int8),
            "packed_int4": torch.zeros(4, 2, dtype=torch.uint8),
            "norm": torch.zeros(7, dtype=torch.bfloat16),
        },
        str(tmp_path / "model.safetensors"),
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg("qwen2.5-0.5b-instruct")))
    e = estimate(tmp_path)
    assert e.source == "safetensors" and e.params == 15 + 8 + 7
    assert e.weights_bytes == 15 + 8 + 2 * 7
    assert estimate(tmp_path, dtype="fp32").weights_bytes == 15 + 8 + 4 * 7  # only floats follow the dtype


def test_sharded_safetensors_follow_the_index(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(10, dtype=torch.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(6, dtype=torch.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    save_file({"c": torch.zeros(100, dtype=torch.float32)}, str(tmp_path / "stale.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg("qwen2.5-0.5b-instruct")))
    assert estimate(tmp_path).params == 16


# --- catalog entries --------------------------------------------------------------------


def test_estimate_entry_on_the_tiny_catalog(models_dir):
    catalog = load_catalog(TINY_CATALOG, models_dir=models_dir)
    estimates = {entry.id: estimate_entry(entry) for entry in catalog}
    assert set(estimates) == {"tiny-flux", "tiny-qwen2", "tiny-whisper", "tiny-video", "echo"}
    assert estimates.pop("echo").total_bytes == 0  # no weights, no work
    for model_id, e in estimates.items():
        assert e.total_bytes > e.weights_bytes > 0, model_id
        assert e.dtype == "fp32", model_id
    qwen = catalog.get("tiny-qwen2")
    assert estimates["tiny-qwen2"].kv_tokens == qwen.limit.max_context * qwen.max_batch
    assert estimates["tiny-whisper"].source == "ctranslate2"


def test_estimate_entry_resolves_relative_weights_against_models_dir(models_dir):
    entry = load_catalog(TINY_CATALOG, models_dir=models_dir).get("tiny-video")
    relative = entry.model_copy(update={"weights": Path("tiny-video")})
    assert estimate_entry(relative, models_dir) == estimate_entry(entry)
    lim = entry.limit
    expected = estimate(
        models_dir / "tiny-video",
        kind="video",
        dtype="float32",
        width=lim.max_width,
        height=lim.max_height,
        frames=lim.max_frames,
        batch=entry.max_batch,
    )
    assert estimate_entry(entry) == expected


# --- the Estimate itself ----------------------------------------------------------------


def test_headroom_is_20_percent_and_json_keys():
    e = estimate(CONFIGS / "qwen2.5-7b-instruct.json", seqs=8, context=8192)
    need = e.weights_bytes + e.kv_cache_bytes + e.activations_bytes
    assert e.headroom_bytes == round(0.2 * need)
    assert e.total_bytes == need + e.headroom_bytes
    assert e.total_bytes == pytest.approx(1.2 * need, abs=1)
    j = e.to_json()
    assert {
        "params",
        "weights_gb",
        "kv_cache_gb",
        "activations_gb",
        "headroom_gb",
        "total_gb",
        "dtype",
        "kv_dtype",
    } <= set(j)
    assert j["weights_gb"] == round(e.weights_bytes / 1e9, 3) and j["total_gb"] == round(e.total_bytes / 1e9, 3)
    assert j["params"] == e.params and j["dtype"] == "bf16" and j["kv_dtype"] == "fp16"
    json.dumps(j)
    assert isinstance(e, Estimate)


def test_dtype_bytes():
    assert [
        dtype_bytes(n) for n in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16", "fp8", "int8", "int4")
    ] == [4, 4, 2, 2, 2, 2, 1, 1, 0.5]
    with pytest.raises(ValueError, match="bf16"):
        dtype_bytes("fp64")
    with pytest.raises(ValueError, match="int4"):
        estimate(CONFIGS / "qwen2.5-7b-instruct.json", dtype="q4")


def test_errors_name_the_path_or_architecture(tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        estimate(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty"):
        estimate(tmp_path / "empty")
    (tmp_path / "odd.json").write_text(
        json.dumps({"architectures": ["FrobnicatorForCausalLM"], "model_type": "frobnicator", "hidden_size": 8})
    )
    with pytest.raises(ConfigError, match="FrobnicatorForCausalLM"):
        estimate(tmp_path / "odd.json")
    (tmp_path / "odd2.json").write_text(json.dumps({"_class_name": "FrobnicatorTransformer2DModel"}))
    with pytest.raises(ConfigError, match="FrobnicatorTransformer2DModel"):
        estimate(tmp_path / "odd2.json")
    with pytest.raises(ConfigError, match="kind"):
        estimate(CONFIGS / "t5-v1_1-xxl-encoder.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        estimate(tmp_path / "bad.json")


@pytest.mark.e2e
def test_the_pure_estimate_never_needs_torch(models_dir, tmp_path):
    code = (
        "import sys; from pathlib import Path; from vramq.jobs.vram import estimate, estimate_entry\n"
        "from vramq.jobs.catalog import TINY_CATALOG, load_catalog\n"
        "from vramq.jobs.errors import ConfigError\n"
        f"for e in load_catalog(TINY_CATALOG, models_dir={str(models_dir)!r}):\n"
        "    assert (estimate_entry(e).total_bytes > 0) == (e.weights is not None)\n"
        f"assert estimate({str(CONFIGS / 'llama-3-70b.json')!r}).params > 7e10\n"
        "try:\n"
        f"    estimate({str(CONFIGS / 'flux.1-vae.json')!r})\n"
        "except ConfigError as exc:\n"
        "    assert 'torch' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('no ConfigError')\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
