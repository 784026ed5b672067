"""Streaming read of chat JSONL and the structural parse of one line into flat per-example columns.

Nothing here decides what passes: each line becomes a row of plain facts (is it UTF-8, is it JSON,
how many messages miss a key, the last role...) that the Great Expectations suite judges, plus a
short human detail per anomaly so the report can say *what* is wrong at that line. A column is None
when its fact could not be established because an earlier stage failed (no JSON, no message facts);
GX skips nulls, so one bad line is reported once, at the first stage it fails.

Memory stays bounded whatever the input: lines are read with a byte cap, and a longer line is
skipped in chunks without ever being held (or parsed) whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from phitune.digest import file_sha256

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "name", "weight")
"""Keys a message may have: OpenAI's chat fine-tuning format. `name` and `weight` are accepted for
compatibility with files written for it; the chat template decides whether `name` is rendered."""

_SKIP_CHUNK = 1 << 20
BLANK_SHOWN = 10
_BOM = b"\xef\xbb\xbf"
_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}


def json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


@dataclass
class FileRead:
    """What streaming a file yields besides its lines: checksum, line count and blank lines."""

    sha256: Any = field(default_factory=hashlib.sha256)
    lines: int = 0
    blank_lines: int = 0
    first_blank_lines: list[int] = field(default_factory=list)  # at most BLANK_SHOWN

    def blank(self, number: int) -> None:
        self.blank_lines += 1
        if len(self.first_blank_lines) < BLANK_SHOWN:
            self.first_blank_lines.append(number)


def iter_lines(
    fh: BinaryIO, cap: int, state: FileRead, on_bytes: Callable[[int], None] | None = None
) -> Iterator[tuple[int, bytes | None, int]]:
    """Yield (1-based line number, line bytes without the newline or None when over `cap`, size in bytes).

    Blank lines are counted in `state` and not yielded. A line over the cap is consumed in
    1 MiB chunks (hashed, never kept), so a 100 MB line costs 1 MiB of memory.
    """
    number = 0
    while chunk := fh.readline(cap + 1):
        number += 1
        state.sha256.update(chunk)
        size = len(chunk)
        if chunk.endswith(b"\n") or size <= cap:
            if on_bytes:
                on_bytes(size)
            data = chunk.rstrip(b"\r\n")
            if number == 1 and data.startswith(_BOM):
                data = data[len(_BOM):]
            if not data.strip():
                state.blank(number)
                continue
            yield number, data, len(data)
            continue
        while not chunk.endswith(b"\n"):
            chunk = fh.readline(_SKIP_CHUNK)
            if not chunk:
                break
            state.sha256.update(chunk)
            size += len(chunk)
        if on_bytes:
            on_bytes(size)
        yield number, None, size - chunk.endswith(b"\n")
    state.lines = number


@dataclass
class Parsed:
    """Per-example facts (column name -> value), details per error code, and the messages when renderable."""

    columns: dict[str, Any]
    details: dict[str, str]
    messages: list[dict[str, Any]] | None = None


def _where(indices: list[int]) -> str:
    """'message 2' or 'messages 2, 5 and 7' (1-based)."""
    if len(indices) == 1:
        return f"message {indices[0]}"
    shown = [str(i) for i in indices[:5]]
    more = f" and {len(indices) - 5} more" if len(indices) > 5 else ""
    return f"messages {', '.join(shown)}{more}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_line(data: bytes) -> Parsed:
    """Decode and structurally inspect one non-blank line; never raises."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = data[exc.start : exc.start + 1].hex()
        return Parsed({"utf8": False}, {"invalid_encoding": f"not UTF-8: byte 0x{bad} at byte {exc.start + 1} of the line"})
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so is a 5000-digit int
        reason = exc.msg + f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else str(exc) or type(exc).__name__
        return Parsed({"utf8": True, "json": False}, {"invalid_json": f"not valid JSON: {reason}"})
    columns: dict[str, Any] = {"utf8": True, "json": True, "kind": json_type(obj)}
    if not isinstance(obj, dict):
        return Parsed(columns, {"data_type": f"the line is a JSON {columns['kind']}, not an object with a 'messages' list"})
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        columns["messages_list"] = False
        if "messages" not in obj:
            why = "no 'messages' key" + (f" (keys: {', '.join(sorted(map(str, obj))[:5])})" if obj else "")
        elif isinstance(messages, list):
            why = "'messages' is an empty list"
        else:
            why = f"'messages' is a JSON {json_type(messages)}, not a list"
        return Parsed(columns, {"missing_messages_list": why})
    columns["messages_list"] = True
    return _inspect_messages(messages, columns, surrogates=b"\\ud" in data or b"\\uD" in data)


def _inspect_messages(messages: list[Any], columns: dict[str, Any], surrogates: bool) -> Parsed:
    counts = dict.fromkeys(ROLES, 0)
    for m in messages:  # the common case, checked cheaply: {"role": <known>, "content": <non-blank text>}
        if type(m) is not dict or len(m) != 2 or surrogates:
            break
        role, content = m.get("role"), m.get("content")
        if type(role) is not str or role not in counts or type(content) is not str or not content or content.isspace():
            break
        counts[role] += 1
    else:
        last_role = messages[-1]["role"] if counts["assistant"] else None
        columns.update(messages=len(messages), **counts, **_CLEAN, last_role=last_role)
        return Parsed(columns, {}, messages if last_role == "assistant" else None)
    return _diagnose_messages(messages, columns, surrogates)


_CLEAN = {"bad_messages": 0, "missing_keys": 0, "unrecognized_keys": 0, "unrecognized_roles": 0, "missing_content": 0}


def _diagnose_messages(messages: list[Any], columns: dict[str, Any], surrogates: bool) -> Parsed:
    """The slow path: every problem of every message, with details for the report."""
    not_objects: list[int] = []
    missing: list[tuple[int, str]] = []
    unknown_keys: list[tuple[int, str]] = []
    unknown_roles: list[tuple[int, Any]] = []
    no_content: list[tuple[int, str]] = []
    bad_text: list[int] = []
    counts = dict.fromkeys(ROLES, 0)
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            not_objects.append(i)
            continue
        absent = [k for k in ("role", "content") if k not in m]
        if absent:
            missing.append((i, "' and '".join(absent)))
        extra = [k for k in m if k not in MESSAGE_KEYS]
        if extra:
            unknown_keys.append((i, extra[0]))
        role = m.get("role")
        if isinstance(role, str) and role in counts:
            counts[role] += 1
        elif "role" in m:
            unknown_roles.append((i, role))
        if "content" in m:
            content = m["content"]
            if not isinstance(content, str):
                no_content.append((i, f"is a JSON {json_type(content)}, not a string"))
            elif not content.strip():
                no_content.append((i, "is empty" if not content else "is whitespace only"))
            elif surrogates and not _encodable(content):
                bad_text.append(i)
    details: dict[str, str] = {}
    if not_objects:
        details["data_type"] = f"{_where(not_objects)}: not a JSON object with role and content"
    if missing:
        i, key = missing[0]
        details["message_missing_key"] = f"{_where([i for i, _ in missing])}: no '{key}'" + ("" if len(missing) == 1 else f" (message {i})")
    if unknown_keys:
        details["message_unrecognized_key"] = (
            f"{_where([i for i, _ in unknown_keys])}: unrecognized key {_short(unknown_keys[0][1])} (allowed: {', '.join(MESSAGE_KEYS)})"
        )
    if unknown_roles:
        details["unrecognized_role"] = (
            f"{_where([i for i, _ in unknown_roles])}: role {_short(unknown_roles[0][1])} is not one of {', '.join(ROLES)}"
        )
    if no_content:
        details["missing_content"] = f"{_where([i for i, _ in no_content])}: content {no_content[0][1]}"
    if bad_text:
        details["invalid_encoding"] = f"{_where(bad_text)}: content has a lone surrogate escape (\\ud800-\\udfff), not valid Unicode"
    last = messages[-1]
    columns.update(
        messages=len(messages),
        **counts,
        bad_messages=len(not_objects),
        missing_keys=len(missing),
        unrecognized_keys=len(unknown_keys),
        unrecognized_roles=len(unknown_roles),
        missing_content=len(no_content),
        # Only meaningful when there is an assistant turn at all (otherwise that is the error to report).
        last_role=_role_name(last.get("role")) if isinstance(last, dict) and counts["assistant"] else None,
    )
    if bad_text:
        columns["utf8"] = False
    renderable = not details and columns["last_role"] == "assistant"
    return Parsed(columns, details, messages if renderable else None)


def _role_name(role: Any) -> str:
    return role if isinstance(role, str) else _short(role)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def data_digest(*paths: Path | str) -> str:
    """The stable id of a dataset: sha256 over each file's sha256, in order (train, then validation).

    Per-file digests rather than one hash of the concatenation: moving an example from the training
    file to the validation file changes the data, and must change the id.
    """
    return hashlib.sha256("\n".join(file_sha256(p) for p in paths).encode("ascii")).hexdigest()
