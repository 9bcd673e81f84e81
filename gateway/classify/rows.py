"""Rows in and out of `tiergate classify`: CSV or JSON Lines, a file or stdin.

Rows are read one at a time and written in batches as their answers arrive,
so a file of any length needs memory only for the rows in flight. Bytes that
are not UTF-8 are carried through unchanged (surrogateescape): the row gets
an error value instead of a text that was silently repaired.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from typing import IO, Iterator

__all__ = ["ANSWER_COLUMNS", "Row", "Result", "RowSource", "CsvFormat", "JsonlFormat", "format_of", "guess_format"]

ANSWER_COLUMNS = ("label", "score", "tier", "model", "error")

_READ = dict(encoding="utf-8-sig", errors="surrogateescape")  # -sig: Excel's "CSV UTF-8" starts with a BOM
_FIELD_LIMIT = 64 * 1024 * 1024  # csv's default (128 KiB) would stop the job at one long text; the gateway
                                 # answers a text over its --max-text-bytes with an error value instead


def _keep_bytes(exc: UnicodeEncodeError):
    """Encoding errors: bytes read as surrogateescape go back out as they came;
    any other lone surrogate (a JSON "\\ud800") is written as its escape."""
    out = []
    for ch in exc.object[exc.start:exc.end]:
        code = ord(ch)
        out.append(bytes([code - 0xDC00]) if 0xDC80 <= code <= 0xDCFF else ch.encode("unicode_escape"))
    return b"".join(out), exc.end


codecs.register_error("tiergate.keep", _keep_bytes)


@dataclass(slots=True)
class Row:
    values: list | dict     # CSV: the fields as read; JSON Lines: the object (or {"input": line} if it is none)
    text: str | None        # None: the row has nothing to score, and `problem` says why
    problem: str | None = None


@dataclass(frozen=True, slots=True)
class Result:
    label: str = ""
    score: float | None = None
    tier: str = ""          # L1, L2, L3 or MODEL; "" when the row has an error
    model: str = ""
    error: str = ""


def guess_format(path: str) -> str:
    return "jsonl" if path.endswith((".jsonl", ".ndjson", ".jsonl.partial")) else "csv"


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class RowSource:
    """The rows of one input (a path, or "-" for stdin), read lazily."""

    def __init__(self, path: str, column: str, fmt: str) -> None:
        self.path, self.column, self.format = path, column, fmt
        if path == "-":
            self._file: IO[str] = io.TextIOWrapper(sys.stdin.buffer, newline="", **_READ)
        else:
            if os.path.isdir(path):
                raise IsADirectoryError(f"{path} is a directory, not a file")
            if not os.path.exists(path):  # (a pipe, e.g. bash's <(...), is welcome)
                raise FileNotFoundError(f"no such file: {path}")
            self._file = open(path, newline="", **_READ)
        self.fields: list[str] = []
        self._csv = None
        if fmt == "csv":
            csv.field_size_limit(_FIELD_LIMIT)
            # strict: a quote still open at the end of the file is an error, not one giant text
            self._csv = csv.reader(self._file, strict=True)
            try:
                self.fields = next(self._csv, [])
            except csv.Error as exc:
                self._file.close()
                raise ValueError(f"{path} is not valid CSV at its header: {exc}") from None
            if column not in self.fields:
                self._file.close()
                hint = " (is it JSON Lines? --input-format jsonl)" if self.fields[:1] and \
                    self.fields[0].lstrip().startswith("{") else ""
                raise ValueError(f"column {column!r} is not in {path} "
                                 f"(its columns: {', '.join(self.fields) or 'none: the file is empty'}){hint}")
            self._text_at = self.fields.index(column)
        self.line = 0  # JSON Lines: the last line read

    def identity(self) -> dict:
        """What says "the same input" to a resumed run."""
        if self.path == "-":
            return {"stdin": True}
        st = os.stat(self.path)
        return {"path": os.path.realpath(self.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}

    def estimated_rows(self) -> int | None:
        """Lines in the file (a progress bar's total; quoted newlines make it an estimate)."""
        if self.path == "-" or not os.path.isfile(self.path):
            return None  # a pipe: counting would consume it
        count = 0
        with open(self.path, "rb") as f:
            while block := f.read(1 << 20):
                count += block.count(b"\n")
        return max(0, count - (1 if self.format == "csv" else 0))

    def close(self) -> None:
        self._file.close()

    def __iter__(self) -> Iterator[Row]:
        return self._csv_rows() if self._csv is not None else self._json_rows()

    def _csv_rows(self) -> Iterator[Row]:
        try:
            yield from self._csv_records()
        except csv.Error as exc:
            raise ValueError(f"{self.path} is not valid CSV at line {self._csv.line_num}: {exc}") from None

    def _csv_records(self) -> Iterator[Row]:
        width, at, column = len(self.fields), self._text_at, self.column
        for values in self._csv:
            if not values:
                continue  # a blank line is no row (csv yields [] for it)
            problem = None
            if len(values) > width:
                problem = f"the row has {len(values)} fields and the header {width}; the extra ones are not copied"
                values = values[:width]
            elif len(values) < width:
                values = values + [""] * (width - len(values))
            text = values[at]
            if problem is None and _has_surrogates(text):
                problem = f"the text in column {column!r} is not valid UTF-8"
            yield Row(values, None if problem else text, problem)

    def _json_rows(self) -> Iterator[Row]:
        for raw in self._file:
            self.line += 1
            line = raw.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield Row({"input": line}, None, f"line {self.line} is not JSON")
                continue
            if not isinstance(obj, dict):
                yield Row({"input": obj}, None, f"line {self.line} is not a JSON object")
                continue
            text = obj.get(self.column)
            if not isinstance(text, str):
                yield Row(obj, None, f"line {self.line} has no text in {self.column!r}")
            elif _has_surrogates(text):
                yield Row(obj, None, f"the text in {self.column!r} is not valid UTF-8")
            else:
                yield Row(obj, text)


def _score_text(score: float | None) -> str:
    return "" if score is None else f"{score:.6f}"


class CsvFormat:
    name = "csv"

    def __init__(self, fields: list[str]) -> None:
        self.fields = list(fields) + [c for c in ANSWER_COLUMNS if c not in fields]
        self._answer_at = [self.fields.index(c) for c in ANSWER_COLUMNS]
        self._width = len(self.fields)

    def _render(self, rows: list[list]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer).writerows(rows)
        return buffer.getvalue().encode("utf-8", "tiergate.keep")

    def header(self) -> bytes:
        return self._render([self.fields])

    def render(self, pairs: list[tuple[Row, Result]]) -> bytes:
        out = []
        for row, r in pairs:
            values = list(row.values) if isinstance(row.values, list) else [str(v) for v in row.values.values()]
            values += [""] * (self._width - len(values))
            for at, value in zip(self._answer_at, (r.label, _score_text(r.score), r.tier, r.model, r.error)):
                values[at] = value
            out.append(values)
        return self._render(out)


class JsonlFormat:
    name = "jsonl"

    def __init__(self, fields: list[str]) -> None:
        self._fields = fields  # CSV input: the keys of each object

    def header(self) -> bytes:
        return b""

    def render(self, pairs: list[tuple[Row, Result]]) -> bytes:
        lines = []
        for row, r in pairs:
            obj = dict(zip(self._fields, row.values)) if isinstance(row.values, list) else dict(row.values)
            obj.update(label=r.label or None, score=None if r.score is None else round(r.score, 6),
                       tier=r.tier or None, model=r.model or None, error=r.error or None)
            line = json.dumps(obj, ensure_ascii=False)
            try:
                lines.append(line.encode("utf-8"))
            except UnicodeEncodeError:  # bytes that were not UTF-8 (or lone surrogates): escaped, valid JSON
                lines.append(json.dumps(obj).encode("ascii"))
        return b"\n".join(lines) + b"\n" if lines else b""


def format_of(name: str, fields: list[str]) -> CsvFormat | JsonlFormat:
    return CsvFormat(fields) if name == "csv" else JsonlFormat(fields)
