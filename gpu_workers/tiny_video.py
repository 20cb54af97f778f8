"""A tiny random-weight Wan 2.1 text-to-video pipeline, built locally.

The video counterpart of ``gpu_workers.tiny``: ``diffusers.WanPipeline`` with the
production component classes of Wan 2.1 T2V (a UMT5 text encoder with a T5-style
tokenizer, ``WanTransformer3DModel``, the causal 3D ``AutoencoderKLWan`` and the
UniPC flow scheduler the real checkpoints ship), every width shrunk to a few dozen
units. The real model's shape rules hold unchanged, because they come from the VAE's
scale factors and the transformer's patch size, not from the widths:

* ``num_frames`` must be ``4k + 1`` (the VAE compresses time by 4, keeping frame 0);
* ``width`` and ``height`` must be multiples of 16 (VAE factor 8 times patch 2).
"""

from __future__ import annotations

from pathlib import Path

from vramq.jobs.errors import MissingExtra

from .tiny import _t5_tokenizer, build_once


def make_tiny_video(dest: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny Wan 2.1 text-to-video pipeline in ``dest`` (unless already built).

    Random weights are drawn from ``seed``; ``DiffusionPipeline.from_pretrained(dest)``
    reloads it as a ``WanPipeline`` without network access.
    """
    return build_once(Path(dest), {"architecture": "wan2.1", "seed": seed}, lambda tmp: _save_wan(tmp, seed))


def _require_video_extra():
    # The image models' packages; the "video" extra adds PyAV, which building does not need.
    try:
        import diffusers  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise MissingExtra(exc.name or "diffusers", "video") from None


def _save_wan(out: Path, seed: int) -> None:
    _require_video_extra()
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    # Wan's tokenizer is umt5-xxl's SentencePiece; the tiny T5 one has its layout
    # (pad 0, eos 1, unk 2) and its 32-token ``model_max_length``.
    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_heads=4,
            num_layers=2,
            feed_forward_proj="gated-gelu",  # as in umt5-xxl
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )
    # Wan2.1-T2V-1.3B's transformer with 2 heads of 16 and 2 layers (the real one has
    # 12 heads of 128 and 30 layers); patch (1, 2, 2) keeps the size rule.
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,  # RoPE splits it 8 (time) + 4 + 4 (height, width)
        in_channels=16,
        out_channels=16,
        text_dim=32,  # UMT5 d_model
        freq_dim=256,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    # The real Wan VAE (base_dim 96) narrowed to 4 channels per level; four levels and
    # two temporal downsamples keep its scale factors (8 in space, 4 in time), and its
    # 16 latent channels keep the real latents_mean / latents_std.
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # The scheduler Wan-AI/Wan2.1-T2V-1.3B-Diffusers ships.
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        num_train_timesteps=1000,
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )
    # mypy reads diffusers' dummy WanPipeline, which has no save_pretrained.
    pipe.save_pretrained(out)  # type: ignore[attr-defined, unused-ignore]
