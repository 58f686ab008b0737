"""Continuous batching: one model thread that admits and retires sequences between decode steps.

    sched = Scheduler(model, tokenizer, max_batch=32)          starts the model thread
    seqs = sched.submit(prompt_ids, [params] * n, sink)         n choices of one prompt; events go to sink(event)
    seq.cancel()                                                the client left: the sequence frees its slot
    sched.close()

Each loop of the model thread: take the new requests, drop cancelled sequences, prefill each admitted prompt
alone (batch 1, once per request however many choices it asks for) and sample its first token, then run ONE
decode step over every active sequence at once and sample each row with its own settings and generator.
A sequence leaves the batch as soon as it ends (end token, stop string, max_tokens) and a waiting one takes
its slot at the next loop, so short and long requests never wait for each other's ends.

How the per-sequence caches become one batch (a `Decoder`):

    Recurrent   lmlab's own models (MambaSWELU's conv + SSM state, INL's keys/values or running context sum):
                states concatenated along the batch; INL keys/values of different lengths are left-padded and
                masked; every row gets its own positions.
    KeyValue    transformers models whose DynamicCache holds only full-attention layers (Llama, ...): keys and
                values left-padded to the longest row, with an attention mask and per-row position ids.
    Sequential  one sequence at a time, each with its own cache, through `lmlab.models.hf.forward_cached`
                exactly as `lmlab generate` decodes: the reference the batched decoders are tested against,
                and what any other cache (sliding windows, leaky INL options, ...) uses.

Events (`Delta`, `Finished`, `Failed`) are plain objects handed to the sink from the model thread; the HTTP
side turns them into JSON. Text is decoded incrementally: an incomplete UTF-8 character or the start of a stop
string is held back until it is settled, and a stop string is never sent.
"""

from __future__ import annotations

import copy
import queue
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..generate import SamplingConfig, next_token
from ..models.hf import forward_cached, is_lmlab_model, new_cache

# ------------------------------------------------------------------------------------------------ requests


@dataclass
class Params:
    """What one choice asks for. `stop_ids`: tokens that end it (not part of its text); `stop`: strings that end
    it (cut from its text); `strip`: drop the reply's leading and trailing whitespace (chat replies, as
    `lmlab chat` shows them)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    strip: bool = False


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    index: int
    text: str  # what was held back until the end (may be "")
    reason: str  # "stop" | "length" | "cancelled"
    completion_tokens: int
    token_ids: list[int]  # every token sampled, the end token included
    tail_ids: list[int]  # those no Delta carried (held text, the end token)


@dataclass
class Failed:
    index: int
    message: str


Event = Delta | Finished | Failed


class _Text:
    """Incremental detokenization with stop strings: `push(id)` → (new text that is safe to send, stopped)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], strip: bool):
        self.tok, self.stops, self.strip = tokenizer, stops, strip
        self.ids: list[int] = []
        self.text, self.sent = "", 0

    def push(self, token_id: int) -> tuple[str, bool]:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if self.strip:
            text = text.lstrip()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return "", False
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._release(len(self.text)), True
        self.text = text
        upto = len(text) - self._held(text)
        if self.strip:  # trailing whitespace waits: a reply that ends there loses it
            upto = min(upto, len(text.rstrip()))
        return self._release(upto), False

    def _held(self, text: str) -> int:
        """Length of the longest tail of `text` that could still grow into a stop string."""
        for k in range(min(len(text), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(text[-k:]) for s in self.stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        out = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return out

    def flush(self) -> str:
        if self.strip:
            self.text = self.text.rstrip()
        return self._release(len(self.text))


class Sequence:
    """One choice being generated: its settings, generator, text state and where its events go."""

    def __init__(self, index: int, prompt_len: int, params: Params, tokenizer, sink: Callable[[Event], None],
                 device: torch.device):
        self.index, self.prompt_len, self.params, self.sink = index, prompt_len, params, sink
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.sampling = SamplingConfig(temperature=params.temperature, top_k=0, top_p=params.top_p)
        self.text = _Text(tokenizer, params.stop, params.strip)
        self.tokens: list[int] = []
        self.unsent: list[int] = []
        self.cancelled = False
        self.done = False

    def cancel(self) -> None:
        """Free this sequence's slot at the model thread's next loop (safe from any thread)."""
        self.cancelled = True

    @property
    def position(self) -> int:
        """Position of the last sampled token, the one the next decode step feeds."""
        return self.prompt_len + len(self.tokens) - 1

    def accept(self, token_id: int) -> bool:
        """Take a sampled token, send what it settles; True when the sequence has ended."""
        self.tokens.append(token_id)
        self.unsent.append(token_id)
        if token_id in self.params.stop_ids:
            return self.finish("stop")
        delta, stopped = self.text.push(token_id)
        if delta:
            self.sink(Delta(self.index, delta, self.unsent))
            self.unsent = []
        if stopped:
            return self.finish("stop")
        if len(self.tokens) >= self.params.max_tokens:
            return self.finish("length")
        return False

    def finish(self, reason: str) -> bool:
        self.done = True
        self.sink(Finished(self.index, self.text.flush(), reason, len(self.tokens), list(self.tokens),
                           self.unsent))
        return True

    def fail(self, message: str) -> None:
        self.done = True
        self.sink(Failed(self.index, message))


def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits (b, V) → one token per row, each with its own temperature, top-p and generator."""
    greedy = logits.argmax(-1).tolist()
    return [greedy[i] if s.sampling.temperature <= 0 else int(next_token(logits[i:i + 1], s.sampling, s.generator)[0])
            for i, s in enumerate(seqs)]


# ------------------------------------------------------------------------------------------------ decoders
class Sequential:
    """Every sequence keeps its own cache and decodes alone, as `lmlab generate` does (the reference)."""

    name = "sequential (one sequence per forward)"

    def __init__(self, model):
        self.model = model
        self.caches: list = []

    def add(self, cache) -> None:
        self.caches.append(cache)

    def keep(self, rows: list[int]) -> None:
        self.caches = [self.caches[i] for i in rows]

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return torch.cat([forward_cached(self.model, torch.tensor([[t]], device=dev), c)[:, -1]
                          for t, c in zip(tokens, self.caches)])


def _pad_left(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero-pad `x` on the left of `dim` to `length`."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [missing, 0]
    return F.pad(x, pad)


class _Padded:
    """Bookkeeping for key/value rows left-padded to a common length: `valid` (b, L) bool."""

    valid: torch.Tensor | None = None

    def _join_valid(self, old_len: int, new_len: int, new_rows: int, device) -> tuple[int, torch.Tensor | None]:
        """The common length after adding `new_rows` rows of `new_len` keys to rows padded to `old_len`."""
        length = max(old_len, new_len)
        parts = []
        if self.valid is not None:
            parts.append(_pad_left(self.valid, length, 1))
        row = torch.zeros(new_rows, length, dtype=torch.bool, device=device)
        row[:, length - new_len:] = True
        parts.append(row)
        return length, torch.cat(parts)

    def _keep_valid(self, rows: list[int]) -> int:
        """Keep `rows`; returns how many leading columns are now padding in every row (to be cut)."""
        self.valid = self.valid[rows]
        trim = int((~self.valid).all(0).long().cumprod(0).sum())
        self.valid = self.valid[:, trim:]
        return trim

    def _mask(self) -> torch.Tensor | None:
        """(b, L + 1) for the next step (the new token is always valid); None when no row is padded."""
        if self.valid is None or bool(self.valid.all()):
            return None
        return F.pad(self.valid, (0, 1), value=True)


class Recurrent:
    """lmlab's own caches (MambaCache, INLCache) joined with their `stack` and parted with `split`: fixed-size
    states are concatenated, INL keys/values left-padded and masked, and every row keeps its own position
    (`lengths`), so the model is simply called on the batch."""

    name = "batched (recurrent state / keys and values per sequence, stacked)"

    def __init__(self, model):
        self.model = model
        self.cache = None

    @staticmethod
    def supports(model, probe) -> bool:
        if not (callable(getattr(type(probe), "stack", None)) and callable(getattr(probe, "split", None))):
            return False
        try:  # INL's leaky options re-read whole rows and refuse to stack
            type(probe).stack([probe])
        except ValueError:
            return False
        return True

    def add(self, cache) -> None:
        self.cache = type(cache).stack([cache] if self.cache is None else [self.cache, cache])

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.cache = None
            return
        parts = self.cache.split()  # one cache per row, its padding dropped: re-stacking trims what retired rows left
        self.cache = type(self.cache).stack([parts[i] for i in rows])

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return self.model(torch.tensor(tokens, device=dev)[:, None], cache=self.cache).logits[:, -1]


class KeyValue(_Padded):
    """A transformers DynamicCache of full-attention layers for the batch: rows left-padded to the longest,
    an attention mask over the padding and per-row position ids (what batched `generate` does)."""

    name = "batched (keys and values per sequence, left-padded)"

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.length = 0

    @staticmethod
    def supports(model, probe) -> bool:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        return (isinstance(probe, DynamicCache) and len(probe.layers) > 0
                and all(type(layer) is DynamicLayer for layer in probe.layers))

    def _rebuild(self, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(layers):
            self.cache.update(k, v, i)

    def add(self, cache) -> None:
        mine = [(layer.keys, layer.values) for layer in cache.layers]
        new_len = mine[0][0].shape[2]
        length, valid = self._join_valid(self.length, new_len, 1, mine[0][0].device)
        if self.cache is None:
            self.cache = cache
        else:
            self._rebuild([(torch.cat([_pad_left(layer.keys, length, 2), _pad_left(k, length, 2)]),
                            torch.cat([_pad_left(layer.values, length, 2), _pad_left(v, length, 2)]))
                           for layer, (k, v) in zip(self.cache.layers, mine)])
        self.length, self.valid = length, valid

    def keep(self, rows: list[int]) -> None:
        if not rows:
            self.cache, self.valid, self.length = None, None, 0
            return
        trim = self._keep_valid(rows)
        self.length -= trim
        idx = torch.tensor(rows, device=self.valid.device)
        self._rebuild([(layer.keys.index_select(0, idx)[:, :, trim:], layer.values.index_select(0, idx)[:, :, trim:])
                       for layer in self.cache.layers])

    def step(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        from .._compat import HF_CACHE_KWARG

        dev = self.valid.device
        mask = self._mask()
        kwargs = {} if mask is None else {"attention_mask": mask.long()}
        out = self.model(input_ids=torch.tensor(tokens, device=dev)[:, None],
                         position_ids=torch.tensor(positions, device=dev)[:, None], use_cache=True,
                         **{HF_CACHE_KWARG: self.cache}, **kwargs)
        self.length += 1
        self.valid = F.pad(self.valid, (0, 1), value=True)
        return out.logits[:, -1]


def make_decoder(model, batched: bool = True):
    """The batched decoder this model's cache allows (probed with a one-token prefill), else `Sequential`."""
    if not batched:
        return Sequential(model)
    probe = new_cache(model)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        forward_cached(model, torch.zeros(1, 1, dtype=torch.long, device=dev), probe)
    kinds = (Recurrent,) if is_lmlab_model(model) else (KeyValue,)
    for kind in kinds:
        if kind.supports(model, probe):
            return kind(model)
    return Sequential(model)


# ------------------------------------------------------------------------------------------------ the scheduler
@dataclass
class _Group:
    """One prompt and its choices (prefilled once)."""

    prompt_ids: list[int]
    seqs: list[Sequence] = field(default_factory=list)


class Scheduler:
    """Owns the model: one daemon thread runs every forward. `submit` and `Sequence.cancel` are thread-safe."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, batched: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.device = next(model.parameters()).device
        self.decoder = make_decoder(model, batched)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Group] = deque()
        self._active: list[Sequence] = []
        self._closed = False
        self.steps = 0  # decode steps run
        self.rows = 0  # sequences summed over those steps (rows / steps = mean batch)
        self.cancelled = 0  # sequences whose client left before their end
        self._thread = threading.Thread(target=self._run, name="lmlab-serve-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ any thread
    def submit(self, prompt_ids: list[int], params: list[Params], sink: Callable[[Event], None],
               first_index: int = 0) -> list[Sequence]:
        """Queue `len(params)` choices of one prompt; their events go to `sink` with indices from `first_index`."""
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        if not 1 <= len(params) <= self.max_batch:
            raise ValueError(f"{len(params)} choices; allowed: 1 to {self.max_batch}")
        group = _Group(list(prompt_ids), [Sequence(first_index + i, len(prompt_ids), p, self.tokenizer, sink,
                                                   self.device) for i, p in enumerate(params)])
        self._inbox.put(group)
        return group.seqs

    def stats(self) -> dict:
        return {"active": len(self._active), "waiting": sum(len(g.seqs) for g in self._waiting),
                "max_batch": self.max_batch, "decoder": self.decoder.name, "decode_steps": self.steps,
                "decode_rows": self.rows, "mean_batch": round(self.rows / self.steps, 2) if self.steps else 0.0,
                "cancelled": self.cancelled}

    def close(self, timeout: float = 10.0) -> None:
        self._closed = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the model thread
    def _run(self) -> None:
        while True:
            try:  # block only when there is nothing to do
                item = self._inbox.get() if not (self._active or self._waiting) else self._inbox.get_nowait()
                while True:
                    if item is None:
                        return
                    self._waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            with torch.inference_mode():
                self._retire([i for i, s in enumerate(self._active) if s.cancelled], "cancelled")
                self._admit()
                if self._active:
                    self._step()

    def _retire(self, rows: list[int], reason: str) -> None:
        if not rows:
            return
        for i in rows:
            if not self._active[i].done:
                self.cancelled += reason == "cancelled"
                self._active[i].finish(reason)
        gone = set(rows)
        keep = [i for i in range(len(self._active)) if i not in gone]
        self.decoder.keep(keep)
        self._active = [self._active[i] for i in keep]

    def _admit(self) -> None:
        while self._waiting:
            group = self._waiting[0]
            live = [s for s in group.seqs if not s.cancelled]
            if len(live) > self.max_batch - len(self._active):
                return
            self._waiting.popleft()
            for s in group.seqs:
                if s.cancelled:
                    self.cancelled += 1
                    s.finish("cancelled")
            if live:
                self._prefill(group.prompt_ids, live)

    def _prefill(self, prompt_ids: list[int], seqs: list[Sequence]) -> None:
        try:
            cache = new_cache(self.model)
            logits = forward_cached(self.model, torch.tensor([prompt_ids], device=self.device), cache)[:, -1]
            for k, s in enumerate(seqs):
                if not s.accept(_sample(logits, [s])[0]):
                    self.decoder.add(cache if k == len(seqs) - 1 else copy.deepcopy(cache))
                    self._active.append(s)
        except Exception as e:  # noqa: BLE001 - the request fails, the server keeps serving
            self._fail(seqs, e)
            self.decoder.keep([i for i, s in enumerate(self._active) if s not in seqs])
            self._active = [s for s in self._active if s not in seqs]

    def _step(self) -> None:
        seqs = self._active
        try:
            logits = self.decoder.step([s.tokens[-1] for s in seqs], [s.position for s in seqs])
            self.steps += 1
            self.rows += len(seqs)
            ended = [i for i, (s, t) in enumerate(zip(seqs, _sample(logits, seqs))) if s.accept(t)]
        except Exception as e:  # noqa: BLE001 - the batch fails, the server keeps serving
            self._fail(seqs, e)
            self.decoder.keep([])
            self._active = []
            return
        self._retire(ended, "stop")

    @staticmethod
    def _fail(seqs: list[Sequence], e: Exception) -> None:
        from ..fsutil import first_line

        for s in seqs:
            if not s.done:
                s.fail(f"generation failed: {type(e).__name__}: {first_line(e)}")
