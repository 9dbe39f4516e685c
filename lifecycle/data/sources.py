"""Sources: local files and folders, Hugging Face datasets, and the built-in corpus, read as records.

One reader per format turns a file into a stream of records (dicts); raw text is the records'
text column (:func:`iter_documents`), instruction data takes whole records (:func:`iter_records`).
Plain text files (``.txt``/``.md``) and the built-in corpus are records of one text column.
Everything streams, so memory stays bounded however large the input is. Bad input raises
:class:`~lifecycle.errors.DataError` with a one-line message that names the file and the place
(byte offset, line, item) where that makes sense. URIs (``runs:/``, ``models:/``) are resolved to
local paths by the caller before they get here. Column names are used exactly as given.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from lifecycle.data.config import SourceConfig
from lifecycle.data.raw import json_objects
from lifecycle.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
TABLE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
BUILTIN_PYDOC = "builtin:pydoc"

# A heading line followed by an underline of *, =, - ... starts a new section of a pydoc topic.
_PYDOC_SECTION = re.compile(r"\n(?=[^\n]+\n[*=\-~^]{3,}\n)")


@dataclass
class SourceStats:
    """What reading the source saw (reported in the data card)."""

    files: int = 0
    documents: int = 0  # records read (documents or examples), at most source.max_documents
    replaced_chars: int = 0  # bytes that were not UTF-8, replaced (errors=replace)
    non_text_values: int = 0  # text column values that were not strings (read as "")
    files_with_replacements: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Read:
    """How one pass reads: the column it needs (None: whole records), and whether plain text counts."""

    cfg: SourceConfig
    stats: SourceStats
    column: str | None
    plain_text: bool


def check_source(cfg: SourceConfig) -> None:
    """Fail early (before any output is made) when a local source does not exist."""
    uri = cfg.uri
    if uri == BUILTIN_PYDOC or uri.startswith("hf:"):
        return
    if uri.startswith("builtin:"):
        raise DataError(f"unknown built-in source {uri!r}; available: {BUILTIN_PYDOC}")
    path = Path(uri).expanduser()
    if not path.exists():
        raise DataError(f"source not found: {path}")
    if path.is_file() and path.suffix.lower() not in TEXT_SUFFIXES + TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix or '(none)'}; "
                        f"use one of {', '.join(TEXT_SUFFIXES + TABLE_SUFFIXES)}")
    try:  # unreadable (permissions): refused before any run or output exists
        if path.is_dir():
            os.listdir(path)
        else:
            path.open("rb").close()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def iter_records(cfg: SourceConfig, stats: SourceStats | None = None, *, column: str | None = None,
                 plain_text: bool = False) -> Iterator[dict[str, Any]]:
    """Yield the records of ``cfg.uri``, at most ``cfg.max_documents`` of them.

    ``column``: only that column is needed (each record must have it; table formats read just
    it). ``plain_text``: text files and the built-in corpus are records of ``cfg.text_column``;
    without it they are refused (they hold no prompt/response or chat records) and skipped in
    folders.
    """
    read = _Read(cfg, stats if stats is not None else SourceStats(), column, plain_text)
    check_source(cfg)
    limit = cfg.max_documents
    for record in _dispatch(read):
        if limit is not None and read.stats.documents >= limit:
            return
        read.stats.documents += 1
        yield record


def iter_documents(cfg: SourceConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the documents of ``cfg.uri`` (its records' text column), at most ``cfg.max_documents``."""
    stats = stats if stats is not None else SourceStats()
    col = cfg.text_column
    for record in iter_records(cfg, stats, column=col, plain_text=True):
        value = record[col]
        if isinstance(value, str):
            yield value
        else:
            stats.non_text_values += 1
            yield ""


def first_record_keys(cfg: SourceConfig) -> list[str] | None:
    """The column names of a source's first record (None: plain text, or nothing readable as records)."""
    if cfg.uri == BUILTIN_PYDOC:
        return None
    path = Path(cfg.uri).expanduser()
    if not cfg.uri.startswith("hf:") and path.is_dir() and _is_prepared(path):
        return None  # an earlier prepared folder is read as raw text
    records = _dispatch(_Read(cfg, SourceStats(), None, False))
    try:
        first = next(records, None)
    except DataError:
        return None  # not records (plain text, a mapping of columns of unequal length ...)
    finally:
        records.close()
    return None if first is None else list(first)


def pydoc_documents() -> Iterator[str]:
    """CPython's documentation topics (``pydoc_data.topics``), one document per section.

    The topics ship with every CPython, so the default corpus needs no download; sections (not
    whole topics) make documents of a few hundred words, closer to real web or doc pages.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        raise DataError(f"{BUILTIN_PYDOC}: this Python ({sys.version.split()[0]}) ships without pydoc_data") from None
    for name in sorted(topics):
        for part in _PYDOC_SECTION.split(topics[name]):
            if part.strip():
                yield part


# -- dispatch ----------------------------------------------------------------------------------

def _plain_text_refused(what: str) -> DataError:
    return DataError(f"{what}: plain text holds no prompt/response or chat records; use JSONL, JSON, CSV or parquet")


def _dispatch(read: _Read) -> Iterator[dict[str, Any]]:
    uri = read.cfg.uri
    if uri == BUILTIN_PYDOC:
        if not read.plain_text:
            raise _plain_text_refused(BUILTIN_PYDOC)
        yield from ({read.cfg.text_column: text} for text in pydoc_documents())
        return
    if uri.startswith("hf:"):
        yield from _hf_records(uri[3:], read)
        return
    path = Path(uri).expanduser()
    if path.is_dir():
        yield from _folder_records(path, read)
    else:
        yield from _file_records(path, read)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _is_prepared(path: Path) -> bool:
    return (path / "data_card.json").is_file() and (path / "raw").is_dir()


def _folder_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    if _is_saved_dataset(path):
        yield from _saved_dataset_records(path, read)
        return
    if _is_prepared(path):
        # An earlier prepared folder: its cleaned raw text is the corpus.
        for split in ("train", "validation", "test"):
            raw = path / "raw" / f"{split}.jsonl"
            if raw.is_file():
                yield from _file_records(raw, read)
        return
    suffixes = (TEXT_SUFFIXES if read.plain_text else ()) + TABLE_SUFFIXES
    try:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    except OSError as exc:
        raise DataError(f"{path}: cannot list the folder ({exc.strerror or exc})") from None
    if not files:
        what = "supported files" if read.plain_text else "record files"
        raise DataError(f"{path}: no {what} ({', '.join(suffixes)}) in this folder")
    for file in files:
        yield from _file_records(file, read)


def _file_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    read.stats.files += 1
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        if not read.plain_text:
            raise _plain_text_refused(str(path))
        col = read.cfg.text_column
        yield from ({col: text} for text in _text_documents(path, read))
    elif suffix == ".jsonl":
        yield from _jsonl_records(path, read)
    elif suffix == ".json":
        yield from _json_records(path, read)
    elif suffix == ".csv":
        yield from _csv_records(path, read)
    elif suffix == ".parquet":
        yield from _parquet_records(path, read)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}")


def _missing_column(where: str, column: str, columns: Iterable[Any]) -> DataError:
    cols = ", ".join(map(str, columns)) or "(none)"
    return DataError(f"{where}: no text column {column!r}; columns are: {cols} (use --text-column)")


def _checked(record: dict[str, Any], read: _Read, where: Any) -> dict[str, Any]:
    """``record`` when it has the column the pass needs; ``where()`` names it in the error."""
    if read.column is not None and read.column not in record:
        raise _missing_column(where(), read.column, record.keys())
    return record


# -- one reader per file format ------------------------------------------------------------------

def _decoded_lines(path: Path, read: _Read) -> Iterator[str]:
    """Lines of ``path`` decoded as UTF-8, naming the byte offset of the first bad byte."""
    offset = 0
    counted = False
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as exc:
                raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
            if not raw:
                return
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if read.cfg.errors == "strict":
                    raise DataError(
                        f"{path}: not valid UTF-8 at byte offset {offset + exc.start} (line {lineno}); "
                        f"fix the file or pass --errors replace") from None
                line = raw.decode("utf-8", errors="replace")
                read.stats.replaced_chars += line.count("\ufffd")
                if not counted:
                    read.stats.files_with_replacements.append(str(path))
                    counted = True
            if offset == 0 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield line


def _text_documents(path: Path, read: _Read) -> Iterator[str]:
    if read.cfg.document_per_file:
        text = "".join(_decoded_lines(path, read))
        if text.strip():
            yield text
        return
    para: list[str] = []
    for line in _decoded_lines(path, read):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para)
            para = []
    if para:
        yield "".join(para)


def _jsonl_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    for lineno, record in json_objects(_decoded_lines(path, read), path):
        yield _checked(record, read, lambda: f"{path}:{lineno}")


def _json_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    """A list of objects, a mapping of equal-length columns, or JSON Lines saved as ``.json``."""
    text = "".join(_decoded_lines(path, read))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            yield from _jsonl_records(path, read)
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if isinstance(data, dict):
        yield from _column_records(path, data, read)
        return
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or a mapping of columns, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {i} is a {type(record).__name__}, expected an object")
        yield _checked(record, read, lambda: f"{path}: item {i}")


def _column_records(path: Path, data: dict[str, Any], read: _Read) -> Iterator[dict[str, Any]]:
    """Column-oriented JSON (``{"col": [v0, v1, ...], ...}``), row by row."""
    if read.column is not None and read.column not in data:
        raise _missing_column(str(path), read.column, data.keys())
    columns = {k: v for k, v in data.items() if read.column is None or k == read.column}
    bad = next((k for k, v in columns.items() if not isinstance(v, list)), None)
    if bad is not None:
        raise DataError(f"{path}: column {bad!r} of a mapping of columns is a {type(columns[bad]).__name__}, "
                        "expected a list")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise DataError(f"{path}: the columns have different lengths ({', '.join(map(str, sorted(lengths)))})")
    for i in range(lengths.pop() if lengths else 0):
        yield {k: v[i] for k, v in columns.items()}


def _csv_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
    reader = csv.DictReader(_decoded_lines(path, read))
    try:
        fields = reader.fieldnames
        if fields is None:
            return
        if read.column is not None and read.column not in fields:
            raise _missing_column(str(path), read.column, fields)
        for row in reader:
            # Cells beyond the header (key None) belong to no column.
            yield {k: v for k, v in row.items() if k is not None}
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _parquet_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if read.column is not None and read.column not in names:
        raise _missing_column(str(path), read.column, names)
    # Only the needed column is read from disk: a wide table costs no more than its text.
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=None if read.column is None else [read.column]):
            yield from batch.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: corrupt parquet data ({str(exc).splitlines()[0]})") from None


# -- datasets ----------------------------------------------------------------------------------

def _dataset_records(ds: Any, where: str, read: _Read) -> Iterator[dict[str, Any]]:
    names = list(ds.column_names or [])
    if read.column is not None:
        if read.column not in names:
            raise _missing_column(where, read.column, names)
        ds = ds.select_columns([read.column])
        names = [read.column]
    for batch in ds.iter(batch_size=1024):
        for i in range(len(batch[names[0]]) if names else 0):
            yield {k: batch[k][i] for k in names}


def _saved_dataset_records(path: Path, read: _Read) -> Iterator[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a broken folder
        raise DataError(f"{path}: cannot load the saved dataset ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        for split in ds:
            yield from _dataset_records(ds[split], f"{path} [{split}]", read)
    else:
        yield from _dataset_records(ds, str(path), read)


def _hf_records(spec: str, read: _Read) -> Iterator[dict[str, Any]]:
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    if not name:
        raise DataError("hf: source needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
    try:
        ds = load_dataset(name, config or None, split="train", streaming=True)
        first = ds.column_names
    except Exception as exc:  # noqa: BLE001 - hub/offline/builder errors all mean "cannot load"
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise DataError(f"cannot load dataset hf:{spec} ({why})") from None
    if read.column is not None and first is not None and read.column not in first:
        raise _missing_column(f"hf:{spec}", read.column, first)
    # Streaming datasets may not know their columns up front: each record is checked.
    for record in ds:
        yield _checked(dict(record), read, lambda: f"hf:{spec}")
