"""Evaluation stage, pure parts: metric modules, bits-per-byte, bootstrap, prompts, checks, config.

No tracking server here; models are tiny and built from config.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lifecycle.config import load_config
from lifecycle.errors import ConfigError, DataError
from lifecycle.evaluate import compare, generation, latency, loss
from lifecycle.evaluate.checks import Check, load_suite, run_check, run_suite
from lifecycle.evaluate.config import EvalConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE trained here on the built-in corpus (never downloaded)."""
    from lifecycle.data.sources import pydoc_documents
    from lifecycle.data.tokenizer import train_tokenizer

    docs = [d for _, d in zip(range(120), pydoc_documents())]
    return train_tokenizer([docs], vocab_size=300)


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    from lifecycle.train.model import build_model

    model = build_model("tiny", tokenizer, seed=0, n_positions=32)
    return model.eval()


DOCS = ["The quick brown fox jumps over the lazy dog. " * 3,
        "Naïve café: 東京 — non-ASCII bytes count as bytes, not characters.",
        "x"]


# --- local evaluate modules ---------------------------------------------------------------------

def test_metric_modules_load_by_path_and_give_known_values():
    rouge = generation.load_metric("rouge")
    got = rouge.compute(predictions=["the cat sat on the mat", "the cat"],
                        references=["the cat sat on the mat", "the cat sat on the mat"], rouge_types=["rougeL"])
    # pair 1: identical -> 1.0; pair 2: LCS 2, P = 2/2, R = 2/6 -> F = 0.5
    assert got["rougeL"] == pytest.approx((1.0 + 0.5) / 2)
    bleu = generation.load_metric("bleu")
    same = ["the cat sat on the mat"]
    assert bleu.compute(predictions=same, references=same)["bleu"] == pytest.approx(100.0)
    disjoint = bleu.compute(predictions=["alpha beta gamma delta"], references=["one two three four"])
    assert disjoint["bleu"] == pytest.approx(0.0)
    exact = generation.load_metric("exact_match")
    em = exact.compute(predictions=["a  b \n", "x", "Y"], references=["a b", "y", "Y"])
    assert em["exact_match"] == pytest.approx(2 / 3)
    bpb = generation.load_metric("bits_per_byte")
    got = bpb.compute(nll=[8 * math.log(2), 4 * math.log(2)], num_bytes=[4, 2])
    assert got["bits_per_byte"] == pytest.approx(2.0) and got["total_bytes"] == 6


def test_metric_modules_are_loadable_with_evaluate_load_path():
    import evaluate

    module = evaluate.load(str(generation.METRICS_DIR / "exact_match"))
    assert module.compute(predictions=["ok"], references=["ok"]) == {"exact_match": 1.0}
    with pytest.raises(ValueError, match="no local metric 'meteor'"):
        generation.load_metric("meteor")


def test_generation_metrics_combine_the_three():
    got = generation.generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert got == pytest.approx({"rougeL": 1.0, "bleu": 100.0, "exact_match": 1.0})


# --- bits per byte ------------------------------------------------------------------------------

def test_document_windows_score_every_token_once():
    toks = list(range(100, 117))  # 17 tokens
    windows = loss.document_windows(toks, prefix_id=0, window=5)
    assert windows[0][0] == 0 and all(len(w) <= 5 for w in windows)
    scored = [t for w in windows for t in w[1:]]
    assert scored == toks
    assert loss.document_windows([], prefix_id=0, window=5) == []


def test_bits_per_byte_of_a_uniform_model_is_hand_computable(tokenizer):
    """With zero token embeddings (tied to the output layer) every logit is 0: each token costs
    exactly ln(V) nats, so bits/byte = tokens * log2(V) / bytes, whatever the windows."""
    import torch

    from lifecycle.train.model import build_model

    model = build_model("tiny", tokenizer, seed=1, n_positions=16).eval()
    with torch.no_grad():
        model.transformer.wte.weight.zero_()
    vocab = model.config.vocab_size
    result = loss.document_nll(model, tokenizer, DOCS, window=6, batch_size=3, progress=False)
    tokens = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCS]
    nbytes = [len(d.encode("utf-8")) for d in DOCS]
    assert list(result.num_tokens) == tokens and list(result.num_bytes) == nbytes
    assert nbytes[1] > len(DOCS[1])  # multi-byte characters are counted in bytes
    assert result.nll == pytest.approx([t * math.log(vocab) for t in tokens], rel=1e-6)
    assert result.bits_per_byte == pytest.approx(sum(tokens) * math.log2(vocab) / sum(nbytes), rel=1e-6)


def test_bits_per_byte_matches_direct_log_probs(tokenizer, tiny_model):
    """A random model: the batched, padded, windowed computation equals per-token log-probs
    computed one window at a time by hand."""
    import torch

    eos = tokenizer.eos_token_id
    got = loss.document_nll(tiny_model, tokenizer, DOCS, window=8, batch_size=2, progress=False)
    for doc, nll in zip(DOCS, got.nll):
        toks = tokenizer(doc, add_special_tokens=False)["input_ids"]
        seq = [eos, *toks]
        expected = 0.0
        pos = 1  # next token of seq to score
        while pos < len(seq):
            ctx_start = pos - 1  # each window has one token of context, then up to 7 scored tokens
            window = seq[ctx_start:ctx_start + 8]
            with torch.no_grad():
                logp = torch.log_softmax(tiny_model(torch.tensor([window])).logits[0].double(), dim=-1)
            expected -= sum(float(logp[i, window[i + 1]]) for i in range(len(window) - 1))
            pos = ctx_start + len(window)
        assert nll == pytest.approx(expected, rel=1e-5)


def test_block_losses_are_the_mean_token_nll(tokenizer, tiny_model):
    import torch

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, len(tokenizer), size=(5, 16))
    got = loss.block_losses(tiny_model, blocks, batch_size=2, progress=False)
    with torch.no_grad():
        out = tiny_model(torch.tensor(blocks), labels=torch.tensor(blocks))
    assert got.loss == pytest.approx(float(out.loss), rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(got.loss))
    assert got.tokens == 5 * 15 and got.block_nll.shape == (5,)
    with pytest.raises(DataError, match="exceed the model's context of 32"):
        loss.block_losses(tiny_model, np.zeros((2, 64), dtype=np.int64), progress=False)
    with pytest.raises(DataError, match="empty"):
        loss.block_losses(tiny_model, np.zeros((0, 16), dtype=np.int64), progress=False)


def test_pack_documents_puts_eos_between_documents(tokenizer):
    blocks = loss.pack_documents(tokenizer, ["a b c", "d e f"], block_size=4)
    flat = blocks.reshape(-1).tolist()
    assert tokenizer.eos_token_id in flat and blocks.shape[1] == 4
    with pytest.raises(DataError, match="fewer than one block"):
        loss.pack_documents(tokenizer, ["a"], block_size=64)


# --- comparisons --------------------------------------------------------------------------------

def test_paired_bootstrap_interval_is_sane_on_synthetic_pairs():
    rng = np.random.default_rng(1)
    base = rng.normal(5.0, 1.0, size=300)  # units differ a lot from each other ...
    chal = base - 0.3 + rng.normal(0.0, 0.1, size=300)  # ... but the paired difference is tight
    res = compare.paired_bootstrap(chal, base, samples=2000, seed=0)
    assert res.low < -0.3 < res.high and res.high < 0
    assert res.high - res.low < 0.05  # pairing removes the between-unit variance (sd 1)
    assert res.mean == pytest.approx(float(np.mean(chal - base)))
    same = compare.paired_bootstrap(base + rng.normal(0, 0.1, 300), base, samples=2000, seed=0)
    assert same.low < 0 < same.high
    again = compare.paired_bootstrap(chal, base, samples=500, seed=3)
    assert compare.paired_bootstrap(chal, base, samples=500, seed=3) == again
    with pytest.raises(ValueError):
        compare.paired_bootstrap([1.0, 2.0], [1.0], samples=100)


def test_win_rate_counts_ties_as_half():
    assert compare.win_rate([1, 2, 3, 4], [2, 2, 1, 5]) == pytest.approx((2 + 0.5) / 4)
    assert compare.win_rate([0.9, 0.1], [0.5, 0.5], lower_is_better=False) == pytest.approx(0.5)


def test_comparison_table_and_chart(tmp_path):
    table = compare.comparison_table({"loss": 2.0, "rougeL": 0.3, "only_here": 1.0}, {"loss": 2.5, "rougeL": 0.4})
    assert list(table["metric"]) == ["loss", "rougeL"]
    assert list(table["better"]) == ["challenger", "baseline"]
    assert table.loc[0, "delta"] == pytest.approx(-0.5)
    boot = compare.paired_bootstrap([1.0, 2.0, 3.0], [1.5, 2.5, 3.1], samples=200)
    png = compare.comparison_chart(table, boot, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- prompts ------------------------------------------------------------------------------------

def test_prompt_file_errors_name_file_and_line(tmp_path):
    good = {"prompt": "a", "reference": "b"}
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + "{not json\n")
    with pytest.raises(DataError, match=r"p\.jsonl:3: invalid JSON"):
        generation.load_prompts(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing 'reference'"):
        generation.load_prompts(f)
    f.write_text("")
    with pytest.raises(DataError, match="no prompts"):
        generation.load_prompts(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "c", "reference": "d"}) + "\n")
    assert generation.load_prompts(f, limit=1) == [generation.Prompt("a", "b")]


def test_default_prompts_cut_documents_in_two():
    doc = "one two three four five six seven eight nine ten eleven twelve"
    prompts = generation.default_prompts([doc, "short"], num_prompts=5, min_document_chars=20, reference_words=3)
    assert len(prompts) == 1
    p = prompts[0]
    # 62 characters: the whitespace nearest character 31 is the one after "seven" (at 33).
    assert p.prompt == "one two three four five six seven" and p.reference == "eight nine ten"
    with pytest.raises(DataError, match="--prompts"):
        generation.default_prompts(["tiny"], num_prompts=3)
    long_doc = "word " * 400
    assert len(generation.default_prompts([long_doc], num_prompts=1, max_prompt_chars=50)[0].prompt) <= 50


# --- behavioural checks -------------------------------------------------------------------------

def _frame(texts, counts=None):
    import pandas as pd

    return pd.DataFrame({"text": texts, "completion_tokens": counts or [len(t.split()) for t in texts]})


def test_default_suite_loads_and_bad_suites_are_refused(tmp_path):
    suite = load_suite()
    assert {c.kind for c in suite} == {"non_empty", "max_new_tokens", "deterministic", "no_pii_echo"}
    bad = tmp_path / "s.yaml"
    bad.write_text("checks:\n  - {name: x, kind: telepathy, prompts: [a]}\n")
    with pytest.raises(ConfigError, match="kind 'telepathy' is not one of"):
        load_suite(bad)
    bad.write_text("checks:\n  - {name: leak, kind: no_pii_echo, prompts: [a]}\n")
    with pytest.raises(ConfigError, match="needs a non-empty 'pii'"):
        load_suite(bad)
    bad.write_text("checks:\n  - {name: 'bad name', kind: non_empty, prompts: [a]}\n")
    with pytest.raises(ConfigError, match="becomes eval/check_"):
        load_suite(bad)


def test_checks_fail_when_the_behaviour_is_wrong():
    """Plain functions that honour the predict contract and misbehave on purpose."""
    echo = lambda prompts, params: _frame(list(prompts))  # noqa: E731 - repeats the prompt verbatim
    pii = Check("pii", "no_pii_echo", ("mail me at a@b.co",), pii=("a@b.co",))
    assert not run_check(pii, echo).passed
    assert "a@b.co" not in run_check(pii, echo).detail  # the report does not leak the PII itself
    blank = lambda prompts, params: _frame([" "] * len(prompts), [1] * len(prompts))  # noqa: E731
    assert not run_check(Check("ne", "non_empty", ("p",)), blank).passed
    long = lambda prompts, params: _frame(["x"] * len(prompts), [params["max_new_tokens"] + 1] * len(prompts))  # noqa: E731
    assert not run_check(Check("mx", "max_new_tokens", ("p",), max_new_tokens=4), long).passed
    counter = iter(range(100))
    flaky = lambda prompts, params: _frame([str(next(counter)) for _ in prompts])  # noqa: E731
    assert not run_check(Check("det", "deterministic", ("p",), repeats=2), flaky).passed
    fixed = lambda prompts, params: _frame(["same"] * len(prompts))  # noqa: E731
    assert all(r.passed for r in run_suite([Check("det", "deterministic", ("p", "q"), repeats=3),
                                            Check("ne", "non_empty", ("p",))], fixed))


# --- latency and config -------------------------------------------------------------------------

def test_latency_metrics_per_batch_size():
    calls = []

    def predict(prompts, params):
        calls.append(len(prompts))
        return _frame(["a b"] * len(prompts), [2] * len(prompts))

    res = [latency.measure(predict, ["p", "q", "r"], batch_size=b, requests=4, warmup=1, max_new_tokens=2)
           for b in (1, 8)]
    assert calls == [1] * 5 + [8] * 5
    m = latency.latency_metrics(res)
    assert set(m) >= {"latency_p50_ms", "latency_p95_ms", "tokens_per_s", "latency_p95_ms_bs8", "tokens_per_s_bs1"}
    assert m["latency_p50_ms"] == m["latency_p50_ms_bs1"] and m["latency_p95_ms_bs8"] >= m["latency_p50_ms_bs8"]
    assert res[1].completion_tokens == 4 * 8 * 2


@pytest.mark.parametrize("overrides, message", [
    (["generation.num_prompts=0"], "generation.num_prompts must be positive"),
    (["split=dev"], "split: 'dev' is not one of"),
    (["latency.batch_sizes=[0]"], "latency.batch_sizes"),
    (["compare.confidence=1.5"], "compare.confidence"),
    (["loss.windw=3"], "unknown config key loss.windw"),
    (["precision=fp16"], "precision"),
])
def test_bad_eval_config_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EvalConfig, None, overrides)


def test_eval_config_defaults_are_small():
    cfg = load_config(EvalConfig, None, ["latency.batch_sizes=1,4"])
    assert cfg.generation.num_prompts == 32 and cfg.generation.max_new_tokens == 32
    assert cfg.latency.batch_sizes == [1, 4]


def test_precision_is_fp32_on_cpu_and_bf16_needs_cuda(tokenizer, tiny_model, tmp_path):
    from lifecycle.evaluate.measure import precision_of

    assert EvalConfig().precision == "auto"
    assert loss.resolve_precision("auto", "cpu") == "fp32" and loss.resolve_precision("auto", "cuda") == "bf16"
    assert loss.resolve_precision("fp32", "cuda") == "fp32" and loss.resolve_precision("bf16", "cuda:1") == "bf16"
    with pytest.raises(ConfigError, match="bf16 evaluation needs CUDA"):
        loss.resolve_precision("bf16", "cpu")
    tiny_model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fp32, _ = loss.load_lm(tmp_path, "cpu", "fp32")
    bf16, _ = loss.load_lm(tmp_path, "cpu", "bf16")  # the loader itself obeys; resolve_precision gates CUDA
    assert (precision_of(fp32, tmp_path), precision_of(bf16, tmp_path)) == ("fp32", "bf16")
