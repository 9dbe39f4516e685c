"""Compressed variants: the int8 format, the policy's compression gate, and `lifecycle compress`
end to end (train a tiny parent, make its int8 variant, promote it under the default policy and
serve it with `lifecycle serve` -> `mlflow models serve`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from lifecycle.errors import ConfigError
from lifecycle.policies import Candidate, check_gates
from lifecycle.policies.loader import load_policy, parse_policy
from lifecycle.policies.schema import CompressionGate, TargetPolicy
from lifecycle.serving import variant as V
from tests import servers

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def test_int8_variant_reloads_exactly_smaller_with_the_head_tied(tiny_gpt2, tmp_path, one_torch_thread):
    import copy

    x = torch.randint(0, 512, (2, 24))
    linear = copy.deepcopy(tiny_gpt2)
    names = V.conv1d_to_linear(linear)
    assert len(names) == 8  # c_attn, c_proj, c_fc, mlp.c_proj in each of 2 blocks
    with torch.no_grad():
        reference = tiny_gpt2(x).logits
        assert torch.allclose(linear(x).logits, reference, atol=1e-5)  # Conv1D -> Linear is exact
    quantized, qnames = V.quantize_int8(copy.deepcopy(tiny_gpt2))
    assert "lm_head" not in qnames and len(qnames) == 8
    tiny_gpt2.config.save_pretrained(tmp_path)
    V.save_int8(quantized, tmp_path)
    V.write_variant(tmp_path, {"method": "int8-dynamic"})
    tiny_gpt2.save_pretrained(tmp_path / "fp32")
    assert V.weights_bytes(tmp_path) < 0.6 * V.weights_bytes(tmp_path / "fp32")
    loaded = V.load_variant(tmp_path, torch.device("cpu"))
    with torch.no_grad():
        q, r = quantized(x).logits, loaded(x).logits
    assert torch.equal(q, r)  # the stored integers and scales come back exactly
    assert (q - reference).abs().max() < 0.1  # and int8 stays close to fp32
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    with pytest.raises(ConfigError, match="runs on CPU only"):
        V.load_variant(tmp_path, torch.device("cuda"))


def _candidate(**tags: str) -> Candidate:
    return Candidate(version="2", tags=tags)


@pytest.mark.parametrize("gate, tags, ok, fragment", [
    (CompressionGate(max_regression=0.02), {}, True, "not a compressed variant"),
    (CompressionGate(max_regression=0.02),
     {"compressed_from": "1", "eval/bits_per_byte": "2.02", "compress/parent_bits_per_byte": "2.0"},
     True, "+1.00% loss"),
    (CompressionGate(max_regression=0.005),
     {"compressed_from": "1", "eval/bits_per_byte": "2.02", "compress/parent_bits_per_byte": "2.0"}, False,
     "more than the allowed 0.50%"),
    (CompressionGate(max_delta=0.01),
     {"compressed_from": "1", "eval/bits_per_byte": "2.02", "compress/parent_bits_per_byte": "2.0"}, False,
     "exceeds max_delta 0.01"),
    (CompressionGate(metric="eval/tokens_per_s", max_regression=0.1),
     {"compressed_from": "1", "eval/tokens_per_s": "95", "compress/parent_tokens_per_s": "100"}, True, "+5.00% loss"),
    (CompressionGate(max_regression=0.02), {"compressed_from": "1", "eval/bits_per_byte": "2.0"}, False,
     "make it with `lifecycle compress`"),
    (CompressionGate(max_regression=0.02),
     {"compressed_from": "1", "eval/bits_per_byte": "2.0", "compress/parent_bits_per_byte": "2.0",
      "eval_data_digest": "aaaa", "compress/eval_data_digest": "bbbb"}, False, "re-evaluated on other data"),
])
def test_compression_gate_bounds_the_loss_against_the_parent(gate, tags, ok, fragment):
    (result,) = check_gates(TargetPolicy(compression=gate), _candidate(**tags))
    assert (result.status == "pass") is ok and fragment in result.reason


@pytest.mark.parametrize("text, message", [
    ("staging:\n  compression: {metric: eval/bits_per_byte}\n", "give max_regression"),
    ("staging:\n  compression: {max_regression: -0.1}\n", r"staging\.compression\.max_regression: must be >= 0"),
    ("staging:\n  compression: {metric: compare/win_rate, max_delta: 0.1}\n", "bounds an eval/<metric>"),
])
def test_policy_refuses_a_bad_compression_gate(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_policy(text, "p.yaml")


def test_shipped_policies_bound_compressed_variants():
    for name in ("default.yaml", "strict.yaml"):
        policy = load_policy(ROOT / "registry_policies" / name)
        compression = policy.production.compression
        assert compression is not None and compression.metric == "eval/bits_per_byte"


# -- end to end ---------------------------------------------------------------------------------

#: A lean evaluation: the trade-off still measures loss, bits-per-byte and generation speed.
LEAN_EVAL = ["--set", "generation.num_prompts=4", "--set", "generation.max_new_tokens=8",
             "--set", "latency.batch_sizes=[1]", "--set", "latency.requests=3", "--set", "latency.max_new_tokens=16",
             "--set", "compare.bootstrap_samples=200"]


@pytest.fixture(scope="module")
def parent(prepared_tiny, tmp_path_factory, one_torch_thread):
    """A tiny model trained for a few steps and registered as version 1 of a fresh name."""
    import uuid

    from mlflow.tracking import MlflowClient

    from lifecycle.train.config import TrainConfig
    from lifecycle.train.run import train

    name = f"lm-compress-{uuid.uuid4().hex[:8]}"
    work = tmp_path_factory.mktemp("compress")
    exp = MlflowClient().create_experiment(name, artifact_location=(work / "artifacts").as_uri())
    cfg = TrainConfig(max_steps=30, batch_size=8, eval_every=10, eval_batches=2, warmup_steps=3, learning_rate=3e-3,
                      progress=False, system_metrics=False, output=str(work / "ckpt"), model_name=name, experiment=name)
    out = train(cfg, str(prepared_tiny))
    return {"name": name, "version": out.version, "experiment": exp, "work": work}


def test_bad_method_or_version_is_refused_without_a_new_version(parent, capsys):
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compress", parent["name"], parent["version"], "--method", "int4"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compress", parent["name"], "99", "--method", "int8-dynamic"])
    assert exc.value.code == 5 and "has no version 99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the parent was never evaluated: no data to take
        main(["compress", parent["name"], parent["version"], "--method", "int8-dynamic"])
    assert exc.value.code == 2 and "give --data" in capsys.readouterr().err
    assert len(MlflowClient().search_model_versions(f"name='{parent['name']}'")) == 1


@pytest.mark.e2e
def test_int8_variant_is_smaller_within_the_policy_and_serves(parent, prepared_tiny, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main
    from lifecycle.registry.promote import promote

    name = parent["name"]
    main(["compress", name, parent["version"], "--method", "int8-dynamic", "--data", str(prepared_tiny),
          "--experiment", name, *LEAN_EVAL])
    printed = capsys.readouterr().out
    assert "int8-dynamic" in printed and "bits/byte" in printed and "tokens/s" in printed
    client = MlflowClient()
    mv = client.get_model_version(name, "2")
    tags = mv.tags
    assert tags["compressed_from"] == parent["version"] and tags["compress/method"] == "int8-dynamic"
    assert int(tags["compress/weights_bytes"]) < int(tags["compress/parent_weights_bytes"])
    assert float(tags["compress/size_ratio"]) < 0.7
    assert tags["compare_baseline"] == f"models:/{name}/{parent['version']}"
    assert tags["eval_data_digest"] == tags["compress/eval_data_digest"]
    for key in ("eval/bits_per_byte", "eval/tokens_per_s", "compress/bits_per_byte_delta",
                "compress/tokens_per_s_delta", "compress/latency_p50_ms_delta"):
        float(tags[key])
    # The compress run holds the trade-off table, the chart and a nested evaluation run.
    run = client.get_run(tags["compress_run_id"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {"plots/tradeoff.png"}
    assert client.list_artifacts(run.info.run_id, "compress")[0].path == "compress/tradeoff.json"
    children = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                  filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert [c.data.tags["lifecycle.stage"] for c in children] == ["evaluate"]

    # The default policy bounds the bits-per-byte loss against the parent; the variant is within it.
    policy = load_policy(ROOT / "registry_policies" / "default.yaml")
    outcome = promote(name, "2", "staging", policy=policy)
    gate = next(g for g in outcome.gates if g.kind == "compression")
    assert gate.status == "pass" and f"vs parent v{parent['version']}" in gate.reason
    delta = float(tags["eval/bits_per_byte"]) / float(tags["compress/parent_bits_per_byte"]) - 1
    assert delta <= policy.staging.compression.max_regression

    # It serves through the same pyfunc class, from the registry, in a real `mlflow models serve`.
    port = servers.free_port()
    log_path = parent["work"] / "serve.log"
    env = {**os.environ, "LIFECYCLE_CPU_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lifecycle", "serve", name, "--alias", "staging",
                                 "--port", str(port), "--device", "cpu"],
                                cwd=parent["work"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
        body = json.dumps({"inputs": ["def main(", "The class"], "params": {"max_new_tokens": 4}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            rows = json.loads(resp.read())["predictions"]
        assert [r["completion_tokens"] for r in rows] == [4, 4]
    except Exception:
        print(log_path.read_text(errors="replace")[-3000:])
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


# -- structured pruning and distillation (issue #14) --------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lifecycle.optimize import prune as P  # noqa: E402


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True))
def test_amount_fraction_and_percent_round_trip(value):
    assert P.parse_amount(repr(value)) == value
    assert P.parse_amount(f" {value!r} ") == value
    assert P.parse_amount(f"{value * 100!r}%") == pytest.approx(value, rel=1e-12)


@given(st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))))
def test_amount_outside_the_open_interval_is_refused(value):
    with pytest.raises(ConfigError, match="--amount"):
        P.parse_amount(repr(value))


@given(st.text(max_size=12))
def test_amount_text_is_a_number_or_a_one_line_config_error(text):
    try:
        value = P.parse_amount(text)
    except ConfigError as exc:
        assert "\n" not in str(exc) and repr(text) in str(exc)
    else:
        assert 0.0 < value < 1.0


@pytest.mark.parametrize("n_layer, amount", [(2, 0.3), (4, 0.3), (4, 0.1), (4, 0.6), (2, 0.55)])
def test_pruned_parameter_count_is_what_the_amount_says_and_loads(n_layer, amount, tmp_path, one_torch_thread):
    """amount = fraction of the transformer blocks' parameters removed, to within half an MLP neuron per
    remaining layer; the folder is a plain GPT-2 (config matches weights) that from_pretrained loads."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from lifecycle.optimize import importance as I

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=n_layer, n_head=2,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    x = torch.randint(0, 256, (4, 24))
    batches = [{"input_ids": x, "labels": x}]
    plan = P.plan(config, amount)
    assert plan.drop_layers == min(int(amount * n_layer), n_layer - 1)
    assert abs(plan.achieved - amount) <= plan.keep_layers * plan.neuron_params / 2 / plan.block_params
    layer_scores = I.layer_scores(model, batches)
    pruned = P.prune_model(model, plan, layer_scores, I.neuron_scores(model, batches, "taylor"))
    assert P.block_params_of(pruned) == plan.kept_block_params == P.block_params_of(model) - round(
        plan.achieved * plan.block_params)
    if plan.drop_layers:  # the least important layers went
        assert sorted(plan.dropped) == sorted(sorted(range(n_layer), key=lambda i: layer_scores[i])[:plan.drop_layers])
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert (loaded.config.n_layer, loaded.config.n_inner) == (plan.keep_layers, plan.keep_neurons)
    assert P.count_params(loaded) == P.count_params(pruned) < P.count_params(model)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, pruned(x).logits)


def test_pruning_refuses_more_than_the_model_has():
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2)
    with pytest.raises(ConfigError, match="more MLP neurons than the model has"):
        P.plan(config, 0.9)
    with pytest.raises(ConfigError, match="more MLP neurons than the model has"):
        P.plan(config, 0.7, layers=False)  # the MLPs are 2/3 of a block
    with pytest.raises(ConfigError, match="nothing would be removed"):
        P.plan(config, 1e-6)


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


@pytest.mark.parametrize("args, message", [
    (["--amount", "0"], "strictly between 0 and 1"),
    (["--amount", "1"], "strictly between 0 and 1"),
    (["--amount", "-0.3"], "strictly between 0 and 1"),
    (["--amount", "1.5"], "strictly between 0 and 1"),
    (["--amount", "lots"], "is not a number"),
    (["--amount", "0.95"], "more MLP neurons than the model has"),
    (["--amount", "0.3", "--set", "prune.importance=random"], "prune.importance"),
    ([], "needs --amount"),
])
def test_bad_prune_amount_exits_2_with_nothing_written(parent, prepared_tiny, args, message, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    runs_before = len(mlflow.search_runs(experiment_ids=[parent["experiment"]], output_format="list"))
    versions_before = len(MlflowClient().search_model_versions(f"name='{parent['name']}'"))
    with pytest.raises(SystemExit) as exc:
        main(["compress", parent["name"], parent["version"], "--method", "prune", "--data", str(prepared_tiny),
              "--experiment", parent["name"], *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert len(MlflowClient().search_model_versions(f"name='{parent['name']}'")) == versions_before
    assert len(mlflow.search_runs(experiment_ids=[parent["experiment"]], output_format="list")) == runs_before


#: A short recovery: the point here is the plumbing, the benchmark measures the quality.
SHORT_DISTILL = ["--set", "distill.steps=6", "--set", "distill.eval_every=3", "--set", "distill.eval_batches=1",
                 "--set", "prune.calibration_batches=2"]


@pytest.mark.e2e
def test_pruned_variant_is_registered_loads_elsewhere_and_serves(parent, prepared_tiny, tmp_path, capsys):
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    name = parent["name"]
    main(["compress", name, parent["version"], "--method", "prune", "--amount", "30%", "--data",
          str(prepared_tiny), "--experiment", name, *LEAN_EVAL, *SHORT_DISTILL])
    printed = capsys.readouterr().out
    assert "prune" in printed and "params" in printed and "tokens/s bs1" in printed
    client = MlflowClient()
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    tags = client.get_model_version(name, str(version)).tags
    assert tags["compressed_from"] == parent["version"] and tags["compress/method"] == "prune"
    assert tags["compress/amount"] == "0.3" and abs(float(tags["compress/amount_achieved"]) - 0.3) < 0.01
    block, parent_block = int(tags["compress/block_params"]), int(tags["compress/parent_block_params"])
    assert block == parent_block - round(float(tags["compress/amount_achieved"]) * parent_block)
    assert int(tags["compress/params"]) < int(tags["compress/parent_params"])
    assert tags["compress/distill_steps"] == "6" and float(tags["compress/time_s"]) > 0
    for key in ("compress/tokens_per_s_bs1_ratio", "compress/bits_per_byte_delta", "compress/parent_bits_per_byte"):
        float(tags[key])
    run = client.get_run(tags["compress_run_id"])
    assert run.data.params["prune.amount"] == "0.3" and "distill/train/loss" in run.data.metrics
    assert "prune/calibration_loss_before_recovery" in run.data.metrics

    # The registered artifact, copied to a folder of its own, loads through the pyfunc class.
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(tmp_path / "dl")))
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(local, moved)
    shutil.rmtree(tmp_path / "dl")
    pyfunc = mlflow.pyfunc.load_model(str(moved))
    out = pyfunc.predict(["def main(", "The class"], params={"max_new_tokens": 3})
    assert list(out["completion_tokens"]) == [3, 3]

    # And in a real `mlflow models serve`, started by `lifecycle serve --version`.
    proc, url = servers.start_lifecycle_serve(name, tmp_path / "serve", ["--version", str(version), "--device", "cpu"],
                                              env={"LIFECYCLE_CPU_THREADS": "1"})
    try:
        body = json.dumps({"inputs": ["def main("], "params": {"max_new_tokens": 4}}).encode()
        req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            rows = json.loads(resp.read())["predictions"]
        assert [r["completion_tokens"] for r in rows] == [4]
    finally:
        servers.stop_process(proc)


@pytest.mark.e2e
def test_distilled_student_is_registered_with_its_lineage(parent, prepared_tiny):
    """Through the MLproject entry point's script, as `mlflow run . -e compress` runs it."""
    from mlflow.tracking import MlflowClient

    name = parent["name"]
    settings = ";".join(w for w in [*LEAN_EVAL, *SHORT_DISTILL] if w != "--set")
    res = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "compress.py"), f"name={name}",
                          f"version={parent['version']}", "method=distill", "amount=", "preset=tiny",
                          f"data={prepared_tiny}", "device=cpu", "config=", f"set={settings}"],
                         cwd=parent["work"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LIFECYCLE_CPU_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "distill of v" in res.stdout
    client = MlflowClient()
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    tags = client.get_model_version(name, str(version)).tags
    assert tags["compressed_from"] == parent["version"] and tags["compress/method"] == "distill"
    assert tags["compress/teacher"] == f"models:/{name}/{parent['version']}"
    assert tags["compress/student_preset"] == "tiny" and tags["compress/distill_steps"] == "6"
    parent_tags = client.get_model_version(name, parent["version"]).tags
    assert tags.get("data_digest") == parent_tags.get("data_digest")  # the parent's lineage is carried over
    float(tags["compress/bits_per_byte_delta"])


# -- where a distilled student starts: a preset, the parent pruned, or a smaller model ----------

from lifecycle.optimize import student as S  # noqa: E402

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


@pytest.fixture(scope="module")
def foreign_students(parent, prepared_tiny, tmp_path_factory):
    """Local model folders a --student must not be: another tokenizer, another vocabulary size, int8."""
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lifecycle.data.tokenizer import train_tokenizer
    from lifecycle.optimize.compress import make_variant
    from lifecycle.tracking import resolve_model_dir

    root = tmp_path_factory.mktemp("students")
    teacher_dir = resolve_model_dir(f"models:/{parent['name']}/{parent['version']}")
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
    ("distill", ["--student", "models:/no-such-model-x/1"], 5, "no such version"),
    ("distill", ["--student", "no/such/folder"], 5, "no such folder"),
])
def test_bad_student_start_exits_with_nothing_written(parent, prepared_tiny, foreign_students, method, args, code,
                                                       message, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    teacher = f"models:/{parent['name']}/{parent['version']}"
    args = [a.replace("TEACHER", teacher) for a in args]
    args = [str(foreign_students[a]) if a in foreign_students else a for a in args]
    runs_before = len(mlflow.search_runs(experiment_ids=[parent["experiment"]], output_format="list"))
    versions_before = len(MlflowClient().search_model_versions(f"name='{parent['name']}'"))
    with pytest.raises(SystemExit) as exc:
        main(["compress", parent["name"], parent["version"], "--method", method, "--data", str(prepared_tiny),
              "--experiment", parent["name"], *args, *SHORT_DISTILL])
    err = capsys.readouterr().err
    assert exc.value.code == code and message in err and "Traceback" not in err, err
    assert len(MlflowClient().search_model_versions(f"name='{parent['name']}'")) == versions_before
    assert len(mlflow.search_runs(experiment_ids=[parent["experiment"]], output_format="list")) == runs_before


def _latest(client, name: str) -> str:
    return str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))


def _loaded_params(uri: str) -> tuple[int, object]:
    """Parameters and config of the Hugging Face folder inside a registered version."""
    from transformers import AutoModelForCausalLM

    from lifecycle.tracking import resolve_model_dir

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(uri)))
    return P.count_params(model), model.config


@pytest.fixture(scope="module")
def pruned_student(parent, prepared_tiny):
    """`lifecycle compress --method distill --amount 0.3`: the student starts as the parent pruned."""
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    name = parent["name"]
    main(["compress", name, parent["version"], "--method", "distill", "--amount", "0.3", "--data",
          str(prepared_tiny), "--experiment", name, *LEAN_EVAL, *SHORT_DISTILL])
    return _latest(MlflowClient(), name)


@pytest.mark.e2e
def test_student_from_the_pruned_parent_is_registered_with_its_lineage(parent, pruned_student):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoConfig

    from lifecycle.tracking import resolve_model_dir

    name, client = parent["name"], MlflowClient()
    parent_uri = f"models:/{name}/{parent['version']}"
    tags = client.get_model_version(name, pruned_student).tags
    assert tags["compressed_from"] == parent["version"] and tags["compress/method"] == "distill"
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
def test_student_from_a_registered_model_starts_from_its_weights(parent, pruned_student, prepared_tiny):
    """`--student models:/NAME@ALIAS` through the MLproject entry point's script: the alias is
    recorded as written and pinned to the version it named."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, client = parent["name"], MlflowClient()
    client.set_registered_model_alias(name, "student", pruned_student)
    uri = f"models:/{name}@student"
    settings = ";".join(w for w in [*LEAN_EVAL, *SHORT_DISTILL] if w != "--set")
    res = subprocess.run([sys.executable, str(ROOT / "entrypoints" / "compress.py"), f"name={name}",
                          f"version={parent['version']}", "method=distill", "amount=", "preset=", f"student={uri}",
                          f"data={prepared_tiny}", "device=cpu", "config=", f"set={settings}"],
                         cwd=parent["work"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "LIFECYCLE_CPU_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"student from {uri}" in res.stdout
    version = _latest(client, name)
    tags = client.get_model_version(name, version).tags
    assert tags["compressed_from"] == parent["version"] and tags["compress/student_init"] == uri
    assert tags["compress/student"] == f"models:/{name}/{pruned_student}"
    assert tags["compress/teacher"] == f"models:/{name}/{parent['version']}" and "compress/amount" not in tags
    assert client.get_run(tags["compress_run_id"]).data.params["compress.student_init"] == uri
    # The student kept the starting model's shape and size (it was trained, not rebuilt).
    start_params, start_config = _loaded_params(f"models:/{name}/{pruned_student}")
    params, config = _loaded_params(f"models:/{name}/{version}")
    assert params == start_params == int(tags["compress/params"]) < int(tags["compress/parent_params"])
    assert (config.n_layer, config.n_inner, config.n_embd) == (start_config.n_layer, start_config.n_inner,
                                                                start_config.n_embd)
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert list(model.predict(["The class"], params={"max_new_tokens": 2})["completion_tokens"]) == [2]
