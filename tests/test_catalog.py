"""The catalog: loading, validation errors that name the entry and field, input models."""

from __future__ import annotations

import pytest

from vramq.jobs.catalog import TINY_CATALOG, ModelEntry, load_catalog, load_embedded_catalog
from vramq.jobs.errors import ConfigError, InputError


def write(tmp_path, text: str):
    path = tmp_path / "catalog.toml"
    path.write_text(text)
    return path


GOOD = """
[[models]]
id = "flux"
kind = "image"
backend = "diffusers"
weights = "weights/flux"
limits = { max_width = 1024 }
"""


def test_tiny_catalog_loads_with_weights_under_models_dir(tmp_path):
    cat = load_catalog(TINY_CATALOG, models_dir=tmp_path)
    entry = cat.get("tiny-flux")
    assert entry.kind == "image" and entry.weights == (tmp_path / "tiny-flux").resolve()


def test_the_embedded_catalog_serves_the_real_small_models_beside_the_tiny_ones(tmp_path):
    from vramq.jobs.services import load_configured_catalog
    from vramq.jobs.settings import Settings

    cat = load_embedded_catalog(tmp_path)
    ids = [e.id for e in cat]
    assert ids[:5] == [e.id for e in load_catalog(TINY_CATALOG)] and ids[5:] == ["smollm2-135m", "whisper-tiny-en"]
    smol, whisper = cat.get("smollm2-135m"), cat.get("whisper-tiny-en")
    assert (smol.kind, smol.backend, smol.weights) == ("text", "vllm", (tmp_path / "smollm2-135m").resolve())
    assert smol.limit.max_context == 2048 and smol.limit.max_tokens <= 2048
    assert (whisper.kind, whisper.backend) == ("speech", "faster_whisper")
    # Priced as the tiny text and speech models are.
    assert smol.price == cat.get("tiny-qwen2").price and whisper.price == cat.get("tiny-whisper").price
    # What a deployment with nothing configured serves; VRAMQ_SMALL_MODELS=0 leaves them out.
    default = load_configured_catalog(Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path)}))
    assert [e.id for e in default] == ids
    tiny_only = Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path), "VRAMQ_SMALL_MODELS": "0"})
    assert [e.id for e in load_configured_catalog(tiny_only)] == ids[:5]
    with pytest.raises(ConfigError, match="VRAMQ_SMALL_MODELS"):
        Settings.from_env({"VRAMQ_DATA_DIR": str(tmp_path), "VRAMQ_SMALL_MODELS": "maybe"})


def test_relative_weights_resolve_against_the_catalog_file(tmp_path):
    entry = load_catalog(write(tmp_path, GOOD)).get("flux")
    assert entry.weights == (tmp_path / "weights" / "flux").resolve()
    assert entry.dtype == "bfloat16" and entry.max_batch == 1


@pytest.mark.parametrize(
    "text, needle",
    [
        (GOOD.replace('kind = "image"', 'kind = "audio"'), "model flux: kind"),
        (GOOD.replace('backend = "diffusers"', 'backend = "vllm"'), "cannot serve kind 'image'"),
        (GOOD.replace("max_width = 1024", "max_widht = 1024"), "max_widht"),
        (GOOD.replace("max_width = 1024", "max_width = 0"), "max_width"),
        (GOOD + 'dtype = "int3"\n', "dtype"),
        (GOOD + "max_batch = 0\n", "max_batch"),
        (GOOD + "defaults = { colour = 1 }\n", "unknown input fields: ['colour']"),
        (GOOD + GOOD, "model id 'flux' appears twice"),
        (GOOD + "defaults = { width = 2048 }\n", "defaults break the limits: width"),
        (GOOD.replace('id = "flux"', 'id = "Bad Id"'), "id"),
        ("models = []", "at least one [[models]]"),
        ("[[models]\n", "not valid TOML"),
    ],
)
def test_bad_catalogs_name_the_entry_and_field(tmp_path, text, needle):
    with pytest.raises(ConfigError) as err:
        load_catalog(write(tmp_path, text))
    assert needle in str(err.value)


def test_missing_catalog_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_catalog(tmp_path / "nope.toml")


def entry(**kw) -> ModelEntry:
    return ModelEntry(id="m", kind="image", backend="diffusers", weights="/w", **kw)


def test_image_input_defaults_and_limits():
    e = entry(limits={"max_width": 256, "max_steps": 8}, defaults={"width": 128, "steps": 2})
    out = e.validate_input({"prompt": "p"})
    assert out["width"] == 128 and out["height"] == 512 and out["steps"] == 2 and out["seed"] is None
    with pytest.raises(InputError) as err:
        e.validate_input({"prompt": "p", "width": 512, "steps": 9})
    locs = {tuple(x["loc"]): x["msg"] for x in err.value.errors}
    assert "limit max_width of model m" in locs[("input", "width")]
    assert "limit max_steps of model m" in locs[("input", "steps")]


def test_text_input_needs_prompt_xor_messages():
    e = ModelEntry(id="t", kind="text", backend="vllm", weights="/w", limits={"max_tokens": 100})
    assert e.validate_input({"prompt": "hi"})["max_tokens"] == 100
    assert e.validate_input({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})["max_tokens"] == 5
    for bad in ({}, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}):
        with pytest.raises(InputError, match="input is not valid"):
            e.validate_input(bad)
    with pytest.raises(InputError):
        e.validate_input({"prompt": "a", "max_tokens": 101})
    with pytest.raises(InputError):
        e.validate_input({"messages": [{"role": "robot", "content": "b"}]})


def test_speech_input_audio_reference():
    e = ModelEntry(id="s", kind="speech", backend="faster_whisper", weights="/w")
    assert e.validate_input({"audio": "file_abc"})["task"] == "transcribe"
    with pytest.raises(InputError):
        e.validate_input({"audio": "http://example.com/a.wav"})


def test_public_view_shows_effective_defaults():
    pub = entry(defaults={"steps": 3}).public()
    assert pub["defaults"]["steps"] == 3 and pub["defaults"]["width"] == 512
    assert pub["limits"]["max_width"] == 1024


@pytest.mark.parametrize(
    "model, field",
    [
        ("tiny-flux", "width"),
        ("tiny-flux", "seed"),
        ("tiny-video", "num_frames"),
        ("tiny-qwen2", "max_tokens"),
        ("tiny-qwen2", "seed"),
    ],
)
def test_integer_fields_take_integral_json_numbers_only(model, field):
    """``64.0`` is the JSON number 64 (and an ``integer`` to JSON Schema, as /openapi.json
    says): accepted as 64. Booleans, numeric strings and fractions are refused."""
    entry = load_catalog(TINY_CATALOG).get(model)
    value = 33 if field == "num_frames" else 64
    assert entry.validate_input({"prompt": "x", field: float(value)})[field] == value
    assert type(entry.validate_input({"prompt": "x", field: float(value)})[field]) is int
    for bad in (True, str(value), value + 0.5):
        with pytest.raises(InputError) as exc:
            entry.validate_input({"prompt": "x", field: bad})
        assert exc.value.errors[0]["loc"] == ["input", field]
