"""How much each MLP neuron and each transformer layer of a GPT-2-style model matters, measured on data.

Scores feed :mod:`lifecycle.optimize.prune`, which keeps the highest-scoring units:

* ``taylor`` (default): the first-order Taylor estimate of the loss change when a neuron's weights
  are zeroed, ``sum |w * dL/dw|`` over the neuron's weights (its ``c_fc`` column and bias, its
  ``c_proj`` row), summed over calibration batches. This is the element-wise criterion of
  LLM-Pruner (Ma et al., 2023) and Torch-Pruning's ``TaylorImportance``.
* ``activation``: mean ``|activation|`` of the neuron after GELU times the L2 norm of its output
  row: how much the neuron writes into the residual stream on this data (Wanda's criterion,
  aggregated per neuron).
* ``magnitude``: the L2 norm of the neuron's weights; needs no data, the baseline.

A layer's score is measured, not estimated: the calibration loss with the layer skipped minus
the loss with it (a layer whose removal costs the least goes first).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

IMPORTANCE = ("taylor", "activation", "magnitude")


def _blocks(model: Any) -> Sequence[Any]:
    return model.transformer.h


def calibration_loss(model: Any, batches: Iterable[dict[str, Any]]) -> float:
    """Mean LM loss of ``model`` over ``batches`` (no gradients, no KV cache)."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            total += float(model(**batch, use_cache=False).loss)
            n += 1
    return total / max(n, 1)


def neuron_scores(model: Any, batches: Sequence[dict[str, Any]], kind: str = "taylor") -> Any:
    """A ``[n_layer, n_inner]`` float tensor: the importance of every MLP neuron of every layer."""
    import torch

    if kind not in IMPORTANCE:
        raise ValueError(f"unknown importance {kind!r}")
    blocks = _blocks(model)
    was_training = model.training
    model.eval()  # no dropout: the scores must not depend on a random mask
    try:
        if kind == "magnitude":
            with torch.no_grad():
                return torch.stack([(b.mlp.c_fc.weight.pow(2).sum(0) + b.mlp.c_fc.bias.pow(2)
                                     + b.mlp.c_proj.weight.pow(2).sum(1)).sqrt() for b in blocks]).float().cpu()
        if kind == "activation":
            return _activation_scores(model, blocks, batches)
        return _taylor_scores(model, blocks, batches)
    finally:
        model.train(was_training)


def _taylor_scores(model: Any, blocks: Sequence[Any], batches: Sequence[dict[str, Any]]) -> Any:
    import torch

    scores = torch.zeros(len(blocks), blocks[0].mlp.c_fc.weight.shape[1], dtype=torch.float64)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        with torch.no_grad():
            for i, b in enumerate(blocks):
                fc, proj = b.mlp.c_fc, b.mlp.c_proj  # Conv1D weights are [in, out]
                s = ((fc.weight * fc.weight.grad).abs().sum(0) + (fc.bias * fc.bias.grad).abs()
                     + (proj.weight * proj.weight.grad).abs().sum(1))
                scores[i] += s.double().cpu()
    model.zero_grad(set_to_none=True)
    return scores.float()


def _activation_scores(model: Any, blocks: Sequence[Any], batches: Sequence[dict[str, Any]]) -> Any:
    import torch

    sums = [None] * len(blocks)
    counts = [0] * len(blocks)

    def hook(i: int) -> Any:
        def record(_module: Any, _inputs: Any, out: Any) -> None:
            flat = out.detach().abs().reshape(-1, out.shape[-1])
            sums[i] = flat.sum(0).double() if sums[i] is None else sums[i] + flat.sum(0).double()
            counts[i] += flat.shape[0]
        return record

    # transformers' ACT2FN activations are modules (GELU variants), so the post-activation values can be hooked.
    handles = [b.mlp.act.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        return torch.stack([(sums[i] / max(counts[i], 1)).float().cpu() * b.mlp.c_proj.weight.norm(dim=1).float().cpu()
                            for i, b in enumerate(blocks)])


def layer_scores(model: Any, batches: Sequence[dict[str, Any]]) -> list[float]:
    """For each layer, how much the calibration loss rises when that layer is skipped."""
    import torch

    was_training = model.training
    model.eval()
    layers = model.transformer.h
    try:
        base = calibration_loss(model, batches)
        out = []
        for i in range(len(layers)):
            model.transformer.h = torch.nn.ModuleList([b for j, b in enumerate(layers) if j != i])
            out.append(calibration_loss(model, batches) - base)
        return out
    finally:
        model.transformer.h = layers
        model.train(was_training)
