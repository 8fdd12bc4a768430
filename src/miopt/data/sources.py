"""Reading a data source into raw rows, each tagged with where it came from.

A source is a ``.jsonl``/``.ndjson`` file (locations ``path:LINE``, counted from 1), a ``.json``
file holding a list of objects or ``{"data": [...]}`` (JSON Lines with a ``.json`` name are read as
JSON Lines), a ``.parquet`` or ``.csv`` file, a folder written by ``datasets``' ``save_to_disk``
(a ``DatasetDict`` gives its ``split``), a folder of data files, or else a Hugging Face Hub dataset
id. Locations other than JSON Lines read ``path:record N`` with N counted from 0, as ``dataset[N]``.

File-level problems (missing, empty, not UTF-8, unreadable) raise ``DataError`` at once; a row that
cannot be parsed (a malformed JSON line, a non-object) comes back with its error so that the
caller may skip it.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miopt.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet",)
CSV_SUFFIXES = (".csv",)
FILE_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES + CSV_SUFFIXES

# CSV cells holding a JSON list are decoded: ``rejected`` as a list of strings or of conversations,
# these columns only when the list holds messages (objects), so ordinary text starting "[" stays text.
CSV_REJECTED_COLUMN = "rejected"
CSV_MESSAGE_COLUMNS = ("prompt", "chosen", "completion", "messages")
CSV_FIELD_SIZE_LIMIT = 2**31 - 1  # responses can exceed the csv module's 128 KiB default


@dataclass(frozen=True)
class RawRow:
    """One row as read: its values, or the error that kept it from being read."""

    location: str  # "path:LINE" (JSON Lines) or "path:record N"
    values: dict[str, Any] | None
    error: DataError | None = None


def read_rows(source: str | Path, *, split: str = "train") -> tuple[str, list[RawRow]]:
    """The source's display name and its rows; raises ``DataError`` if it has none or cannot be read."""
    name = str(source)
    path = Path(source).expanduser()
    if path.is_dir():
        rows = _dataset_rows(name, _load_folder(name, path, split))
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            rows = _jsonl_rows(name, path.read_bytes())
        elif suffix in JSON_SUFFIXES:
            rows = _json_rows(name, path.read_bytes())
        elif suffix in PARQUET_SUFFIXES:
            rows = _parquet_rows(name, path)
        elif suffix in CSV_SUFFIXES:
            rows = _csv_rows(name, path.read_bytes())
        else:
            raise DataError(
                f"unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(FILE_SUFFIXES)}, "
                "a folder saved with datasets' save_to_disk, or a Hub dataset id",
                source=name,
            )
    elif _looks_local(name, path):
        raise DataError("no such file or folder", source=name)
    else:
        rows = _dataset_rows(f"{name}[{split}]", _load_hub(name, split))
    if not rows:
        raise DataError("the data source is empty: it holds no records", source=name)
    return name, rows


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON Lines file, for readers that stop at the
    first bad line (``miopt eval``'s records, GSM8K files): its ``DataError`` names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", source=str(path))
    for row in _jsonl_rows(str(path), path.read_bytes()):
        if row.error is not None:
            raise row.error
        yield int(row.location.rsplit(":", 1)[1]), row.values


def _looks_local(name: str, path: Path) -> bool:
    """A name that can only be a path (a data-file suffix, absolute, or ./ ../ ~): never tried on the Hub."""
    return path.suffix.lower() in FILE_SUFFIXES or path.is_absolute() or name.startswith((".", "~"))


def _decode(name: str, data: bytes, line_offset: int = 0) -> str:
    """UTF-8 text (a leading byte-order mark dropped); non-UTF-8 bytes raise naming their line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = line_offset + data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        bad = data[error.start : error.end].hex(" ")
        raise DataError(
            f"not valid UTF-8: byte(s) 0x{bad} at column {column}; re-save the file as UTF-8",
            source=f"{name}:{line}",
        ) from None
    return text.removeprefix("\ufeff")


def _jsonl_rows(name: str, data: bytes) -> list[RawRow]:
    """One JSON object per non-blank line; blank lines are ignored."""
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        line = _decode(name, raw, line_offset=number - 1)
        if not line.strip():
            continue
        location = f"{name}:{number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            problem = DataError(f"malformed JSON: {error.msg} (column {error.colno})", source=location)
            rows.append(RawRow(location, None, problem))
            continue
        rows.append(_object_row(location, value))
    return rows


def _json_rows(name: str, data: bytes) -> list[RawRow]:
    """A JSON list of objects, or an object whose ``data`` is that list."""
    text = _decode(name, data)
    if not text.strip():
        return []
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several top-level values: JSON Lines under a .json name
            return _jsonl_rows(name, data)
        raise DataError(
            f"malformed JSON: {error.msg} (column {error.colno})", source=f"{name}:{error.lineno}"
        ) from None
    if isinstance(document, dict) and "data" in document:
        document = document["data"]
    if not isinstance(document, list):
        raise DataError(
            f'expected a JSON list of records or an object {{"data": [...]}}, got {kind_of(document)}',
            source=name,
        )
    return [_object_row(f"{name}:record {index}", value) for index, value in enumerate(document)]


def _object_row(location: str, value: Any) -> RawRow:
    if isinstance(value, dict):
        return RawRow(location, value)
    return RawRow(location, None, DataError(f"expected a JSON object, got {kind_of(value)}", source=location))


def _csv_rows(name: str, data: bytes) -> list[RawRow]:
    """A header line, then one record per row; JSON-list cells are decoded (see ``CSV_*`` above)."""
    text = _decode(name, data)
    csv.field_size_limit(CSV_FIELD_SIZE_LIMIT)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for index, row in enumerate(reader):
            values = {key: _csv_cell(key, cell) for key, cell in row.items() if key is not None}
            rows.append(RawRow(f"{name}:record {index}", values))
    except csv.Error as error:
        raise DataError(f"malformed CSV: {error}", source=f"{name}:{reader.line_num}") from None
    return rows


def _csv_cell(column: str, cell: str | None) -> Any:
    if cell is None or not cell.lstrip().startswith("["):
        return cell
    if column != CSV_REJECTED_COLUMN and column not in CSV_MESSAGE_COLUMNS:
        return cell
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return cell
    if not isinstance(value, list) or not value:
        return cell
    if all(isinstance(item, dict) for item in value):
        return value
    if column == CSV_REJECTED_COLUMN and all(isinstance(item, (str, list)) for item in value):
        return value
    return cell


def _parquet_rows(name: str, path: Path) -> list[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for a corrupt or foreign file
        raise DataError(f"cannot read as Parquet: {error}", source=name) from None
    return [RawRow(f"{name}:record {index}", values) for index, values in enumerate(table.to_pylist())]


def _load_folder(name: str, path: Path, split: str) -> Any:
    """A ``save_to_disk`` folder (``split`` of a DatasetDict), else a folder of data files."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        try:
            return datasets.load_dataset(str(path), split=split)
        except Exception as error:
            raise DataError(
                "folder is neither a dataset saved with save_to_disk nor a folder of data files "
                f"with a {split!r} split ({type(error).__name__}: {error})",
                source=name,
            ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"no split {split!r}; the saved DatasetDict has {', '.join(loaded)}", source=name)
        loaded = loaded[split]
    return loaded


def _load_hub(name: str, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as error:
        raise DataError(
            "no such file or folder here, and loading it as a Hugging Face Hub dataset failed "
            f"(the Hub could not be reached, or has no such dataset or split): {type(error).__name__}: {error}",
            source=name,
        ) from None


def _dataset_rows(name: str, dataset: Any) -> list[RawRow]:
    return [RawRow(f"{name}:record {index}", values) for index, values in enumerate(dataset.to_list())]


def kind_of(value: Any) -> str:
    """A short description of a JSON value's type, for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return type(value).__name__
