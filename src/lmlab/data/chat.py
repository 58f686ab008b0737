"""Chat templates → token ids + loss labels, and leak-free packing of encoded conversations.

    fmt = ChatFormat(tokenizer, "auto")                # the tokenizer's own chat_template, else "plain"
    enc = fmt.encode(messages)                         # Encoded(input_ids, labels): two lists of equal length
    ids = fmt.prompt_ids(messages[:-1])                # for generation: ends with the assistant header
    rows = pack(encoded, seq_len=512, pad_id=tokenizer.eos_token_id)   # (n_rows, seq_len) tensors

Labels follow the Hugging Face convention: aligned with input_ids (the loss shifts them inside), -100 where
no loss is taken. By default only assistant turns are targets: the reply, and the end-of-turn token that
follows it (so the model learns to stop), never the headers. A conversation is rendered to one string and
tokenized as a whole (`add_special_tokens=False`, so no double BOS), exactly as `apply_chat_template` does at
inference; the labels come from the character spans of the targets through the tokenizer's offsets.

Templates (the end-of-turn token in brackets):

    plain      System: …\\nUser: …\\nAssistant: …<eos>\\n            [the tokenizer's eos]   (default without one)
    chatml     <|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n…<|im_end|>\\n   [<|im_end|>]
    llama3     <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n…<|eot_id|>…   [<|eot_id|>]
    tokenizer  the tokenizer's `chat_template`; targets found by rendering each prefix of the conversation

A BOS is put first only when the tokenizer would add one itself when encoding and the text lacks it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..errors import ConfigError, DataError
from ..fsutil import first_line
from .records import Conversation, DataSummary
from .tokenizer import clean_backend

IGNORE = -100
TRAIN_ON = ("assistant", "all")
OVERLONG = ("truncate", "drop")


@dataclass(frozen=True)
class Template:
    """A built-in template: each turn is `before + content + after`; for assistant turns `header` is the prompt
    side and `prefix + content + end` the target; `sep` follows an assistant turn outside the loss.
    "{eos}" stands for the tokenizer's eos token."""

    name: str
    system: tuple[str, str]
    user: tuple[str, str]
    header: str
    prefix: str = ""
    end: str = "{eos}"
    sep: str = ""
    bos: str = ""
    special: tuple[str, ...] = ()  # tokens the template needs in the vocabulary, as single special tokens


TEMPLATES = {
    "plain": Template("plain", ("System: ", "\n"), ("User: ", "\n"), "Assistant:", prefix=" ", sep="\n"),
    "chatml": Template("chatml", ("<|im_start|>system\n", "<|im_end|>\n"), ("<|im_start|>user\n", "<|im_end|>\n"),
                       "<|im_start|>assistant\n", end="<|im_end|>", sep="\n", special=("<|im_start|>", "<|im_end|>")),
    "llama3": Template("llama3", ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
                       ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                       "<|start_header_id|>assistant<|end_header_id|>\n\n", end="<|eot_id|>", bos="<|begin_of_text|>",
                       special=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
}
TEMPLATE_NAMES = ("auto", "tokenizer", *TEMPLATES)


@dataclass
class Encoded:
    """One tokenized conversation; `labels[i]` is `input_ids[i]` where it is a target, else -100."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_targets(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def add_template_tokens(tokenizer: PreTrainedTokenizerBase, template: str) -> list[str]:
    """Add the special tokens a built-in template needs and the tokenizer lacks; returns those added (the model's
    embeddings must then be resized to `len(tokenizer)`)."""
    t = TEMPLATES.get(template)
    if t is None:
        return []
    vocab = tokenizer.get_vocab()
    missing = [s for s in t.special if s not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def builtin_of(tokenizer: PreTrainedTokenizerBase, system: str | None = None) -> str | None:
    """The built-in template whose `inference_template` (with this default system prompt) is the tokenizer's
    chat_template, i.e. one lmlab wrote into a fine-tuned run's tokenizer; None for any other template."""
    own = getattr(tokenizer, "chat_template", None)
    if not isinstance(own, str):
        return None
    vocab = tokenizer.get_vocab()
    for name, t in TEMPLATES.items():
        if not all(s in vocab for s in t.special):
            continue
        try:
            if ChatFormat(tokenizer, name, system=system).inference_template() == own:
                return name
        except DataError:  # a template this tokenizer cannot serve (no single end-of-turn token)
            continue
    return None


class ChatFormat:
    """A tokenizer bound to a chat template: renders, encodes with labels, and describes itself for export.

    `template`: "auto" (the tokenizer's chat_template if it has one, else "plain"; a chat_template lmlab wrote for
    a built-in template, as a fine-tuned run's tokenizer carries, counts as that built-in, so a resumed or
    re-evaluated run encodes exactly as it trained), "tokenizer", "plain", "chatml", "llama3". `system`: a default
    system prompt for conversations without one. `train_on`: "assistant" (default) or "all" (every token is a
    target).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = "auto", *, system: str | None = None,
                 train_on: str = "assistant"):
        if template not in TEMPLATE_NAMES:
            raise ConfigError(f"chat template {template!r}; allowed: {', '.join(TEMPLATE_NAMES)}")
        if train_on not in TRAIN_ON:
            raise ConfigError(f"finetune.train_on={train_on!r}; allowed: {', '.join(TRAIN_ON)}")
        if template == "auto":
            own = getattr(tokenizer, "chat_template", None)
            template = (builtin_of(tokenizer, system) or "tokenizer") if own else "plain"
        if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"tokenizer '{tokenizer.name_or_path}' has no chat_template; "
                              f"choose one of {', '.join(TEMPLATES)} (finetune.template=NAME, or --template NAME)")
        self.tokenizer, self.name, self.system, self.train_on = tokenizer, template, system, train_on
        self.added_tokens: list[str] = []  # special tokens added to the tokenizer for this template (by the caller)
        self.vocab_before = len(tokenizer)
        self.backend = clean_backend(tokenizer)
        if template in TEMPLATES:
            t = TEMPLATES[template]
            missing = [s for s in t.special if tokenizer.convert_tokens_to_ids(s) in (None, tokenizer.unk_token_id)
                       or s not in tokenizer.get_vocab()]
            if missing:
                raise DataError(f"chat template '{template}' needs the special tokens {', '.join(missing)}, which the "
                                f"tokenizer lacks; `lmlab finetune/dpo --template {template}` adds them and grows the "
                                f"model's embeddings (in Python: add_template_tokens(tokenizer, '{template}'), then "
                                f"model.resize_token_embeddings(len(tokenizer)))")
            eos = tokenizer.eos_token or ""
            self.template = Template(t.name, t.system, t.user, t.header, t.prefix,
                                     t.end.replace("{eos}", eos), t.sep, t.bos, t.special)
        else:
            self.template = None
        self.bos = self._bos_to_add()
        # what a built-in rendering starts with: the template's BOS, or the tokenizer's when it adds one itself
        self.lead = "" if self.template is None else self.template.bos or self.bos
        self.end_of_turn_id = self._end_of_turn_id()

    # ------------------------------------------------------------------------------------------ rendering

    def render(self, messages: Conversation, add_generation_prompt: bool = False) -> tuple[str, list[tuple]]:
        """(text, target character spans) for a conversation; with `add_generation_prompt` the text ends with
        the assistant header, ready for generation."""
        messages = self._with_system(messages)
        if self.template is not None:
            return self._render_builtin(messages, add_generation_prompt)
        text, spans = self._render_tokenizer(messages, add_generation_prompt)
        if self.bos and not text.startswith(self.bos):
            text, spans = self.bos + text, [(a + len(self.bos), b + len(self.bos)) for a, b in spans]
        return text, spans

    def encode(self, messages: Conversation, max_len: int | None = None,
               overlong: str = "truncate") -> Encoded | None:
        """Token ids and labels; a conversation longer than `max_len` is cut to it ("truncate", None if no target
        is left) or None ("drop")."""
        if overlong not in OVERLONG:
            raise ConfigError(f"finetune.overlong={overlong!r}; allowed: {', '.join(OVERLONG)}")
        text, spans = self.render(messages)
        enc = self.backend.encode(text, add_special_tokens=False)
        ids = list(enc.ids)
        if self.train_on == "all":
            labels = list(ids)
        else:
            labels = [i if any(s < b and e > a for a, b in spans) else IGNORE for i, (s, e) in zip(ids, enc.offsets)]
        out = Encoded(ids, labels)
        if max_len is not None and len(out) > max_len:
            if overlong == "drop":
                return None
            out = Encoded(ids[:max_len], labels[:max_len])
            if out.n_targets == 0:
                return None
        return out

    def prompt_text(self, messages: Conversation) -> str:
        """The conversation so far, ending with the assistant header (the text a model continues)."""
        return self.render(messages, add_generation_prompt=True)[0]

    def prompt_ids(self, messages: Conversation) -> list[int]:
        """Token ids of `prompt_text(messages)`."""
        return list(self.backend.encode(self.prompt_text(messages), add_special_tokens=False).ids)

    def inference_template(self) -> str:
        """A jinja chat template for `tokenizer.chat_template` of an exported model: renders exactly what `render`
        does (default system prompt and BOS included), with no training-only markers."""
        if self.template is None:
            return self.tokenizer.chat_template
        t, q = self.template, json.dumps
        parts = ["{%- if messages and messages[0]['role'] == 'system' -%}{%- set loop_messages = messages -%}"]
        if self.system:
            parts.append("{%- else -%}{%- set loop_messages = [{'role': 'system', 'content': "
                         f"{q(self.system)}" "}] + messages -%}")
        else:
            parts.append("{%- else -%}{%- set loop_messages = messages -%}")
        parts.append("{%- endif -%}")
        if self.lead:
            parts.append(f"{{{{ {q(self.lead)} }}}}")
        parts.append(
            "{%- for m in loop_messages -%}"
            f"{{%- if m['role'] == 'system' -%}}{{{{ {q(t.system[0])} + m['content'] + {q(t.system[1])} }}}}"
            f"{{%- elif m['role'] == 'user' -%}}{{{{ {q(t.user[0])} + m['content'] + {q(t.user[1])} }}}}"
            f"{{%- else -%}}{{{{ {q(t.header + t.prefix)} + m['content'] + {q(t.end + t.sep)} }}}}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{ {q(t.header)} }}}}{{%- endif -%}}"
        )
        return "".join(parts)

    # ------------------------------------------------------------------------------------------ internals

    def _with_system(self, messages: Conversation) -> Conversation:
        if self.system and (not messages or messages[0]["role"] != "system"):
            return [{"role": "system", "content": self.system}, *messages]
        return list(messages)

    def _render_builtin(self, messages: Conversation, add_generation_prompt: bool) -> tuple[str, list[tuple]]:
        t, text, spans = self.template, self.lead, []
        for m in messages:
            role, content = m["role"], m["content"]
            if role == "assistant":
                text += t.header
                start = len(text)
                text += t.prefix + content + t.end
                spans.append((start, len(text)))
                text += t.sep
            else:
                before, after = t.system if role == "system" else t.user
                text += before + content + after
        if add_generation_prompt:
            text += t.header
        return text, spans

    def _apply(self, messages: Conversation, add_generation_prompt: bool) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja raises TemplateError / exceptions from the template's own checks
            raise DataError(f"the tokenizer's chat_template cannot render this conversation ({first_line(e)})") \
                from None

    def _render_tokenizer(self, messages: Conversation, add_generation_prompt: bool) -> tuple[str, list[tuple]]:
        text = self._apply(messages, add_generation_prompt)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._apply(messages[:i], True)
            upto = self._apply(messages[: i + 1], False)
            if not (upto.startswith(before) and text.startswith(upto)):
                raise DataError("the tokenizer's chat_template renders earlier turns differently once later ones "
                                "follow, so assistant targets cannot be located; choose template chatml or plain "
                                "(finetune.template=chatml)")
            spans.append((len(before), len(upto.rstrip())))  # the reply and its end-of-turn, not trailing space
        return text, spans

    def _bos_to_add(self) -> str:
        tok = self.tokenizer
        if tok.bos_token is None:
            return ""
        with_special = tok.encode("a", add_special_tokens=True)
        return tok.bos_token if with_special and with_special[0] == tok.bos_token_id else ""

    def _end_of_turn_id(self) -> int:
        if self.template is not None:
            ids = self.backend.encode(self.template.end, add_special_tokens=False).ids
            if len(ids) != 1:
                raise DataError(f"chat template '{self.name}': end of turn {self.template.end!r} is not one token")
            return ids[0]
        # the tokenizer's template: the first special token after the reply inside the target span
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
        text, spans = self._render_tokenizer(probe, False)
        a, b = spans[-1]
        reply_end = text.index("ok", a) + 2
        enc = self.backend.encode(text, add_special_tokens=False)
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        for i, (s, _) in zip(enc.ids, enc.offsets):
            if reply_end <= s < b and i in special:
                return i
        if self.tokenizer.eos_token_id is None:
            raise DataError("the tokenizer's chat_template ends turns with no special token and there is no eos")
        return self.tokenizer.eos_token_id


def encode_examples(examples: Iterable, fmt: ChatFormat, *, max_len: int | None = None, overlong: str = "truncate",
                    summary: DataSummary | None = None) -> list[Encoded]:
    """Encode `Example`s (or plain conversations); over-long ones are truncated or dropped and counted in
    `summary.tokenized_dropped`, whose `token_lengths` get the percentiles of the lengths before truncation."""
    out, lengths, dropped = [], [], Counter()
    for ex in examples:
        msgs = ex if isinstance(ex, list) else ex.messages
        full = fmt.encode(msgs)
        lengths.append(len(full))
        if max_len is not None and len(full) > max_len:
            enc = fmt.encode(msgs, max_len, overlong)
            if enc is None:
                dropped["over-long" if overlong == "drop" else "over-long, no target left after truncation"] += 1
                continue
            full = enc
        out.append(full)
    if summary is not None:
        summary.add_token_lengths(lengths)
        summary.tokenized_dropped.update(dropped)
    if not out:
        raise DataError(f"no example left after tokenizing ({dict(dropped) or 'no input'}); "
                        "raise data.seq_len / finetune.max_len or set finetune.overlong=truncate")
    return out


# ---------------------------------------------------------------------------------------------------------- packing


@dataclass
class Packed:
    """Rows of packed examples, each (n_rows, seq_len) int64.

    seq_idx: example index within the row (padding gets the next one), for state resets in Mamba-style models;
    position_ids: restart at 0 at every example (and at the padding), for transformers."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    seq_idx: torch.Tensor
    position_ids: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pack(encoded: list[Encoded], seq_len: int, pad_id: int, overlong: str = "truncate") -> Packed:
    """Pack examples in order into rows of `seq_len`, starting a new row when the next one does not fit (an example
    is never split across rows). Examples longer than `seq_len` are cut to it ("truncate") or left out ("drop").
    Each example's first label is -100, so no loss crosses from one example into the next."""
    if overlong not in OVERLONG:
        raise ConfigError(f"finetune.overlong={overlong!r}; allowed: {', '.join(OVERLONG)}")
    if seq_len < 2:
        raise ConfigError(f"data.seq_len={seq_len}: must be at least 2")
    rows: list[list[Encoded]] = [[]]
    used = 0
    for e in encoded:
        if len(e) > seq_len:
            if overlong == "drop":
                continue
            e = Encoded(e.input_ids[:seq_len], e.labels[:seq_len])
        if used + len(e) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(e)
    rows = [r for r in rows if r]
    if not rows:
        raise DataError(f"nothing to pack: every example is longer than seq_len={seq_len}")
    shape = (len(rows), seq_len)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    seq_idx = torch.zeros(shape, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for d, e in enumerate(row):
            n = len(e)
            ids[r, at: at + n] = torch.tensor(e.input_ids)
            labels[r, at: at + n] = torch.tensor(e.labels)
            labels[r, at] = IGNORE
            seq_idx[r, at: at + n] = d
            pos[r, at: at + n] = torch.arange(n)
            at += n
        seq_idx[r, at:] = len(row)
        pos[r, at:] = torch.arange(seq_len - at)
    return Packed(ids, labels, seq_idx, pos)


def pad_batch(encoded: list[Encoded], pad_id: int) -> Packed:
    """One example per row, right-padded to the longest (labels -100 on padding): the unpacked batch."""
    seq_len = max(len(e) for e in encoded)
    rows = [pack([e], seq_len, pad_id) for e in encoded]
    return Packed(*(torch.cat([getattr(r, k) for r in rows]) for k in ("input_ids", "labels", "seq_idx",
                                                                        "position_ids")))


def block_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) example ids → (b, 1, l, l) bool, True where query i may attend key j: j <= i, same example."""
    l = seq_idx.shape[1]
    causal = torch.ones(l, l, dtype=torch.bool, device=seq_idx.device).tril()
    same = seq_idx[:, :, None] == seq_idx[:, None, :]  # (b, l, l)
    return (same & causal)[:, None]
