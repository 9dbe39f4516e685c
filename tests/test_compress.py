"""Compressed variants: the int8 format, the policy's compression gate, and `lifecycle compress`
end to end (train a tiny parent, make its int8 variant, promote it under the default policy and
serve it with `lifecycle serve` -> `mlflow models serve`); structured pruning (`--method prune`) and
its refusals. Distillation and where its student starts: tests/test_compress_distill.py."""

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
from hypothesis import given
from hypothesis import strategies as st

from lifecycle.errors import ConfigError
from lifecycle.optimize import prune as P
from lifecycle.policies import Candidate, check_gates
from lifecycle.policies.loader import load_policy, parse_policy
from lifecycle.policies.schema import CompressionGate, TargetPolicy
from lifecycle.serving import variant as V
from tests import servers
from tests.compress_support import LEAN_EVAL, SHORT_DISTILL, SHORT_PRUNE, short_for

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


# -- end to end (the parent is conftest's compress_parent; distillation: tests/test_compress_distill.py)


def test_bad_method_or_version_is_refused_without_a_new_version(compress_parent, capsys):
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["compress", compress_parent["name"], compress_parent["version"], "--method", "int4"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["compress", compress_parent["name"], "99", "--method", "int8-dynamic"])
    assert exc.value.code == 5 and "has no version 99" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # the parent was never evaluated: no data to take
        main(["compress", compress_parent["name"], compress_parent["version"], "--method", "int8-dynamic"])
    assert exc.value.code == 2 and "give --data" in capsys.readouterr().err
    assert len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'")) == 1


@pytest.mark.e2e
def test_int8_variant_is_smaller_within_the_policy_and_serves(compress_parent, prepared_tiny, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main
    from lifecycle.registry.promote import promote

    name = compress_parent["name"]
    main(["compress", name, compress_parent["version"], "--method", "int8-dynamic", "--data", str(prepared_tiny),
          "--experiment", name, *LEAN_EVAL])
    printed = capsys.readouterr().out
    assert "int8-dynamic" in printed and "bits/byte" in printed and "tokens/s" in printed
    client = MlflowClient()
    mv = client.get_model_version(name, "2")
    tags = mv.tags
    assert tags["compressed_from"] == compress_parent["version"] and tags["compress/method"] == "int8-dynamic"
    assert int(tags["compress/weights_bytes"]) < int(tags["compress/parent_weights_bytes"])
    assert float(tags["compress/size_ratio"]) < 0.7
    assert tags["compare_baseline"] == f"models:/{name}/{compress_parent['version']}"
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
    assert gate.status == "pass" and f"vs parent v{compress_parent['version']}" in gate.reason
    delta = float(tags["eval/bits_per_byte"]) / float(tags["compress/parent_bits_per_byte"]) - 1
    assert delta <= policy.staging.compression.max_regression

    # It serves through the same pyfunc class, from the registry, in a real `mlflow models serve`.
    port = servers.free_port()
    log_path = compress_parent["work"] / "serve.log"
    env = {**os.environ, "LIFECYCLE_CPU_THREADS": "1"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lifecycle", "serve", name, "--alias", "staging",
                                 "--port", str(port), "--device", "cpu"],
                                cwd=compress_parent["work"], env=env, stdout=log, stderr=subprocess.STDOUT,
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


# -- structured pruning (issue #14) -------------------------------------------------------------


@given(st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True))
def test_amount_fraction_and_percent_round_trip(value):
    assert P.parse_amount(repr(value)) == value
    assert P.parse_amount(f"{value * 100!r}%") == pytest.approx(value, rel=1e-12)
    # Surrounding whitespace, as for every number flag (lifecycle.config.number_text); not inside.
    assert P.parse_amount(f" {value!r}\n") == value
    with pytest.raises(ConfigError, match="is not a number"):
        P.parse_amount(f"{value * 100!r} %")


@pytest.mark.parametrize("text, value", [("0.30", 0.3), ("3e-1", 0.3), ("30%", 0.3), (".3", 0.3), ("+0.3", 0.3),
                                         ("3E-1", 0.3), ("0.5%", 0.005), (" 0.3", 0.3), ("30% ", 0.3)])
def test_amount_spellings_of_one_number_are_that_number(text, value):
    assert P.parse_amount(text) == value


@pytest.mark.parametrize("text", ["30 %", "0_3", "3_0%", "\u0660.\u0663", "0,3", "0.3%%", "%", "", "1e-400",
                                  "0.99999999999999999", "inf", "nan", "0x0.4"])
def test_amount_text_that_is_not_exactly_a_fraction_is_refused(text):
    with pytest.raises(ConfigError, match="--amount"):
        P.parse_amount(text)


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


@pytest.mark.parametrize("args, message", [
    (["--amount", "0"], "strictly between 0 and 1"),
    (["--amount", "1"], "strictly between 0 and 1"),
    (["--amount", "-0.3"], "strictly between 0 and 1"),
    (["--amount", "1.5"], "strictly between 0 and 1"),
    (["--amount", "lots"], "is not a number"),
    (["--amount", "30 %"], "is not a number"),
    (["--amount", "\u0660.\u0663"], "is not a number"),
    (["--amount", "0.3", "--set", "prune.amount=0.5"], "not --set prune.amount"),
    (["--set", "prune.amount=0.3"], "not --set prune.amount"),
    (["--amount", "0.95"], "more MLP neurons than the model has"),
    (["--amount", "0.3", "--set", "prune.importance=random"], "prune.importance"),
    ([], "needs --amount"),
])
def test_bad_prune_amount_exits_2_with_nothing_written(compress_parent, prepared_tiny, args, message, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    runs_before = len(mlflow.search_runs(experiment_ids=[compress_parent["experiment"]], output_format="list"))
    versions_before = len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'"))
    with pytest.raises(SystemExit) as exc:
        main(["compress", compress_parent["name"], compress_parent["version"], "--method", "prune",
              "--data", str(prepared_tiny), "--experiment", compress_parent["name"], *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and "Traceback" not in err
    assert len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'")) == versions_before
    assert len(mlflow.search_runs(experiment_ids=[compress_parent["experiment"]], output_format="list")) == runs_before



@pytest.mark.e2e
def test_pruned_variant_is_registered_loads_elsewhere_and_serves(compress_parent, prepared_tiny, tmp_path, capsys):
    import shutil

    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    name = compress_parent["name"]
    main(["compress", name, compress_parent["version"], "--method", "prune", "--amount", "30%", "--data",
          str(prepared_tiny), "--experiment", name, *LEAN_EVAL, *SHORT_DISTILL, *SHORT_PRUNE])
    printed = capsys.readouterr().out
    assert "prune" in printed and "params" in printed and "tokens/s bs1" in printed
    client = MlflowClient()
    version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    tags = client.get_model_version(name, str(version)).tags
    assert tags["compressed_from"] == compress_parent["version"] and tags["compress/method"] == "prune"
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


@pytest.fixture(scope="module")
def foreign_data(prepared_tiny, tmp_path_factory):
    """Prepared folders compress must refuse as --data: another tokenizer, an empty validation split
    (three documents, tokenized with the parent's tokenizer)."""
    from tests.cli import cli

    root = tmp_path_factory.mktemp("foreign-data")
    for folder, docs, tokenizer in (("tokenizer", "60", ["--vocab-size", "300"]),
                                    ("same-size", "400", ["--vocab-size", "512", "--seed", "7"]),  # another split
                                    ("empty-split", "3", ["--tokenizer", str(prepared_tiny)])):
        code = cli("prepare", "--source", "builtin:pydoc", "--output", str(root / folder), *tokenizer,
                   "--block-size", "64", "--max-documents", docs)
        assert code == 0
    return root


@pytest.mark.parametrize("args, data, message", [
    (["--method", "int8-dynamic"], "tokenizer", "was tokenized with a different tokenizer than models:/"),
    (["--method", "prune", "--amount", "0.3"], "tokenizer", "was tokenized with a different tokenizer"),
    (["--method", "distill", "--preset", "tiny"], "tokenizer", "was tokenized with a different tokenizer"),
    (["--method", "int8-dynamic"], "same-size", "(both have 512 tokens, but not the same ones)"),
    (["--method", "prune", "--amount", "0.3"], "empty-split", "trains on --data (prepared data"),
    (["--method", "distill", "--amount", "0.3"], "empty-split", "validation is empty: prepare more"),
    (["--method", "int8-dynamic"], "missing", "not found"),
    (["--method", "prune", "--amount", "0.3"], "missing", "not found"),
])
def test_bad_data_is_refused_before_any_run_or_version(compress_parent, foreign_data, args, data, message,
                                                       capsys):
    """Data of another tokenizer, an empty training split or no data at all: exit 4, nothing written
    (no run, and no version number used up: the next version is still the next number)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from lifecycle.cli import main

    runs_before = len(mlflow.search_runs(experiment_ids=[compress_parent["experiment"]], output_format="list"))
    versions_before = len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'"))
    with pytest.raises(SystemExit) as exc:
        main(["compress", compress_parent["name"], compress_parent["version"], "--data", str(foreign_data / data),
              "--experiment", compress_parent["name"], *args, *short_for(args)])
    err = capsys.readouterr().err
    assert exc.value.code == 4 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert len(MlflowClient().search_model_versions(f"name='{compress_parent['name']}'")) == versions_before
    assert len(mlflow.search_runs(experiment_ids=[compress_parent["experiment"]], output_format="list")) == runs_before


def test_amount_from_the_mlproject_parameter_is_passed_on_exactly():
    """`mlflow run . -e compress -P amount=...`: the entry point hands the text to --amount as written
    (parse_amount then reads it by the one rule for numbers), never re-read on the way."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lifecycle_entrypoints_run", ROOT / "entrypoints" / "_run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)  # type: ignore[union-attr]
    for text in ("0.30", "3e-1", " 0.3", "30%", "30 %"):
        args = run.to_cli_args("compress", ["name=m", "version=1", "method=prune", f"amount={text}", "preset=",
                                            "student=", "data="])
        assert f"--amount={text}" in args and args[-2:] == ["m", "1"]
    assert "--amount" not in " ".join(run.to_cli_args("compress", ["name=m", "version=1", "amount="]))

