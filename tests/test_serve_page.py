"""The chat page of `lmlab serve` in headless Debian chromium, driven over the DevTools protocol on a pipe
(--remote-debugging-pipe, no extra package): type a question, press Enter, and the answer streams into the page,
equal to what `lmlab chat` answers. Skipped when chromium is not installed (`apt-get install chromium`)."""

import fcntl
import json
import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmlab.commands.chat import respond  # noqa: E402
from lmlab.data.chat import ChatFormat  # noqa: E402
from lmlab.generate import SamplingConfig  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


class DevTools:
    """A headless chromium and the Chrome DevTools protocol over its pipe: JSON messages ending in NUL on fds 3/4."""

    def __init__(self, profile):
        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():  # the child reads commands on fd 3 and writes answers on fd 4
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child, from_child)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-pipe",
             f"--user-data-dir={profile}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id = b"", 0

    def call(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._w)
        os.close(self._r)


def _eval(dt, session, expr):
    return dt.call("Runtime.evaluate", session, expression=expr, returnByValue=True)["result"].get("value")


def test_the_chat_page_streams_a_typed_question_s_answer(tmp_path):
    from test_serve import SYSTEM, _build, serving

    from lmlab.data.tokenizer import load_tokenizer, train_bpe
    from lmlab.serve.app import Engine

    train_bpe("stdlib", 512, tmp_path / "tok", max_chars=200_000)
    tok = load_tokenizer(str(tmp_path / "tok"))
    tok.chat_template = ChatFormat(tok, "plain", system=SYSTEM).inference_template()
    model = _build("mamba", tok)
    question = "What is a list?"
    expected = respond(model, tok, ChatFormat(tok, "auto"), [{"role": "user", "content": question}],
                       SamplingConfig(max_new_tokens=40, temperature=0))
    assert expected
    engine = Engine(model, tok, name="tiny")
    dt = None
    try:
        with serving(engine) as url:
            dt = DevTools(tmp_path / "profile")
            target = dt.call("Target.createTarget", url=f"{url}/?temperature=0&max_tokens=40")["targetId"]
            session = dt.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            deadline = time.time() + 60
            while _eval(dt, session, "document.getElementById('model').textContent") != "tiny":
                assert time.time() < deadline, "the page did not load the model list"
                time.sleep(0.1)
            _eval(dt, session, "document.getElementById('input').focus()")
            dt.call("Input.insertText", session, text=question)  # typed, as a person would
            for kind in ("keyDown", "keyUp"):
                dt.call("Input.dispatchKeyEvent", session, type=kind, key="Enter", code="Enter",
                        windowsVirtualKeyCode=13)
            seen = []
            while True:
                state = _eval(dt, session, "JSON.stringify([document.body.dataset.state, "
                                           "Number(document.body.dataset.chunks), "
                                           "[...document.querySelectorAll('.msg')].map(d => [d.className, "
                                           "d.textContent])])")
                state, chunks, msgs = json.loads(state)
                seen.append(chunks)
                if state in ("done", "error"):
                    break
                assert time.time() < deadline, f"no answer: {state} {msgs}"
                time.sleep(0.02)
    finally:
        if dt is not None:
            dt.close()
        engine.close()
    assert state == "done", msgs
    assert msgs == [["msg user", question], ["msg assistant", expected]]
    assert chunks > 1  # the answer arrived in pieces, each shown as it came
