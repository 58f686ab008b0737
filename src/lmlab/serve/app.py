"""The OpenAI-compatible HTTP API over a `Scheduler`, on FastAPI.

    engine = Engine(model, tokenizer, name="my-model")            the model thread starts here
    app = create_app(engine, api_key=None, max_body=1 << 20)      uvicorn.run(app, host="127.0.0.1", ...)

Routes: GET /v1/models (and /v1/models/{id}), POST /v1/completions, POST /v1/chat/completions, streaming by
server-sent events (`data: {...}` then `data: [DONE]`) or one JSON answer; GET / is the chat page; GET /health
reports the scheduler's load. Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
400 for a bad request (malformed JSON, a value out of range, a prompt longer than the context, an unknown role,
no user turn), 401 for a missing or wrong API key, 404 for an unknown model or route, 413 for a body over
`max_body`. The asyncio side only validates, queues and relays events; every forward runs in the model thread.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .scheduler import Delta, Failed, Finished, Params, Scheduler

ROLES = ("system", "developer", "user", "assistant")  # developer: OpenAI's newer name for system


# ------------------------------------------------------------------------------------------------ errors
class ApiError(Exception):
    """An error answered as OpenAI does: HTTP `status` and `{"error": {...}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(exc: RequestValidationError) -> ApiError:
    err = exc.errors()[0]
    if err.get("type") == "json_invalid":
        return ApiError(400, f"malformed JSON body: {err.get('msg', 'cannot be parsed')}", code="invalid_json")
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    raw = err.get("input")
    if not loc and isinstance(raw, (str, bytes)) and raw:  # a body FastAPI did not read as JSON (no content type)
        try:
            json.loads(raw)
        except ValueError as e:
            return ApiError(400, f"malformed JSON body: {e}", code="invalid_json")
    if err.get("type") == "missing" and not loc:
        return ApiError(400, "the request needs a JSON object body", code="invalid_json")
    return ApiError(400, f"{param or 'body'}: {err.get('msg')}", param=param, code="invalid_value")


# ------------------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the served model
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    return_token_ids: bool = False  # as vLLM: the prompt's and every choice's token ids in the answer


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None


# ------------------------------------------------------------------------------------------------ the engine
class Engine:
    """The model, its tokenizer and chat format, and the scheduler that runs it; turns requests into prompts."""

    def __init__(self, model, tokenizer, *, name: str, template: str = "auto", max_batch: int = 32,
                 batched: bool = True, aliases: tuple[str, ...] = ()):
        from ..commands.chat import context_limit, stop_strings
        from ..data.chat import ChatFormat

        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.names = {name, *aliases}
        self.fmt = ChatFormat(tokenizer, template)
        self.chat_stops = tuple(stop_strings(self.fmt))
        self.context = context_limit(model)
        self.created = int(time.time())
        self.scheduler = Scheduler(model, tokenizer, max_batch=max_batch, batched=batched)

    def close(self) -> None:
        self.scheduler.close()

    # ------------------------------------------------------------------ validation
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.name!r}",
                           param="model", code="model_not_found")

    def params(self, req: _Request, prompt_len: int, *, chat: bool) -> list[Params]:
        """One Params per choice, after checking what the request asks against the model's context."""
        for key in ("presence_penalty", "frequency_penalty"):
            if getattr(req, key):
                raise ApiError(400, f"{key}: not supported by lmlab serve (use 0)", param=key, code="unsupported")
        if req.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs: not supported by lmlab serve", param="logprobs", code="unsupported")
        if req.n > self.scheduler.max_batch:
            raise ApiError(400, f"n: at most {self.scheduler.max_batch} (the server's batch), got {req.n}",
                           param="n", code="invalid_value")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(s == "" for s in stops):
            raise ApiError(400, "stop: an empty string cannot be a stop sequence", param="stop", code="invalid_value")
        key = "max_completion_tokens" if chat and getattr(req, "max_completion_tokens", None) is not None \
            else "max_tokens"
        asked = getattr(req, key)
        limit = self.context
        if limit is not None and prompt_len >= limit:
            raise ApiError(400, f"the prompt is {prompt_len} tokens and the model's context is {limit} tokens: "
                                f"no room for a reply; shorten the prompt", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        room = (limit - prompt_len) if limit is not None else None
        if asked is not None:
            if asked <= 0:
                raise ApiError(400, f"{key}: must be at least 1, got {asked}", param=key, code="invalid_value")
            if room is not None and asked > room:
                raise ApiError(400, f"{key}: {asked} is too large: the prompt is {prompt_len} tokens and the model's "
                                    f"context is {limit} tokens, so at most {room} can follow",
                               param=key, code="context_length_exceeded")
            max_tokens = asked
        else:  # OpenAI's defaults: the rest of the context for chat, 16 for completions
            max_tokens = room if chat else min(16, room if room is not None else 16)
            if max_tokens is None:
                max_tokens = 256
        stop_ids = {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set()
        if chat:
            stop_ids.add(self.fmt.end_of_turn_id)
            stops = [*stops, *self.chat_stops]
        return [Params(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                       seed=None if req.seed is None else (req.seed + i) % (1 << 63), stop=tuple(stops),
                       stop_ids=frozenset(stop_ids), strip=chat) for i in range(req.n)]

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        p = req.prompt
        if isinstance(p, str):
            texts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            texts = [list(p)]
        else:
            texts = list(p)
        if not texts:
            raise ApiError(400, "prompt: must not be empty", param="prompt", code="invalid_value")
        vocab = len(self.tokenizer)
        out = []
        for t in texts:
            if isinstance(t, str):  # as `lmlab generate`: the tokenizer's own encoding, an empty prompt is eos
                ids = self.tokenizer.encode(t) if t else [self.tokenizer.eos_token_id]
            else:
                if not t or any(not 0 <= i < vocab for i in t):
                    raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt",
                                   code="invalid_value")
                ids = list(t)
            out.append(ids)
        return out

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        msgs = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise ApiError(400, f"messages[{i}].role: unknown role {m.role!r}; allowed: system, user, assistant",
                               param=f"messages[{i}].role", code="invalid_value")
            if isinstance(m.content, list):
                bad = [p.type for p in m.content if p.type != "text"]
                if bad:
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported, got {bad[0]!r}",
                                   param=f"messages[{i}].content", code="invalid_value")
                text = "".join(p.text or "" for p in m.content)
            else:
                text = m.content or ""
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": text})
        if not any(m["role"] == "user" for m in msgs):
            raise ApiError(400, "messages: the conversation needs at least one user turn", param="messages",
                           code="invalid_value")
        from ..errors import LmlabError

        try:
            return self.fmt.prompt_ids(msgs)
        except LmlabError as e:
            raise ApiError(400, f"messages: {e}", param="messages", code="invalid_value") from None


# ------------------------------------------------------------------------------------------------ relaying
async def _events(engine: Engine, prompts: list[list[int]], params: list[Params]) -> AsyncIterator:
    """Queue every prompt × choice and yield their events as they come; leaving early cancels them all."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(ev) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, ev)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    seqs = []
    try:
        for k, ids in enumerate(prompts):
            seqs += engine.scheduler.submit(ids, params, sink, first_index=k * len(params))
        left = len(seqs)
        while left:
            ev = await q.get()
            if isinstance(ev, (Finished, Failed)):
                left -= 1
            yield ev
    finally:
        for s in seqs:
            s.cancel()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _Call:
    """One API call's identity and the shape of its answers (completions or chat)."""

    def __init__(self, engine: Engine, chat: bool, prompts: list[list[int]], n: int, token_ids: bool):
        self.engine, self.chat, self.prompts, self.n, self.token_ids = engine, chat, prompts, n, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def head(self, chunk: bool) -> dict:
        return {"id": self.id, "object": self.object + (".chunk" if chunk and self.chat else ""),
                "created": self.created, "model": self.engine.name}

    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def choice(self, index: int, text: str, finish: str | None, delta: bool, role: bool = False) -> dict:
        if self.chat:
            body = {"role": "assistant", "content": text} if not delta else (
                {"role": "assistant", "content": text} if role else ({"content": text} if text else {}))
            c = {"index": index, ("delta" if delta else "message"): body, "logprobs": None, "finish_reason": finish}
        else:
            c = {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return c


def _finish_reason(ev: Finished) -> str:
    return "length" if ev.reason == "length" else "stop"


async def _answer(call: _Call, params: list[Params], request: Request) -> Response:
    texts: dict[int, list[str]] = {}
    done: dict[int, Finished] = {}

    async def collect() -> None:
        async with aclosing(_events(call.engine, call.prompts, params)) as events:
            async for ev in events:
                if isinstance(ev, Failed):
                    raise ApiError(500, ev.message, type="server_error", code="generation_failed")
                texts.setdefault(ev.index, []).append(ev.text)
                if isinstance(ev, Finished):
                    done[ev.index] = ev

    task = asyncio.ensure_future(collect())
    try:
        while not (await asyncio.wait({task}, timeout=0.25))[0]:
            if await request.is_disconnected():  # the client left: free its slots, answer nobody
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
                return Response(status_code=499)
    finally:
        task.cancel()
    task.result()
    choices = []
    for i in sorted(done):
        c = call.choice(i, "".join(texts[i]), _finish_reason(done[i]), delta=False)
        if call.token_ids:
            c["token_ids"] = done[i].token_ids
        choices.append(c)
    body = {**call.head(False), "choices": choices,
            "usage": _usage(call.prompt_tokens(), sum(f.completion_tokens for f in done.values()))}
    if call.token_ids:
        body["prompt_token_ids"] = call.prompts[0] if len(call.prompts) == 1 else call.prompts
    return JSONResponse(body)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(call: _Call, params: list[Params], include_usage: bool) -> AsyncIterator[str]:
    completion = 0
    if call.chat:
        for i in range(len(call.prompts) * call.n):
            yield _sse({**call.head(True), "choices": [call.choice(i, "", None, delta=True, role=True)]})
    async with aclosing(_events(call.engine, call.prompts, params)) as events:
        async for ev in events:
            if isinstance(ev, Failed):
                yield _sse(ApiError(500, ev.message, type="server_error", code="generation_failed").body())
                return
            if isinstance(ev, Delta):
                c = call.choice(ev.index, ev.text, None, delta=True)
                if call.token_ids:
                    c["token_ids"] = ev.token_ids
                yield _sse({**call.head(True), "choices": [c]})
            else:
                completion += ev.completion_tokens
                c = call.choice(ev.index, ev.text, _finish_reason(ev), delta=True)
                if call.token_ids:  # the tokens no Delta carried: held text, the end token
                    c["token_ids"] = ev.tail_ids
                yield _sse({**call.head(True), "choices": [c]})
    if include_usage:
        yield _sse({**call.head(True), "choices": [], "usage": _usage(call.prompt_tokens(), completion)})
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------ the app
class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413. The body is read and dropped (up to
    64 × limit) so that the client gets the answer instead of a reset connection."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._drain(receive)
            return await self._refuse(scope, send, int(length))
        seen, over = 0, False

        async def counted():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request" and not over:
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # a body without Content-Length: cut it, drop the app's answer
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return msg

        async def guarded(msg):
            if not over:
                await send(msg)

        await self.app(scope, counted, guarded)
        if over:
            await self._drain(receive)
            await self._refuse(scope, send, seen)

    async def _drain(self, receive) -> None:
        got = 0
        while got <= 64 * self.limit:
            msg = await receive()
            if msg["type"] != "http.request" or not msg.get("more_body"):
                return
            got += len(msg.get("body", b""))

    async def _refuse(self, scope, send, size: int) -> None:
        err = ApiError(413, f"the request body is over {self.limit:,} bytes ({size:,} seen); this server takes at "
                            f"most {self.limit:,} (lmlab serve --max-body)", code="request_too_large")
        await err.response()(scope, None, send)


class _ApiKey:
    """ASGI middleware: every route but the page itself wants `Authorization: Bearer <key>` (else 401)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") != "/":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
                return await err.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def page_html() -> str:
    return resources.files("lmlab.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(engine: Engine, *, api_key: str | None = None, max_body: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving `engine`; with `api_key`, every API route wants `Authorization: Bearer KEY`."""
    app = FastAPI(title="lmlab serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        return ApiError(exc.status_code, msg, code=code).response()

    def _model_card() -> dict:
        return {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "lmlab",
                "context_length": engine.context}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(page_html())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, **engine.scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        engine.check_model(model_id)
        return _model_card()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        engine.check_model(req.model)
        if req.echo:
            raise ApiError(400, "echo: not supported by lmlab serve", param="echo", code="unsupported")
        prompts = engine.completion_prompts(req)
        params = engine.params(req, max(len(p) for p in prompts), chat=False)
        call = _Call(engine, False, prompts, req.n, req.return_token_ids)
        return await _respond(call, params, req, request)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        engine.check_model(req.model)
        prompt = engine.chat_prompt(req)
        params = engine.params(req, len(prompt), chat=True)
        call = _Call(engine, True, [prompt], req.n, req.return_token_ids)
        return await _respond(call, params, req, request)

    async def _respond(call: _Call, params: list[Params], req: _Request, request: Request):
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_stream(call, params, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _answer(call, params, request)

    if api_key is not None:
        app.add_middleware(_ApiKey, key=api_key)
    app.add_middleware(_BodyLimit, limit=max_body)  # outermost: a huge body is refused before anything else
    return app

