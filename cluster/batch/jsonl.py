"""Batch input lines (validated) and the result files (append + fsync per record, crash-recoverable).

Every input line gets exactly one result record, in the output file (a 2xx response) or the error file
(anything else). A record's `id` is `batch_req_<batch hex>_<line number>`, so after a crash the set of
finished lines is read back from the files themselves; a torn last record is cut off and its line runs again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUEST_KEYS = {"custom_id", "method", "url", "body"}


class InputError(Exception):
    """The input file as a whole cannot be used (missing, empty, not UTF-8)."""


@dataclass(frozen=True)
class InputLine:
    lineno: int  # 1-based line number in the input file
    custom_id: str | None
    body: dict[str, Any] | None  # None when the line is broken
    error: str | None = None  # why the line is broken (names the line)


def parse_input(path: str | Path, endpoint: str) -> list[InputLine]:
    """Parse a batch input JSONL file; broken lines come back with `error` set, blank lines are skipped."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the input file: {e.strerror}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"the input file is not UTF-8 (byte {e.start})") from e
    lines: list[InputLine] = []
    first_seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        lines.append(_parse_line(lineno, line, endpoint, first_seen))
    if not lines:
        raise InputError("the input file has no requests")
    return lines


def _parse_line(lineno: int, line: str, endpoint: str, first_seen: dict[str, int]) -> InputLine:
    def broken(msg: str, custom_id: str | None = None) -> InputLine:
        return InputLine(lineno, custom_id, None, f"line {lineno}: {msg}")

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return broken(f"not valid JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return broken("not valid JSON (nested too deeply)")
    if not isinstance(obj, dict):
        return broken(f"expected a JSON object, got {type(obj).__name__}")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return broken("'custom_id' must be a non-empty string")
    if cid in first_seen:
        return broken(f"duplicate custom_id {cid!r} (first on line {first_seen[cid]})", cid)
    first_seen[cid] = lineno
    unknown = sorted(set(obj) - REQUEST_KEYS)
    if unknown:
        return broken(f"unknown field(s) {unknown}; a request has {sorted(REQUEST_KEYS)}", cid)
    if obj.get("method") != "POST":
        return broken(f"'method' must be \"POST\", got {obj.get('method')!r}", cid)
    if obj.get("url") != endpoint:
        return broken(f"'url' must be the batch's endpoint {endpoint!r}, got {obj.get('url')!r}", cid)
    body = obj.get("body")
    if not isinstance(body, dict):
        return broken("'body' must be a JSON object", cid)
    if body.get("stream"):
        return broken("'body.stream' must be false: batch requests are not streamed", cid)
    return InputLine(lineno, cid, body)


def record_id(batch_id: str, lineno: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{lineno}"


def lineno_of(batch_id: str, rec_id: str) -> int:
    prefix = f"batch_req_{batch_id.removeprefix('batch_')}_"
    if not rec_id.startswith(prefix) or not rec_id[len(prefix):].isdigit():
        raise ValueError(f"record id {rec_id!r} does not belong to batch {batch_id}")
    return int(rec_id[len(prefix):])


class ResultFiles:
    """The output and error JSONL files of one batch. Not thread-safe: the runner serialises appends."""

    def __init__(self, batch_id: str, folder: Path, total: int):
        self.batch_id = batch_id
        self.total = total  # input lines (blank ones excluded)
        folder.mkdir(parents=True, exist_ok=True)
        self.output_path = folder / "output.jsonl"
        self.error_path = folder / "errors.jsonl"
        self.done: set[int] = set()  # line numbers with a record
        self.completed = self._recover(self.output_path)
        self.failed = self._recover(self.error_path)
        _fsync_dir(folder)

    def _recover(self, path: Path) -> int:
        """Read back finished records; cut the file after the last intact one. Returns how many there are."""
        if not path.exists():
            path.touch()
            return 0
        data = path.read_bytes()
        good_end, n = 0, 0
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break  # torn write: the record never finished
            try:
                lineno = lineno_of(self.batch_id, json.loads(raw)["id"])
            except (ValueError, KeyError, TypeError):
                break
            if lineno in self.done:
                raise RuntimeError(f"{path}: line {lineno} has two records; the result files are corrupt")
            self.done.add(lineno)
            good_end += len(raw)
            n += 1
        if good_end != len(data):
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return n

    def append(self, records: list[tuple[int, dict[str, Any], bool]]) -> None:
        """Append (lineno, record, ok) records and fsync; ok records go to the output file, others to errors."""
        lines = [ln for ln, _, _ in records]
        if len(set(lines)) != len(lines) or self.done.intersection(lines):
            raise RuntimeError(f"batch {self.batch_id}: a line would get a second record ({sorted(lines)})")
        out = b"".join(_line(r) for ln, r, ok in records if ok)
        err = b"".join(_line(r) for ln, r, ok in records if not ok)
        for path, data in ((self.output_path, out), (self.error_path, err)):
            if data:
                with open(path, "ab") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        for ln, _, ok in records:
            self.done.add(ln)
            if ok:
                self.completed += 1
            else:
                self.failed += 1


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
