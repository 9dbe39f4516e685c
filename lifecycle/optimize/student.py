"""Where a distilled student starts (``lifecycle compress --method distill``): exactly one of

* ``--preset tiny|small``: a fresh model of that shape (``scratch:tiny``);
* ``--amount A``: the teacher itself, structurally pruned by ``A`` with the prune method's own
  machinery (importance on ``--data``, :func:`lifecycle.optimize.prune.prune_model`) (``pruned:0.3``);
* ``--student URI``: the weights of another model (``models:/NAME/VERSION``, ``@alias``,
  ``runs:/...`` or a local folder), e.g. an earlier pruned variant (the URI, exactly as given).

The text in parentheses is the ``compress/student_init`` tag and param; :func:`parse_init` reads
it back to the same start. A ``--student`` is checked before any run exists: it must load with
``from_pretrained`` (an int8 variant does not), share the teacher's tokenizer and output
vocabulary (the KL term compares the two models' next-token distributions token by token), take
the data's blocks, and have fewer parameters than the teacher (distilling into a model as large as
the teacher compresses nothing). A ``--preset`` is held to the same rule (:func:`check_preset`): a
fresh student of that shape, built for the teacher's tokenizer and the data's blocks, must have
fewer parameters than the teacher, or it is refused before any run exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from lifecycle.errors import ConfigError, NotFoundError

SCRATCH = "scratch"
PRUNED = "pruned"
MODEL = "model"
EXCLUSIVE = "--preset, --amount and --student are mutually exclusive for --method distill (the student starts " \
            "from scratch, from the parent pruned, or from a model's weights): give one"
NEEDS_ONE = "--method distill needs one of --preset (a fresh tiny|small student), --amount (the parent pruned " \
            "by that fraction) or --student (a smaller model's weights, e.g. models:/NAME/VERSION)"


@dataclass(frozen=True)
class StudentInit:
    """How the student starts: ``kind`` and its value (preset name, amount, or the model URI as given)."""

    kind: Literal["scratch", "pruned", "model"]
    preset: Optional[str] = None
    amount: Optional[float] = None
    uri: Optional[str] = None

    @property
    def text(self) -> str:
        """The ``compress/student_init`` value: ``scratch:<preset>``, ``pruned:<amount>`` or the URI."""
        if self.kind == SCRATCH:
            return f"{SCRATCH}:{self.preset}"
        if self.kind == PRUNED:
            return f"{PRUNED}:{self.amount!r}"  # repr: float() gives the same amount back
        return str(self.uri)


def init_of(preset: Optional[str], amount: Optional[float], student: Optional[str]) -> StudentInit:
    """The student's start from the three options; ConfigError (one line) unless exactly one is given."""
    given = [k for k, v in (("preset", preset), ("amount", amount), ("student", student)) if v is not None]
    if len(given) > 1:
        raise ConfigError(f"{EXCLUSIVE} (got {', '.join('--' + k for k in given)})")
    if not given:
        raise ConfigError(NEEDS_ONE)
    if preset is not None:
        return StudentInit(SCRATCH, preset=preset)
    if amount is not None:
        return StudentInit(PRUNED, amount=float(amount))
    text = str(student)
    # Refused rather than altered, so the tag reads back as exactly this text (and as a URI).
    if not text.strip() or text != text.strip() or "\n" in text or text.startswith((f"{SCRATCH}:", f"{PRUNED}:")):
        raise ConfigError(f"--student {student!r} is not a model URI: give models:/NAME/VERSION, "
                          "models:/NAME@ALIAS, runs:/<run_id>/<path> or a local folder")
    return StudentInit(MODEL, uri=text)


def parse_init(text: str) -> StudentInit:
    """The inverse of :attr:`StudentInit.text` (for reading a version's ``compress/student_init`` tag)."""
    kind, sep, value = text.partition(":")
    if sep and kind == SCRATCH:
        return StudentInit(SCRATCH, preset=value)
    if sep and kind == PRUNED:
        return StudentInit(PRUNED, amount=float(value))
    return init_of(None, None, text)


@dataclass
class StudentModel:
    """A ``--student`` that passed the checks: its folder, what it resolved to and its size."""

    folder: Path
    resolved: str  # models:/NAME/VERSION for a registry URI (an alias pinned), else the URI as given
    params: int
    teacher_params: int


def _meta_params(config: Any) -> int:
    """Parameter count of a model of ``config`` without allocating its weights (tied head counted once)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lifecycle.optimize.prune import count_params

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model)


def fresh_student(preset: str, tokenizer: Any, block_size: int, *, seed: Optional[int] = None) -> Any:
    """A fresh ``--preset`` student for ``tokenizer``, long enough for blocks of ``block_size`` tokens.

    The one place the student's shape is decided: :func:`check_preset` counts it (on the meta
    device, nothing allocated) and :func:`lifecycle.optimize.structural.make` trains it.
    """
    from lifecycle.train.model import build_model, get_preset

    shape = get_preset(preset)
    return build_model(preset, tokenizer, seed=seed, n_positions=max(shape.n_positions, block_size))


def refuse_not_smaller(what: str, params: int, teacher: int) -> None:
    """ConfigError (exit 2) unless a student of ``params`` parameters is smaller than the teacher's ``teacher``.

    A student as large as its teacher (or larger) is not a compression: distilling into it makes a
    model no smaller than the parent, which the compress command would register as a "variant".
    """
    if params >= teacher:
        raise ConfigError(f"{what} has {params} parameters, the teacher {teacher}: the student must be smaller "
                          "than the teacher")


def check_preset(preset: str, teacher_config: Any, tokenizer: Any, block_size: int) -> int:
    """The parameter count of a fresh ``--preset`` student; ConfigError unless it is smaller than the teacher."""
    import torch

    from lifecycle.optimize.prune import count_params

    with torch.device("meta"):
        params = count_params(fresh_student(preset, tokenizer, block_size))
    refuse_not_smaller(f"--preset {preset} (for this tokenizer and {block_size}-token blocks)", params,
                       _meta_params(teacher_config))
    return params


def check_student(uri: str, teacher_config: Any, teacher_tokenizer: Any, block_size: int) -> StudentModel:
    """Resolve ``--student`` and refuse it (ConfigError, exit 2) unless it can be distilled into.

    Nothing is loaded but configs and the tokenizer; a missing model is a NotFoundError (exit 5).
    """
    from transformers import AutoConfig, AutoTokenizer

    from lifecycle.evaluate.results import registered_version
    from lifecycle.serving.variant import read_variant
    from lifecycle.tracking import resolve_model_dir
    from lifecycle.train.finetune import tokenizer_mismatch

    remote = uri.startswith(("models:/", "runs:/")) or "://" in uri
    if not remote and not Path(uri).expanduser().exists():
        # resolve_model_dir would hand a bare name to the hub; nothing is downloaded here.
        raise NotFoundError(f"--student {uri}: no such folder (give models:/NAME/VERSION, models:/NAME@ALIAS, "
                            "runs:/<run_id>/<path> or a local model folder)")
    folder = resolve_model_dir(uri)
    variant = read_variant(folder) or {}
    if variant.get("method") == "int8-dynamic":
        raise ConfigError(f"--student {uri} is an int8-dynamic variant, which cannot be trained; give an fp32 "
                          "model (its parent, or a prune/distill variant)")
    config = AutoConfig.from_pretrained(str(folder))
    if int(config.vocab_size) != int(teacher_config.vocab_size):
        raise ConfigError(f"--student {uri} has an output vocabulary of {config.vocab_size} tokens, the teacher "
                          f"{teacher_config.vocab_size}: its logits cannot be matched to the teacher's")
    why = tokenizer_mismatch(AutoTokenizer.from_pretrained(str(folder)), teacher_tokenizer)
    if why:  # tokenizer_mismatch names its sides for fine-tuning: "the data" and "the base model"
        why = why.replace("in the data", "in the student").replace("in the base model", "in the teacher")
        raise ConfigError(f"--student {uri} does not use the teacher's tokenizer ({why})")
    limit = int(getattr(config, "n_positions", 0) or getattr(config, "max_position_embeddings", 0) or 0)
    if limit and block_size > limit:
        raise ConfigError(f"--student {uri} takes at most {limit} tokens but the data's blocks have {block_size}")
    params, teacher = _meta_params(config), _meta_params(teacher_config)
    refuse_not_smaller(f"--student {uri}", params, teacher)
    version = registered_version(uri)
    return StudentModel(folder=folder, resolved=version.uri if version else uri, params=params,
                        teacher_params=teacher)


def load_student(student: StudentModel) -> Any:
    """The checked student's weights, in fp32 (a half-precision variant is trained in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(student.folder), dtype=torch.float32)
