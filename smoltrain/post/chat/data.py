"""Conversations out of jsonl, jsonl.gz and parquet files and dataset folders, checked row by row, errors naming file:line.

Rows hold `messages` ([{"role", "content"}]) and optional `chat_template_kwargs` as Hugging Face's
smoltalk2 stores them, or `prompt` / `completion` (a string or a list of messages each). A None
where text belongs is refused, never read as "absent": a `custom_instructions` that became None is
how SmolLM3's SFT lost every system prompt to the default one.
"""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from smoltrain.data.readers import dataset_rows, expand_inputs, input_kind, json_list_rows
from smoltrain.errors import DataError
from smoltrain.files import BadLine, jsonl_rows, write_atomic
from smoltrain.post.chat.template import TEMPLATE_KWARGS

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    messages: list[dict]  # {"role", "content"} only, content a string
    kwargs: dict = field(default_factory=dict)  # chat_template_kwargs, None values dropped
    source: str = ""  # the file's first dotted name part ("arithmetic" for arithmetic.train.jsonl.gz)
    where: str = ""  # "file:line" for messages that name the row

    def to_row(self) -> dict:
        row = {"messages": self.messages}
        if self.kwargs:
            row["chat_template_kwargs"] = self.kwargs
        return row


def _strip_flags(text: str) -> str:
    return text.replace("/no_think", "").replace("/think", "").strip()


def system_prompt(conv: Conversation) -> str | None:
    """The custom instructions the template must render: the system message without its flags, else
    `custom_instructions`; None when the conversation has none (the template's default prompt)."""
    if conv.messages[0]["role"] == "system":
        text = _strip_flags(conv.messages[0]["content"])
        if text:
            return text
    text = conv.kwargs.get("custom_instructions")
    return text.strip() or None if isinstance(text, str) else None


def assistant_modes(conv: Conversation) -> list[str]:
    """"think" or "no_think" for each assistant turn, by the smollm3 template's rules: the system
    message's flag, else enable_thinking (default think); a user message ending with a flag switches."""
    mode = "think" if conv.kwargs.get("enable_thinking", True) else "no_think"
    modes = []
    for i, message in enumerate(conv.messages):
        content = message["content"]
        if message["role"] == "system" and i == 0:
            if "/no_think" in content:
                mode = "no_think"
            elif "/think" in content:
                mode = "think"
        elif message["role"] == "user":
            stripped = content.rstrip()
            if stripped.endswith("/no_think"):
                mode = "no_think"
            elif stripped.endswith("/think"):
                mode = "think"
        elif message["role"] == "assistant":
            modes.append(mode)
    return modes


def conversation_mode(conv: Conversation) -> str:
    """"think", "no_think" or "mixed" (a chat that switches mode)."""
    modes = set(assistant_modes(conv))
    return modes.pop() if len(modes) == 1 else "mixed"


# ----------------------------------------------------------------------------- checking one row


class BadRow(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def _message_list(value, key: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user" if key == "prompt" else "assistant", "content": value}]
    if value is None:
        raise BadRow("none_content", f"'{key}' is None")
    if not isinstance(value, list):
        raise BadRow("not_messages", f"'{key}' is {type(value).__name__}, expected a string or a list of messages")
    return value


def _check_messages(raw, need_assistant: bool = True) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise BadRow("no_messages", "'messages' is empty" if isinstance(raw, list) else
                     f"'messages' is {type(raw).__name__}, expected a list of messages")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRow("not_messages", f"message {i} is {type(message).__name__}, expected an object")
        role = message.get("role")
        if role not in ROLES:
            raise BadRow("unknown_role", f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = message.get("content")
        if content is None:
            if role == "system":
                raise BadRow("none_system_prompt", "message 0 is a system prompt whose content is None "
                             "(it would render as the default prompt: the SmolLM3 SFT bug)")
            raise BadRow("none_content", f"message {i} ({role}) has content None")
        if not isinstance(content, str):
            raise BadRow("not_string", f"message {i} ({role}) content is {type(content).__name__}, not a string")
        if role == "system" and i != 0:
            raise BadRow("misplaced_system", f"message {i} is a system message; only the first message may be one")
        messages.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no_assistant", "no assistant turn (nothing to train on)")
    return messages


def _check_kwargs(raw) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRow("bad_kwargs", f"'chat_template_kwargs' is {type(raw).__name__}, expected an object")
    kwargs = {}
    for key, value in raw.items():
        if key not in TEMPLATE_KWARGS:
            raise BadRow("bad_kwargs", f"chat_template_kwargs has unknown key {key!r} (expected {', '.join(TEMPLATE_KWARGS)})")
        if key == "custom_instructions":
            if value is None:
                raise BadRow("none_system_prompt", "chat_template_kwargs.custom_instructions is None (it would render "
                             "as the default prompt: the SmolLM3 SFT bug)")
            if not isinstance(value, str):
                raise BadRow("bad_kwargs", f"custom_instructions is {type(value).__name__}, not a string")
        elif value is None:  # a parquet struct column fills absent fields with None
            continue
        elif key == "enable_thinking" and not isinstance(value, bool):
            raise BadRow("bad_kwargs", f"enable_thinking is {type(value).__name__}, not true/false")
        elif key in ("xml_tools", "python_tools") and not isinstance(value, list):
            raise BadRow("bad_kwargs", f"{key} is {type(value).__name__}, expected a list")
        kwargs[key] = value
    return kwargs


def conversation_from_row(row, source: str = "", where: str = "") -> Conversation:
    """A checked Conversation, or BadRow naming what is wrong."""
    if not isinstance(row, dict):
        raise BadRow("not_object", f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
    elif "prompt" in row or "completion" in row:
        if "prompt" not in row or "completion" not in row:
            missing = "completion" if "prompt" in row else "prompt"
            raise BadRow("no_messages", f"a prompt/completion row without '{missing}'")
        messages = _message_list(row["prompt"], "prompt") + _message_list(row["completion"], "completion")
    else:
        keys = ", ".join(list(row)[:8]) or "none"
        raise BadRow("no_messages", f"no 'messages' (nor 'prompt' and 'completion'); keys: {keys}")
    return Conversation(_check_messages(messages), _check_kwargs(row.get("chat_template_kwargs")), source, where)


def prompt_from_row(row, where: str = "") -> Conversation:
    """A conversation to continue (`messages` or `prompt`): checked like training rows, but it needs
    no assistant turn and must not end with one."""
    if not isinstance(row, dict):
        raise BadRow("not_object", f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _check_messages(row["messages"], need_assistant=False)
    elif "prompt" in row:
        messages = _check_messages(_message_list(row["prompt"], "prompt"), need_assistant=False)
    else:
        keys = ", ".join(list(row)[:8]) or "none"
        raise BadRow("no_messages", f"no 'messages' (nor 'prompt'); keys: {keys}")
    if messages[-1]["role"] == "assistant":
        raise BadRow("ends_with_assistant", "the last message is an assistant turn; nothing is left to generate")
    return Conversation(messages, _check_kwargs(row.get("chat_template_kwargs")), "", where)


# ----------------------------------------------------------------------------- files


def source_of(path: Path) -> str:
    return path.name.split(".")[0]


class ConversationReader:
    """The conversations of one file; bad rows raise DataError at file:line, or are counted (skip_bad)."""

    def __init__(self, path: str | os.PathLike, skip_bad: bool = False, split: str | None = None):
        self.path = Path(path)
        self.skip_bad = skip_bad
        self.split = split  # of a dataset folder
        self.kind = input_kind(self.path)
        if self.kind == "text":
            raise DataError(f"{self.path}: chat data must be .jsonl, .jsonl.gz, .json (a list of rows), .parquet or a dataset folder")
        self.source = source_of(self.path)
        self.skipped: Counter[str] = Counter()
        self.read = 0

    def _row(self, row, where: str) -> Conversation | None:
        try:
            return conversation_from_row(row, self.source, f"{self.path}:{where}")
        except BadRow as bad:
            if not self.skip_bad:
                raise DataError(f"{self.path}:{where}: {bad}") from None
            self.skipped[bad.kind] += 1
            return None

    def __iter__(self) -> Iterator[Conversation]:
        rows = {"jsonl": self._jsonl, "json": self._json, "parquet": self._parquet, "dataset": self._dataset}[self.kind]()
        for conv in rows:
            if conv is not None:
                self.read += 1
                yield conv
        if self.read == 0:
            skipped = f" ({sum(self.skipped.values())} bad rows skipped)" if self.skipped else ""
            if not self.skip_bad:
                raise DataError(f"{self.path}: no conversations{skipped}")
            self.skipped["empty_file"] += 1  # a counted skip, as `data tokenize --skip-bad` counts it

    def _jsonl(self) -> Iterator[Conversation | None]:
        for line_no, row in jsonl_rows(self.path):
            if isinstance(row, BadLine):
                yield self._bad_line(line_no, row.reason, row.kind)
            else:
                yield self._row(row, str(line_no))

    def _json(self) -> Iterator[Conversation | None]:
        for where, row in json_list_rows(self.path):
            yield self._row(row, where)

    def _bad_line(self, line_no: int, reason: str, kind: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{self.path}:{line_no}: {reason}")
        self.skipped[kind] += 1

    def _dataset(self) -> Iterator[Conversation | None]:
        for row_no, row in enumerate(dataset_rows(self.path, self.split), start=1):
            yield self._row(row, f"row {row_no}")

    def _parquet(self) -> Iterator[Conversation | None]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(self.path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{self.path}: not a readable parquet file ({e})") from None
        columns = parquet.schema_arrow.names
        wanted = [c for c in ("messages", "prompt", "completion", "chat_template_kwargs") if c in columns]
        if "messages" not in wanted and not {"prompt", "completion"} <= set(wanted):
            raise DataError(f"{self.path}: no 'messages' column (nor 'prompt' and 'completion'); columns: {', '.join(columns)}")
        row_no = 0
        try:
            for batch in parquet.iter_batches(batch_size=1024, columns=wanted):
                for row in batch.to_pylist():
                    row_no += 1
                    yield self._row(row, f"row {row_no}")
        except pa.ArrowException as e:
            raise DataError(f"{self.path}: unreadable after row {row_no} ({e})") from None


@dataclass
class ChatData:
    conversations: list[Conversation]
    skipped: Counter
    files: list[str]


def read_conversations(inputs: list[str], skip_bad: bool = False, split: str | None = None) -> ChatData:
    """Every conversation of every file the patterns match, in file order (`split` of dataset folders)."""
    conversations, skipped, files = [], Counter(), expand_inputs(inputs)
    for path in files:
        reader = ConversationReader(path, skip_bad, split)
        conversations.extend(reader)
        skipped.update(reader.skipped)
    if not conversations:
        counts = ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items()))
        raise DataError(f"no conversations in {', '.join(map(str, files))} (skipped {counts})")
    return ChatData(conversations, skipped, [str(f) for f in files])


def write_conversations(path: str | os.PathLike, conversations: list[Conversation | dict]) -> Path:
    """jsonl or jsonl.gz (by the name), written atomically."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(c.to_row() if isinstance(c, Conversation) else c, ensure_ascii=False) + "\n"
                    for c in conversations).encode("utf-8")
    if not out.name.endswith(".gz"):
        return write_atomic(out, lines)

    def write_gzip(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5, mtime=0) as gz:
            gz.write(lines)

    return write_atomic(out, write_gzip)


__all__ = [
    "ROLES",
    "BadRow",
    "ChatData",
    "Conversation",
    "ConversationReader",
    "assistant_modes",
    "conversation_from_row",
    "conversation_mode",
    "prompt_from_row",
    "read_conversations",
    "system_prompt",
    "write_conversations",
]
