"""lmlab chat: replies stop at the end of turn and at the next user header, history and /reset, the context
budget, and the command itself through a pseudo-terminal and through a pipe, on tiny exported models."""

import json
import os
import select
import subprocess
import sys
import time

import pytest
import torch

from lmlab.commands.chat import ChatSession, _ReplyStream, one_line, respond, stop_strings
from lmlab.data.chat import ChatFormat
from lmlab.generate import SamplingConfig, generate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
SYSTEM = "You are a helpful assistant."


@pytest.fixture(scope="module")
def models(tmp_path_factory, stdlib_tokenizer_dir):
    """A base model folder (no chat template: plain format) and a 'tuned' one whose tokenizer carries a template."""
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models import build_config, build_model
    from lmlab.models.export import export

    d = tmp_path_factory.mktemp("chat-models")
    out = {}
    for name, seed in (("base", 0), ("tuned", 1)):
        tok = load_tokenizer(str(stdlib_tokenizer_dir))
        if name == "tuned":
            tok.chat_template = ChatFormat(tok, "plain", system=SYSTEM).inference_template()
        cfg = build_config("mamba-swelu-tiny", vocab_size=len(tok),
                           overrides=dict(d_model=32, n_layers=1, dense_hidden=32, max_seq_len=96))
        torch.manual_seed(seed)
        model = build_model(cfg).eval()
        out[name] = export(model, tok, d / name)
    return out


def _load(folder):
    from lmlab.inference import load_for_inference

    return load_for_inference(str(folder), "cpu")


class _Tok:
    """Decodes ids as characters (id 0 is the end token)."""

    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i)


def _feed(stream, text):
    for ch in text:
        try:
            stream(ord(ch))
        except Exception:  # noqa: BLE001 - _Stop
            return True
    return False


def test_reply_stops_at_the_next_user_header_without_showing_it():
    shown = []
    stream = _ReplyStream(_Tok(), ["\nUser:"], {0}, shown.append)
    assert _feed(stream, " Paris is the capital.\nUser: and Spain?")
    assert stream.finish() == "Paris is the capital."
    assert "".join(shown) == "Paris is the capital."
    assert "User" not in "".join(shown)


def test_reply_stops_at_an_end_token_and_strips_spaces():
    shown = []
    stream = _ReplyStream(_Tok(), ["\nUser:"], {5}, shown.append)
    assert _feed(stream, "  4\n" + chr(5) + "more")
    assert stream.finish() == "4" and "".join(shown) == "4"


def test_stop_strings_of_the_plain_template(models):
    _, tok = _load(models["base"])
    assert "\nUser:" in stop_strings(ChatFormat(tok, "plain"))


def test_session_keeps_history_system_and_reset(models):
    model, tok = _load(models["tuned"])
    s = ChatSession(model, tok, system="Be brief.", sampling=SamplingConfig(max_new_tokens=6, temperature=0))
    assert s.fmt.name == "tokenizer"  # the exported template is used
    a1 = s.ask("Hello")
    s.ask("What is 2+2?")
    msgs = s.messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == a1
    assert "Hello" in s.fmt.prompt_text(msgs) and "Be brief." in s.fmt.prompt_text(msgs)
    assert s.command("/reset") == "(history cleared)" and s.messages() == [{"role": "system", "content": "Be brief."}]
    assert s.command("/system Talk like a pirate.").startswith("(system prompt set")
    assert s.messages()[0]["content"] == "Talk like a pirate."
    assert s.command("/exit") == "exit" and s.command("hello") is None
    assert "unknown command" in s.command("/nope")


def test_greedy_reply_is_the_models_own_greedy_continuation(models):
    model, tok = _load(models["base"])
    fmt = ChatFormat(tok)
    assert fmt.name == "plain"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    cfg = SamplingConfig(max_new_tokens=10, temperature=0)
    streamed = []
    reply = respond(model, tok, fmt, msgs, cfg, write=streamed.append)
    ids = fmt.prompt_ids(msgs)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0, eos_id=tok.eos_token_id)
    out = generate(model, torch.tensor([ids]), greedy)
    full = tok.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
    expected = full.lstrip()
    for s in stop_strings(fmt):
        expected = expected.split(s)[0]
    assert reply == expected.rstrip()
    assert "".join(streamed) == reply


def test_long_history_is_trimmed_to_the_context(models, monkeypatch):
    import lmlab.generate

    lengths = []
    real = lmlab.generate.generate

    def spy(model, ids, cfg, **kw):
        lengths.append(ids.shape[1])
        return real(model, ids, cfg, **kw)

    monkeypatch.setattr(lmlab.generate, "generate", spy)
    model, tok = _load(models["base"])  # max_seq_len 96
    s = ChatSession(model, tok, system="Stay on topic.", sampling=SamplingConfig(max_new_tokens=8, temperature=0))
    for i in range(6):
        s.ask(f"Tell me about topic number {i} in some detail please.")
    assert len(s.history) == 12  # the history is kept; only the prompt is trimmed
    full = len(s.fmt.prompt_ids(s.messages()[:-1]))
    assert full > 96 - 8 and max(lengths) <= 96 - 8  # it had to be trimmed, and it was


def test_chat_in_a_script_mode_in_process(models, monkeypatch, capsys):
    import argparse
    import io

    from lmlab.commands import chat

    p = argparse.ArgumentParser()
    chat.add_arguments(p)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n/reset\nWhat is 2+2?\n\n"))
    assert chat.run(p.parse_args([str(models["tuned"]), "-n", "6", "--greedy", "--jsonl"])) == 0
    turns = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [t["user"] for t in turns] == ["Hello", "What is 2+2?"]
    model, tok = _load(models["tuned"])
    s = ChatSession(model, tok, sampling=SamplingConfig(max_new_tokens=6, temperature=0))
    assert turns[1]["assistant"] == s.ask("What is 2+2?")  # after /reset: no history


# ------------------------------------------------------------------------------------------------ the command
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
LAUNCH = ("import sys, argparse, importlib\n"
          "from lmlab import cli\n"
          "argv = sys.argv[1:]\n"
          "if argv[0] in cli.COMMANDS:\n"
          "    sys.exit(cli.main(argv))\n"
          "mod = importlib.import_module('lmlab.commands.' + argv[0])\n"
          "p = argparse.ArgumentParser(); mod.add_arguments(p)\n"
          "sys.exit(mod.run(p.parse_args(argv[1:])))\n")


def _cmd(*args):
    return [sys.executable, "-c", LAUNCH, "chat", *map(str, args)]


def test_chat_through_a_pipe_answers_one_line_each(models):
    model, tok = _load(models["tuned"])
    expected = [ChatSession(model, tok, sampling=SamplingConfig(max_new_tokens=6, temperature=0)).ask(q)
                for q in ("Hello", "What is 2+2?")]
    p = subprocess.run(_cmd(models["tuned"], "-n", "6", "--greedy"), input="Hello\n/reset\nWhat is 2+2?\n/exit\nno\n",
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    # a reply's own newlines are printed as ⏎, so each answer stays one line
    assert p.stdout.splitlines() == [one_line(expected[0]), "(history cleared)", one_line(expected[1])]


def _read_until(fd, marker: bytes, timeout: float = 60.0) -> bytes:
    buf, end = b"", time.time() + timeout
    while marker not in buf:
        left = end - time.time()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout}s; got {buf[-400:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


@pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")
def test_chat_through_a_pseudo_terminal(models):
    master, slave = os.openpty()
    p = subprocess.Popen(_cmd(models["base"], "-n", "5", "--greedy", "--system", "Be kind."), stdin=slave,
                         stdout=slave, stderr=slave, env=ENV, close_fds=True)
    os.close(slave)
    try:
        banner = _read_until(master, b"you> ")
        assert b"template plain" in banner and b"/reset" in banner and b"Be kind." in banner
        os.write(master, b"Hello there\n")
        out = _read_until(master, b"you> ")
        assert b"model> " in out
        os.write(master, b"/reset\n")
        assert b"(history cleared)" in _read_until(master, b"you> ")
        os.write(master, b"/exit\n")
        assert p.wait(timeout=30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)


def test_piped_chat_prints_a_multi_line_answer_on_one_line(models, monkeypatch, capsys):
    """Scripts read one line per question: newlines in a reply are shown as ⏎ (JSONL keeps them as they are)."""
    import argparse
    import io

    from lmlab.commands import chat

    monkeypatch.setattr(ChatSession, "ask", lambda self, text, write=None: f"def f({text}):\n    return 1\r\n")
    p = argparse.ArgumentParser()
    chat.add_arguments(p)
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\nb\n"))
    assert chat.run(p.parse_args([str(models["tuned"]), "-n", "2"])) == 0
    assert capsys.readouterr().out.splitlines() == ["def f(a):⏎     return 1⏎ ", "def f(b):⏎     return 1⏎ "]
    monkeypatch.setattr(sys, "stdin", io.StringIO("a\n"))
    assert chat.run(p.parse_args([str(models["tuned"]), "-n", "2", "--jsonl"])) == 0
    assert json.loads(capsys.readouterr().out)["assistant"] == "def f(a):\n    return 1\r\n"
