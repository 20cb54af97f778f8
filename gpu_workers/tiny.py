"""Tiny random-weight models of the real architectures, built locally.

No hub downloads exist on the machines vramq is developed and tested on, so the
embedded catalog serves models built here: the production classes (diffusers,
transformers) with every width shrunk to a few dozen units and random weights, saved
with ``save_pretrained`` so the workers load them exactly as they load real weights.
Outputs are noise; the code paths are the production ones.

``make_tiny(dir)`` is what ``vramq models make-tiny DIR`` calls. A model directory is
complete once its ``vramq-tiny.json`` marker exists; building goes to a temporary
directory beside it that is renamed into place at the end, so a crash never leaves a
half-built model that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vramq.jobs.errors import MissingExtra

MARKER = "vramq-tiny.json"

CLIP_MAX_LENGTH = 77
"""CLIP's real context (``max_position_embeddings``); the FLUX pipeline pads to it."""

T5_MAX_LENGTH = 32
"""The tiny T5 tokenizer's ``model_max_length``; backends pass it as the pipeline's
``max_sequence_length`` (the real FLUX pipeline defaults to 512)."""

# The tokenizers learn their merges / pieces from this text. Any prompt still
# tokenizes: CLIP falls back to single bytes, T5 to <unk> for unseen characters.
_CORPUS = [
    "a photo of a cat sitting on a wooden table in the morning light",
    "an astronaut riding a horse on the moon, highly detailed digital art",
    "portrait of a woman with red hair, oil painting, dramatic lighting",
    "a futuristic city skyline at night with neon signs and flying cars",
    "watercolor landscape of mountains and a lake under a cloudy sky",
    "a small dog playing in the snow, 35mm film photograph, bokeh",
    "the quick brown fox jumps over the lazy dog while the sun sets",
    "a bowl of fresh fruit: apples, oranges, grapes and bananas",
    "studio product shot of a red sneaker on a white background, 4k",
    "an old lighthouse on a rocky coast during a storm, waves crashing",
    "cyberpunk street market in the rain, reflections, cinematic",
    "a cozy living room with a fireplace, plants and large windows",
    "minimalist logo of a mountain, vector, flat colors, simple shapes",
    "anime style girl reading a book under a cherry blossom tree",
    "macro photograph of a dragonfly resting on a green leaf",
    "a medieval castle surrounded by forest, fantasy illustration",
    "close-up of a steaming cup of coffee on a rainy day, shallow depth of field",
    "a robot painting a picture in an art studio, warm colors",
    "aerial view of a beach with turquoise water and white sand",
    "black and white street photography, people walking in the city",
]


def make_tiny(dir: str | Path) -> dict[str, Path]:
    """Build every tiny model under ``dir``; return ``{model_id: directory}``.

    Models already built are kept as they are, so this is cheap to call at start-up.
    The ids match the embedded catalog (``jobs/catalogs/tiny.toml``), whose ``echo``
    model has no weights to build.
    """
    from .tiny_speech import make_tiny_whisper
    from .tiny_text import make_tiny_qwen2
    from .tiny_video import make_tiny_video

    dir = Path(dir)
    builders = {
        "tiny-flux": make_tiny_flux,
        "tiny-qwen2": make_tiny_qwen2,
        "tiny-video": make_tiny_video,
        "tiny-whisper": make_tiny_whisper,
    }
    return {model_id: build(dir / model_id) for model_id, build in builders.items()}


def make_tiny_flux(dest: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny FLUX-type diffusers pipeline in ``dest`` (unless already built).

    The pipeline is ``diffusers.FluxPipeline`` with its real component classes (CLIP
    and T5 text encoders, ``FluxTransformer2DModel``, a 16-channel ``AutoencoderKL``
    with the real VAE's scale factor of 8) and random weights drawn from ``seed``.
    ``FluxPipeline.from_pretrained(dest)`` reloads it without network access.
    """
    return build_once(Path(dest), {"architecture": "flux", "seed": seed}, lambda tmp: _save_flux(tmp, seed))


def build_once(dest: Path, marker: dict, build: Callable[[Path], None]) -> Path:
    """Build a model into a temporary directory beside ``dest``, then rename it into place.

    A model is complete when its marker file is there: the marker is written last, and
    only complete builds are renamed into place, so a crash never leaves a half-built
    model that looks complete, and a concurrent builder's model is kept. Every tiny
    model builder (image, video, text, speech) goes through here.
    """
    if (dest / MARKER).is_file():
        return dest
    if dest.exists() and any(dest.iterdir()):
        # Never ours (we only ever rename complete builds into place): refuse rather
        # than delete someone's files.
        raise FileExistsError(f"{dest} exists and is not a complete tiny model; remove it to rebuild")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.building-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; workers may run as another user
        build(tmp)
        (tmp / MARKER).write_text(json.dumps(marker))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        try:
            os.replace(tmp, dest)
        except OSError:
            # A concurrent builder won the rename; its model is as good as ours.
            if not (dest / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _require_image_extra():
    try:
        import diffusers  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(exc.name or "diffusers", "image") from None


def _save_flux(out: Path, seed: int) -> None:
    _require_image_extra()
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = _clip_tokenizer()
    t5_tok = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=32,
            hidden_act="quick_gelu",
            bos_token_id=clip_tok.bos_token_id,
            # Not 2, so CLIP pools at the first end-of-text token (the pad token too).
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
        )
    )
    text_encoder_2 = T5EncoderModel(
        # transformers 5 types T5Config's fields only; other keywords are kept as attributes.
        T5Config(  # type: ignore[call-arg, unused-ignore]
            vocab_size=len(t5_tok),
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            feed_forward_proj="gated-gelu",  # as in T5 v1.1, the FLUX encoder
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2, as in FLUX.1
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5 d_model
        pooled_projection_dim=32,  # CLIP hidden size
        guidance_embeds=False,  # like FLUX.1-schnell
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # The real FLUX VAE (model-configs/flux.1-vae.json) with its widths divided by 16:
    # four levels keep the scale factor 8 the pipeline's sizes depend on.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=256,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    # FLUX.1-schnell's scheduler settings.
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
    # mypy reads diffusers' dummy FluxPipeline, which has no save_pretrained.
    pipe.save_pretrained(out)  # type: ignore[attr-defined, unused-ignore]


def _clip_tokenizer():
    """A byte-level BPE tokenizer in CLIP's format, loaded from vocab.json + merges.txt.

    Every byte and every byte closing a word is in the vocabulary, so any text
    tokenizes; merges learned from the corpus make common words single tokens.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token=eos))
    # CLIP's own normalization and pre-tokenization, so the merges fit what it feeds BPE.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    # CLIP's layout: bytes, bytes ending a word, merged tokens in merge order, specials.
    tokens = alphabet + [c + "</w>" for c in alphabet]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [bos, eos]
    # The files CLIP ships; loading them (rather than building the class from a vocab
    # dict) works with both the slow and the tokenizers-backed CLIPTokenizer.
    with tempfile.TemporaryDirectory() as files:
        Path(files, "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        Path(files, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer.from_pretrained(files, model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer():
    """A SentencePiece-style Unigram tokenizer laid out like T5's (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # transformers 5 keeps T5TokenizerFast as a lazy alias of T5Tokenizer, absent from its types.
    from transformers import T5TokenizerFast  # type: ignore[attr-defined, unused-ignore]

    tok = Tokenizer(models.Unigram())
    # T5's pre-tokenization, which T5TokenizerFast rebuilds when it loads.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=512,
        show_progress=False,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        # Printable ASCII always, so English prompts rarely meet <unk>.
        initial_alphabet=[chr(c) for c in range(33, 127)],
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )
