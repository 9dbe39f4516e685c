"""Sources of every kind, and every bad input: exit code, one-line message, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle.data.config import SourceConfig
from lifecycle.data.sources import SourceStats, iter_documents
from lifecycle.data.synthetic import generate_documents
from lifecycle.errors import DataError
from tests.cli import cli

DOCS = list(generate_documents(40, seed=21, chinese_share=0.2))


def _docs(uri: Path | str, **kw) -> list[str]:
    return list(iter_documents(SourceConfig(uri=str(uri), **kw), SourceStats()))


def test_text_files_blank_line_separated_and_one_per_file(tmp_path: Path) -> None:
    folder = tmp_path / "txt"
    folder.mkdir()
    (folder / "a.txt").write_text("first doc\nstill first\n\n\nsecond doc\n", encoding="utf-8")
    (folder / "b.md").write_text("# third\n\nfourth\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("ignored\n", encoding="utf-8")
    assert _docs(folder) == ["first doc\nstill first\n", "second doc\n", "# third\n", "fourth\n"]
    assert _docs(folder, document_per_file=True) == ["first doc\nstill first\n\n\nsecond doc\n", "# third\n\nfourth\n"]


def test_table_formats_and_saved_datasets(tmp_path: Path) -> None:
    import pandas as pd
    from datasets import Dataset, DatasetDict

    df = pd.DataFrame({"id": range(len(DOCS)), "body": DOCS})
    df.to_json(tmp_path / "d.jsonl", orient="records", lines=True, force_ascii=False)
    (tmp_path / "d.json").write_text(json.dumps([{"body": d} for d in DOCS], ensure_ascii=False), encoding="utf-8")
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet"):
        assert _docs(tmp_path / name, text_column="body") == DOCS, name
    Dataset.from_pandas(df).save_to_disk(str(tmp_path / "saved"))
    assert _docs(tmp_path / "saved", text_column="body") == DOCS
    DatasetDict({"train": Dataset.from_pandas(df[:30]), "test": Dataset.from_pandas(df[30:])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    assert _docs(tmp_path / "saved_dict", text_column="body") == DOCS
    assert _docs(tmp_path / "d.parquet", text_column="body", max_documents=7) == DOCS[:7]


def test_hf_source_with_a_local_dataset_folder(tmp_path: Path) -> None:
    import pandas as pd

    folder = tmp_path / "hfdata"
    folder.mkdir()
    pd.DataFrame({"text": DOCS}).to_parquet(folder / "train.parquet")
    assert _docs(f"hf:{folder}") == DOCS


def test_replace_mode_counts_bad_bytes(tmp_path: Path) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes("good text here\n\nbad \xff\xfe bytes\n".encode("latin-1"))
    stats = SourceStats()
    docs = list(iter_documents(SourceConfig(uri=str(path), errors="replace"), stats))
    assert docs[1] == "bad \ufffd\ufffd bytes\n" and stats.replaced_chars == 2
    with pytest.raises(DataError, match=r"byte offset 20 \(line 3\)"):
        _docs(path)




# -- bad input through the CLI ------------------------------------------------------------------

def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = cli("prepare", *args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error:")]
    return code, "\n".join(err)


def _assert_refused(args: list[str], tmp_path: Path, capsys, code: int, pattern: str) -> None:
    before = set(tmp_path.iterdir())
    out = tmp_path / "out"
    got, err = _run([*args, "--output", str(out), "--vocab-size", "300", "--block-size", "16"], capsys)
    assert got == code, err
    assert len(err.splitlines()) == 1, err
    import re

    assert re.search(pattern, err), err
    assert not out.exists()
    assert set(tmp_path.iterdir()) == before  # no temp folder left behind either


def test_missing_path(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    _assert_refused(["--source", str(tmp_path / "nope.jsonl")], tmp_path, capsys, 4, "source not found: .*nope.jsonl")


def test_empty_corpus(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "empty.jsonl")], tmp_path, capsys, 4, "holds no documents")


def test_corpus_emptied_by_filters_names_the_filters(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    (tmp_path / "junk.txt").write_text("tiny\n\nshort one\n\n" + "## $$ ## " * 40 + "\n", encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "junk.txt")], tmp_path, capsys, 4,
                    r"all 3 documents were dropped \(min_words 2, symbol_word_ratio 1\)")


def test_not_utf8_names_file_and_offset(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    good = "\n\n".join(DOCS[:10])
    (tmp_path / "latin.txt").write_bytes(good.encode() + b"\n\ncaf\xe9 au lait\n")
    offset = len(good.encode()) + 2 + 3
    _assert_refused(["--source", str(tmp_path / "latin.txt")], tmp_path, capsys, 4,
                    rf"latin.txt: not valid UTF-8 at byte offset {offset} .*--errors replace")


def test_missing_text_column_lists_columns(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    (tmp_path / "d.jsonl").write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "d.jsonl")], tmp_path, capsys, 4,
                    r"d.jsonl:1: no text column 'text'; columns are: body, id")
    import pandas as pd

    pd.DataFrame({"body": DOCS}).to_parquet(tmp_path / "d.parquet")
    _assert_refused(["--source", str(tmp_path / "d.parquet"), "--text-column", "content"], tmp_path, capsys, 4,
                    r"no text column 'content'; columns are: body")


def test_corrupt_json_line_and_parquet(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    lines = [json.dumps({"text": d}) for d in DOCS[:5]] + ['{"text": "broken'] + [json.dumps({"text": DOCS[6]})]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "d.jsonl")], tmp_path, capsys, 4, r"d.jsonl:6: invalid JSON")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet at all")
    _assert_refused(["--source", str(tmp_path / "bad.parquet")], tmp_path, capsys, 4,
                    r"bad.parquet: not a readable parquet file")


def test_block_size_beyond_reused_tokenizer(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    from lifecycle.data.tokenizer import train_tokenizer

    tok = train_tokenizer([DOCS], vocab_size=300)
    tok.model_max_length = 8
    tok.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "d.jsonl"), "--tokenizer", str(tmp_path / "tok")], tmp_path, capsys,
                    4, r"block size 16 exceeds the tokenizer's model_max_length 8")


def test_existing_output_is_refused_unless_overwrite(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS * 1), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old", encoding="utf-8")
    code, err = _run(["--source", str(src), "--output", str(out)], capsys)
    assert code == 6 and "already exists; use --overwrite" in err
    assert (out / "keep.txt").read_text() == "old"
    code, err = _run(["--source", str(src), "--output", str(out), "--overwrite", "--vocab-size", "300",
                      "--block-size", "16", "--set", "split.validation=0.2", "--set", "split.test=0.2"], capsys)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "data_card.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out"]


def test_bad_flag_value_is_a_usage_error(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    code, err = _run(["--output", str(tmp_path / "o"), "--set", "dedup.threshold=2"], capsys)
    assert code == 2 and "dedup.threshold" in err
