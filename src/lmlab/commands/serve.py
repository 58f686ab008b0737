"""lmlab serve: an OpenAI-compatible HTTP server for a run or a model, with continuous batching and a chat page.

    lmlab serve runs/chat-sft                           http://127.0.0.1:8000/v1 (API) and / (chat page)
    lmlab serve runs/sft-lora --merge                   a LoRA/QLoRA run with its adapters folded into the base
    lmlab serve runs/x --host 0.0.0.0 --api-key KEY     open to the network; every API route wants the key

Anything `lmlab generate` loads is served: a run folder (final/ or its latest checkpoint, a LoRA run with its
adapters), a model folder, a hub id. Chat requests are rendered with the model's own chat
template (`--template`). docs/serving.md has the routes, what is batched, and the limits.
"""

from __future__ import annotations

import os

from ._common import add_device_flag, add_template_flag


def add_arguments(p) -> None:
    p.add_argument("model", help="run folder (a LoRA run: base + adapters), model folder, or hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free one, printed at start)")
    p.add_argument("--api-key", default=os.environ.get("LMLAB_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every API route (default: $LMLAB_API_KEY)")
    p.add_argument("--name", help="the model id clients use (default: the folder's name)")
    add_template_flag(p)
    p.add_argument("--merge", action="store_true", help="a LoRA/QLoRA run: fold its adapters into the base first")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--no-batch", action="store_true",
                   help="decode one sequence at a time (the reference path; same answers, slower)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes (else 413)")
    add_device_flag(p)
    p.add_argument("--log-requests", action="store_true", help="print one line per HTTP request")


def load(spec: str, device: str = "auto", merge: bool = False):
    """(model, tokenizer) for serving: `lmlab.inference.load_for_inference`, or a LoRA/QLoRA run merged."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..inference import load_for_inference
    from ..runtime import pick_device

    path = Path(spec)
    if merge:
        from ..runs import is_run
        from ..runs.load import load_run_model

        if not is_run(path):
            raise ConfigError(f"--merge: {spec} is not a run folder (merging folds a LoRA run's adapters)")
        model, tok = load_run_model(path, merge=True)
        return model.to(pick_device(device)).eval(), tok
    return load_for_inference(spec, device)


def _socket(host: str, port: int):
    import socket

    from ..errors import ConfigError

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ConfigError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    from pathlib import Path

    import torch

    from ..errors import ConfigError

    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ConfigError(f"lmlab serve needs {e.name}: pip install 'lmlab[serve]'") from None
    from ..serve.app import Engine, create_app

    if args.max_batch < 1:
        raise ConfigError(f"--max-batch: must be >= 1, got {args.max_batch}")
    if args.max_body < 1024:
        raise ConfigError(f"--max-body: must be at least 1024 bytes, got {args.max_body}")
    if args.api_key is not None and not args.api_key.strip():
        raise ConfigError("--api-key: must not be empty")
    sock = _socket(args.host, args.port)  # before loading: a busy port fails in a second
    model, tok = load(args.model, args.device, args.merge)
    spec = Path(args.model)
    name = args.name or (spec.parent.name if spec.name == "final" else spec.name) or args.model
    engine = Engine(model, tok, name=name, template=args.template, max_batch=args.max_batch,
                    batched=not args.no_batch, aliases=(args.model,))
    params = sum(p.numel() for p in model.parameters())
    dev = next(model.parameters()).device
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"lmlab serve  {args.model}  ({type(model).__name__}, {params:,} parameters, {dev.type} {dtype}, "
          f"{torch.get_num_threads()} threads)")
    print(f"model        {name}  ·  context {engine.context or 'unlimited'} tokens  ·  chat template "
          f"{engine.fmt.name}")
    print(f"batching     up to {args.max_batch} sequences, {engine.scheduler.decoder.name}")
    print(f"listening    http://{shown}:{port}  ·  OpenAI API at /v1  ·  chat page at /"
          + ("  ·  API key required" if args.api_key else ""))
    if host not in ("127.0.0.1", "::1", "localhost") and not args.api_key:
        print("warning      open to the network with no --api-key: anyone who can reach it can use it")
    print("             Ctrl-C stops", flush=True)
    app = create_app(engine, api_key=args.api_key, max_body=args.max_body)
    config = uvicorn.Config(app, log_level="info" if args.log_requests else "warning", access_log=args.log_requests,
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then raises the signal again
        pass
    finally:
        engine.close()
        sock.close()
    print("stopped", flush=True)
    return 0
