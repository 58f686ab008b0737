"""lmlab serve: the OpenAI API driven by the official `openai` client against a server on 127.0.0.1 — greedy answers
equal `lmlab generate` and `lmlab chat` token for token, streaming equals non-streaming, 32 concurrent clients each
get their own sequential answer, the batched decoders equal the one-at-a-time reference, a client that leaves frees
its slot, and every bad request gets OpenAI's error JSON with the right 4xx while the server keeps serving."""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from lmlab.commands.chat import respond  # noqa: E402
from lmlab.data.chat import ChatFormat  # noqa: E402
from lmlab.generate import SamplingConfig, generate  # noqa: E402
from lmlab.serve.app import Engine, create_app  # noqa: E402
from lmlab.serve.scheduler import Failed, Finished, Params, Scheduler  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
SYSTEM = "You are a helpful assistant."
PROMPTS = ["def parse(", "import os\n", "The ", "class Foo:\n    def ", "# Copyright", "return self.",
           "for i in range(", "x = "]


def _build(kind: str, tok, seed: int = 0):
    from lmlab.models import build_config, build_model

    sizes = {"mamba": ("mamba-swelu-tiny", dict(d_model=32, n_layers=1, dense_hidden=32, max_seq_len=96)),
             "inl": ("inl-tiny", dict(d_model=32, n_layers=1, n_heads=2, ff_dim=64, n_iterations=2, max_seq_len=96)),
             "llama": ("llama-tiny", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=96))}
    name, overrides = sizes[kind]
    torch.manual_seed(seed)
    return build_model(build_config(name, vocab_size=len(tok), overrides=overrides)).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Exported tiny models (random weights) whose tokenizer carries the plain chat template with a system prompt."""
    from lmlab.data.tokenizer import load_tokenizer, train_bpe
    from lmlab.models.export import export

    d = tmp_path_factory.mktemp("serve-models")
    train_bpe("stdlib", 512, d / "tok", max_chars=200_000)
    out = {}
    for kind in ("mamba", "inl", "llama"):
        tok = load_tokenizer(str(d / "tok"))
        tok.chat_template = ChatFormat(tok, "plain", system=SYSTEM).inference_template()
        out[kind] = export(_build(kind, tok), tok, d / kind)
    return out


def _load(folder):
    from lmlab.inference import load_for_inference

    return load_for_inference(str(folder), "cpu")


@contextlib.contextmanager
def serving(engine, **kw):
    """The app on a free port of 127.0.0.1, uvicorn in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, **kw), log_level="warning"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


@pytest.fixture(scope="module")
def mamba(folders):
    model, tok = _load(folders["mamba"])
    engine = Engine(model, tok, name="tiny", max_batch=32)
    with serving(engine) as url:
        yield engine, url
    engine.close()


def _client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def _greedy(model, tok, prompt: str, n: int) -> list[int]:
    """What `lmlab generate -n N --greedy` samples after the prompt (eos included when reached)."""
    ids = tok.encode(prompt) if prompt else [tok.eos_token_id]
    out = generate(model, torch.tensor([ids]), SamplingConfig(max_new_tokens=n, temperature=0, eos_id=tok.eos_token_id))
    return out[0, len(ids):].tolist()


# ------------------------------------------------------------------------------------------------ answers
def test_models_route_lists_the_served_model(mamba):
    engine, url = mamba
    ids = [m.id for m in _client(url).models.list()]
    assert ids == ["tiny"]
    assert _client(url).models.retrieve("tiny").id == "tiny"


def test_greedy_completion_equals_lmlab_generate_token_for_token(mamba, monkeypatch, capsys):
    import argparse

    from lmlab.commands import generate as generate_cmd

    engine, url = mamba
    client = _client(url)
    folder = engine.model.name_or_path
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                                      extra_body={"return_token_ids": True})
        expected = _greedy(engine.model, engine.tokenizer, prompt, 20)
        c = r.choices[0]
        assert c.token_ids == expected  # token for token
        # the text of those tokens (a last incomplete UTF-8 character is never sent, as `lmlab generate` prints)
        assert engine.tokenizer.decode(expected, skip_special_tokens=True).startswith(c.text)
        assert c.finish_reason == ("stop" if expected[-1] == engine.tokenizer.eos_token_id else "length")
        assert r.usage.prompt_tokens == len(engine.tokenizer.encode(prompt))
        assert r.usage.completion_tokens == len(expected)
        # the command itself prints the prompt and the same continuation
        p = argparse.ArgumentParser()
        generate_cmd.add_arguments(p)
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        assert generate_cmd.run(p.parse_args([folder, "-p", prompt, "-n", "20", "--greedy", "--device", "cpu"])) == 0
        assert capsys.readouterr().out == prompt + c.text + "\n"


def test_streaming_completion_equals_the_whole_answer(mamba):
    _, url = mamba
    client = _client(url)
    whole = client.completions.create(model="tiny", prompt="def parse(", max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="def parse(", max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # it really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_answer_is_lmlab_chats_reply_streaming_or_not(mamba):
    engine, url = mamba
    client = _client(url)
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3+3?"}]
    fmt = ChatFormat(engine.tokenizer, "auto")
    expected = respond(engine.model, engine.tokenizer, fmt, messages, SamplingConfig(max_new_tokens=16, temperature=0))
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(fmt.prompt_ids(messages))  # the run's own template, system prompt included
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_the_text_and_never_stream_it(mamba):
    _, url = mamba
    client = _client(url)
    full = client.completions.create(model="tiny", prompt="import os\n", max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 6, full
    stop = full[3:6]  # a piece of the greedy answer: it must end there
    cut = full[:full.index(stop)]
    r = client.completions.create(model="tiny", prompt="import os\n", max_tokens=30, temperature=0,
                                  stop=[stop, "\x00never"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    streamed = client.completions.create(model="tiny", prompt="import os\n", max_tokens=30, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_n_choices_and_seed(mamba):
    _, url = mamba
    client = _client(url)

    def ask(seed):
        r = client.completions.create(model="tiny", prompt="The ", max_tokens=12, temperature=1.0, top_p=0.9, n=3,
                                      seed=seed)
        assert [c.index for c in r.choices] == [0, 1, 2]
        assert 3 <= r.usage.completion_tokens <= 36
        return [c.text for c in r.choices]

    a, b, c = ask(7), ask(7), ask(8)
    assert a == b  # the same seed, the same choices
    assert a != c and len(set(a)) > 1  # another seed, other choices; the choices differ from each other


# ------------------------------------------------------------------------------------------------ concurrency
def _concurrent_equals_sequential(engine, url, n_clients=32):
    """n_clients threads, each its own openai client and prompt; every answer equals its greedy `generate`."""
    tok = engine.tokenizer
    jobs = [(PROMPTS[i % len(PROMPTS)] + "x" * (i // len(PROMPTS)), 6 + (i * 7) % 19) for i in range(n_clients)]
    expected = [_greedy(engine.model, tok, p, n) for p, n in jobs]
    before = engine.scheduler.stats()

    def ask(job):
        prompt, n = job
        r = _client(url).completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                            extra_body={"return_token_ids": True})
        return r.choices[0].token_ids

    with ThreadPoolExecutor(n_clients) as pool:
        got = list(pool.map(ask, jobs))  # raises on any error
    assert got == expected
    after = engine.scheduler.stats()
    steps = after["decode_steps"] - before["decode_steps"]
    rows = after["decode_rows"] - before["decode_rows"]
    assert rows / steps > 2, (rows, steps)  # sequences really shared decode steps


def test_32_concurrent_clients_each_get_their_sequential_answer(mamba):
    engine, url = mamba
    assert engine.scheduler.decoder.name.startswith("batched")
    _concurrent_equals_sequential(engine, url)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["inl", "llama"])
def test_32_concurrent_clients_inl_and_llama(folders, kind):
    model, tok = _load(folders[kind])
    engine = Engine(model, tok, name="tiny")
    assert engine.scheduler.decoder.name.startswith("batched")
    try:
        with serving(engine) as url:
            _concurrent_equals_sequential(engine, url)
    finally:
        engine.close()


def _run_all(sched, jobs):
    """Submit every (prompt_ids, Params) at once; returns each one's sampled tokens (or failure message)."""
    done, lock, all_done = {}, threading.Lock(), threading.Event()

    def sink_for(k):
        def sink(ev):
            if isinstance(ev, (Finished, Failed)):
                with lock:
                    done[k] = ev.token_ids if isinstance(ev, Finished) else ev.message
                    if len(done) == len(jobs):
                        all_done.set()
        return sink

    for k, (ids, params) in enumerate(jobs):
        sched.submit(ids, [params], sink_for(k))
    assert all_done.wait(120)
    return [done[k] for k in range(len(jobs))]


@pytest.mark.parametrize("kind", ["mamba", "inl", "llama"])
def test_batched_decoder_equals_the_one_at_a_time_reference(folders, kind):
    """Prompts of different lengths, sampled with seeds and top-p: the batched decoder (stacked states, padded
    keys/values) gives every sequence exactly what decoding it alone gives."""
    model, tok = _load(folders[kind])
    g = torch.Generator().manual_seed(1)
    jobs = [(torch.randint(0, len(tok), (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist(),
             Params(max_tokens=int(torch.randint(2, 25, (1,), generator=g)), temperature=0.0 if i % 3 == 0 else 0.9,
                    top_p=0.95, seed=i)) for i in range(16)]
    results = []
    for batched in (True, False):
        sched = Scheduler(model, tok, max_batch=8, batched=batched)
        try:
            assert sched.decoder.name.startswith("batched" if batched else "sequential")
            results.append(_run_all(sched, jobs))
        finally:
            sched.close()
    assert results[0] == results[1]
    assert all(isinstance(r, list) for r in results[0])


@pytest.mark.parametrize("kind", ["mamba", "inl", "llama"])
def test_batched_decoder_logits_equal_one_at_a_time_as_rows_join_and_leave(folders, kind):
    """The decoders themselves: rows of different lengths join and leave between steps, and every step's logits
    equal those of decoding each sequence alone (padding masked, positions per row, states kept apart)."""
    from lmlab.models.hf import forward_cached, new_cache
    from lmlab.serve.scheduler import Sequential, make_decoder

    model, tok = _load(folders[kind])
    fast, slow = make_decoder(model), Sequential(model)
    assert fast.name.startswith("batched")
    g = torch.Generator().manual_seed(2)
    rows: list[list[int]] = []  # each active row's tokens so far

    def join(n):
        ids = torch.randint(0, len(tok), (1, n), generator=g)
        for dec in (fast, slow):
            cache = new_cache(model)
            forward_cached(model, ids, cache)
            dec.add(cache)
        rows.append(ids[0].tolist())

    def leave(i):
        keep = [j for j in range(len(rows)) if j != i]
        for dec in (fast, slow):
            dec.keep(keep)
        rows.pop(i)

    with torch.inference_mode():
        for n in (5, 1, 12):
            join(n)
        for step in range(14):
            if step == 3:
                join(20)  # longer than every row so far: the others get more padding
            if step == 6:
                leave(3)  # the longest leaves: the padding it forced goes
            if step == 9:
                leave(0)
                join(2)
            tokens = torch.randint(0, len(tok), (len(rows),), generator=g).tolist()
            positions = [len(r) for r in rows]
            a, b = fast.step(tokens, positions), slow.step(tokens, positions)
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
            for r, t in zip(rows, tokens):
                r.append(t)


def test_cancelled_sequence_frees_its_slot_for_a_waiting_one(folders):
    model, tok = _load(folders["mamba"])
    sched = Scheduler(model, tok, max_batch=1)
    events, first, gate = [], threading.Event(), threading.Event()

    def sink(ev):  # runs in the model thread: holding it at the first event pins the scheduler there
        events.append(ev)
        if not first.is_set():
            first.set()
            gate.wait(30)

    try:
        long = sched.submit([5, 6, 7], [Params(max_tokens=90)], sink)[0]
        assert first.wait(30)
        short_done = threading.Event()
        sched.submit([8], [Params(max_tokens=3)], lambda ev: short_done.set() if isinstance(ev, Finished) else None)
        long.cancel()
        gate.set()
        assert short_done.wait(30)  # the only slot was the long one's
        for _ in range(100):
            if sched.stats()["active"] == 0:
                break
            time.sleep(0.01)
        assert sched.stats()["active"] == 0
        assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
        assert len(long.tokens) < 90
    finally:
        gate.set()
        sched.close()


def _health(url):
    return httpx.get(url + "/health", timeout=10).json()


@pytest.fixture
def slow_engine(folders):
    """An engine whose decode steps take at least 20 ms, so that a request outlives its client."""
    model, tok = _load(folders["mamba"])
    engine = Engine(model, tok, name="tiny", max_batch=4)
    step = engine.scheduler.decoder.step

    def slow_step(*a):
        time.sleep(0.02)
        return step(*a)

    engine.scheduler.decoder.step = slow_step
    yield engine
    engine.close()


def _wait_until(cond, timeout=20.0):
    end = time.time() + timeout
    while not cond():
        assert time.time() < end
        time.sleep(0.02)


def test_a_client_that_vanishes_mid_stream_frees_its_slot_and_stalls_nobody(slow_engine):
    engine = slow_engine
    with serving(engine) as url:
        other = {}

        def steady():  # another client streaming at the same time, to its end
            chunks = list(_client(url).completions.create(model="tiny", prompt="x", max_tokens=40, temperature=0,
                                                          stream=True, extra_body={"return_token_ids": True}))
            other["tokens"] = sum(len(c.choices[0].token_ids or []) for c in chunks if c.choices)
            other["finish"] = chunks[-1].choices[0].finish_reason

        t = threading.Thread(target=steady)
        t.start()
        assert len(_greedy(engine.model, engine.tokenizer, "def ", 90)) == 90  # no early end: it takes >= 1.8 s
        body = {"prompt": "def ", "max_tokens": 90, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as h, h.stream("POST", url + "/v1/completions", json=body) as r:
            assert next(r.iter_lines()).startswith("data: ")  # one piece read, then the client is gone
        _wait_until(lambda: engine.scheduler.stats()["cancelled"] == 1)  # its slot freed well before 90 tokens
        t.join(60)
        expected = _greedy(engine.model, engine.tokenizer, "x", 40)
        assert (other["tokens"], other["finish"]) == (len(expected), "length" if len(expected) == 40 else "stop")
        _wait_until(lambda: _health(url)["active"] == 0)


def test_a_client_that_times_out_without_streaming_frees_its_slot(slow_engine):
    engine = slow_engine
    assert len(_greedy(engine.model, engine.tokenizer, "def ", 90)) == 90  # no early end: it takes >= 1.8 s
    with serving(engine) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"prompt": "def ", "max_tokens": 90, "temperature": 0},
                       timeout=0.5)
        _wait_until(lambda: engine.scheduler.stats()["cancelled"] == 1)
        _wait_until(lambda: _health(url)["active"] == 0)
        r = _client(url).completions.create(model="tiny", prompt="x", max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")


# ------------------------------------------------------------------------------------------------ bad requests
def _error(exc_info, status, param=None, code=None):
    e = exc_info.value
    assert e.status_code == status
    body = e.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(mamba):
    engine, url = mamba
    client = _client(url)
    user = [{"role": "user", "content": "hi"}]

    def still_serving():
        r = client.chat.completions.create(model="tiny", messages=user, max_tokens=2, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")

    cases = [
        (openai.NotFoundError, 404, "model", "model_not_found",
         lambda: client.chat.completions.create(model="gpt-4", messages=user)),
        (openai.BadRequestError, 400, "messages", "context_length_exceeded",
         lambda: client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 400}])),
        (openai.BadRequestError, 400, "prompt", "context_length_exceeded",
         lambda: client.completions.create(model="tiny", prompt="y " * 400)),
        (openai.BadRequestError, 400, "max_tokens", None,
         lambda: client.chat.completions.create(model="tiny", messages=user, max_tokens=0)),
        (openai.BadRequestError, 400, "max_tokens", None,
         lambda: client.completions.create(model="tiny", prompt="a", max_tokens=-3)),
        (openai.BadRequestError, 400, "max_tokens", "context_length_exceeded",
         lambda: client.completions.create(model="tiny", prompt="a", max_tokens=10_000)),
        (openai.BadRequestError, 400, "temperature", None,
         lambda: client.chat.completions.create(model="tiny", messages=user, temperature=-0.5)),
        (openai.BadRequestError, 400, "messages[1].role", None,
         lambda: client.chat.completions.create(model="tiny", messages=[*user, {"role": "robot", "content": "x"}])),
        (openai.BadRequestError, 400, "messages", None,
         lambda: client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "be brief"}])),
        (openai.APIStatusError, 413, None, "request_too_large",
         lambda: client.chat.completions.create(model="tiny",
                                                messages=[{"role": "user", "content": "z" * 10_000_000}])),
    ]
    for exc, status, param, code, call in cases:
        with pytest.raises(exc) as info:
            call()
        _error(info, status, param, code)
        still_serving()
    # malformed JSON, a body that is not an object, an unknown route: no client sends these
    for data, status in ((b'{"model": "tiny", "messages": [', 400), (b"[1, 2]", 400), (b"", 400)):
        r = httpx.post(url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (data, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.post(url + "/v1/chat/completions", content=b"{oops").json()["error"]["code"] == "invalid_json"
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    # a 10 MB body sent without Content-Length (chunked) is refused too
    chunks = (b'{"model": "tiny", "prompt": "' + b"a" * 1_000_000 for _ in range(10))
    r = httpx.post(url + "/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    still_serving()


def test_api_key_is_checked_on_every_route(folders):
    model, tok = _load(folders["mamba"])
    engine = Engine(model, tok, name="tiny")
    try:
        with serving(engine, api_key="s3cret") as url:
            with pytest.raises(openai.AuthenticationError) as info:
                _client(url, "wrong").models.list()
            _error(info, 401, code="invalid_api_key")
            for path in ("/v1/models", "/v1/models/tiny", "/health"):
                assert httpx.get(url + path).status_code == 401
            for path in ("/v1/completions", "/v1/chat/completions"):
                assert httpx.post(url + path, json={}).status_code == 401
            good = _client(url, "s3cret")
            assert [m.id for m in good.models.list()] == ["tiny"]
            r = good.completions.create(model="tiny", prompt="a", max_tokens=2)
            assert r.choices[0].finish_reason in ("stop", "length")
            assert httpx.get(url + "/").status_code == 200  # the page holds no data; its requests carry the key
    finally:
        engine.close()


# ------------------------------------------------------------------------------------------------ the command
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}
LAUNCH = "import sys; from lmlab import cli; sys.exit(cli.main(sys.argv[1:]))"


@pytest.mark.slow
def test_lmlab_serve_command_starts_answers_and_stops_on_ctrl_c(folders):
    p = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", str(folders["mamba"]), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        head = []
        for line in p.stdout:
            head.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(head)
        assert "MambaSWELUForCausalLM" in text and "chat template tokenizer" in text, text
        url = re.search(r"listening\s+(http://127\.0\.0\.1:\d+)", text).group(1)
        # README shows this start-up: the same lines, each begun by the same label
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
        shown = readme.split("$ lmlab serve runs/tiny-stdlib\n", 1)[1].split("```", 1)[0].splitlines()
        labels = [ln.split("  ")[0].strip() for ln in shown]
        assert labels == [ln.split("  ")[0].strip() for ln in head], (labels, head)
        r = _client(url).chat.completions.create(model="mamba", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, temperature=0)
        assert r.model == "mamba" and r.choices[0].finish_reason in ("stop", "length")
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_lmlab_serve_refuses_a_busy_port_before_loading_anything(folders):
    import argparse

    from lmlab.commands import serve
    from lmlab.errors import ConfigError

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    try:
        with pytest.raises(ConfigError, match=r"--port: cannot listen on 127\.0\.0\.1:\d+"):
            serve.run(p.parse_args(["no/such/folder", "--port", str(busy.getsockname()[1])]))
        with pytest.raises(ConfigError, match="--max-batch"):
            serve.run(p.parse_args([str(folders["mamba"]), "--max-batch", "0"]))
    finally:
        busy.close()


def test_sse_wire_format(mamba):
    _, url = mamba
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: ")
        assert json.loads(e[6:])["object"] == "chat.completion.chunk"


@pytest.mark.slow
def test_a_lora_run_is_served_with_its_adapters_or_merged(tmp_path):
    """A LoRA run (4 steps on a toy task), served as base + adapters and merged: each greedy chat answer is
    `lmlab chat`'s reply from the run."""
    from lmlab.commands.serve import load
    from lmlab.config import load_config
    from lmlab.data.tokenizer import train_bpe
    from lmlab.train.loop import train

    train_bpe("stdlib", 512, tmp_path / "tok", max_chars=200_000)
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
            for a in range(9) for b in range(7)]
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = train(load_config(None, [
        "model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=1", "model.dense_hidden=32",
        "train.objective=sft", "finetune.method=lora", f"data.source={tmp_path / 'add.jsonl'}",
        f"data.tokenizer={tmp_path / 'tok'}", "data.seq_len=48", "data.val_fraction=0.1", "train.batch_size=4",
        "train.max_steps=4", "train.eval_every=1000", "train.eval_batches=1", "train.threads=1",
        "train.progress=false", "train.sample_tokens=2", "train.warmup_steps=0", "train.lr=1e-2",
        "finetune.lora_rank=4", f"run.out_dir={tmp_path / 'runs'}", "run.name=lora"]), echo=lambda *a: None)
    messages = [{"role": "user", "content": "Add 3 and 4."}]
    ref_model, ref_tok = _load(run)
    fmt = ChatFormat(ref_tok, "auto")
    expected = respond(ref_model, ref_tok, fmt, messages, SamplingConfig(max_new_tokens=12, temperature=0))
    ids = fmt.prompt_ids(messages)
    tokens = generate(ref_model, torch.tensor([ids]), SamplingConfig(max_new_tokens=12, temperature=0))[0, len(ids):]
    for merge in (False, True):
        model, tok = load(str(run), "cpu", merge)
        assert ("Peft" in type(model).__name__) != merge
        engine = Engine(model, tok, name="lora")
        try:
            assert engine.scheduler.decoder.name.startswith("batched")
            with serving(engine) as url:
                r = _client(url).chat.completions.create(model="lora", messages=messages, max_tokens=12,
                                                         temperature=0, extra_body={"return_token_ids": True})
            assert r.choices[0].message.content == expected, merge
            got = r.choices[0].token_ids
            assert got and got == tokens[:len(got)].tolist(), merge  # the run's own greedy tokens
        finally:
            engine.close()
