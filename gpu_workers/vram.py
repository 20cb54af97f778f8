"""The VRAM estimate with the count that needs torch: any architecture, any catalog entry.

The arithmetic is ``vramq.jobs.vram`` (pure Python: the API prices with it). An
architecture with neither weight files nor a closed formula there is counted here,
``meta_params``: the model built on PyTorch's ``meta`` device (no memory) and its unique
parameters summed. ``estimate`` and ``estimate_entry`` are ``jobs.vram``'s with that count
plugged in; a caller that must not import torch uses ``jobs.vram`` itself.

Importing this module does not import torch; only the ``meta`` device count does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from vramq.jobs import vram as arithmetic
from vramq.jobs.errors import ConfigError, MissingExtra

if TYPE_CHECKING:
    from vramq.jobs.vram import Estimate


def meta_params(cfg: dict, where, class_hint: str | None = None) -> int:
    """Build the model on the meta device (no memory) and sum its unique parameters."""
    try:
        import torch
        import transformers

        if "_class_name" in cfg:
            import diffusers
    except ImportError as exc:
        raise MissingExtra(exc.name or "torch", "image") from None
    if "_class_name" in cfg:  # a diffusers model
        name = cfg["_class_name"]
        cls = getattr(diffusers, name, None)
    else:  # a transformers model
        name = (cfg.get("architectures") or [class_hint or "AutoModel"])[0]
        known = cfg.get("model_type") in transformers.CONFIG_MAPPING
        cls = getattr(transformers, name, None) if known else None
    if cls is None:
        raise ConfigError(f"{where}: unknown architecture {name!r} (model_type {cfg.get('model_type')!r})")
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        try:
            if "_class_name" in cfg:
                model = cls.from_config(cfg)
            else:
                fields = {k: v for k, v in cfg.items() if k != "model_type"}
                config = transformers.AutoConfig.for_model(cfg["model_type"], **fields)
                model = cls.from_config(config) if name == "AutoModel" else cls(config)
        except Exception as exc:
            raise ConfigError(f"{where}: cannot build {name} from its config: {exc}") from None
    return sum(p.numel() for p in model.parameters())


def estimate(path: str | Path, **kw) -> Estimate:
    """``jobs.vram.estimate`` (same arguments), any other architecture counted on the meta device."""
    return arithmetic.estimate(path, fallback_count=meta_params, **kw)


def estimate_entry(entry, models_dir: Path | None = None) -> Estimate:
    """``jobs.vram.estimate_entry``, any other architecture counted on the meta device."""
    return arithmetic.estimate_entry(entry, models_dir, fallback_count=meta_params)
