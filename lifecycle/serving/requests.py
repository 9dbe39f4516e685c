"""Request parsing and validation: inputs to prompts, params to a checked ``GenParams``.

Pure logic (no torch, no MLflow) so every refusal is unit-testable. Every problem raises
:class:`InvalidRequest` with a message that says what *is* allowed; the pyfunc model turns it
into ``MlflowException(INVALID_PARAMETER_VALUE)``, which the scoring server answers with 400.

Accepted inputs (each yields one or more rows):

* a string, or a list / array / Series of strings;
* a DataFrame with a ``prompt`` column (strings) or a ``messages`` column (chat lists);
* ``{"prompt": str | [str, ...]}`` or ``{"messages": [{"role": ..., "content": ...}, ...]}``;
* a list of such dicts (one row each).

Chat messages use the tokenizer's chat template when it has one; otherwise the plain format
documented at :func:`plain_chat_prompt`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

from lifecycle.errors import DataError


class InvalidRequest(DataError):
    """A request the model refuses: bad input shape, empty prompt, bad or unknown param, over a cap.

    ``str(exc)`` goes back to the client and may quote the request (it is theirs). ``record`` is
    the same refusal without anything taken from the request (no prompt or message text, no stop
    string, no key the client chose): that is what the inference records keep.
    """

    def __init__(self, message: str, *, record: str | None = None):
        super().__init__(message)
        self.record = message if record is None else record


#: Parameter name -> (MLflow ParamSpec dtype, default, shape). ``None`` defaults mean "not given".
PARAM_SPECS: dict[str, tuple[str, Any, tuple[int, ...] | None]] = {
    "max_new_tokens": ("long", None, None),
    "temperature": ("double", 1.0, None),
    "top_p": ("double", 1.0, None),
    "top_k": ("long", 0, None),
    "do_sample": ("boolean", False, None),
    "seed": ("long", None, None),
    "stop": ("string", [], (-1,)),
    "repetition_penalty": ("double", 1.0, None),
    "truncate": ("boolean", False, None),
}

ALLOWED_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 8
#: Longest param name or value quoted back in a refusal (a client may put anything there).
_QUOTE_CHARS = 40


def _quoted(value: Any) -> str:
    """``repr`` of a client's value, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= _QUOTE_CHARS else text[:_QUOTE_CHARS] + "..."


@dataclass(frozen=True)
class GenParams:
    """Checked generation parameters; hashable so that compatible requests share a batch."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    truncate: bool = False

    def batch_key(self) -> tuple[Any, ...]:
        """What must be equal for two requests to run in the same ``generate`` call.

        ``max_new_tokens`` differs freely: a batch runs to the largest and each row is cut to its
        own limit. ``truncate`` only affects prompt preparation. A seeded sampled request gets its
        own batch so that its output depends on its seed alone, not on its neighbours.
        """
        sampling = (self.temperature, self.top_p, self.top_k, self.seed) if self.do_sample else ()
        return (self.do_sample, sampling, self.stop, self.repetition_penalty)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for inference records)."""
        # Field by field: dataclasses.asdict deep-copies every value, 5x the cost, once per request.
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["stop"] = list(self.stop)
        return out


def _describe_allowed(cap: int, stop_chars: int | None = None) -> str:
    each = f" of at most {stop_chars} characters" if stop_chars else ""
    return (f"max_new_tokens (1..{cap}), temperature (>= 0), top_p (0 < p <= 1), top_k (>= 0, 0 = off), "
            f"do_sample (bool), seed (int), stop (list of up to {MAX_STOP_STRINGS} strings{each}), "
            "repetition_penalty (> 0), truncate (bool)")


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise InvalidRequest(f"param {name} must be an integer, got {_quoted(value)}")
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"param {name} must be an integer, got {_quoted(value)}") from None
    if not math.isfinite(as_float) or not as_float.is_integer():
        raise InvalidRequest(f"param {name} must be an integer, got {_quoted(value)}")
    return int(value) if isinstance(value, int) else int(as_float)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidRequest(f"param {name} must be a number, got {_quoted(value)}")
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        raise InvalidRequest(f"param {name} must be a number, got {_quoted(value)}") from None
    if not math.isfinite(out):
        raise InvalidRequest(f"param {name} must be finite, got {_quoted(value)}")
    return out


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InvalidRequest(f"param {name} must be true or false, got {_quoted(value)}")


def parse_params(params: Mapping[str, Any] | None, *, max_new_tokens_cap: int,
                 default_max_new_tokens: int, max_stop_chars: int | None = None) -> GenParams:
    """Validate request params against the caps; unknown names and bad values raise InvalidRequest.

    ``max_stop_chars`` bounds each stop string (matching a long one costs on every decoded token).
    """
    if params is not None and not isinstance(params, Mapping):
        raise InvalidRequest(f"params must be an object of name: value, got {type(params).__name__}")
    params = dict(params or {})
    unknown = sorted((str(k) for k in set(params) - set(PARAM_SPECS)), key=str)
    if unknown:
        raise InvalidRequest(f"unknown param {_quoted(unknown[0])}; allowed params: "
                             f"{_describe_allowed(max_new_tokens_cap, max_stop_chars)}")
    get = {k: v for k, v in params.items() if not _is_missing(v)}
    max_new = _as_int("max_new_tokens", get.get("max_new_tokens", default_max_new_tokens))
    if not 1 <= max_new <= max_new_tokens_cap:
        raise InvalidRequest(f"max_new_tokens must be between 1 and {max_new_tokens_cap}, got {max_new}")
    temperature = _as_float("temperature", get.get("temperature", 1.0))
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")
    top_p = _as_float("top_p", get.get("top_p", 1.0))
    if not 0 < top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    top_k = _as_int("top_k", get.get("top_k", 0))
    if top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    do_sample = _as_bool("do_sample", get.get("do_sample", False))
    # temperature 0 is the usual spelling of "greedy" in LLM APIs.
    if do_sample and temperature == 0:
        do_sample = False
    seed = get.get("seed")
    seed = None if seed is None else _as_int("seed", seed)
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidRequest(f"seed must be a non-negative 64-bit integer, got {seed}")
    stop = get.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) and hasattr(stop, "tolist"):
        stop = stop.tolist()
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequest(f"stop must be a list of non-empty strings, got {_quoted(stop)}",
                             record=f"stop must be a list of non-empty strings, got {type(stop).__name__}")
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    longest = max((len(s) for s in stop), default=0)
    if max_stop_chars is not None and longest > max_stop_chars:
        raise InvalidRequest(f"each stop string may have at most {max_stop_chars} characters (the server's "
                             f"max_stop_chars limit), got one of {longest}")
    penalty = _as_float("repetition_penalty", get.get("repetition_penalty", 1.0))
    if penalty <= 0:
        raise InvalidRequest(f"repetition_penalty must be > 0, got {penalty}")
    truncate = _as_bool("truncate", get.get("truncate", False))
    return GenParams(max_new_tokens=max_new, do_sample=do_sample, temperature=temperature, top_p=top_p,
                     top_k=top_k, seed=seed, stop=tuple(stop), repetition_penalty=penalty, truncate=truncate)


def plain_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The chat format used when the tokenizer has no chat template.

    One line per message, ``"<role>: <content>\\n"``, then ``"assistant:"`` for the model to
    continue. Plain text keeps it learnable by a small model trained on ordinary prose.
    """
    lines = [f"{m['role']}: {m['content']}\n" for m in messages]
    return "".join(lines) + "assistant:"


def _check_messages(messages: Any) -> list[dict[str, str]]:
    if hasattr(messages, "tolist") and not isinstance(messages, (list, dict, str)):
        messages = messages.tolist()
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not {"role", "content"} <= set(m):
            wanted = f"messages[{i}] must be an object with role and content"
            raise InvalidRequest(f"{wanted}, got {_quoted(m)}", record=f"{wanted}, got {type(m).__name__}")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in ALLOWED_ROLES:
            wanted = f"messages[{i}].role must be one of {', '.join(ALLOWED_ROLES)}"
            raise InvalidRequest(f"{wanted}, got {_quoted(role)}", record=wanted)
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise InvalidRequest("messages are all empty: give at least one message with content")
    return out


def _check_prompt(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be a string, got {type(value).__name__} ({_quoted(value)})",
                             record=f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InvalidRequest(f"{where} is empty: give a non-empty prompt string")
    return value


_FORMATS = ("a string or list of strings, a DataFrame with a 'prompt' (or 'messages') column, "
            "{\"prompt\": ...}, or {\"messages\": [{\"role\": ..., \"content\": ...}]}")


def _check_rows(n: int, max_rows: int | None) -> None:
    if max_rows is not None and n > max_rows:
        raise InvalidRequest(f"the request holds {n} rows; at most {max_rows} are allowed per request (the "
                             "server's max_rows limit): split it into several requests")


def _row_count(model_input: Any) -> int | None:
    """Rows of ``model_input`` without looking inside them (None when that needs parsing)."""
    if isinstance(model_input, (str, Mapping)):
        prompt = model_input.get("prompt") if isinstance(model_input, Mapping) else None
        return len(prompt) if isinstance(prompt, (list, tuple)) else 1
    try:
        return len(model_input)
    except TypeError:
        return None


def parse_inputs(model_input: Any, chat: Callable[[list[dict[str, str]]], str], *,
                 max_rows: int | None = None) -> list[str]:
    """Turn any accepted input shape into a list of prompt strings (chat rendered by ``chat``).

    More than ``max_rows`` rows are refused before any row is looked at.
    """
    import pandas as pd

    count = _row_count(model_input)
    if count is not None:
        _check_rows(count, max_rows)

    def row(item: Any, where: str) -> str:
        if isinstance(item, Mapping):
            keys = set(k for k, v in item.items() if not _is_missing(v))
            if "messages" in keys and "prompt" in keys:
                raise InvalidRequest(f"{where}: give either prompt or messages, not both")
            if "messages" in keys:
                return chat(_check_messages(item["messages"]))
            if "prompt" in keys:
                return _check_prompt(item["prompt"], f"{where}.prompt")
            missing = f"{where} has neither 'prompt' nor 'messages'"
            raise InvalidRequest(f"{missing} (keys: {_quoted(sorted(map(str, item)))}); expected {_FORMATS}",
                                 record=f"{missing}; expected {_FORMATS}")
        return _check_prompt(item, where)

    if isinstance(model_input, pd.DataFrame):
        cols = set(model_input.columns)
        if not cols & {"prompt", "messages"}:
            raise InvalidRequest(f"input DataFrame has columns {_quoted(sorted(map(str, cols)))}; expected {_FORMATS}",
                                 record=f"input DataFrame has no prompt or messages column; expected {_FORMATS}")
        extra = cols - {"prompt", "messages"}
        if extra:
            raise InvalidRequest(f"unexpected input column(s) {_quoted(sorted(map(str, extra)))}; allowed: prompt, "
                                 "messages", record="unexpected input column(s); allowed: prompt, messages")
        records = model_input.to_dict(orient="records")
        rows = [row(r, f"row {i}") for i, r in enumerate(records)]
    elif isinstance(model_input, pd.Series):
        rows = [row(v, f"row {i}") for i, v in enumerate(model_input.tolist())]
    elif isinstance(model_input, str):
        rows = [_check_prompt(model_input, "prompt")]
    elif isinstance(model_input, Mapping):
        extra = set(model_input) - {"prompt", "messages"}
        if extra:
            hint = f"allowed: prompt, messages (generation params go in params: {', '.join(PARAM_SPECS)})"
            raise InvalidRequest(f"unexpected input key(s) {_quoted(sorted(map(str, extra)))}; {hint}",
                                 record=f"unexpected input key(s); {hint}")
        prompt = model_input.get("prompt")
        if hasattr(prompt, "tolist") and not isinstance(prompt, str):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)):
            rows = [row(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        else:
            rows = [row(dict(model_input), "input")]
    elif isinstance(model_input, (list, tuple)) or hasattr(model_input, "tolist"):
        items = model_input.tolist() if hasattr(model_input, "tolist") else list(model_input)
        rows = [row(v, f"row {i}") for i, v in enumerate(items)]
    else:
        raise InvalidRequest(f"unsupported input type {type(model_input).__name__}; expected {_FORMATS}")
    if not rows:
        raise InvalidRequest(f"the request holds no prompts; expected {_FORMATS}")
    _check_rows(len(rows), max_rows)
    return rows

