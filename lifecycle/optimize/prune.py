"""Structured pruning of a GPT-2-style model: whole layers and MLP neurons out, a smaller dense model left.

What ``amount`` means, precisely: the fraction of the **transformer blocks' parameters**
(``transformer.h.*``: attention, MLP and their layer norms) that is removed. Token and position
embeddings, the final layer norm and the tied output head are outside it: the vocabulary and
the context length are the tokenizer's and the data's, not something to prune. The result has
``round(to units)((1 - amount) * block parameters)`` block parameters: whole layers go first
(``floor(amount * n_layer)`` of them, the ones whose removal raises the calibration loss least),
then the same number of MLP neurons from each remaining layer, as many as come closest to the
rest of the target. The achieved fraction differs from ``amount`` by at most half a neuron per
remaining layer (``plan.achieved``; tested).

Why this shape, and not attention heads: transformers 5.x's GPT-2 has no ``prune_heads`` any
more and no per-layer head count; ``head_dim`` is ``n_embd / n_head`` and ``c_attn`` is split
into q, k, v of ``n_embd`` each. A GPT-2 with fewer heads of the same width cannot be written as a
``GPT2Config``, so a head-pruned folder would not load with ``from_pretrained`` (nor through
the pyfunc class, nor in any other runtime). ``n_inner`` (one MLP width for every layer) and
``n_layer`` can: the pruned folder is an ordinary GPT-2 whose config matches its weights, which
is why neurons are removed uniformly per layer (each layer keeps its own best neurons).

Why not Torch-Pruning: it prunes channel groups per layer to different widths, which GPT2Config
cannot describe (one ``n_inner``), and it needs custom pruners for HF's ``Conv1D`` (weights
stored transposed, q/k/v fused in one matrix). Slicing two Conv1D weights per layer and
renumbering layers is a few lines here, and the config is written by construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from lifecycle.config import number_text
from lifecycle.errors import ConfigError
from lifecycle.optimize.importance import IMPORTANCE


def parse_amount(text: str) -> float:
    """``--amount`` text: a fraction strictly between 0 and 1 (``0.3``, ``3e-1``) or a percentage (``30%``).

    The number follows the project's one rule for numbers as written
    (:func:`lifecycle.config.number_text`, also behind every numeric flag and ``--set``): plain
    ASCII digits, surrounding whitespace ignored; other scripts' digits (``٠.٣``), underscores and
    a space before the ``%`` (``30 %``) are refused, never re-read. So is anything outside the
    open interval (empty, negative, 0, 1 or more, nan, inf, words): a ConfigError naming the text.
    """
    raw = str(text)
    body = raw.strip()
    percent = body.endswith("%")
    number = body[:-1] if percent else body
    if number != number.strip() or not number_text(number):
        raise ConfigError(f"--amount {raw!r} is not a number: give the fraction of block parameters to remove, "
                          "strictly between 0 and 1 (e.g. 0.3 or 30%)")
    value = float(number) / (100.0 if percent else 1.0)
    if not 0.0 < value < 1.0:
        raise ConfigError(f"--amount {raw!r} must be strictly between 0 and 1 (0 removes nothing, 1 everything); "
                          "e.g. 0.3 or 30%")
    return value


@dataclass
class PruneConfig:
    """``--set prune.<key>=...``: how structure is chosen and removed."""

    #: Fraction of the transformer blocks' parameters to remove (``--amount``).
    amount: float = 0.3
    importance: Literal["taylor", "activation", "magnitude"] = "taylor"
    #: Remove whole layers first (``floor(amount * n_layer)``); false: MLP neurons only.
    layers: bool = True
    #: Batches of the training split the importance is measured on.
    calibration_batches: int = 8
    calibration_batch_size: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.amount, (int, float)) and 0.0 < float(self.amount) < 1.0):
            raise ConfigError(f"prune.amount must be strictly between 0 and 1, got {self.amount!r}")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"prune.importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        for key in ("calibration_batches", "calibration_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"prune.{key} must be a positive integer, got {getattr(self, key)}")


@dataclass
class PrunePlan:
    """How many layers and neurons go, and the parameter counts that follow."""

    amount: float
    n_layer: int
    n_inner: int
    drop_layers: int
    drop_neurons: int  # per remaining layer
    block_params: int  # of the parent
    kept_block_params: int
    layer_params: int
    neuron_params: int
    dropped: list[int] = field(default_factory=list)  # layer indices, once chosen

    @property
    def achieved(self) -> float:
        """The fraction of block parameters actually removed."""
        return 1.0 - self.kept_block_params / self.block_params

    @property
    def keep_layers(self) -> int:
        """Layers left."""
        return self.n_layer - self.drop_layers

    @property
    def keep_neurons(self) -> int:
        """MLP width left (``n_inner`` of the pruned config)."""
        return self.n_inner - self.drop_neurons


def mlp_width(config: Any) -> int:
    """GPT-2's MLP width (``n_inner``, or 4 x ``n_embd`` when unset)."""
    return int(config.n_inner) if getattr(config, "n_inner", None) else 4 * int(config.n_embd)


def block_param_count(config: Any, *, n_layer: int | None = None, n_inner: int | None = None) -> int:
    """Parameters of GPT-2's transformer blocks for ``config`` (optionally with another depth or MLP width)."""
    e = int(config.n_embd)
    inner = mlp_width(config) if n_inner is None else n_inner
    per_layer = (2 * 2 * e  # ln_1, ln_2
                 + e * 3 * e + 3 * e + e * e + e  # c_attn, attn c_proj
                 + e * inner + inner + inner * e + e)  # c_fc, mlp c_proj
    return per_layer * (int(config.n_layer) if n_layer is None else n_layer)


def plan(config: Any, amount: float, *, layers: bool = True) -> PrunePlan:
    """The pruning plan for a GPT-2 ``config`` at ``amount``; a ConfigError when it cannot be done."""
    if getattr(config, "model_type", "") != "gpt2":
        raise ConfigError(f"structured pruning supports GPT-2-style models; this one is {config.model_type!r}")
    if getattr(config, "add_cross_attention", False):
        raise ConfigError("structured pruning of a GPT-2 with cross-attention is not supported")
    n_layer, n_inner, e = int(config.n_layer), mlp_width(config), int(config.n_embd)
    total = block_param_count(config)
    layer_params = total // n_layer
    neuron_params = 2 * e + 1  # a c_fc column and bias, a c_proj row
    # Layer-index-scaled attention would change every later layer's function when one is removed.
    may_drop = layers and not getattr(config, "scale_attn_by_inverse_layer_idx", False)
    drop_layers = min(math.floor(amount * n_layer + 1e-9), n_layer - 1) if may_drop else 0
    rest = amount * total - drop_layers * layer_params
    keep = n_layer - drop_layers
    drop_neurons = max(0, round(rest / (keep * neuron_params)))
    if drop_neurons >= n_inner:
        hint = "" if may_drop else " or allow whole layers to go (prune.layers=true)"
        raise ConfigError(f"--amount {amount:g} removes more MLP neurons than the model has ({n_inner} per layer, "
                          f"{n_layer} layers of {layer_params} parameters); use a smaller amount{hint}")
    kept = block_param_count(config, n_layer=keep, n_inner=n_inner - drop_neurons)
    if kept == total:
        raise ConfigError(f"--amount {amount:g} is less than one MLP neuron per layer of this model "
                          f"({keep * neuron_params} of {total} block parameters): nothing would be removed")
    return PrunePlan(amount=amount, n_layer=n_layer, n_inner=n_inner, drop_layers=drop_layers,
                     drop_neurons=drop_neurons, block_params=total, kept_block_params=kept,
                     layer_params=layer_params, neuron_params=neuron_params)


def prune_model(model: Any, the_plan: PrunePlan, layer_score: Sequence[float] | None, neuron_score: Any) -> Any:
    """A new, smaller ``GPT2LMHeadModel`` with the plan applied (the parent is left untouched).

    ``layer_score[i]``: importance of layer ``i`` (the lowest ``drop_layers`` go);
    ``neuron_score``: ``[n_layer, n_inner]`` (each kept layer keeps its ``keep_neurons`` best, in order).
    """
    import copy

    import torch
    from transformers import GPT2LMHeadModel

    config = copy.deepcopy(model.config)
    if the_plan.drop_layers:
        order = sorted(range(the_plan.n_layer), key=lambda i: (layer_score[i], i))  # type: ignore[index]
        the_plan.dropped = sorted(order[: the_plan.drop_layers])
    kept_layers = [i for i in range(the_plan.n_layer) if i not in the_plan.dropped]
    config.n_layer = len(kept_layers)
    config.n_inner = the_plan.keep_neurons
    state = model.state_dict()
    new_state: dict[str, Any] = {}
    for key, value in state.items():
        m = re.match(r"transformer\.h\.(\d+)\.(.*)", key)
        if m is None:
            new_state[key] = value
            continue
        old, rest = int(m.group(1)), m.group(2)
        if old not in kept_layers:
            continue
        keep = torch.sort(torch.topk(neuron_score[old], the_plan.keep_neurons).indices).values
        if rest in ("mlp.c_fc.weight",):
            value = value[:, keep]  # Conv1D [n_embd, n_inner]: a column per neuron
        elif rest == "mlp.c_fc.bias":
            value = value[keep]
        elif rest == "mlp.c_proj.weight":
            value = value[keep, :]  # [n_inner, n_embd]: a row per neuron
        new_state[f"transformer.h.{kept_layers.index(old)}.{rest}"] = value.clone()
    pruned = GPT2LMHeadModel(config)
    # strict: the config written above must describe exactly these tensors.
    missing, unexpected = pruned.load_state_dict(new_state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", True) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned weights do not match the pruned config (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    pruned.tie_weights()
    pruned.train(model.training)  # a new module starts in training mode (dropout on): mirror the parent
    if getattr(model, "generation_config", None) is not None:
        pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned


def count_params(model: Any) -> int:
    """Distinct parameters of ``model`` (a tied head counted once)."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def block_params_of(model: Any) -> int:
    """Parameters inside ``transformer.h`` of a loaded model."""
    return sum(p.numel() for p in model.transformer.h.parameters())
