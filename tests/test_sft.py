"""Instruction data (format sft): records, rendering, masking, truncation, and the prepare stage.

The learning test (a tiny model learns a task, measured by exact match; the served model renders
chat with the same template) is in tests/test_sft_learning.py.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lifecycle.data.chat import DEFAULT_CHAT_TEMPLATE, ChatRenderer, chat_segments, renderer_for
from lifecycle.data.encode import IGNORE_INDEX, encode_segments
from lifecycle.data.tokenizer import EOS_TOKEN, train_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained here, with the default chat template set as prepare sets it."""
    texts = [f"user: reverse {' '.join(LETTERS[i:i + 4])}\nassistant: {' '.join(LETTERS[i:i + 4][::-1])}"
             for i in range(22)] * 5
    tok = train_tokenizer([texts], vocab_size=320, min_frequency=1)
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _prepare(args: list[str]) -> int:
    from tests.cli import cli

    return cli("prepare", *args)


# -- rendering ----------------------------------------------------------------------------------


def test_default_template_renders_like_transformers_and_like_serving(tokenizer):
    from lifecycle.serving.requests import plain_chat_prompt

    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "reverse a b"},
                    {"role": "assistant", "content": "b a"}, {"role": "user", "content": "reverse c d"}]
    ours = renderer_for(tokenizer)
    for gen in (False, True):
        assert ours.render(conversation, add_generation_prompt=gen) == \
            tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
    # A single-turn prompt is exactly serving's plain fallback, so even a model folder without the
    # template would see the prompts it was trained on.
    single = conversation[:2]
    assert ours.render(single, add_generation_prompt=True) == plain_chat_prompt(single) == \
        "system: Be brief.\nuser: reverse a b\nassistant:"


def test_every_assistant_turn_is_labelled_and_ends_with_eos():
    renderer = ChatRenderer(DEFAULT_CHAT_TEMPLATE, eos_token=EOS_TOKEN)
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "bye"}, {"role": "assistant", "content": "see you"}]
    segments = chat_segments(conversation, renderer)
    assert segments == [("user: hi\nassistant:", False, False), (" hello", True, True),
                        ("\nuser: bye\nassistant:", False, False), (" see you", True, True)]


def test_a_template_that_does_not_render_prompt_plus_answer_is_refused():
    from lifecycle.errors import DataError

    # Puts the last message first: the rendering of a turn is no prefix of the next one.
    odd = "{{ messages[-1]['content'] }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="prompt \\+ answer"):
        chat_segments([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                      ChatRenderer(odd, eos_token=EOS_TOKEN))


# -- tokenization, masking, truncation ------------------------------------------------------------


def test_prompt_is_masked_and_response_plus_eos_is_labelled(tokenizer):
    enc = encode_segments(tokenizer, [("reverse a b c d =>", False, False), (" d c b a", True, True)], block_size=64)
    prompt = tokenizer("reverse a b c d =>", add_special_tokens=False)["input_ids"]
    response = tokenizer(" d c b a", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    assert enc.input_ids == prompt + response + [eos]
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + response + [eos]
    assert enc.truncated_tokens == 0 and enc.dropped is None


def test_long_examples_lose_prompt_tokens_or_are_dropped(tokenizer):
    long_prompt = "reverse " + " ".join(LETTERS) + " =>"
    segments = [(long_prompt, False, False), (" z y x", True, True)]
    full = encode_segments(tokenizer, segments, block_size=1000)
    cut = encode_segments(tokenizer, segments, block_size=12)
    assert len(cut.input_ids) == 12 and cut.truncated_tokens == len(full.input_ids) - 12
    # The oldest tokens went; the response and its EOS are whole, with a token of context.
    assert cut.input_ids == full.input_ids[-12:] and cut.labels == full.labels[-12:]
    assert cut.labels[0] == IGNORE_INDEX
    assert encode_segments(tokenizer, segments, block_size=12, overflow="drop").dropped == "too_long"
    # A response that cannot fit even without its prompt is dropped in truncate mode too.
    assert encode_segments(tokenizer, segments, block_size=3).dropped == "too_long"


def test_the_loss_is_spent_on_response_tokens_only(tokenizer):
    """Masking, tested on the loss the training loop computes (model(**batch).loss).

    The gradient of the loss reaches no logit that predicts a prompt token: whatever the prompt
    tokens' labels were, they change nothing. Changing one response label changes the loss.
    """
    from lifecycle.train.collate import pad_rows
    from lifecycle.train.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", tokenizer, seed=0)
    rows = [encode_segments(tokenizer, [(p, False, False), (r, True, True)], block_size=64)
            for p, r in (("reverse a b c d =>", " d c b a"), ("user: reverse e f\nassistant:", " f e"))]
    x, y, m = pad_rows([r.input_ids for r in rows], [r.labels for r in rows], tokenizer.pad_token_id)

    out = model(input_ids=x, attention_mask=m, labels=y)
    out.logits.retain_grad()
    out.loss.backward()
    grad = out.logits.grad.abs().sum(dim=-1)  # [B, T]: how much each position's prediction matters
    predicts = torch.zeros_like(y, dtype=torch.bool)
    predicts[:, :-1] = y[:, 1:] != IGNORE_INDEX  # position t predicts label t+1
    assert float(grad[~predicts].max()) == 0.0
    assert bool((grad[predicts] > 0).all())

    # The loss equals the mean NLL of the response tokens, computed by hand.
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x, attention_mask=m).logits.float(), dim=-1)
        nll = [-logp[b, t, y[b, t + 1]] for b in range(len(y)) for t in range(y.shape[1] - 1) if predicts[b, t]]
        assert float(out.loss) == pytest.approx(float(torch.stack(nll).mean()), rel=1e-5)
        # Changing a response token's label changes the loss.
        y2 = y.clone()
        b, t = torch.nonzero(y != IGNORE_INDEX)[0].tolist()
        y2[b, t] = (y2[b, t] + 1) % len(tokenizer)
        assert float(model(input_ids=x, attention_mask=m, labels=y2).loss) != pytest.approx(float(out.loss), rel=1e-6)


# -- the prepare stage --------------------------------------------------------------------------


def test_prepare_sft_cleans_scrubs_dedups_filters_and_truncates(tmp_path, artifacts_in_tmp):
    rows = [{"prompt": f"reverse {' '.join(LETTERS[i:i + 4])} =>", "response": " " + " ".join(LETTERS[i:i + 4][::-1])}
            for i in range(20)]
    rows += [
        dict(rows[0]),                                                      # exact duplicate example
        {"prompt": rows[1]["prompt"], "response": " another answer"},      # same prompt, new answer: kept
        {"prompt": "mail me at jane.doe@example.com =>", "response": " ok"},  # PII in the prompt
        {"prompt": "empty =>", "response": "   "},                          # nothing to learn
        {"prompt": "numbers =>", "response": " " + " ".join(str(10 * k) for k in range(1, 15))},  # alpha_words
        {"prompt": "long " + " ".join(["word"] * 80) + " =>", "response": " short"},  # truncated
    ]
    src = _write_jsonl(tmp_path / "tasks.jsonl", rows)
    out = tmp_path / "prepared"
    # No --format: the columns say it is instruction data.
    assert _prepare(["--source", str(src), "--output", str(out), "--vocab-size", "300", "--block-size", "24",
                     "--set", "split.validation=0.2", "--set", "split.test=0.2"]) == 0
    card = json.loads((out / "data_card.json").read_text())
    assert card["format"] == "sft"
    assert card["dedup"]["exact"] == 1
    assert card["filters"]["no_response"] == 1 and card["filters"]["alpha_words"] == 1
    assert card["counts"]["documents_read"] == 26 and card["counts"]["documents_kept"] == 23
    assert card["pii"]["email"] == 1
    assert sum(card["sft"]["truncated_examples"].values()) == 1 and sum(card["sft"]["truncated_tokens"].values()) > 0
    assert card["sft"]["chat_template"] == "default"
    kept = [json.loads(line) for split in ("train", "validation", "test")
            for line in (out / "raw" / f"{split}.jsonl").read_text().splitlines()]
    assert len(kept) == 23
    assert not any("jane.doe@example.com" in json.dumps(r) for r in kept)
    assert sum(r["prompt"] == rows[1]["prompt"] for r in kept) == 2
    # Each split: one row per example, labels masked on the prompt, the raw line i = row i.
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    for split in ("train", "validation", "test"):
        ds = load_from_disk(str(out / split))
        raw = [json.loads(line) for line in (out / "raw" / f"{split}.jsonl").read_text().splitlines()]
        assert len(ds) == len(raw) == card["splits"][split]
        for row, example in zip(ds, raw):
            assert set(row) == {"input_ids", "attention_mask", "labels"} and len(row["input_ids"]) <= 24
            labelled = [t for t in row["labels"] if t != IGNORE_INDEX]
            assert tok.decode(labelled[:-1]) == example["response"] and labelled[-1] == tok.eos_token_id
    # The split depends on the example alone: preparing a superset keeps every example's split.
    more = _write_jsonl(tmp_path / "more.jsonl", rows + [{"prompt": "new =>", "response": " thing"}])
    out2 = tmp_path / "prepared2"
    assert _prepare(["--source", str(more), "--output", str(out2), "--vocab-size", "300", "--block-size", "24",
                     "--set", "split.validation=0.2", "--set", "split.test=0.2"]) == 0
    for split in ("train", "validation", "test"):
        before = {r["text"] for r in map(json.loads, (out / "raw" / f"{split}.jsonl").read_text().splitlines())}
        after = {r["text"] for r in map(json.loads, (out2 / "raw" / f"{split}.jsonl").read_text().splitlines())}
        assert before <= after
    # Continuous training: against the earlier folder only the new example is kept.
    out3 = tmp_path / "increment"
    assert _prepare(["--source", str(more), "--output", str(out3), "--vocab-size", "300", "--block-size", "24",
                     "--dedup-against", str(out), "--set", "split.validation=0.2", "--set", "split.test=0.2"]) == 0
    card3 = json.loads((out3 / "data_card.json").read_text())
    # 23 earlier examples, and the in-file copy of one of them.
    assert card3["dedup"]["exact_against"] == 24 and card3["counts"]["documents_kept"] == 1


def test_chat_records_from_csv_and_custom_columns(tmp_path, artifacts_in_tmp):
    src = tmp_path / "chat.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["conversation", "id"])
        for i in range(12):
            w.writerow([json.dumps([{"role": "user", "content": f"reverse {LETTERS[i]} {LETTERS[i + 1]}"},
                                    {"role": "assistant", "content": f"{LETTERS[i + 1]} {LETTERS[i]}"}]), i])
    out = tmp_path / "prepared"
    assert _prepare(["--source", str(src), "--output", str(out), "--format", "sft", "--messages-column", "conversation",
                     "--vocab-size", "300", "--block-size", "32", "--set", "dedup.near=false"]) == 0
    card = json.loads((out / "data_card.json").read_text())
    assert card["sft"]["layouts"] == {"chat": 12} and sum(card["splits"].values()) == 12
    row = json.loads((out / "raw" / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("user: reverse ") and row["prompt"].endswith("\nassistant:")
    assert row["messages"][-1]["content"] == row["response"]
    # Worker processes make the same data (same order, same digest).
    out2 = tmp_path / "prepared-2proc"
    assert _prepare(["--source", str(src), "--output", str(out2), "--format", "sft",
                     "--messages-column", "conversation", "--vocab-size", "300", "--block-size", "32",
                     "--set", "dedup.near=false", "--num-proc", "2",
                     "--set", "batch_size=4"]) == 0
    assert json.loads((out2 / "data_card.json").read_text())["digest"] == card["digest"]


@pytest.mark.parametrize("rows, fmt, message", [
    ([{"prompt": "a", "answer": "b"}], "sft", "record 1: no 'response' column"),
    ([{"messages": [{"role": "robot", "content": "x"}]}], "auto", "role must be one of system, user, assistant"),
    ([{"messages": "hello"}], "auto", "must be a list of"),
])
def test_bad_records_fail_with_one_line_and_leave_nothing(tmp_path, artifacts_in_tmp, capsys, rows, fmt, message):
    src = _write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "prepared"
    assert _prepare(["--source", str(src), "--output", str(out), "--format", fmt]) == 4
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".prepared")]


def test_plain_text_is_not_instruction_data(tmp_path, artifacts_in_tmp, capsys):
    src = tmp_path / "notes.txt"
    src.write_text("some words here\n", encoding="utf-8")
    assert _prepare(["--source", str(src), "--output", str(tmp_path / "out"), "--format", "sft"]) == 4
    assert "plain text holds no prompt/response or chat records" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["parquet", "saved_dataset"])
def test_records_from_parquet_and_saved_datasets_are_detected(tmp_path, artifacts_in_tmp, kind):
    from datasets import Dataset

    rows = [{"messages": [{"role": "system", "content": "Answer with the next letter."},
                          {"role": "user", "content": f"after {LETTERS[i]}"},
                          {"role": "assistant", "content": LETTERS[i + 1]}]} for i in range(20)]
    ds = Dataset.from_list(rows)
    if kind == "parquet":
        src = tmp_path / "chat.parquet"
        ds.to_parquet(str(src))
    else:
        src = tmp_path / "saved"
        ds.save_to_disk(str(src))
    out = tmp_path / "prepared"
    assert _prepare(["--source", str(src), "--output", str(out), "--vocab-size", "300", "--block-size", "32"]) == 0
    card = json.loads((out / "data_card.json").read_text())
    assert card["format"] == "sft" and card["sft"]["layouts"] == {"chat": 20}
    row = json.loads((out / "raw" / "train.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith("system: Answer with the next letter.\nuser: after ")


def test_packed_examples_never_attend_to_each_other(tmp_path, artifacts_in_tmp):
    """With sft.packing several examples share a row; the loss is exactly the unpacked loss.

    Without the block-diagonal mask and restarted positions it would not be (checked too), so the
    equality shows that no example sees another one.
    """
    from lifecycle.train.config import TrainConfig
    from lifecycle.train.data import load_prepared
    from lifecycle.train.distributed import DistContext
    from lifecycle.train.loop import Trainer
    from lifecycle.train.model import build_model

    rows = [{"prompt": f"reverse {' '.join(LETTERS[i % 23:i % 23 + 3])} {i} =>",
             "response": " " + " ".join(LETTERS[i % 23:i % 23 + 3][::-1])} for i in range(60)]
    src = _write_jsonl(tmp_path / "tasks.jsonl", rows)
    common = ["--source", str(src), "--vocab-size", "300", "--block-size", "48", "--set", "dedup.near=false"]
    assert _prepare([*common, "--output", str(tmp_path / "rows")]) == 0
    assert _prepare([*common, "--output", str(tmp_path / "packed"), "--set", "sft.packing=true"]) == 0
    rows_data, packed = load_prepared(tmp_path / "rows"), load_prepared(tmp_path / "packed")
    card = json.loads((tmp_path / "packed" / "data_card.json").read_text())
    assert card["sft"]["packing"] and card["blocks"]["train"] < card["splits"]["train"] == len(rows_data.train)
    assert len(packed.train) == card["blocks"]["train"]

    model = build_model("tiny", rows_data.tokenizer, seed=0).eval()
    with torch.no_grad():
        unpacked_loss = model(**rows_data.batch("train", torch.arange(len(rows_data.train)))).loss
        batch = packed.batch("train", torch.arange(len(packed.train)))
        packed_loss = model(**batch).loss
        leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"],
                 "attention_mask": (batch["input_ids"] != packed.tokenizer.pad_token_id).long()}
        leaky_loss = model(**leaky).loss
    assert float(packed_loss) == pytest.approx(float(unpacked_loss), rel=1e-5)
    assert abs(float(leaky_loss) - float(unpacked_loss)) > 1e-3
    # The training loop runs on packed rows.
    cfg = TrainConfig(max_steps=3, batch_size=4, eval_every=3, warmup_steps=1, progress=False, system_metrics=False,
                      log_model=False, output=str(tmp_path / "ckpt"))
    result = Trainer(cfg, build_model("tiny", packed.tokenizer, seed=0), packed,
                     ctx=DistContext(device=torch.device("cpu"))).fit()
    assert result.steps == 3 and result.best_val_loss < 10

    # LoRA fine-tuning of a base model on instruction rows: only the adapters move.
    from dataclasses import replace

    from lifecycle.train.config import LoraConfig
    from lifecycle.train.finetune import load_starting_point
    from lifecycle.train.model import save_model_dir

    base = save_model_dir(build_model("tiny", rows_data.tokenizer, seed=1), rows_data.tokenizer, tmp_path / "base")
    lora_cfg = replace(cfg, base_model=str(base), lora=LoraConfig(r=4), output=str(tmp_path / "ckpt-lora"))
    start = load_starting_point(lora_cfg, rows_data.tokenizer, rows_data.block_size)
    frozen = {k: v.clone() for k, v in start.model.named_parameters() if not v.requires_grad}
    result = Trainer(lora_cfg, start.model, rows_data, ctx=DistContext(device=torch.device("cpu"))).fit()
    assert result.steps == 3
    assert all(torch.equal(v, dict(start.model.named_parameters())[k]) for k, v in frozen.items())
