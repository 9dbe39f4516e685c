"""Sources of every kind, and every bad input: exit code, one-line message, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lifecycle.cli import main
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


# -- properties of the readers (hypothesis) ---------------------------------------------------------

from hypothesis import HealthCheck, example, given, settings  # noqa: E402 - the property tests' own imports
from hypothesis import strategies as st  # noqa: E402

from lifecycle.data.sources import iter_records  # noqa: E402

# Any text a file can hold: every code point but the surrogates (which UTF-8 cannot encode).
_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
_NAMES = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
                  min_size=1, max_size=4, unique=True)
_PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _write_table(path: Path, fmt: str, names: list[str], rows: list[list[str]]) -> None:
    records = [dict(zip(names, row)) for row in rows]
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    elif fmt == "columns.json":
        path.write_text(json.dumps({n: [row[i] for row in rows] for i, n in enumerate(names)}, ensure_ascii=False),
                        encoding="utf-8")
    elif fmt == "csv":
        import csv

        with path.open("w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(names)
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({n: pa.array([row[i] for row in rows], pa.string()) for i, n in enumerate(names)}),
                       path)


def _refusal(exc: DataError) -> str:
    message = str(exc)
    assert message and "\n" not in message, message
    return message


@pytest.mark.tried("data sources", "JSONL, JSON (records and columns), CSV and parquet files of random column names "
                   "(e.g. 'yes', '012', 'a #b') and random text values, read whole and by one column (hypothesis)",
                   "read back exactly, or refused with a one-line error (CSV cells holding NUL only)")
@_PROPS
@given(fmt=st.sampled_from(["jsonl", "json", "columns.json", "csv", "parquet"]), names=_NAMES,
       data=st.data(), pick=st.integers(min_value=0, max_value=3))
@example(fmt="csv", names=["yes", "012", "a #b"], data=None, pick=0)
@example(fmt="parquet", names=["a.b", "012"], data=None, pick=0)
def test_table_readers_read_any_records_exactly(tmp_path_factory, fmt, names, data, pick) -> None:
    rows = ([["v", "w", "x"][:len(names)]] if data is None else
            data.draw(st.lists(st.lists(_TEXT, min_size=len(names), max_size=len(names)), min_size=1, max_size=5)))
    path = tmp_path_factory.mktemp("t") / f"d.{fmt}"
    _write_table(path, fmt, names, rows)
    column = names[pick % len(names)]
    cfg = SourceConfig(uri=str(path), text_column=column)
    try:
        records = list(iter_records(cfg))
        documents = list(iter_documents(cfg))
    except DataError as exc:
        assert fmt == "csv" and "malformed CSV" in _refusal(exc) and any("\0" in c for r in rows for c in r), exc
        return
    assert records == [dict(zip(names, row)) for row in rows]
    assert documents == [row[names.index(column)] for row in rows]


_LINE = _TEXT.filter(lambda s: "\n" not in s and s.strip() != "" and not s.startswith("\ufeff"))


@pytest.mark.tried("data sources", "text files of random paragraphs in UTF-8, UTF-8 with BOM, UTF-16, Latin-1 "
                   "and cp1252 (hypothesis)", "read exactly as UTF-8 decodes them, or refused naming the byte offset")
@_PROPS
@given(docs=st.lists(st.lists(_LINE, min_size=1, max_size=3), min_size=1, max_size=4),
       encoding=st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252"]))
def test_text_reader_reads_utf8_exactly_or_names_the_offset(tmp_path_factory, docs, encoding) -> None:
    expected = ["\n".join(lines) + "\n" for lines in docs]
    try:
        raw = "\n".join(expected).encode(encoding)
    except UnicodeEncodeError:
        return  # text this encoding cannot hold never reaches a file
    path = tmp_path_factory.mktemp("t") / "d.txt"
    path.write_bytes(raw)
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        with pytest.raises(DataError) as refused:
            _docs(path)
        assert f"not valid UTF-8 at byte offset {bom + exc.start} " in _refusal(refused.value)
        return
    got = _docs(path)
    if text == "\n".join(expected):  # UTF-8 (with or without BOM), or ASCII in any of them
        assert got == expected


# -- unreadable sources ----------------------------------------------------------------------------

def _as_nobody(fn) -> tuple[int, str]:
    """Run ``fn`` in a forked child with the uid of ``nobody`` (root reads everything); its exit code and stderr."""
    import io
    import os
    import sys

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        err = io.StringIO()
        try:
            os.setgid(65534)
            os.setuid(65534)
            sys.stderr = err
            fn()
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as a failure
            code, err = 99, io.StringIO(f"{type(exc).__name__}: {exc}")
        os.write(write_end, f"{code}\n{err.getvalue()}".encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        text = fh.read().decode()
    os.waitpid(pid, 0)
    code, _, err = text.partition("\n")
    return int(code), err


@pytest.mark.tried("data sources", "a source file or a file inside a source folder the user may not read",
                   "exit 4, one line naming the file, nothing written")
def test_unreadable_source_is_refused_in_one_line(tmp_path: Path, artifacts_in_tmp: str) -> None:
    import os

    if os.geteuid() != 0:  # an ordinary user is refused just the same: drop the permissions directly
        pytest.skip("the test forks a child that becomes 'nobody', which needs root")
    import tempfile

    tmp_path = Path(tempfile.mkdtemp(prefix="unreadable-", dir="/tmp"))  # every parent open to 'nobody'
    tmp_path.chmod(0o777)
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "private words"}\n', encoding="utf-8")
    secret.chmod(0o000)
    out = tmp_path / "out"
    code, err = _as_nobody(lambda: main(["prepare", "--source", str(secret), "--output", str(out)]))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 4 and len(lines) == 1 and "secret.jsonl: cannot read (Permission denied)" in lines[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.jsonl"]

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "readable"}\n', encoding="utf-8")
    secret.rename(folder / "b.jsonl")
    folder.chmod(0o755)

    def read() -> None:
        try:
            list(iter_documents(SourceConfig(uri=str(folder))))
        except DataError as exc:
            print(exc, file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    import sys

    code, err = _as_nobody(read)
    assert code == 4 and err.strip().endswith("b.jsonl: cannot read (Permission denied)"), err
    import shutil

    shutil.rmtree(tmp_path)


@pytest.mark.tried("data sources", "a folder where a file is expected, empty files of every format, a header-only "
                   "CSV, a missing column in CSV and JSON", "exit 4, one line naming the file, nothing written")
def test_folders_in_place_of_files_and_empty_files(tmp_path: Path, capsys, artifacts_in_tmp: str) -> None:
    (tmp_path / "d.jsonl").mkdir()
    _assert_refused(["--source", str(tmp_path / "d.jsonl")], tmp_path, capsys, 4, r"d.jsonl: no supported files")
    (tmp_path / "d.jsonl" / "part.csv").mkdir()  # a folder named like a file is not read as one
    (tmp_path / "d.jsonl" / "x.txt").write_text("", encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "d.jsonl")], tmp_path, capsys, 4, r"holds no documents")
    for name, content in [("e.txt", b""), ("e.json", b""), ("e.csv", b""), ("h.csv", b"text,id\n"),
                          ("e.parquet", b""), ("e.md", b"\n\n  \n")]:
        (tmp_path / name).write_bytes(content)
        pattern = {"e.json": r"e.json:1: invalid JSON", "e.parquet": r"e.parquet: not a readable parquet file"}
        _assert_refused(["--source", str(tmp_path / name)], tmp_path, capsys, 4,
                        pattern.get(name, r"holds no documents"))
    (tmp_path / "c.csv").write_text("body,id\nhello,1\n", encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "c.csv")], tmp_path, capsys, 4,
                    r"c.csv: no text column 'text'; columns are: body, id")
    (tmp_path / "c.json").write_text('{"body": ["a"], "id": [1]}', encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "c.json")], tmp_path, capsys, 4,
                    r"c.json: no text column 'text'; columns are: body, id")
    (tmp_path / "u.json").write_text('{"text": ["a", "b"], "id": [1]}', encoding="utf-8")
    _assert_refused(["--source", str(tmp_path / "u.json"), "--text-column", "id"], tmp_path, capsys, 4,
                    r"holds no documents|all 1 documents were dropped")
