"""Model construction: GPT-2-style size presets built from config, never downloaded.

The presets are the shapes every stage agrees on: ``tiny`` for tests (trains tens of steps in
seconds on a CPU), ``small`` for quick real runs, ``gpt2`` for the 124M GPT-2 shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lifecycle.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """Shape of a GPT-2-style decoder."""

    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(n_layer=2, n_head=2, n_embd=64, n_positions=256),
    "small": Preset(n_layer=4, n_head=4, n_embd=256, n_positions=512),
    "gpt2": Preset(n_layer=12, n_head=12, n_embd=768, n_positions=1024),
}


def get_preset(name: str) -> Preset:
    """Look up a preset by name with an error that lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def build_model(preset: str | Preset, tokenizer: Any, *, n_positions: int | None = None, dropout: float = 0.0,
                seed: int | None = None) -> Any:
    """A freshly initialised ``GPT2LMHeadModel`` of ``preset`` (a name or a shape) with ``tokenizer``'s vocabulary.

    bos/eos/pad ids come from the tokenizer (transformers 5.x warns when GPT-2's default 50256
    lies outside a smaller vocabulary).
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = preset if isinstance(preset, Preset) else get_preset(preset)
    if seed is not None:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions or shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    return GPT2LMHeadModel(config)


def save_model_dir(model: Any, tokenizer: Any, out: str | Path) -> Path:
    """Write weights (safetensors), config, generation config and tokenizer to one folder.

    This folder is the unit every later stage loads (``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` on the same path) and what the pyfunc model carries.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
