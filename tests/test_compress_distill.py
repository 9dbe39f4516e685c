"""Distillation in `lifecycle compress --method distill`: the loss, the registered student and its
lineage, and where the student starts (--preset, --amount: the parent pruned, or --student: a smaller
model), with the refusals of a bad start. The int8 and pruning variants are in tests/test_compress.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lifecycle.errors import ConfigError
from lifecycle.optimize import prune as P
from lifecycle.optimize import student as S
from tests.compress_support import LEAN_EVAL, SHORT_DISTILL, SHORT_PRUNE, short_for

ROOT = Path(__file__).resolve().parents[1]


def test_distill_loss_is_zero_against_itself_and_the_lm_loss_at_weight_0(one_torch_thread):
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    from lifecycle.optimize.distill import DistillConfig, DistillLoss

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
    x = torch.randint(0, 128, (2, 16))
    batch = {"input_ids": x, "labels": x}
    same = DistillLoss(copy.deepcopy(model), kd_weight=1.0, temperature=2.0)
    assert float(same(model, batch)) == pytest.approx(0.0, abs=1e-5)
    lm_only = DistillLoss(copy.deepcopy(model), kd_weight=0.0, temperature=2.0)
    assert float(lm_only(model, batch)) == pytest.approx(float(model(**batch).loss))
    for bad, message in [({"kd_weight": 1.5}, "kd_weight"), ({"temperature": 0}, "temperature"),
                         ({"steps": -1}, "steps")]:
        with pytest.raises(ConfigError, match=message):
            DistillConfig(**bad)


@pytest.mark.e2e
def test_distilled_student_is_registered_with_its_lineage(compress_parent, prepared_tiny):
    """Through the MLproject entry point's script, as `mlflow run . -e compress` runs it."""
    from mlflow.tracking import MlflowClient

    name = compress_parent["name"]
    settings = ";".join(w for w in [*LEAN_EVAL, *SHORT_DISTILL] if w != "--set")
    res = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "compress.py"), f"name={name}",
                          f"version={compress_parent['version']}", "method=distill", "amount=", "preset=tiny",
                          f"data={prepared_tiny}", "device=cpu", "config=", f"set={settings}"],
                         cwd=compress_parent["work"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LIFECYCLE_CPU_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distill of v" in res.stdout
    client = MlflowClient()
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    tags = client.get_model_version(name, str(version)).tags
    assert tags["compressed_from"] == compress_parent["version"] and tags["compress/method"] == "distill"
    assert tags["compress/teacher"] == f"models:/{name}/{compress_parent['version']}"
    assert tags["compress/student_preset"] == "tiny" and tags["compress/distill_steps"] == "6"
    parent_tags = client.get_model_version(name, compress_parent["version"]).tags
    assert tags.get("data_digest") == parent_tags.get("data_digest")  # the parent's lineage is carried over
    float(tags["compress/bits_per_byte_delta"])
    assert int(tags["compress/params"]) < int(tags["compress/parent_params"])

    # A 6-step student from scratch is far worse than its parent: registered, but the default
    # policy's compression gate (read from eval/bits_per_byte and compress/parent_bits_per_byte,
    # both measured in the compress run) refuses to promote it, and no alias moves.
    from lifecycle.errors import GateRejected
    from lifecycle.policies.loader import load_policy
    from lifecycle.registry.promote import promote

    policy = load_policy(ROOT / "registry_policies" / "default.yaml")
    loss = float(tags["eval/bits_per_byte"]) / float(tags["compress/parent_bits_per_byte"]) - 1
    assert loss > policy.staging.compression.max_regression
    with pytest.raises(GateRejected) as rejected:
        promote(name, str(version), "staging", policy=policy)
    gate = next(g for g in rejected.value.outcome.gates if g.kind == "compression")
    assert gate.status == "fail" and "more than the allowed" in gate.reason
    assert f"vs parent v{compress_parent['version']}" in gate.reason
    after = client.get_model_version(name, str(version))
    assert after.tags["compressed_from"] == compress_parent["version"] and not after.aliases


# -- where a distilled student starts: a preset, the parent pruned, or a smaller model ----------


_STARTS = st.fixed_dictionaries({}, optional={
    "preset": st.sampled_from(["tiny", "small"]),
    "amount": st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True),
    "student": st.text(min_size=0, max_size=40)})


@given(_STARTS)
def test_student_start_is_exactly_one_and_its_text_round_trips(given_options):
    """Exactly one of --preset / --amount / --student, or a one-line ConfigError; the tag text reads
    back to the same start (a --student URI exactly as written, or refused)."""
    try:
        init = S.init_of(given_options.get("preset"), given_options.get("amount"), given_options.get("student"))
    except ConfigError as exc:
        assert "\n" not in str(exc)
        if len(given_options) != 1:
            assert ("mutually exclusive" if given_options else "needs one of") in str(exc)
        else:  # only a --student text that would not read back exactly is refused
            assert "student" in given_options and "is not a model URI" in str(exc)
        return
    assert len(given_options) == 1
    assert S.parse_init(init.text) == init
    if init.kind == S.MODEL:
        assert init.text == given_options["student"]
    elif init.kind == S.PRUNED:
        assert init.text == f"pruned:{given_options['amount']!r}"
    else:
        assert init.text == f"scratch:{given_options['preset']}"


@pytest.mark.parametrize("teacher_layers, refused", [(2, True), (3, False)])
def test_preset_student_must_be_smaller_than_the_teacher(prepared_tiny, teacher_layers, refused):
    """A `tiny` teacher (2 layers) and a fresh `--preset tiny` student are the same size: no compression."""
    from transformers import AutoTokenizer

    from lifecycle.train.model import PRESETS, Preset, build_model

    tokenizer = AutoTokenizer.from_pretrained(str(prepared_tiny / "tokenizer"))
    tiny = PRESETS["tiny"]
    with torch.device("meta"):
        teacher = build_model(Preset(teacher_layers, tiny.n_head, tiny.n_embd, tiny.n_positions), tokenizer)
    if refused:
        with pytest.raises(ConfigError, match="--preset tiny .* the student must be smaller than the teacher"):
            S.check_preset("tiny", teacher.config, tokenizer, 64)
    else:
        params = S.check_preset("tiny", teacher.config, tokenizer, 64)
        # What check_preset counts is exactly what compress then trains.
        assert params == P.count_params(S.fresh_student("tiny", tokenizer, 64, seed=0)) < P.count_params(teacher)


@pytest.fixture(scope="module")
def foreign_students(compress_parent, prepared_tiny, tmp_path_factory):
    """Local model folders a --student must not be: another tokenizer, another vocabulary size, int8."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lifecycle.data.tokenizer import train_tokenizer
    from lifecycle.optimize.compress import make_variant
    from lifecycle.tracking import resolve_model_dir

    root = tmp_path_factory.mktemp("students")
    teacher_dir = resolve_model_dir(f"models:/{compress_parent['name']}/{compress_parent['version']}")
    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    vocab = len(teacher_tok)
    # Upper-cased text: other merges, the same number of tokens.
    other_tok = train_tokenizer([[t.upper() for t in topics.values()]], vocab_size=vocab)
    folders = {}
    for key, tok, size in (("tokenizer", other_tok, vocab), ("vocabulary", teacher_tok, vocab + 16)):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=size, n_positions=128, n_embd=32, n_layer=1, n_head=2,
                                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
        folders[key] = root / key
        model.save_pretrained(folders[key])
        tok.save_pretrained(folders[key])
    folders["int8"] = make_variant(teacher_dir, "int8-dynamic", root / "int8", parent_uri="test")
    return folders


@pytest.mark.parametrize("method, args, code, message", [
    ("distill", ["--preset", "tiny", "--amount", "0.3"], 2, "mutually exclusive"),
    ("distill", ["--preset", "tiny", "--student", "TEACHER"], 2, "mutually exclusive"),
    ("distill", ["--amount", "0.3", "--student", "TEACHER"], 2, "(got --amount, --student)"),
    ("distill", ["--preset", "tiny", "--amount", "30%", "--student", "TEACHER"], 2, "mutually exclusive"),
    ("distill", [], 2, "needs one of --preset"),
    ("prune", ["--amount", "0.3", "--student", "TEACHER"], 2, "--student is for --method distill, not prune"),
    ("int8-dynamic", ["--student", "TEACHER"], 2, "--student is for --method distill, not int8-dynamic"),
    ("distill", ["--amount", "0.95"], 2, "more MLP neurons than the model has"),
    ("distill", ["--amount", "0"], 2, "strictly between 0 and 1"),
    ("distill", ["--student", " TEACHER"], 2, "is not a model URI"),
    ("distill", ["--student", "TEACHER"], 2, "must be smaller than the teacher"),
    ("distill", ["--student", "tokenizer"], 2, "does not use the teacher's tokenizer (encodings of"),
    ("distill", ["--student", "vocabulary"], 2, "has an output vocabulary of"),
    ("distill", ["--student", "int8"], 2, "int8-dynamic variant, which cannot be trained"),
    ("distill", ["--preset", "small"], 2, "--preset small (for this tokenizer and 64-token blocks) has"),
    ("distill", ["--student", "models:/no-such-model-x/1"], 5, "no such version"),
    ("distill", ["--student", "models:/no-such-model-x@champion"], 5, "no such alias @champion"),
    ("distill", ["--student", "no/such/folder"], 5, "no such folder"),
    ("distill", ["--preset", "tiny", "--set", "prune.importance=magnitude"], 2,
     "--set prune.importance has no effect with --method distill --preset"),
    ("distill", ["--student", "TEACHER", "--set", "prune.layers=false"], 2,
     "--set prune.layers has no effect with --method distill --student"),
    ("int8-dynamic", ["--set", "distill.steps=3"], 2, "--set distill.steps has no effect with --method int8-dynamic"),
])
def test_bad_student_start_exits_with_nothing_written(compress_parent, prepared_tiny, foreign_students, method, args,
                                                       code, message, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    teacher = f"models:/{compress_parent['name']}/{compress_parent['version']}"
    args = [a.replace("TEACHER", teacher) for a in args]
    args = [str(foreign_students[a]) if a in foreign_students else a for a in args]
    runs_before = len(mlflow.search_runs(experiment_ids=[compress_parent["experiment"]], output_format="list"))
    versions_before = len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'"))
    with pytest.raises(SystemExit) as exc:
        main(["compress", compress_parent["name"], compress_parent["version"], "--method", method,
              "--data", str(prepared_tiny), "--experiment", compress_parent["name"], *args,
              *short_for(["--method", method, *args])])
    err = capsys.readouterr().err
    assert exc.value.code == code and message in err and "Traceback" not in err, err
    assert len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'")) == versions_before
    assert len(mlflow.search_runs(experiment_ids=[compress_parent["experiment"]], output_format="list")) == runs_before


def _latest(client, name: str) -> str:
    return str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))


def _loaded_params(uri: str) -> tuple[int, object]:
    """Parameters and config of the Hugging Face folder inside a registered version."""
    from transformers import AutoModelForCausalLM

    from lifecycle.tracking import resolve_model_dir

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(uri)))
    return P.count_params(model), model.config


@pytest.fixture(scope="module")
def pruned_student(compress_parent, prepared_tiny):
    """`lifecycle compress --method distill --amount 0.3`: the student starts as the parent pruned."""
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    name = compress_parent["name"]
    main(["compress", name, compress_parent["version"], "--method", "distill", "--amount", "0.3", "--data",
          str(prepared_tiny), "--experiment", name, *LEAN_EVAL, *SHORT_DISTILL, *SHORT_PRUNE])
    return _latest(MlflowClient(), name)


@pytest.mark.e2e
def test_student_from_the_pruned_parent_is_registered_with_its_lineage(compress_parent, pruned_student):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoConfig

    from lifecycle.tracking import resolve_model_dir

    name, client = compress_parent["name"], MlflowClient()
    parent_uri = f"models:/{name}/{compress_parent['version']}"
    tags = client.get_model_version(name, pruned_student).tags
    assert tags["compressed_from"] == compress_parent["version"] and tags["compress/method"] == "distill"
    assert tags["compress/student_init"] == "pruned:0.3" and tags["compress/teacher"] == parent_uri
    assert tags["compress/amount"] == "0.3" and "compress/student_preset" not in tags
    assert tags["compress/distill_steps"] == "6"
    # The student is exactly the pruning plan's shape: the parent less the plan's block parameters.
    plan = P.plan(AutoConfig.from_pretrained(str(resolve_model_dir(parent_uri))), 0.3)
    parent_params, _ = _loaded_params(parent_uri)
    params, config = _loaded_params(f"models:/{name}/{pruned_student}")
    assert params == parent_params - (plan.block_params - plan.kept_block_params) == int(tags["compress/params"])
    assert (config.n_layer, config.n_inner) == (plan.keep_layers, plan.keep_neurons)
    run = client.get_run(tags["compress_run_id"])
    assert run.data.params["compress.student_init"] == "pruned:0.3" and run.data.params["prune.amount"] == "0.3"
    assert "distill/train/kd" in run.data.metrics and "prune/calibration_loss_before_recovery" in run.data.metrics
    assert S.parse_init(tags["compress/student_init"]) == S.StudentInit(S.PRUNED, amount=0.3)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{pruned_student}")
    assert list(model.predict(["def main("], params={"max_new_tokens": 3})["completion_tokens"]) == [3]


@pytest.mark.e2e
def test_student_from_a_registered_model_starts_from_its_weights(compress_parent, pruned_student, prepared_tiny):
    """`--student models:/NAME@ALIAS` through the MLproject entry point's script: the alias is
    recorded as written and pinned to the version it named."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, client = compress_parent["name"], MlflowClient()
    client.set_registered_model_alias(name, "student", pruned_student)
    uri = f"models:/{name}@student"
    settings = ";".join(w for w in [*LEAN_EVAL, *SHORT_DISTILL] if w != "--set")
    res = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "compress.py"), f"name={name}",
                          f"version={compress_parent['version']}", "method=distill", "amount=", "preset=",
                          f"student={uri}",
                          f"data={prepared_tiny}", "device=cpu", "config=", f"set={settings}"],
                         cwd=compress_parent["work"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LIFECYCLE_CPU_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"student from {uri}" in res.stdout
    version = _latest(client, name)
    tags = client.get_model_version(name, version).tags
    assert tags["compressed_from"] == compress_parent["version"] and tags["compress/student_init"] == uri
    assert tags["compress/student"] == f"models:/{name}/{pruned_student}"
    assert tags["compress/teacher"] == f"models:/{name}/{compress_parent['version']}" and "compress/amount" not in tags
    assert client.get_run(tags["compress_run_id"]).data.params["compress.student_init"] == uri
    # The student kept the starting model's shape and size (it was trained, not rebuilt).
    start_params, start_config = _loaded_params(f"models:/{name}/{pruned_student}")
    params, config = _loaded_params(f"models:/{name}/{version}")
    assert params == start_params == int(tags["compress/params"]) < int(tags["compress/parent_params"])
    assert (config.n_layer, config.n_inner, config.n_embd) == (start_config.n_layer, start_config.n_inner,
                                                                start_config.n_embd)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert list(model.predict(["The class"], params={"max_new_tokens": 2})["completion_tokens"]) == [2]

    # A second compress of the same parent did not touch the first's artifacts: each run keeps its
    # own trade-off table (the parent's row and its own variant's) and chart.
    for v in (pruned_student, version):
        run_id = client.get_model_version(name, v).tags["compress_run_id"]
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="compress/tradeoff.json",
                                                   dst_path=str(compress_parent["work"] / f"table-v{v}"))
        table = json.loads(Path(path).read_text())
        column = table["columns"].index("model")
        assert [row[column] for row in table["data"]] == [f"v{compress_parent['version']} (parent)", f"v{v} (distill)"]
        assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/tradeoff.png"]

