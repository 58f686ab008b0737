"""OpenAssistant (oasst1) message rows → conversation trees: the instruction reader takes the best-ranked path of
each tree (`read_oasst`), the preference reader the ranked sibling replies (preference.py).

A row: message_id, parent_id (None at a tree's root), role (prompter | assistant), text, and optionally lang,
rank (0 = best), deleted, message_tree_id. Deleted messages, and so their replies, are left out.
"""

from __future__ import annotations

from collections.abc import Iterator

from .normalise import validate
from .records import OASST_FIELDS, Conversation, DataSummary, Example, RowError, SourceSpec, report_bad
from .rows import Unparsable


def oasst_trees(rows: list[tuple[str, dict]], lang: str | None = None) -> dict[str, dict]:
    """Message rows → {tree id: {"root": row, "children": {message_id: [child rows]}}}.

    Deleted messages (and so their replies) are left out; with `lang`, only trees whose root has that language.
    """
    trees: dict[str, dict] = {}
    by_parent: dict[str, list[dict]] = {}
    for _, r in rows:
        if r.get("deleted"):
            continue
        if r.get("parent_id") is None:
            if lang is None or r.get("lang") == lang:
                tid = str(r.get("message_tree_id") or r["message_id"])
                trees[tid] = {"root": r, "children": by_parent}
        else:
            by_parent.setdefault(r["parent_id"], []).append(r)
    return trees


def oasst_best_path(tree: dict) -> Conversation:
    """The conversation from the root following the best-ranked reply (rank 0; unranked last) at every step."""
    msgs, node = [], tree["root"]
    while node is not None:
        msgs.append({"role": oasst_role(node), "content": node["text"] or ""})
        kids = tree["children"].get(node["message_id"], [])
        node = min(kids, key=_rank) if kids else None
    return msgs


def oasst_role(r: dict) -> str:
    """A message row's role in the message schema (prompter → user); RowError for any other."""
    role = {"prompter": "user", "assistant": "assistant"}.get(r.get("role"))
    if role is None:
        raise RowError(f"oasst role {r.get('role')!r}, expected prompter or assistant")
    return role


def oasst_valid_trees(spec: SourceSpec, rows: Iterator, summary: DataSummary, on_error: str) -> dict:
    """oasst message rows → {tree id: tree}; bad rows reported (file:line) and skipped or fatal per `on_error`."""
    good = []
    for where, r in rows:
        reason = _row_problem(r)
        if reason:
            report_bad(spec.path, where, reason, summary, on_error)
        else:
            good.append((where, r))
    trees = oasst_trees(good, spec.lang)
    summary.stats(spec.path).read = len(trees)
    return trees


def read_oasst(spec: SourceSpec, rows: Iterator, summary: DataSummary, on_error: str) -> list[Example]:
    """One example per tree (its best path), grouped by tree so a tree never straddles the split."""
    out = []
    for tid, tree in oasst_valid_trees(spec, rows, summary, on_error).items():
        where = f"{spec.path}: tree {tid}"
        try:
            out.append(Example(validate(oasst_best_path(tree)), spec.path, where, group=tid))
        except RowError as e:
            report_bad(spec.path, where, str(e), summary, on_error)
    return out


def _rank(r: dict) -> tuple[float, str]:
    rank = r.get("rank")
    return (float(rank) if rank is not None else float("inf"), str(r["message_id"]))


def _row_problem(r) -> str | None:
    if isinstance(r, Unparsable):
        return r.reason
    if not isinstance(r, dict) or not OASST_FIELDS <= set(r):
        return "not an oasst message row (needs message_id, parent_id, role, text)"
    if r["role"] not in ("prompter", "assistant"):
        return f"oasst role {r['role']!r}, expected prompter or assistant"
    if not isinstance(r["text"], str):
        return "text is not a string"
    return None
