"""Instruction rows of every one-row-per-example format → one validated conversation (records.Conversation).

Formats, detected from the fields of a row (`detect_format`) or forced with `SourceSpec(format=...)`:

    alpaca             instruction, input, output
    dolly              instruction, context, response, category
    oasst              oasst1 message rows: message_id, parent_id, role, text, ... (whole trees: oasst.py)
    sharegpt           conversations: [{from: human|gpt|system, value}]
    messages           OpenAI chat: messages: [{role, content}]
    prompt_completion  prompt, completion

`as_messages` reads the looser forms of the preference and unpaired rows (a string, or a list of messages).
"""

from __future__ import annotations

from ..errors import DataError
from .records import FORMATS, OASST_FIELDS, ROLES, Conversation, RowError
from .rows import Unparsable

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}


def detect_format(row: dict, where: str = "row") -> str:
    """The format of a row, from its field names; DataError naming the fields when none fits."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    if OASST_FIELDS <= keys:
        return "oasst"
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "response"} <= keys:
        return "dolly"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise DataError(f"{where}: cannot tell the instruction format from the fields ({', '.join(map(str, row))}); "
                    f"expected one of {', '.join(FORMATS)} (see `lmlab finetune --help`)")


def row_to_messages(row: dict, fmt: str) -> Conversation:
    """One row of a single-row format as a validated conversation; RowError(reason) when it is bad."""
    if isinstance(row, Unparsable):
        raise RowError(row.reason)
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if fmt == "alpaca":
        prompt = _join(_text(row, "instruction"), _text(row, "input", optional=True))
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output")}]
    elif fmt == "dolly":
        prompt = _join(_text(row, "instruction"), _text(row, "context", optional=True))
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "response")}]
    elif fmt == "prompt_completion":
        msgs = [{"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "completion")}]
    elif fmt == "sharegpt":
        msgs = [_sharegpt_turn(t) for t in _list(row, "conversations")]
    elif fmt == "messages":
        msgs = [_openai_turn(t) for t in _list(row, "messages")]
    else:
        raise RowError(f"format {fmt!r} is not a one-row-per-example format")
    return validate(msgs)


def validate(messages: Conversation) -> Conversation:
    """Check and tidy a conversation: contents stripped, trailing non-assistant turns removed, an optional
    system message first, then user/assistant alternating from a user turn. RowError(reason) otherwise."""
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    while msgs and msgs[-1]["role"] != "assistant":
        msgs.pop()
    body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not body:
        raise RowError("no assistant reply")
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise RowError(f"turn {i + 1} is {m['role']}, expected {want} (roles must alternate)")
        if not m["content"]:
            raise RowError("empty prompt" if want == "user" else "empty response")
    if msgs[0]["role"] == "system" and not msgs[0]["content"]:
        msgs = msgs[1:]
    return msgs


def as_messages(v, role: str) -> Conversation:
    """A string (one turn of `role`) or a list of {role, content} messages as a conversation, not yet validated;
    RowError otherwise."""
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                   and m.get("role") in ROLES for m in v):
        return [{"role": m["role"], "content": m["content"]} for m in v]
    raise RowError(f"expected a string or a list of {{role, content}} messages, got {type(v).__name__}")


def _text(row: dict, key: str, optional: bool = False) -> str:
    v = row.get(key)
    if v is None and optional:
        return ""
    if v is None:
        raise RowError(f"missing field '{key}'")
    if not isinstance(v, str):
        raise RowError(f"field '{key}' is {type(v).__name__}, expected a string")
    return v.strip()


def _join(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra and instruction else instruction or extra


def _list(row: dict, key: str) -> list:
    v = row.get(key)
    if not isinstance(v, list):
        raise RowError(f"field '{key}' is {type(v).__name__}, expected a list of turns")
    return v


def _sharegpt_turn(t) -> dict[str, str]:
    if not isinstance(t, dict) or "from" not in t or "value" not in t:
        raise RowError("a turn without 'from' and 'value'")
    role = SHAREGPT_ROLES.get(str(t["from"]).lower())
    if role is None:
        raise RowError(f"unknown speaker {t['from']!r} (expected human, gpt or system)")
    if not isinstance(t["value"], str):
        raise RowError(f"turn 'value' is {type(t['value']).__name__}, expected a string")
    return {"role": role, "content": t["value"]}


def _openai_turn(t) -> dict[str, str]:
    if not isinstance(t, dict) or "role" not in t or "content" not in t:
        raise RowError("a message without 'role' and 'content'")
    if t["role"] not in ROLES:
        raise RowError(f"unknown role {t['role']!r} (expected {', '.join(ROLES)})")
    if not isinstance(t["content"], str):
        raise RowError(f"message content is {type(t['content']).__name__}, expected a string")
    return {"role": t["role"], "content": t["content"]}
