"""Which model the loop starts from: a fresh preset, a base model to fine-tune, and LoRA.

A base model may be a local folder, a hub name, a ``runs:/`` URI or a registered model
(``models:/NAME@production``: the continuous-training case). Data must have been prepared with
the base model's own tokenizer, or every token id would mean something else to the model; that
is checked here before any step is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lifecycle.errors import ConfigError, DataError, NotFoundError
from lifecycle.train.config import LoraConfig, TrainConfig
from lifecycle.train.model import build_model

#: Strings whose encodings must agree between the data's tokenizer and the base model's.
PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # 42",
    "Ünïcödé, emoji 🙂 and   spaces\ttabs",
)


@dataclass
class StartingPoint:
    """The model to train, its tokenizer, and where it came from (for lineage tags)."""

    model: Any
    tokenizer: Any
    base_model: str  # "" when trained from scratch
    base_dir: Path | None
    #: The shape built from scratch (``shape.*`` params: preset or auto choice, model.* overrides).
    shape_params: dict[str, str] = field(default_factory=dict)


def tokenizer_mismatch(data_tok: Any, base_tok: Any) -> str | None:
    """Why two tokenizers disagree (vocabulary size, special tokens or encodings), or None."""
    if len(data_tok) != len(base_tok):
        return f"vocabulary sizes differ ({len(data_tok)} in the data, {len(base_tok)} in the base model)"
    if data_tok.eos_token_id != base_tok.eos_token_id:
        return f"EOS ids differ ({data_tok.eos_token_id} vs {base_tok.eos_token_id})"
    for text in PROBES:
        a = data_tok(text, add_special_tokens=False)["input_ids"]
        b = base_tok(text, add_special_tokens=False)["input_ids"]
        if a != b:
            return f"encodings of {text[:24]!r}... differ"
    return None


def load_starting_point(cfg: TrainConfig, data_tokenizer: Any, block_size: int, *, train_tokens: int = 0,
                        world_size: int = 1, resumed: Mapping[str, Any] | None = None) -> StartingPoint:
    """Build the preset (or the ``auto`` shape for ``train_tokens``) from scratch, or load ``cfg.base_model``.

    ``resumed``: the saved config of the run a resume continues (its ``auto`` shape is rebuilt).
    """
    if cfg.base_model is None:
        from lifecycle.train.auto import resolve_shape

        shape, params = resolve_shape(cfg, vocab=len(data_tokenizer), block_size=block_size,
                                      train_tokens=train_tokens, world_size=world_size, sized_by=resumed)
        if cfg.learning_rate is None:  # --preset auto without --learning-rate: the rule's, logged as the param
            cfg.learning_rate = float(params["shape.auto_learning_rate"])
        model = build_model(shape, data_tokenizer, dropout=cfg.dropout, seed=cfg.seed)
        return StartingPoint(model=model, tokenizer=data_tokenizer, base_model="", base_dir=None, shape_params=params)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lifecycle.tracking import resolve_model_dir

    base_dir = resolve_model_dir(cfg.base_model)
    try:
        base_tok = AutoTokenizer.from_pretrained(str(base_dir))
    except Exception as exc:  # noqa: BLE001 - offline hub names and broken folders land here
        raise NotFoundError(f"cannot load the tokenizer of base model {cfg.base_model}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    why = tokenizer_mismatch(data_tokenizer, base_tok)
    if why:
        raise DataError(f"the prepared data was not tokenized with the base model's tokenizer: {why}; "
                        f"prepare it again with `lifecycle prepare --tokenizer {cfg.base_model} ...`")
    torch.manual_seed(cfg.seed)  # LoRA's adapter init draws from the global RNG
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise NotFoundError(f"cannot load base model {cfg.base_model}: {str(exc).splitlines()[0]}") from None
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if limit is not None and block_size > limit:
        raise DataError(f"data blocks have {block_size} tokens but {cfg.base_model} takes at most {limit}; "
                        f"prepare with --block-size {limit} or less")
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    return StartingPoint(model=model, tokenizer=base_tok, base_model=cfg.base_model, base_dir=base_dir)


def _default_targets(model: Any) -> Any:
    if getattr(model.config, "model_type", "") == "gpt2":
        return ["c_attn", "c_proj", "c_fc"]
    return "all-linear"


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap ``model`` with trainable low-rank adapters; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora.target_modules) or _default_targets(model)
    try:
        peft_cfg = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            task_type="CAUSAL_LM", fan_in_fan_out=getattr(model.config, "model_type", "") == "gpt2")
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {str(exc).splitlines()[0]}") from None


def is_lora(model: Any) -> bool:
    """Whether ``model`` carries peft adapters."""
    return hasattr(model, "peft_config")


def finalize_model(model: Any, lora: LoraConfig, adapter_dir: Path | None = None) -> Any:
    """The plain model to save: LoRA adapters saved (when asked) and merged into the weights.

    The registered model is always a merged one, because every later stage loads a plain
    Hugging Face folder; with ``lora.merge=false`` the adapter itself is kept as well.
    """
    if not is_lora(model):
        return model
    if adapter_dir is not None and not lora.merge:
        model.save_pretrained(str(adapter_dir))
    return model.merge_and_unload()
