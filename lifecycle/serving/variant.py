"""Compressed variants of a model folder: how they are written down and how they load.

A variant folder is an ordinary Hugging Face folder (``config.json``, tokenizer, generation
config) plus ``lifecycle_variant.json`` naming the method. Every loader of the project (serving's
:func:`~lifecycle.serving.generate.load_model`, evaluation's ``load_lm``) asks
:func:`load_variant` first, so a variant loads and serves through the same pyfunc class:

* ``fp16`` / ``bf16``: half-precision safetensors. On CUDA they run in that dtype; on a CPU they
  are computed in fp32 (the weights keep their half-precision rounding), like every model here.
* ``int8-dynamic``: torch dynamic quantisation of the transformer blocks' linear layers (weights
  int8 per output channel, activations quantised on the fly; CPU kernels only). GPT-2's blocks
  are ``transformers.pytorch_utils.Conv1D``, which ``quantize_dynamic`` does not touch, so they
  are converted to ``nn.Linear`` first (same function: ``x @ W + b`` with ``W`` transposed).
  The int8 weights, their per-channel scales and the float parameters go to
  ``model.int8.safetensors``; loading rebuilds the architecture from ``config.json``, quantises
  it the same way and puts the stored integers back, so the result is the saved model exactly.
  The tied output head stays a float copy of the embedding: quantising it would untie it and
  make the file larger, not smaller.
* ``prune`` / ``distill``: a smaller dense GPT-2 (fewer layers, a narrower MLP, or a smaller
  preset) in fp32 safetensors, made by :mod:`lifecycle.optimize.structural`. Its config matches
  its weights, so it loads like any Hugging Face folder; the variant file only records how it
  was made (amount, importance, dropped layers, teacher).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

from lifecycle.errors import ConfigError, DataError

VARIANT_FILE = "lifecycle_variant.json"
INT8_WEIGHTS = "model.int8.safetensors"
METHODS = ("int8-dynamic", "fp16", "bf16", "prune", "distill")
#: Methods whose folder is a plain fp32 model of a smaller shape.
STRUCTURAL = ("prune", "distill")
HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}
#: Methods whose kernels exist on CPU only.
CPU_ONLY = ("int8-dynamic",)

log = logging.getLogger(__name__)


def choose_device(requested: str | None, method: str | None = None) -> str:
    """The device a model (a variant made with ``method``, or a plain one) runs on.

    The one device choice of serve, evaluate and compress. ``requested`` None / "" / "auto"
    means "nobody asked": CUDA when available, except that a CPU-only variant then falls back
    to ``cpu`` with a warning. A device that was asked for is honoured or refused, never
    replaced: ``cuda`` without a GPU, or a GPU for a CPU-only variant, is a ConfigError.
    """
    import torch

    asked = (requested or "").strip()
    if asked.lower() in ("", "auto"):
        if method in CPU_ONLY:
            if torch.cuda.is_available():
                log.warning("an %s variant runs on CPU only (torch's dynamic quantisation has no GPU kernels): "
                            "using cpu although a GPU is available", method)
            return "cpu"
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(asked).type
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {asked!r} is not a device: use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {asked!r} requested but CUDA is not available; use cpu")
    if method in CPU_ONLY and kind != "cpu":
        raise ConfigError(f"an {method} variant runs on CPU only (torch's dynamic quantisation has no GPU kernels); "
                          f"device {asked!r} was asked for: use cpu, or leave the device unset to fall back to it")
    return asked


def variant_device(model_dir: str | Path, requested: str | None) -> str:
    """:func:`choose_device` for the model in ``model_dir`` (plain folder or variant)."""
    meta = read_variant(model_dir)
    return choose_device(requested, meta["method"] if meta else None)


def read_variant(model_dir: str | Path) -> dict[str, Any] | None:
    """The folder's variant description, or None for a plain model folder."""
    path = Path(model_dir) / VARIANT_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is unreadable: {exc}") from None
    if meta.get("method") not in METHODS:
        raise DataError(f"{path}: unknown variant method {meta.get('method')!r}; known: {', '.join(METHODS)}")
    return meta


def write_variant(model_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write the variant description (``method`` plus whatever the maker records)."""
    path = Path(model_dir) / VARIANT_FILE
    path.write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return path


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation notices: the eager dynamic API is what this format uses
    (torch 2.13 still ships it; its successor lives in the separate torchao package)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        yield


def conv1d_to_linear(model: Any) -> list[str]:
    """Replace every HF ``Conv1D`` inside the transformer blocks by an equal ``nn.Linear``; their names."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = torch.nn.Linear(n_in, n_out, bias=child.bias is not None,
                                         device=child.weight.device, dtype=child.weight.dtype)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)
                names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def block_linears(model: Any) -> list[str]:
    """The ``nn.Linear`` layers to quantise: everything but the (tied) output head."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and mod is not head]


def quantize_int8(model: Any) -> tuple[Any, list[str]]:
    """Dynamic int8 quantisation (per output channel) of the block linears; (model, their names)."""
    import torch
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.to("cpu", dtype=torch.float32).eval()
    conv1d_to_linear(model)
    names = block_linears(model)
    if not names:
        raise ConfigError("int8-dynamic: the model has no linear layers to quantise")
    with _quiet():
        quantized = quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8)
    return quantized, names


def _quantized_modules(model: Any) -> Iterator[tuple[str, Any]]:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for name, mod in model.named_modules():
        if isinstance(mod, DynamicLinear):
            yield name, mod


def int8_state(model: Any) -> dict[str, Any]:
    """Plain tensors for safetensors: int8 weights + per-channel scales/zero points, float rest.

    Tied parameters are stored once (loading re-ties them, as ``from_pretrained`` does).
    """
    tensors: dict[str, Any] = {}
    prefixes = []
    for name, mod in _quantized_modules(model):
        weight, bias = mod._weight_bias()
        prefixes.append(name + ".")
        tensors[f"{name}.weight_int8"] = weight.int_repr().contiguous()
        tensors[f"{name}.weight_scales"] = weight.q_per_channel_scales().to(dtype=_f64()).contiguous()
        tensors[f"{name}.weight_zero_points"] = weight.q_per_channel_zero_points().contiguous()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in prefixes) or not hasattr(value, "data_ptr"):
            continue
        if value.data_ptr() in seen:  # a tied weight (lm_head = wte)
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.detach().contiguous()
    return tensors


def _f64() -> Any:
    import torch

    return torch.float64


def save_int8(model: Any, out: str | Path) -> Path:
    """Write a quantised model's weights to ``out/model.int8.safetensors``."""
    from safetensors.torch import save_file

    path = Path(out) / INT8_WEIGHTS
    save_file(int8_state(model), str(path), metadata={"format": "pt", "lifecycle": "int8-dynamic"})
    return path


def load_int8(model_dir: str | Path) -> Any:
    """Rebuild an ``int8-dynamic`` variant exactly as it was saved (CPU, eval mode)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    weights = model_dir / INT8_WEIGHTS
    if not weights.is_file():
        raise DataError(f"{model_dir} is an int8-dynamic variant without {INT8_WEIGHTS}")
    config = AutoConfig.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model, _ = quantize_int8(model)
    tensors = load_file(str(weights))
    with _quiet():
        for name, mod in _quantized_modules(model):
            qweight = torch._make_per_channel_quantized_tensor(
                tensors.pop(f"{name}.weight_int8"), tensors.pop(f"{name}.weight_scales"),
                tensors.pop(f"{name}.weight_zero_points"), 0)
            mod.set_weight_bias(qweight, tensors.pop(f"{name}.bias", None))
    # The float parameters one by one: load_state_dict would ask the quantised modules for
    # packed-parameter keys that this format stores as plain int8 + scales (done above).
    expected = {k for k in int8_state(model) if not k.endswith(("weight_int8", "weight_scales", "weight_zero_points"))
                and not any(k == f"{n}.bias" for n, _ in _quantized_modules(model))}
    unexpected = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unexpected or missing:
        raise DataError(f"{weights} does not match config.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, value in tensors.items():
            module_name, _, attr = key.rpartition(".")
            getattr(model.get_submodule(module_name), attr).copy_(value)
    if getattr(config, "tie_word_embeddings", True) and model.get_output_embeddings() is not None:
        model.tie_weights()
    return model.eval()


def load_variant(model_dir: str | Path, device: Any) -> Any | None:
    """The variant in ``model_dir`` loaded for ``device`` (eval mode), or None for a plain folder."""
    import torch

    meta = read_variant(model_dir)
    if meta is None:
        return None
    kind = getattr(device, "type", str(device))
    if meta["method"] == "int8-dynamic":
        if kind != "cpu":
            # Callers pick the device with variant_device(), which falls back to cpu by itself.
            raise ConfigError("an int8-dynamic variant runs on CPU only (torch's dynamic quantisation has no GPU "
                              "kernels); serve or evaluate it on cpu")
        return load_int8(model_dir)
    from transformers import AutoModelForCausalLM

    half = HALF_DTYPES.get(meta["method"])
    dtype = getattr(torch, half) if half and kind == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    return model.to(device).eval()


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the weight files in a model folder (safetensors or PyTorch bins)."""
    root = Path(model_dir)
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in root.glob(pattern))
