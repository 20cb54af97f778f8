"""A tiny random-weight Qwen2 causal LM, built locally.

The text counterpart of ``gpu_workers.tiny``: ``transformers.Qwen2ForCausalLM`` (the
architecture vLLM serves for Qwen2/Qwen2.5) with 2 layers of width 128 and random
weights, saved as float32 safetensors with a byte-level BPE tokenizer trained here on a
small English corpus, so any text tokenizes. The tokenizer carries Qwen2's ChatML chat
template and ends a turn with ``<|im_end|>``, as the real checkpoints do.

Two shapes are forced by vLLM's CPU kernels and by the tests, not by taste:

* head_dim is 64 (2 heads of 64): the CPU attention kernels reject small head sizes;
* the special tokens (end of turn, end of text) and the padding rows of the vocabulary
  are kept from being sampled, so a generation runs to ``max_tokens`` unless a stop
  string ends it. Random weights would otherwise end some generations after a handful
  of tokens, at random.
"""

from __future__ import annotations

from pathlib import Path

from vramq.jobs.errors import MissingExtra

from .tiny import build_once

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]

MAX_POSITIONS = 2048
"""The tiny model's context (``max_position_embeddings``); catalog ``max_context`` fits it."""

VOCAB_SIZE = 4096
"""Rows of the embedding and the LM head. Like the real Qwen2 (151,936 rows for 151,665
tokens) the table is padded past the tokenizer; the padding rows are never sampled."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""Qwen2-Instruct's chat template (ChatML, with its default system turn)."""

# The BPE merges are learned from this text; bytes cover everything else.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "Write a short poem about the sea, the wind and the lighthouse keeper.",
    "Explain how a hash table works, and why lookups take constant time on average.",
    "The weather today is sunny with a few clouds; tomorrow it will rain in the morning.",
    "Please summarize the following article in three sentences for a busy reader.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate this sentence into German: where is the train station?",
    "A GPU runs thousands of threads at once, so large matrix products finish quickly.",
    "She opened the door, looked at the empty street, and went back to her book.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Q: How many days are in a week? A: There are seven days in a week.",
    "The meeting starts at 10:30 and should end before noon, if everyone is on time.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 42 2024.",
    "You are a helpful assistant. Answer the user's questions clearly and briefly.",
    "I think the best way to learn a language is to read, listen and speak every day.",
    "Large language models predict the next token from the tokens that came before.",
    'He said: "Let\'s go!" and they walked along the river until the sun went down.',
    "Ingredients: two eggs, a cup of flour, some milk, butter, sugar and a pinch of salt.",
    "Error: file not found. Check the path and try again, or ask an administrator.",
    "The history of science is full of mistakes that taught people something important.",
    "Our company builds software for hospitals, schools and small businesses around the world.",
    "Dear customer, thank you for your order. Your package will arrive within five working days.",
    "In the evening the children played football in the park while their parents talked.",
    "To install the package, run the command below and restart the server afterwards.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The train was late again, so I bought a coffee and read the newspaper on the platform.",
    "Step 1: preheat the oven. Step 2: mix the dry ingredients. Step 3: bake for twenty minutes.",
    "Mathematics is the language in which the laws of nature are most simply written.",
    '{"name": "Alice", "age": 30, "city": "London", "tags": ["admin", "user"]}',
    "Why is the sky blue? Because air scatters short blue wavelengths more than red ones.",
    "They finally reached the top of the mountain, tired but happy, just before the storm.",
]


def make_tiny_qwen2(dest: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny Qwen2 causal LM with its tokenizer in ``dest`` (unless already built).

    Random weights are drawn from ``seed``; ``AutoModelForCausalLM.from_pretrained(dest)``,
    ``AutoTokenizer.from_pretrained(dest)`` and vLLM load it without network access.
    """
    marker = {"architecture": "qwen2", "seed": seed}
    return build_once(Path(dest), marker, lambda tmp: _save_qwen2(tmp, seed))


def _require_text_extra():
    # Building needs torch, transformers and tokenizers only: the image extra's
    # packages (vLLM brings the same ones).
    try:
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(exc.name or "transformers", "image") from None


def _save_qwen2(out: Path, seed: int) -> None:
    _require_text_extra()
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _qwen2_tokenizer()
    if len(tokenizer) > VOCAB_SIZE:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than VOCAB_SIZE {VOCAB_SIZE}")
    # Never sampled: the specials (so generations run to max_tokens) and the padding rows.
    suppressed = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) + list(range(len(tokenizer), VOCAB_SIZE))
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64
        num_key_value_heads=1,  # grouped-query attention, as in every Qwen2
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        bos_token_id=endoftext,
        eos_token_id=im_end,
        pad_token_id=endoftext,
    )
    # PreTrainedModel.to is wrapped (functools.wraps); mypy reads the wrapper as unbound.
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type, unused-ignore]
    _suppress_tokens(model, suppressed)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Qwen2-Instruct's generation config: a turn ends at <|im_end|> or <|endoftext|>.
    GenerationConfig(
        bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext, do_sample=True
    ).save_pretrained(out)


def _suppress_tokens(model, token_ids: list[int]) -> None:
    """Make ``token_ids`` all but impossible to sample, whatever the input.

    Hidden unit 0 is made constant: every embedding has 1.0 there and no layer writes
    to it (its rows of the attention and MLP output projections are zero), so after
    the final RMSNorm it is always positive. A large negative weight from unit 0 to the
    suppressed tokens' logits then keeps them far below every other token.
    """
    import torch

    with torch.no_grad():
        m = model.model
        m.embed_tokens.weight[:, 0] = 1.0
        for layer in m.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[token_ids, 0] = -4.0


def _qwen2_tokenizer():
    """A byte-level BPE tokenizer in Qwen2's shape: no unknown token, ChatML specials."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    # Qwen2's pre-tokenization: its split pattern, then bytes mapped to printable characters.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
                ),
                behavior="isolated",
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text tokenizes
        special_tokens=SPECIAL_TOKENS,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
