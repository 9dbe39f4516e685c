"""Document sources: local files and folders, Hugging Face datasets, and the built-in corpus.

Every source is a generator of document strings, so memory stays bounded however large the
input is. Bad input raises :class:`~lifecycle.errors.DataError` with a one-line message that names
the file and the place (byte offset, line) where that makes sense. URIs (``runs:/``,
``models:/``) are resolved to local paths by the caller before they get here.
"""

from __future__ import annotations

import csv
import json
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
    documents: int = 0
    replaced_chars: int = 0
    non_text_values: int = 0
    files_with_replacements: list[str] = field(default_factory=list)


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


def iter_documents(cfg: SourceConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Yield the documents of ``cfg.uri``, at most ``cfg.max_documents`` of them."""
    stats = stats if stats is not None else SourceStats()
    check_source(cfg)
    limit = cfg.max_documents
    for text in _dispatch(cfg, stats):
        if limit is not None and stats.documents >= limit:
            return
        stats.documents += 1
        yield text


def _dispatch(cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    uri = cfg.uri
    if uri == BUILTIN_PYDOC:
        yield from pydoc_documents()
        return
    if uri.startswith("hf:"):
        yield from _hf_documents(uri[3:], cfg, stats)
        return
    path = Path(uri).expanduser()
    if path.is_dir():
        yield from _folder_documents(path, cfg, stats)
    else:
        yield from _file_documents(path, cfg, stats)


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


# -- local files -------------------------------------------------------------------------------

def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "dataset_info.json").is_file() and (path / "state.json").is_file())


def _folder_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    if _is_saved_dataset(path):
        yield from _saved_dataset_documents(path, cfg, stats)
        return
    if (path / "data_card.json").is_file() and (path / "raw").is_dir():
        # An earlier prepared folder: its cleaned raw text is the corpus.
        for split in ("train", "validation", "test"):
            raw = path / "raw" / f"{split}.jsonl"
            if raw.is_file():
                yield from _jsonl_documents(raw, cfg, stats)
        return
    suffixes = TEXT_SUFFIXES + TABLE_SUFFIXES
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path}: no supported files ({', '.join(suffixes)}) in this folder")
    for file in files:
        yield from _file_documents(file, cfg, stats)


def _file_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    stats.files += 1
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        yield from _text_documents(path, cfg, stats)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, cfg, stats)
    elif suffix == ".json":
        yield from _json_documents(path, cfg, stats)
    elif suffix == ".csv":
        yield from _csv_documents(path, cfg, stats)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, cfg, stats)
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}")


def _decoded_lines(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    """Lines of ``path`` decoded as UTF-8, naming the byte offset of the first bad byte."""
    offset = 0
    counted = False
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                if cfg.errors == "strict":
                    raise DataError(
                        f"{path}: not valid UTF-8 at byte offset {offset + exc.start} (line {lineno}); "
                        f"fix the file or pass --errors replace") from None
                line = raw.decode("utf-8", errors="replace")
                stats.replaced_chars += line.count("\ufffd")
                if not counted:
                    stats.files_with_replacements.append(str(path))
                    counted = True
            if offset == 0 and line.startswith("\ufeff"):
                line = line[1:]
            offset += len(raw)
            yield line


def _text_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    if cfg.document_per_file:
        text = "".join(_decoded_lines(path, cfg, stats))
        if text.strip():
            yield text
        return
    para: list[str] = []
    for line in _decoded_lines(path, cfg, stats):
        if line.strip():
            para.append(line)
        elif para:
            yield "".join(para)
            para = []
    if para:
        yield "".join(para)


def _missing_column(where: str, column: str, columns: Iterable[str]) -> DataError:
    cols = ", ".join(map(str, columns)) or "(none)"
    return DataError(f"{where}: no text column {column!r}; columns are: {cols} (use --text-column)")


def _value_text(value: Any, stats: SourceStats) -> str:
    if isinstance(value, str):
        return value
    stats.non_text_values += 1
    return ""


def _jsonl_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    col = cfg.text_column
    for lineno, record in json_objects(_decoded_lines(path, cfg, stats), path):
        if col not in record:
            raise _missing_column(f"{path}:{lineno}", col, record.keys())
        yield _value_text(record[col], stats)


def _json_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    text = "".join(_decoded_lines(path, cfg, stats))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            yield from _jsonl_documents(path, cfg, stats)
            return
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    col = cfg.text_column
    if isinstance(data, dict) and isinstance(data.get(col), list):  # column-oriented
        for value in data[col]:
            yield _value_text(value, stats)
        return
    if isinstance(data, dict):
        raise _missing_column(str(path), col, data.keys())
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects or a mapping of columns, got {type(data).__name__}")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise DataError(f"{path}: item {i} is a {type(record).__name__}, expected an object")
        if col not in record:
            raise _missing_column(f"{path}: item {i}", col, record.keys())
        yield _value_text(record[col], stats)


def _csv_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
    reader = csv.DictReader(_decoded_lines(path, cfg, stats))
    try:
        fields = reader.fieldnames
        if fields is None:
            return
        if cfg.text_column not in fields:
            raise _missing_column(str(path), cfg.text_column, fields)
        for row in reader:
            yield _value_text(row.get(cfg.text_column), stats)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def _parquet_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    names = pf.schema_arrow.names
    if cfg.text_column not in names:
        raise _missing_column(str(path), cfg.text_column, names)
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[cfg.text_column]):
            for value in batch.column(0).to_pylist():
                yield _value_text(value, stats)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: corrupt parquet data ({str(exc).splitlines()[0]})") from None


# -- datasets ----------------------------------------------------------------------------------

def _iter_dataset(ds: Any, where: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    names = list(ds.column_names or [])
    if cfg.text_column not in names:
        raise _missing_column(where, cfg.text_column, names)
    for batch in ds.select_columns([cfg.text_column]).iter(batch_size=1024):
        for value in batch[cfg.text_column]:
            yield _value_text(value, stats)


def _saved_dataset_documents(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a broken folder
        raise DataError(f"{path}: cannot load the saved dataset ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, DatasetDict):
        for split in ds:
            yield from _iter_dataset(ds[split], f"{path} [{split}]", cfg, stats)
    else:
        yield from _iter_dataset(ds, str(path), cfg, stats)


def _hf_documents(spec: str, cfg: SourceConfig, stats: SourceStats) -> Iterator[str]:
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    if not name:
        raise DataError("hf: source needs a dataset name, e.g. hf:wikitext:wikitext-2-raw-v1")
    try:
        ds = load_dataset(name, config or None, split="train", streaming=True)
        first = ds.column_names
    except Exception as exc:  # noqa: BLE001 - hub/offline/builder errors all mean "cannot load"
        raise DataError(f"cannot load dataset hf:{spec} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if first is not None and cfg.text_column not in first:
        raise _missing_column(f"hf:{spec}", cfg.text_column, first)
    for record in ds:
        if cfg.text_column not in record:
            raise _missing_column(f"hf:{spec}", cfg.text_column, record.keys())
        yield _value_text(record[cfg.text_column], stats)


# -- records (instruction data) ----------------------------------------------------------------
# The document readers above pick one text column; instruction data needs whole records
# (prompt and response, or a list of chat messages), so these readers yield dicts.

def iter_records(cfg: SourceConfig, stats: SourceStats | None = None) -> Iterator[dict[str, Any]]:
    """Yield the records (dicts) of a table-like source, at most ``cfg.max_documents`` of them.

    Sources: JSONL/JSON/CSV/Parquet files or folders of them, ``save_to_disk`` folders and
    ``hf:`` datasets. Plain text files hold no records and are refused.
    """
    stats = stats if stats is not None else SourceStats()
    check_source(cfg)
    limit = cfg.max_documents
    for record in _dispatch_records(cfg, stats):
        if limit is not None and stats.documents >= limit:
            return
        stats.documents += 1
        yield record


def first_record_keys(cfg: SourceConfig) -> list[str] | None:
    """The column names of a source's first record (None: a text source without records)."""
    uri = cfg.uri
    if uri == BUILTIN_PYDOC:
        return None
    path = Path(uri).expanduser()
    if not uri.startswith("hf:") and path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
        return None
    if not uri.startswith("hf:") and path.is_dir() and not _is_saved_dataset(path):
        if (path / "data_card.json").is_file():
            return None  # an earlier prepared folder is read as raw text
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        if not files:
            return None
    records = _dispatch_records(cfg, SourceStats())
    try:
        first = next(records, None)
    except DataError:
        return None  # not records (e.g. column-oriented JSON): the text readers say what is wrong
    finally:
        records.close()
    return None if first is None else list(first)


def _dispatch_records(cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    uri = cfg.uri
    if uri == BUILTIN_PYDOC:
        raise DataError(f"{BUILTIN_PYDOC} holds plain text, not prompt/response or chat records")
    if uri.startswith("hf:"):
        yield from _hf_records(uri[3:], stats)
        return
    path = Path(uri).expanduser()
    if path.is_dir():
        if _is_saved_dataset(path):
            yield from _saved_dataset_records(path)
            return
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: no record files ({', '.join(TABLE_SUFFIXES)}) in this folder")
        for file in files:
            yield from _file_records(file, cfg, stats)
    else:
        yield from _file_records(path, cfg, stats)


def _file_records(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    stats.files += 1
    suffix = path.suffix.lower()
    if suffix in TEXT_SUFFIXES:
        raise DataError(f"{path}: plain text holds no prompt/response or chat records; use JSONL, JSON, CSV or parquet")
    if suffix == ".jsonl":
        yield from _jsonl_records(path, cfg, stats)
    elif suffix == ".json":
        text = "".join(_decoded_lines(path, cfg, stats))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":
                yield from _jsonl_records(path, cfg, stats)
                return
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
        for i, record in enumerate(data):
            if not isinstance(record, dict):
                raise DataError(f"{path}: item {i} is a {type(record).__name__}, expected an object")
            yield record
    elif suffix == ".csv":
        csv.field_size_limit(sys.maxsize if sys.maxsize < 2**63 else 2**31 - 1)
        reader = csv.DictReader(_decoded_lines(path, cfg, stats))
        try:
            for row in reader:
                # A chat column in CSV is a JSON list in one cell.
                yield {k: _maybe_json_list(v) for k, v in row.items() if k is not None}
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=1024):
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    else:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'}")


def _maybe_json_list(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _jsonl_records(path: Path, cfg: SourceConfig, stats: SourceStats) -> Iterator[dict[str, Any]]:
    for _, record in json_objects(_decoded_lines(path, cfg, stats), path):
        yield record


def _saved_dataset_records(path: Path) -> Iterator[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{path}: cannot load the saved dataset ({str(exc).splitlines()[0]})") from None
    parts = [ds[s] for s in ds] if isinstance(ds, DatasetDict) else [ds]
    for part in parts:
        for batch in part.iter(batch_size=1024):
            keys = list(batch)
            for i in range(len(batch[keys[0]]) if keys else 0):
                yield {k: batch[k][i] for k in keys}


def _hf_records(spec: str, stats: SourceStats) -> Iterator[dict[str, Any]]:
    from datasets import load_dataset

    name, _, config = spec.partition(":")
    if not name:
        raise DataError("hf: source needs a dataset name, e.g. hf:NAME[:CONFIG]")
    try:
        ds = load_dataset(name, config or None, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot load dataset hf:{spec} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for record in ds:
        yield dict(record)
