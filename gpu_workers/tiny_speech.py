"""A tiny random-weight Whisper, converted to CTranslate2 for faster-whisper.

The model is ``transformers.WhisperForConditionalGeneration`` with the real
architecture (80 mel bins, 1500 encoder positions = 30 s of audio, 448 decoder
positions) shrunk to ``d_model`` 64 with two encoder and two decoder layers, random
weights drawn from ``seed``. ``ctranslate2.converters.TransformersConverter`` turns it
into the directory ``faster_whisper.WhisperModel(dest, device="cpu")`` loads offline:
``model.bin``, ``config.json``, ``vocabulary.json``, plus the ``tokenizer.json`` and
``preprocessor_config.json`` faster-whisper reads instead of fetching them from the hub.

The vocabulary is the genuine multilingual Whisper one (50257 byte-level BPE tokens,
then the special tokens: ``<|endoftext|>``, ``<|startoftranscript|>``, 100 language
tokens, ``<|translate|>``, ``<|transcribe|>``, …, ``<|notimestamps|>``, and the 1501
timestamps ``<|0.00|>`` … ``<|30.00|>``; 51866 ids, as in large-v3). It is converted
from ``whisper/assets/multilingual.tiktoken``, which the ``openai-whisper`` source
distribution ships: taken from an installed ``whisper`` package, from a copy cached in
``~/.cache/vramq``, or fetched once with ``pip download`` (the package index is the
one network these machines reach). Offline with none of those, a byte-level BPE
trained here on a small corpus stands in, padded to the same 50257 ids so the special
tokens, the model and everything downstream are identical; the marker records which
vocabulary was used.

Random weights never predict ``<|endoftext|>`` on purpose, so the model directory also
holds a ``generation_config.json`` with ``max_new_tokens`` (24): the speech backend
bounds decoding by it, and a chunk costs 24 decoder steps instead of Whisper's 448.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Literal

from vramq.jobs.errors import MissingExtra

from .tiny import MARKER, build_once

log = logging.getLogger("vramq.tiny")

N_TEXT_TOKENS = 50257
"""Regular (byte-level BPE) tokens of the multilingual vocabulary; specials follow."""
MAX_NEW_TOKENS = 24
"""Decoding bound the tiny model ships in its generation_config.json."""
WHISPER_SDIST = "openai-whisper==20250625"
"""The source distribution whose ``whisper/assets/multilingual.tiktoken`` is used."""
_TIKTOKEN_MEMBER = "whisper/assets/multilingual.tiktoken"

# The local stand-in vocabulary learns its merges from this text.
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello and welcome to the show, today we talk about speech recognition",
    "please transcribe this recording of a meeting about the quarterly budget",
    "bonjour tout le monde, merci d'être venus ce soir",
    "guten morgen, wie geht es dir heute",
    "buenos días, ¿cómo estás? muy bien, gracias",
    "one two three four five six seven eight nine ten",
    "it was the best of times, it was the worst of times",
    "thank you very much for listening, see you next week",
    "a man, a plan, a canal: panama",
]


def make_tiny_whisper(
    dest: str | Path,
    *,
    seed: int = 0,
    vocabulary: Literal["auto", "whisper", "local"] = "auto",
    vocab_file: str | Path | None = None,
) -> Path:
    """Build the tiny CTranslate2 Whisper in ``dest`` (unless already built); return ``dest``.

    ``vocabulary``: ``"whisper"`` the genuine multilingual vocabulary (from
    ``vocab_file``, a ``multilingual.tiktoken``, or found as the module docstring says;
    ``FileNotFoundError`` if it cannot be had), ``"local"`` the stand-in, ``"auto"`` the
    genuine one when it can be had, else the stand-in (with a warning).
    """
    dest = Path(dest)
    if (dest / MARKER).is_file():  # built already: skip finding the vocabulary
        return dest
    _require_speech_extra()
    tiktoken = None
    if vocabulary != "local":
        tiktoken = Path(vocab_file).read_text() if vocab_file is not None else _find_tiktoken()
        if tiktoken is None and vocabulary == "whisper":
            raise FileNotFoundError(
                "no Whisper vocabulary: no installed whisper package, no cached copy,"
                f" and pip download {WHISPER_SDIST} failed"
            )
        if tiktoken is None:
            log.warning("no Whisper vocabulary could be found or fetched; the tiny Whisper uses a local BPE one")
    marker = {
        "architecture": "whisper",
        "format": "ctranslate2",
        "seed": seed,
        "vocabulary": "whisper-multilingual" if tiktoken is not None else "local-bpe",
    }
    return build_once(dest, marker, lambda tmp: _save_whisper(tmp, seed, tiktoken))


def _require_speech_extra() -> None:
    try:
        import ctranslate2  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(exc.name or "ctranslate2", "speech") from None


# --- the model ------------------------------------------------------------------------


def _save_whisper(out: Path, seed: int, tiktoken: str | None) -> None:
    import ctranslate2
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES
    from transformers.utils import logging as hf_logging

    specials = _special_tokens(list(LANGUAGES))
    ids = {tok: N_TEXT_TOKENS + i for i, tok in enumerate(specials)}
    vocab_size = N_TEXT_TOKENS + len(specials)  # 51866
    eot, sot, no_ts = ids["<|endoftext|>"], ids["<|startoftranscript|>"], ids["<|notimestamps|>"]

    tok = _tokenizer(tiktoken, specials)
    with tempfile.TemporaryDirectory(prefix="tiny-whisper-hf-") as hf_dir:
        hf = Path(hf_dir)
        tok.save(str(hf / "tokenizer.json"))
        (hf / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "WhisperTokenizer",
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>",
                    "model_max_length": 448,
                    "add_prefix_space": False,
                }
            )
        )
        WhisperFeatureExtractor(
            feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
        ).save_pretrained(hf)

        torch.manual_seed(seed)
        config = WhisperConfig(
            vocab_size=vocab_size,
            num_mel_bins=80,
            d_model=64,
            encoder_layers=2,
            encoder_attention_heads=4,
            encoder_ffn_dim=128,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=128,
            max_source_positions=1500,  # 3000 mel frames / 2 (conv stride): 30 s
            max_target_positions=448,
            pad_token_id=eot,
            bos_token_id=eot,
            eos_token_id=eot,
            decoder_start_token_id=sot,
        )
        model = WhisperForConditionalGeneration(config)
        non_speech = _non_speech_tokens(tok)
        model.generation_config = GenerationConfig(
            decoder_start_token_id=sot,
            bos_token_id=eot,
            eos_token_id=eot,
            pad_token_id=eot,
            max_length=448,
            max_new_tokens=MAX_NEW_TOKENS,
            is_multilingual=True,
            lang_to_id={f"<|{code}|>": ids[f"<|{code}|>"] for code in LANGUAGES},
            task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
            no_timestamps_token_id=no_ts,
            prev_sot_token_id=ids["<|startofprev|>"],
            max_initial_timestamp_index=50,
            begin_suppress_tokens=[tok.token_to_id("Ġ"), eot],
            suppress_tokens=sorted(non_speech),
            # The last decoder layer's heads, as the converter picks when none are given.
            alignment_heads=[[1, h] for h in range(4)],
        )
        converter = ctranslate2.converters.TransformersConverter(
            str(hf), copy_files=["tokenizer.json", "preprocessor_config.json", "generation_config.json"]
        )
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # saving and reloading a tiny model needs no bars
        try:
            model.save_pretrained(hf)
            converter.convert(str(out), quantization="float32", force=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()


def _special_tokens(languages: list[str]) -> list[str]:
    """Whisper's special tokens in id order (``whisper/tokenizer.py`` ``get_encoding``)."""
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in languages],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * 0.02:.2f}|>" for i in range(1501)],
    ]


def _non_speech_tokens(tok) -> set[int]:
    """Symbols Whisper suppresses (speaker tags, music notes…): faster-whisper's own list."""
    from faster_whisper.tokenizer import Tokenizer

    return set(Tokenizer(tok, multilingual=True, task="transcribe", language="en").non_speech_tokens)


# --- the tokenizer --------------------------------------------------------------------


def _tokenizer(tiktoken: str | None, specials: list[str]):
    """A ``tokenizers.Tokenizer`` laid out like Hugging Face's Whisper ``tokenizer.json``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = _tiktoken_bpe(tiktoken) if tiktoken is not None else _local_bpe()
    if len(vocab) != N_TEXT_TOKENS:
        raise ValueError(f"expected {N_TEXT_TOKENS} regular tokens, got {len(vocab)}")
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    # GPT-2's pre-tokenizer regex is Whisper's ``pat_str``.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    timestamps = [s for s in specials if s[2:-2].replace(".", "").isdigit()]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials if s not in timestamps])
    # Hugging Face's Whisper tokenizers add the timestamps as plain (non-special) tokens.
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in timestamps])
    for i, s in enumerate(specials):
        if tok.token_to_id(s) != N_TEXT_TOKENS + i:
            raise ValueError(f"special token {s} got id {tok.token_to_id(s)}, expected {N_TEXT_TOKENS + i}")
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def _tiktoken_bpe(text: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges from a tiktoken rank file (``base64(token) rank`` lines).

    tiktoken stores only ranks; a token's merge is recovered by running BPE on its bytes
    with the merges ranked below it until two parts remain (the Hugging Face converters
    do the same).
    """
    ranks: dict[bytes, int] = {}
    for line in text.splitlines():
        if line.strip():
            encoded, rank_text = line.split()
            ranks[base64.b64decode(encoded)] = int(rank_text)
    byte_char = _bytes_to_unicode()

    def chars(token: bytes) -> str:
        return "".join(byte_char[b] for b in token)

    vocab = {chars(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue  # a single byte, or the empty token at rank 50256 (no merge makes it)
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[1]):
                    best = (i, r)
            if best is None:
                break
            i = best[0]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"multilingual.tiktoken: token of rank {rank} has no merge")
        merges.append((chars(parts[0]), chars(parts[1])))
    return vocab, merges


def _local_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE learned from ``_CORPUS``, padded to Whisper's 50257 ids.

    The padding tokens are never produced by encoding (no merge makes them), only by a
    model that predicts them; they decode to `` tok12345``-style text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, min_frequency=2, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    merges = [(a, b) for a, b in (m.split(" ") if isinstance(m, str) else m for m in model["merges"])]
    n = 0
    while len(vocab) < N_TEXT_TOKENS - 1:
        vocab.setdefault(f"Ġtok{n:05d}", len(vocab))
        n += 1
    # The genuine vocabulary's last regular token is the empty string; without it there,
    # CTranslate2 4.8 reports the model as English-only (found by experiment).
    vocab[""] = N_TEXT_TOKENS - 1
    return vocab, merges


def _find_tiktoken() -> str | None:
    """The text of ``multilingual.tiktoken``: from an installed ``whisper`` package, the
    cache, or the ``openai-whisper`` sdist fetched with ``pip download`` (then cached)."""
    import importlib.util

    spec = importlib.util.find_spec("whisper")  # finds without importing (whisper imports torch)
    if spec is not None and spec.origin:
        installed = Path(spec.origin).parent / "assets" / "multilingual.tiktoken"
        if installed.is_file():
            return installed.read_text()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vramq" / "whisper-multilingual.tiktoken"
    if cache.is_file():
        return cache.read_text()
    with tempfile.TemporaryDirectory(prefix="vramq-whisper-sdist-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        cmd += ["--timeout", "15", "--retries", "1", "-d", tmp, WHISPER_SDIST]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("pip download %s failed: %s", WHISPER_SDIST, exc)
            return None
        text = None
        for sdist in Path(tmp).glob("openai_whisper-*.tar.gz"):
            with tarfile.open(sdist) as tar:
                member = next((m for m in tar.getmembers() if m.isfile() and m.name.endswith(_TIKTOKEN_MEMBER)), None)
                data = tar.extractfile(member) if member is not None else None  # None only for a non-file
                if data is not None:
                    text = data.read().decode()
    if text is None:
        log.warning("%s has no %s", WHISPER_SDIST, _TIKTOKEN_MEMBER)
        return None
    try:  # cached for the next build; a read-only home only costs a download next time
        cache.parent.mkdir(parents=True, exist_ok=True)
        part = cache.with_suffix(f".{os.getpid()}.part")
        part.write_text(text)
        os.replace(part, cache)
    except OSError as exc:
        log.warning("could not cache the Whisper vocabulary in %s: %s", cache, exc)
    return text
