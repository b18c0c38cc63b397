"""Instruction and chat data: Alpaca / Dolly records and multi-turn conversations, rendered and tokenized with an
assistant-only loss mask.

Record formats (one JSON object per line, or one JSON array of objects):

    alpaca    {"instruction", "input" (optional), "output"}            single turn
    dolly     {"instruction", "context" (optional), "response"}        single turn (context plays Alpaca's input)
    sharegpt  {"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]}
    messages  {"messages": [{"role": "user" | "assistant" | "system", "content"}, ...]}   (OpenAI / OpenAssistant)

Single-turn records are rendered with Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca train.py PROMPT_DICT:
the "with input" prompt when the input is non-empty, else the "no input" one); the prompt ends with
"### Response:" and the response is the target (Alpaca appends EOS to it).

Conversations are rendered with a `ChatTemplate` (default, Tulu / Zephyr style):

    <|system|>\n{system text}\n<|user|>\n{user text}\n<|assistant|>\n{assistant text}</s><|user|>\n...

Every turn is tokenized separately (role prefix, content, suffix) and the pieces concatenated, so the loss mask
falls on token boundaries: `targets_loss_mask` is 1 on each assistant turn's content, its `assistant_suffix` and
its EOS, and 0 on role prefixes, system and user turns. The sequence always ends with EOS (appended, mask 0, if the
last turn is not an assistant turn). Per-segment tokenization can differ from tokenizing the joined text (e.g.
SentencePiece's word-initial marker at each segment start); training and generation use the same segments.

Malformed records (invalid JSON, missing keys, unknown roles, non-string texts, empty conversations, no assistant
turn) are counted and reported with file and line (`ChatFileReport`); a file that is not UTF-8 is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

FORMATS = ("alpaca", "dolly", "sharegpt", "messages")
SINGLE_TURN_FORMATS = ("alpaca", "dolly")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:")

SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


class ChatDataError(ValueError):
    """A chat / instruction data file that cannot be used; the message names the file (and line)."""


class MalformedRecord(ValueError):
    """One record that does not fit its format (counted and reported, not fatal by default)."""


# ----------------------------------------------------------------------------------------------------------
# Templates.

@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Role markers of a rendered conversation (all plain text, tokenized with the task's vocabulary).

    Attributes:
      system_prefix / user_prefix / assistant_prefix: text before a turn's content (no loss).
      turn_suffix: text after a system or user turn (no loss).
      assistant_suffix: text after an assistant reply (loss), e.g. "<|end|>"; then EOS if `assistant_eos`.
      assistant_eos: end every assistant turn with the vocabulary's EOS id (loss): the model learns to stop.
    """

    system_prefix: str = "<|system|>\n"
    user_prefix: str = "<|user|>\n"
    assistant_prefix: str = "<|assistant|>\n"
    turn_suffix: str = "\n"
    assistant_suffix: str = ""
    assistant_eos: bool = True

    def prefix(self, role: str) -> str:
        return {"system": self.system_prefix, "user": self.user_prefix, "assistant": self.assistant_prefix}[role]

    def render(self, messages: Sequence[Mapping[str, str]], eos: str = "</s>") -> str:
        """The conversation as text (EOS shown as `eos`): what `tokenize_conversation` tokenizes, segment by
        segment."""
        out = []
        for m in messages:
            if m["role"] == "assistant":
                out.append(self.assistant_prefix + m["content"] + self.assistant_suffix +
                           (eos if self.assistant_eos else ""))
            else:
                out.append(self.prefix(m["role"]) + m["content"] + self.turn_suffix)
        text = "".join(out)
        return text if text.endswith(eos) else text + eos


DEFAULT_TEMPLATE = ChatTemplate()


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """Stanford Alpaca's prompt: the "with input" variant when `input_text` is non-empty."""
    if input_text != "":
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


# ----------------------------------------------------------------------------------------------------------
# Parsing records.

def _text(record: Mapping[str, Any], key: str, where: str = "", optional: bool = False) -> str:
    if key not in record or (optional and record[key] is None):
        if optional:
            return ""
        raise MalformedRecord(f"{where}missing key {key!r}")
    if not isinstance(record[key], str):
        raise MalformedRecord(f"{where}{key!r} is {type(record[key]).__name__}, not a string")
    return record[key]


def parse_single_turn(record: Any, fmt: str) -> dict[str, str]:
    """An alpaca / dolly record -> {"inputs": the Alpaca prompt, "targets": the response}."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"a {type(record).__name__}, not a JSON object")
    if fmt == "alpaca":
        instruction, extra, response = (_text(record, "instruction"), _text(record, "input", optional=True),
                                        _text(record, "output"))
    elif fmt == "dolly":
        instruction, extra, response = (_text(record, "instruction"), _text(record, "context", optional=True),
                                        _text(record, "response"))
    else:
        raise ValueError(f"format={fmt!r} is not a single-turn format {SINGLE_TURN_FORMATS}.")
    return {"inputs": alpaca_prompt(instruction, extra), "targets": response}


def parse_conversation(record: Any, fmt: str) -> list[dict[str, str]]:
    """A sharegpt / messages record -> [{"role": "system" | "user" | "assistant", "content": str}, ...]."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"a {type(record).__name__}, not a JSON object")
    if fmt == "sharegpt":
        list_key, role_key, text_key, roles = "conversations", "from", "value", SHAREGPT_ROLES
    elif fmt == "messages":
        list_key, role_key, text_key, roles = "messages", "role", "content", MESSAGE_ROLES
    else:
        raise ValueError(f"format={fmt!r} is not a conversation format ('sharegpt', 'messages').")
    if list_key not in record:
        raise MalformedRecord(f"missing key {list_key!r}")
    turns = record[list_key]
    if not isinstance(turns, list):
        raise MalformedRecord(f"{list_key!r} is {type(turns).__name__}, not a list")
    if not turns:
        raise MalformedRecord("empty conversation")
    messages = []
    for number, turn in enumerate(turns, 1):
        where = f"turn {number}: "
        if not isinstance(turn, dict):
            raise MalformedRecord(f"{where}a {type(turn).__name__}, not a JSON object")
        role = _text(turn, role_key, where)
        if role not in roles:
            raise MalformedRecord(f"{where}unknown role {role!r} (expected one of {', '.join(roles)})")
        messages.append({"role": roles[role], "content": _text(turn, text_key, where)})
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecord("no assistant turn (nothing to learn)")
    return messages


def parse_record(record: Any, fmt: str) -> Any:
    """Single-turn formats -> {"inputs", "targets"}; conversation formats -> a list of messages."""
    if fmt not in FORMATS:
        raise ValueError(f"format={fmt!r}: use one of {FORMATS}.")
    return parse_single_turn(record, fmt) if fmt in SINGLE_TURN_FORMATS else parse_conversation(record, fmt)


# ----------------------------------------------------------------------------------------------------------
# Tokenization with the loss mask.

def tokenize_conversation(messages: Sequence[Mapping[str, str]], vocabulary, template: ChatTemplate = DEFAULT_TEMPLATE
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [length] int32, loss mask [length] int32: 1 on assistant content / suffix / EOS).

    `vocabulary`: a seqio.Vocabulary (`encode(str) -> list[int]`, `eos_id`).
    """
    ids: list[int] = []
    mask: list[int] = []

    def add(text_or_ids, loss: int) -> None:
        piece = list(vocabulary.encode(text_or_ids)) if isinstance(text_or_ids, str) else list(text_or_ids)
        ids.extend(piece)
        mask.extend([loss] * len(piece))

    for m in messages:
        add(template.prefix(m["role"]), 0)
        if m["role"] == "assistant":
            add(m["content"], 1)
            if template.assistant_suffix:
                add(template.assistant_suffix, 1)
            if template.assistant_eos:
                add([vocabulary.eos_id], 1)
        else:
            add(m["content"], 0)
            if template.turn_suffix:
                add(template.turn_suffix, 0)
    if not ids or ids[-1] != vocabulary.eos_id:
        add([vocabulary.eos_id], 0)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


# ----------------------------------------------------------------------------------------------------------
# Files.

@dataclasses.dataclass
class ChatFileReport:
    """What reading one file found: the number of records and the malformed ones as (line, reason)."""

    path: str
    num_records: int = 0
    malformed: list[tuple[int, str]] = dataclasses.field(default_factory=list)
    in_memory: bool = False  # numbers are 1-based record positions, not file lines

    @property
    def num_malformed(self) -> int:
        return len(self.malformed)

    def summary(self, max_shown: int = 5) -> str:
        sep = " record " if self.in_memory else ":"
        shown = "; ".join(f"{self.path}{sep}{line}: {reason}" for line, reason in self.malformed[:max_shown])
        more = f"; and {self.num_malformed - max_shown} more" if self.num_malformed > max_shown else ""
        return (f"{self.path}: {self.num_malformed} of {self.num_records} records malformed and skipped: "
                f"{shown}{more}")


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise ChatDataError(f"{path}: no such data file.")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ChatDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode it as UTF-8 "
                            "(e.g. `iconv -f latin1 -t utf-8`).") from None


def iter_json_records(path: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object or MalformedRecord) for a JSON-lines file or a JSON array of objects.

    An invalid line of a JSON-lines file is one malformed record; an invalid JSON array is a ChatDataError
    (nothing after the error can be located).
    """
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] != "[":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    yield number, MalformedRecord(f"invalid JSON ({e.msg}, column {e.colno})")
        return
    decoder = json.JSONDecoder()
    pos, line, counted = start + 1, 1, 0

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}).") from None
        yield line, obj
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            line += text.count("\n", counted, min(pos, len(text)))
            raise ChatDataError(f"{path}:{line}: expected ',' or ']' between the records of the JSON array.")


def read_records(path: str, fmt: str) -> tuple[list[Any], ChatFileReport]:
    """The parsed records of one file (see `parse_record`) and the report of the malformed ones."""
    report = ChatFileReport(path)
    parsed = []
    for line, obj in iter_json_records(path):
        report.num_records += 1
        try:
            if isinstance(obj, MalformedRecord):
                raise obj
            parsed.append(parse_record(obj, fmt))
        except MalformedRecord as e:
            report.malformed.append((line, str(e)))
    return parsed, report


def parse_records(records: Sequence[Any], fmt: str, label: str = "<records>") -> tuple[list[Any], ChatFileReport]:
    """Like read_records for in-memory records; 'lines' are 1-based record positions."""
    report = ChatFileReport(label, num_records=len(records), in_memory=True)
    parsed = []
    for number, record in enumerate(records, 1):
        try:
            parsed.append(parse_record(record, fmt))
        except MalformedRecord as e:
            report.malformed.append((number, str(e)))
    return parsed, report
