"""The prepare pipeline on generated corpora (no MLflow): counts, outputs and their contract."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lifecycle.config import load_config
from lifecycle.data.config import PrepareConfig
from lifecycle.data.pipeline import prepare_folder
from lifecycle.data.synthetic import chinese_document, english_document, generate_documents


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _cfg(source: Path, *overrides: str) -> PrepareConfig:
    return load_config(PrepareConfig, None, ["tokenizer.vocab_size=400", "pack.block_size=32",
                                             "split.validation=0.15", "split.test=0.15", *overrides],
                       **{"source.uri": str(source)})


def _raw(folder: Path, split: str) -> list[str]:
    lines = (folder / "raw" / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A corpus with planted duplicates, near duplicates, PII, Chinese documents and junk."""
    rng = random.Random(11)
    base = list(generate_documents(120, seed=5, chinese_share=0.0))
    chinese = [chinese_document(rng) for _ in range(15)]
    exact_dups = [base[0], base[1].upper(), "  " + base[2].replace(" ", "   ")]
    near_dups = [base[3].replace(".", "!") + " extra", " ".join(base[4].split(" ")[:-2]) + " changed words."]
    pii_doc = english_document(rng) + " Contact me at someone@example.com or +1 (415) 555-2671."
    junk = ["$$$ ### !!! " * 30, "click here", "\n".join(["same line over and over again"] * 12)]
    docs = base + chinese + exact_dups + near_dups + [pii_doc] + junk
    folder = tmp_path_factory.mktemp("corpus")
    src = _write_jsonl(folder / "docs.jsonl", docs)
    out = folder / "prepared"
    out.mkdir()
    result = prepare_folder(_cfg(src), out)
    return {"src": src, "out": out, "card": result.card, "result": result, "base": base, "chinese": chinese,
            "docs": docs}


def test_counts_in_the_card(corpus: dict) -> None:
    card = corpus["card"]
    assert card["counts"]["documents_read"] == len(corpus["docs"])
    assert card["dedup"]["exact"] == 3
    assert card["dedup"]["near"] == 2
    assert sum(card["filters"].values()) == 3
    assert card["pii"]["email"] == 1 and card["pii"]["phone"] == 1
    kept = card["counts"]["documents_kept"]
    assert kept == sum(card["splits"].values()) == 120 + 15 + 1
    assert all(card["splits"][s] > 0 for s in ("train", "validation", "test"))
    assert card["format"] == "lm" and len(card["digest"]) == 64 and card["block_size"] == 32
    samples = corpus["result"].drop_samples
    assert "dedup_exact" in samples and "dedup_near" in samples


def test_chinese_documents_survive_and_pii_is_scrubbed(corpus: dict) -> None:
    texts = [t for s in ("train", "validation", "test") for t in _raw(corpus["out"], s)]
    assert sum(1 for t in texts if t in corpus["chinese"]) == 15
    joined = "\n".join(texts)
    assert "someone@example.com" not in joined and "<EMAIL>" in joined and "<PHONE>" in joined


def test_tokenizer_round_trip_and_packed_blocks(corpus: dict) -> None:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    out = corpus["out"]
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    assert tok.eos_token and tok.pad_token and tok.bos_token
    assert len(tok) == corpus["card"]["vocab_size"] <= 400
    for text in _raw(out, "validation")[:5] + ["混合 text 你好，世界！ tabs\tand  spaces"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    for split in ("train", "validation", "test"):
        ds = load_from_disk(str(out / split))
        assert ds.column_names == ["input_ids"]
        assert len(ds) == corpus["card"]["blocks"][split] > 0
        assert {len(r) for r in ds["input_ids"]} == {32}
    train = load_from_disk(str(out / "train"))
    flat = [i for row in train["input_ids"] for i in row]
    # EOS separates documents: one per train document, minus the dropped tail.
    assert flat.count(tok.eos_token_id) >= corpus["card"]["splits"]["train"] - 1
    first_doc = _raw(out, "train")[0]
    n = len(tok(first_doc, add_special_tokens=False)["input_ids"])
    assert flat[n] == tok.eos_token_id and tok.decode(flat[:n]) == first_doc


def test_split_is_stable_when_the_corpus_grows(corpus: dict, tmp_path: Path) -> None:
    more = list(generate_documents(60, seed=99, chinese_share=0.2))
    src = _write_jsonl(tmp_path / "grown.jsonl", corpus["docs"] + more)
    out = tmp_path / "grown"
    out.mkdir()
    prepare_folder(_cfg(src, "dedup.near=false"), out)
    for split in ("train", "validation", "test"):
        assert set(_raw(corpus["out"], split)) <= set(_raw(out, split))


def test_dedup_against_earlier_prepared_data(corpus: dict, tmp_path: Path) -> None:
    fresh = list(generate_documents(40, seed=123))
    src = _write_jsonl(tmp_path / "next.jsonl", corpus["base"][:30] + fresh)
    out = tmp_path / "next"
    out.mkdir()
    card = prepare_folder(_cfg(src), out, reference_dir=corpus["out"]).card
    assert card["dedup"]["exact_against"] == 30
    assert card["dedup"]["reference_documents"] == corpus["card"]["counts"]["documents_kept"]
    assert card["counts"]["documents_kept"] == 40


def test_same_input_same_digest_and_pii_drop_mode(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "again"
    out.mkdir()
    assert prepare_folder(_cfg(corpus["src"]), out).card["digest"] == corpus["card"]["digest"]
    out2 = tmp_path / "drop"
    out2.mkdir()
    card = prepare_folder(_cfg(corpus["src"], "pii.mode=drop"), out2).card
    assert card["filters"]["pii"] == 1 and card["counts"]["documents_kept"] == 135
    assert card["digest"] != corpus["card"]["digest"]


def test_worker_processes_give_the_same_result(corpus: dict, tmp_path: Path) -> None:
    out = tmp_path / "procs"
    out.mkdir()
    card = prepare_folder(_cfg(corpus["src"], "num_proc=2", "batch_size=16"), out).card
    assert card["digest"] == corpus["card"]["digest"]
    assert card["dedup"] == corpus["card"]["dedup"]
    # The workers encode from the saved tokenizer: the very same blocks, in the same order.
    from datasets import load_from_disk

    for split in ("train", "validation", "test"):
        assert load_from_disk(str(out / split))["input_ids"] == load_from_disk(str(corpus["out"] / split))["input_ids"]


def test_tokenizer_learns_from_a_bounded_sample_of_the_train_split(corpus: dict, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from lifecycle.data.tokenizer import train_tokenizer

    whole = corpus["card"]
    # The fixture's train split is below the default sample (256 bytes per vocabulary entry).
    assert whole["tokenizer"]["trained_on_bytes"] == whole["split_bytes"]["train"]
    out = tmp_path / "sampled"
    out.mkdir()
    card = prepare_folder(_cfg(corpus["src"], "tokenizer.sample_bytes=20000"), out).card
    used = card["tokenizer"]["trained_on_bytes"]
    assert 20000 <= used < card["split_bytes"]["train"]
    # Everything else is the same: every split is still tokenized and packed in full.
    assert card["splits"] == whole["splits"] and all(card["blocks"][s] > 0 for s in card["blocks"])
    # The sample is the first train documents, in order, up to the cap.
    sample, size = [], 0
    for text in _raw(out, "train"):
        if size >= 20000:
            break
        sample.append(text)
        size += len(text.encode("utf-8"))
    assert size == used
    expected = train_tokenizer([sample], vocab_size=400, min_frequency=2)
    assert AutoTokenizer.from_pretrained(str(out / "tokenizer")).get_vocab() == expected.get_vocab()


def test_held_out_splits_too_small_for_a_block_are_named_in_the_card(tmp_path: Path) -> None:
    docs = list(generate_documents(30, seed=21, chinese_share=0.0))
    src = _write_jsonl(tmp_path / "small.jsonl", docs)
    out = tmp_path / "small"
    out.mkdir()
    cfg = load_config(PrepareConfig, None, ["tokenizer.vocab_size=400", "pack.block_size=1024",
                                            "split.validation=0.05", "split.test=0.05"], **{"source.uri": str(src)})
    card = prepare_folder(cfg, out).card
    assert card["blocks"]["train"] > 0
    empty = [s for s in ("validation", "test") if card["blocks"][s] == 0]
    assert empty, card["blocks"]
    for split in empty:
        assert any(w.startswith(f"the {split} split fills no block of 1024 tokens") for w in card["warnings"])


@pytest.mark.tried("prepare", "column names that YAML or a shell would reinterpret ('yes', '012', 'a #b') for the "
                   "text, prompt and response columns; a column name that is not a string",
                   "used exactly as given and recorded so in the card; a non-string refused with a one-line error")
def test_column_names_are_used_exactly_as_given(tmp_path: Path) -> None:
    from lifecycle.config import from_mapping
    from lifecycle.data.config import SourceConfig
    from lifecycle.errors import ConfigError

    docs = list(generate_documents(60, seed=5))
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"a #b": d, "text": "decoy " * 20, "yes": 1}) + "\n" for d in docs),
                   encoding="utf-8")
    cfg = from_mapping(PrepareConfig, {"source": {"uri": str(src), "text_column": "a #b"},
                                       "tokenizer": {"vocab_size": 300}, "pack": {"block_size": 16}})
    card = prepare_folder(cfg, tmp_path / "lm").card
    assert card["config"]["source"]["text_column"] == "a #b" and card["counts"]["documents_kept"] > 50
    kept = [json.loads(line)["text"] for line in (tmp_path / "lm" / "raw" / "train.jsonl").open()]
    assert all("decoy" not in t for t in kept)

    rows = [{"012": f"reverse {i} =>", "yes": f" {i} done", "prompt": "decoy", "response": "decoy"} for i in range(40)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = from_mapping(PrepareConfig, {"format": "sft", "source": {"uri": str(tmp_path / "s.jsonl")},
                                       "sft": {"prompt_column": "012", "response_column": "yes"},
                                       "tokenizer": {"vocab_size": 300}, "pack": {"block_size": 32}})
    card = prepare_folder(cfg, tmp_path / "sft", data_format="sft").card
    assert card["sft"]["columns"] == {"prompt": "012", "response": "yes", "messages": "messages"}
    row = json.loads((tmp_path / "sft" / "raw" / "train.jsonl").open().readline())
    assert row["prompt"].startswith("reverse ") and row["response"].endswith(" done")
    for bad in (True, 12, None):
        with pytest.raises(ConfigError, match=r"source.text_column: a column name must be a string"):
            SourceConfig(text_column=bad)  # type: ignore[arg-type]


@pytest.mark.tried("data card", "data_card.json holding random bytes, JSON that is not an object, a digest that is "
                   "not a string, or missing (hypothesis)", "read by the one card reader, or refused with a one-line "
                   "DataError naming the file (train, evaluate and monitoring all read it this way)")
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=40), st.builds(lambda v: json.dumps(v).encode(), st.one_of(
    st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
    st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3),
    st.builds(lambda d: {"digest": d}, st.one_of(st.integers(), st.none(), st.text(max_size=8)))))))
def test_the_card_reader_reads_a_card_or_refuses_in_one_line(tmp_path_factory, content: bytes) -> None:
    from lifecycle.data.card import read_card
    from lifecycle.errors import DataError

    folder = tmp_path_factory.mktemp("card")
    assert read_card(folder, required=False) == {}
    with pytest.raises(DataError, match="not a prepared data folder"):
        read_card(folder)
    (folder / "data_card.json").write_bytes(content)
    try:
        card = read_card(folder)
    except DataError as exc:
        assert "\n" not in str(exc) and "data_card.json: " in str(exc)
        return
    assert card == json.loads(content.decode("utf-8")) and isinstance(card.get("digest", ""), str)


def test_a_run_killed_between_the_fallback_renames_gets_its_old_output_back(tmp_path: Path) -> None:
    from lifecycle.data.publish import clean_stale

    out = tmp_path / "prepared"
    old = tmp_path / ".prepared.old-1234"
    old.mkdir()
    (old / "data_card.json").write_text("{}", encoding="utf-8")
    (tmp_path / ".prepared.tmp-abcd").mkdir()
    clean_stale(out)
    assert (out / "data_card.json").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]
