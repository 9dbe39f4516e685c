"""``--preset auto`` and ``prepare --vocab-size auto``: sizes chosen from the data and the budget.

The rule (docs/training-and-evaluation.md has the measurements it was fitted on):

* Throughput is modelled as ``CPU_FLOPS`` effective training FLOP/s divided by the training FLOPs
  per token of a shape (6 x parameters + attention, the PaLM count), so a budget of ``T``
  seconds buys ``T x CPU_FLOPS / flops_per_token`` tokens; without a budget, the tokens are
  ``max_steps x global batch x block``.
* The shape is the largest of :data:`LADDER` that still sees ``TOKENS_PER_PARAM`` tokens per
  parameter (embeddings included: at these sizes they are a large part of the compute), and
  no larger than ``MAX_PARAMS_PER_CORPUS_TOKEN`` parameters per training token of the corpus
  (a model much larger than its data memorises it within a few epochs).
* The vocabulary (``prepare --vocab-size auto``) is :func:`lifecycle.data.tokenizer.choose_vocab`.

Pure arithmetic over the inputs: the same corpus size, budget and settings give the same
choice on every machine (the constants are what make it fit these CPUs; set ``model.*`` to
override any part).
"""

from __future__ import annotations

from typing import Any, Mapping

from lifecycle.train.model import Preset, get_preset

#: Effective training FLOP/s of one process with one thread on the 2-core CPUs the rule was fitted on
#: (fp32, the other core busy with a second run): 3.4e10 to 5.0e10 over the sweep's runs (2.2e10 with
#: the machine loaded to 6). docs/training-and-evaluation.md has the figures.
CPU_FLOPS = 4.0e10
#: Tokens seen per parameter: at T=2m on 1 MB (quiet machine), 3 x 64 wide models that saw 6.9 (context
#: 256) and 8.3 (context 128) per parameter beat 2 x 64 ones that saw 12 and 4 x 64 / 2 x 96 / 6 x 64
#: ones that saw 3.4 to 5.8.
TOKENS_PER_PARAM = 7.0
#: At most this many parameters per token of the training split.
MAX_PARAMS_PER_CORPUS_TOKEN = 4.0

#: Candidate shapes, smallest first: (n_layer, n_head, n_embd); heads of 32 (64 from 384 wide). Deeper
#: before wider at the bottom: at T=2m, 4 x 64 (2.103 bits/byte) beat 2 x 96 (2.190) with fewer parameters.
LADDER: tuple[tuple[int, int, int], ...] = (
    (2, 2, 64), (3, 2, 64), (4, 2, 64), (4, 3, 96), (4, 4, 128), (4, 5, 160), (4, 6, 192), (5, 6, 192),
    (6, 8, 256), (6, 10, 320), (8, 6, 384), (8, 8, 512), (12, 12, 768),
)


#: Peak LR of the auto rule at 64 wide: at T=2m the 2 x 64 model reached 2.1753 bits/byte at 3e-3
#: against 2.2486 at 1e-3. Wider models get 3e-3 x sqrt(64 / width) (an assumption, not measured).
AUTO_LR_AT_64 = 3e-3


def auto_learning_rate(shape: Preset) -> float:
    """The peak LR ``--preset auto`` uses when ``learning_rate`` is not set."""
    return round(AUTO_LR_AT_64 * (64 / shape.n_embd) ** 0.5, 6)


def parameters(shape: Preset, vocab: int) -> int:
    """Parameters of a GPT-2 shape (tied embeddings, position embeddings excluded)."""
    d = shape.n_embd
    return vocab * d + shape.n_layer * (12 * d * d + 13 * d) + 2 * d


def flops_per_token(shape: Preset, vocab: int, seq: int) -> float:
    """Training FLOPs per token: 6 x parameters + 12 x layers x width x sequence (attention)."""
    return 6.0 * parameters(shape, vocab) + 12.0 * shape.n_layer * shape.n_embd * seq


def choose_shape(*, vocab: int, block_size: int, train_tokens: int, budget_s: float | None = None,
                 tokens: int | None = None) -> tuple[Preset, dict[str, Any]]:
    """The largest ladder shape that sees enough tokens per parameter; the figures of the choice.

    Give ``budget_s`` (a time budget) or ``tokens`` (what ``max_steps`` will show the model).
    """
    if (budget_s is None) == (tokens is None):
        raise ValueError("give exactly one of budget_s and tokens")
    best, figures = None, {}
    for n_layer, n_head, n_embd in LADDER:
        shape = Preset(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size)
        n = parameters(shape, vocab)
        seen = tokens if tokens is not None else budget_s * CPU_FLOPS / flops_per_token(shape, vocab, block_size)
        if best is not None and (seen / n < TOKENS_PER_PARAM or n > MAX_PARAMS_PER_CORPUS_TOKEN * train_tokens):
            break
        best = shape
        figures = {"parameters": n, "tokens_seen": int(seen), "tokens_per_parameter": round(seen / n, 2)}
    figures.update(rule=f"tokens/param>={TOKENS_PER_PARAM:g}, params<={MAX_PARAMS_PER_CORPUS_TOKEN:g}x"
                        f"corpus tokens, {CPU_FLOPS:.3g} FLOP/s")
    return best, figures


def resolve_shape(cfg: Any, *, vocab: int, block_size: int, train_tokens: int, world_size: int = 1,
                  sized_by: Mapping[str, Any] | None = None) -> tuple[Preset, dict[str, str]]:
    """The shape a from-scratch run builds (preset or auto, then ``model.*`` overrides) and its params.

    ``sized_by``: the saved config of the run being resumed. A resume may change ``time_budget`` and
    ``max_steps``, but the checkpoint holds the shape that the run's first budget or steps chose.
    """
    from lifecycle.train.budget import parse_duration

    budget, max_steps = cfg.time_budget, cfg.max_steps
    if sized_by and (sized_by.get("time_budget") or sized_by.get("max_steps")):
        budget, max_steps = sized_by.get("time_budget"), sized_by.get("max_steps")
    params: dict[str, str] = {"shape.source": cfg.preset}
    if cfg.preset == "auto":
        if budget is not None:
            base, figures = choose_shape(vocab=vocab, block_size=block_size, train_tokens=train_tokens,
                                         budget_s=parse_duration(budget))
        else:
            seen = max_steps * cfg.batch_size * cfg.grad_accum * world_size * block_size
            base, figures = choose_shape(vocab=vocab, block_size=block_size, train_tokens=train_tokens, tokens=seen)
        figures["learning_rate"] = auto_learning_rate(base)
        params.update({f"shape.auto_{k}": str(v) for k, v in figures.items()})
    else:
        base = get_preset(cfg.preset)
    over = cfg.model
    if over.given:
        params["shape.source"] += "+model.*"
    shape = Preset(n_layer=over.n_layer or base.n_layer, n_head=over.n_head or base.n_head,
                   n_embd=over.n_embd or base.n_embd,
                   n_positions=max(over.n_positions or base.n_positions, block_size))
    if shape.n_embd % shape.n_head:
        from lifecycle.errors import ConfigError

        raise ConfigError(f"model.n_embd ({shape.n_embd}) must be a multiple of model.n_head ({shape.n_head})")
    params.update({f"shape.{k}": str(getattr(shape, k)) for k in ("n_layer", "n_head", "n_embd", "n_positions")})
    return shape, params
