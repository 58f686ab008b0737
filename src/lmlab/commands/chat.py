"""lmlab chat: talk to a run or a model, streaming, with the model's own chat template and the history.

    lmlab chat runs/chat-sft                          interactive: /reset, /system TEXT, /exit
    printf 'Hi\\nWhat is 2+2?\\n' | lmlab chat runs/chat-sft     a script: one user turn per line, one answer each

The conversation is rendered by `lmlab.data.chat.ChatFormat`: a fine-tuned export carries its template in its
tokenizer (`chat_template`); a base model gets the plain `User:` / `Assistant:` format. A reply ends at the
template's end-of-turn token, at the end-of-text token, or where the model starts the next user turn itself.
When the history outgrows the model's context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ._common import add_device_flag, add_sampling_flags, add_template_flag, sampling_config

COMMANDS_HELP = "/reset clears the history · /system TEXT sets the system prompt · /exit quits"


def add_arguments(p) -> None:
    p.add_argument("model", help="run folder (its final/ model or latest checkpoint), model folder, or hub id")
    p.add_argument("--system", help="system prompt (kept across /reset)")
    add_template_flag(p)
    add_sampling_flags(p, max_new_tokens=256, temperature=0.7)
    add_device_flag(p)
    p.add_argument("--jsonl", action="store_true",
                   help="non-interactive: print one JSON object per turn ({\"user\", \"assistant\"})")


# ------------------------------------------------------------------------------------------------ replying
class _Stop(Exception):
    """Raised from the token callback to end a reply early (a stop string or a second end token)."""


def stop_strings(fmt) -> list[str]:
    """Text that means the model has moved past its reply: the next user (or system) header of a built-in template."""
    if fmt.template is None:
        return []
    t = fmt.template
    return sorted({"\n" + t.user[0].strip(), "\n" + t.system[0].strip()})


@dataclass
class _Reply:
    text: str = ""
    shown: int = 0


class _ReplyStream:
    """Decodes a reply token by token, cuts it at a stop string, and writes only text that cannot be the start of
    one (so a half-printed `\\nUser:` never reaches the screen)."""

    def __init__(self, tokenizer, stops: list[str], stop_ids: set[int], write=None):
        self.tok, self.stops, self.stop_ids, self.write = tokenizer, stops, stop_ids, write
        self.ids: list[int] = []
        self.r = _Reply()
        self.hold = max((len(s) for s in stops), default=1) - 1

    def __call__(self, token_id: int) -> None:
        if token_id in self.stop_ids:
            raise _Stop
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.r.text = text[:cut]
            self._emit(len(self.r.text))
            raise _Stop
        self.r.text = text
        self._emit(max(self.r.shown, len(text) - self.hold))

    def _emit(self, upto: int) -> None:
        if self.write is not None and upto > self.r.shown:
            self.write(self.r.text[self.r.shown:upto])
        self.r.shown = max(self.r.shown, upto)

    def finish(self) -> str:
        self.r.text = self.r.text.rstrip()
        self._emit(len(self.r.text))
        return self.r.text


def context_limit(model) -> int | None:
    cfg = model.config
    return getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None)


def respond(model, tokenizer, fmt, messages: list[dict], sampling, *, generator=None, write=None) -> str:
    """The assistant's reply to `messages` (ending with a user turn), streamed through `write` when given.
    The oldest turns (never the system prompt) are dropped while the prompt and the reply would not fit."""
    import dataclasses

    import torch

    from ..generate import generate

    limit = context_limit(model)
    msgs = list(messages)
    ids = fmt.prompt_ids(msgs)
    if limit is not None:
        budget = max(1, limit - sampling.max_new_tokens)
        first = 1 if msgs and msgs[0]["role"] == "system" else 0
        while len(ids) > budget and len(msgs) - first > 1:
            del msgs[first: first + 2 if len(msgs) - first > 2 else first + 1]  # a user turn and its answer
            ids = fmt.prompt_ids(msgs)
        ids = ids[-budget:]
    stop_ids = {i for i in (fmt.end_of_turn_id, tokenizer.eos_token_id) if i is not None}
    cfg = dataclasses.replace(sampling, eos_id=fmt.end_of_turn_id)
    stream = _ReplyStream(tokenizer, stop_strings(fmt), stop_ids, write)
    dev = next(model.parameters()).device
    try:
        generate(model, torch.tensor([ids], device=dev), cfg, generator=generator, on_token=stream)
    except _Stop:
        pass
    return stream.finish()


class ChatSession:
    """A conversation with one model: history, system prompt, reset."""

    def __init__(self, model, tokenizer, *, template: str = "auto", system: str | None = None, sampling=None,
                 seed: int = 0):
        import torch

        from ..data.chat import ChatFormat
        from ..generate import SamplingConfig

        self.model, self.tokenizer = model, tokenizer
        self.fmt = ChatFormat(tokenizer, template)
        self.system = system
        self.sampling = sampling or SamplingConfig(max_new_tokens=256, temperature=0.0)
        dev = next(model.parameters()).device
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.history: list[dict] = []

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str, write=None) -> str:
        self.history.append({"role": "user", "content": text})
        reply = respond(self.model, self.tokenizer, self.fmt, self.messages(), self.sampling,
                        generator=self.generator, write=write)
        self.history.append({"role": "assistant", "content": reply})
        return reply

    def command(self, line: str) -> str | None:
        """Handle a /command: returns "exit", a message to show, or None when `line` is not a command."""
        if not line.startswith("/"):
            return None
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return "exit"
        if name == "/reset":
            self.reset()
            return "(history cleared)"
        if name == "/system":
            self.system = rest.strip() or None
            self.reset()
            return f"(system prompt {'set' if self.system else 'removed'}; history cleared)"
        if name in ("/help", "/?"):
            return COMMANDS_HELP
        return f"(unknown command {name}; {COMMANDS_HELP})"


# ------------------------------------------------------------------------------------------------ the loops
def _interactive(session: ChatSession, label: str) -> None:
    try:
        import readline  # noqa: F401 - line editing and ↑ history for input()
    except ImportError:
        pass

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    print(f"lmlab chat · {label} · template {session.fmt.name}" + (f" · system: {session.system}"
                                                                   if session.system else ""))
    print(COMMANDS_HELP)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            return
        if not line:
            continue
        said = session.command(line)
        if said == "exit":
            return
        if said is not None:
            print(said)
            continue
        write("model> ")
        try:
            session.ask(line, write=write)
        except KeyboardInterrupt:  # stop this reply, keep the conversation
            write(" [interrupted]")
        write("\n")


def one_line(text: str) -> str:
    """A reply on one printed line: each newline shown as ⏎ (as `lmlab compare` prints answers)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "⏎ ")


def _scripted(session: ChatSession, jsonl: bool) -> None:
    """stdin is not a terminal: every line a user turn, every answer one line (JSONL keeps the reply as it is)."""
    import json

    for raw in sys.stdin:
        line = raw.strip()
        if not line:
            continue
        said = session.command(line)
        if said == "exit":
            return
        if said is not None:
            if not jsonl:
                print(said, flush=True)
            continue
        reply = session.ask(line)
        if jsonl:
            print(json.dumps({"user": line, "assistant": reply}, ensure_ascii=False), flush=True)
        else:
            print(one_line(reply), flush=True)


def run(args) -> int:
    from ..inference import load_for_inference

    sampling = sampling_config(args)
    model, tok = load_for_inference(args.model, args.device)
    session = ChatSession(model, tok, template=args.template, system=args.system, sampling=sampling, seed=args.seed)
    if sys.stdin.isatty() and not args.jsonl:
        _interactive(session, args.model)
    else:
        _scripted(session, args.jsonl)
    return 0
