"""Group relative policy optimisation (`train.objective=grpo`; Shao et al., 2024, DeepSeekMath): reinforcement
learning with verifiable rewards, on-policy, without a value model.

Each optimizer step (`before_step`, before its batches are drawn):
1. rollouts: train.batch_size × train.grad_accum prompts of this rank (lmlab.data.prompts), each repeated G =
   rl.num_generations times, sampled from the current policy with the model's own cached generation
   (lmlab.generate: recurrent state for MambaSWELU, KV cache for transformers); prompts of one token length
   share one batched call, so no prompt is padded. A completion ends at the first end-of-text token (kept:
   the model learns to stop) or after rl.max_completion_length tokens. The sampling generator is seeded from
   (train.seed, step, rank): a resumed run samples exactly what the uninterrupted one would.
2. rewards: Σ_k w_k·f_k(prompts, completions, **columns) over rl.reward_funcs (lmlab.rewards).
3. advantages, within each group of G: A = r − mean(r), divided by std(r) + 1e-4 (rl.scale_rewards=group, GRPO),
   by the std over the whole batch (batch), or not at all (none: Dr. GRPO, Liu et al., 2025).
4. for rl.iterations = μ > 1 the batch serves μ optimizer steps; the log-probabilities of the sampling policy
   (π_old) and of the reference are taken once, at rollout time.

The loss per completion token t (PPO's clipped surrogate with GRPO's per-token KL estimator):

    ρ = π_θ(t) / π_old(t)       (= 1 with a gradient when μ = 1)
    ℓ_t = −min(ρ·A, clip(ρ, 1 − ε, 1 + ε_high)·A) + β·(π_ref/π_θ − log(π_ref/π_θ) − 1)
    ε = rl.epsilon (0.2), ε_high = rl.epsilon_high (DAPO's clip-higher, Yu et al., 2025: 0.28; default ε),
    β = rl.beta (0: no KL term and no reference model)

aggregated by rl.loss_type: `grpo` (mean over each completion's tokens, then over completions: GRPO),
`dapo` (mean over every completion token of the optimizer step, across micro-batches and ranks: DAPO's
token-level loss), `dr_grpo` (sum over tokens / (completions × rl.max_completion_length): Dr. GRPO).

Units: count() is the number of completions; the loss and metrics are sums chosen so that the trainer's
division by the step's completions gives what each name says (TRL's names): reward (mean total reward per
completion), rewards/<fn> (each function's raw mean), reward_std (mean within-group std), frac_reward_zero_std
(groups whose completions all scored alike: no learning signal), completion_length (mean tokens), kl and
clip_ratio (means over completion tokens; clip_ratio counts tokens whose ratio was clipped). At log steps
rank 0 appends the first rl.log_completions completions, with each reward and any note (the sandbox's
reason), to RUN/samples_grpo.jsonl.

Validation (train.eval_every): greedy completions of the held-out prompts; val_loss is minus the weighted
mean reward (lower is better, as for every objective), with val_reward and val_rewards/<fn> beside it.
Strategies: ddp (rollouts need no collective); fsdp and deepspeed are refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..data.chat import IGNORE
from ..data.examples import RowStream, chat_format
from ..errors import ConfigError
from .ipo import FrozenReference
from .losses import lm_token_logps, token_logps  # noqa: F401  (token_logps: the plain path, re-exported)
from .objectives import Batch, Objective, ObjectiveData

ADV_EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


# ------------------------------------------------------------------------------------------------ the maths
def group_advantages(rewards: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages (n,), per-completion std of its group (n,)) for `rewards` (n,) laid out as consecutive groups
    of `group`; scale: group (÷ group std), batch (÷ std of all n), none."""
    g = rewards.view(-1, group)
    std = g.std(dim=1, keepdim=True).expand_as(g).reshape(-1)
    adv = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        adv = adv / (std + ADV_EPS)
    elif scale == "batch":
        adv = adv / (rewards.std() + ADV_EPS)
    return adv, std


def grpo_terms(logp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, adv: torch.Tensor,
               mask: torch.Tensor, *, epsilon: float, epsilon_high: float, beta: float, loss_type: str,
               tok_scale: float, max_len: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, {kl, clip_ratio} sums) from per-token log-probabilities (b, t) of the policy, the sampling
    policy and the reference, advantages (b,) and the completion mask (b, t). `tok_scale` = completions /
    completion tokens of the whole step (so token means survive the trainer's division by completions)."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a)
    kl = None
    if beta != 0 and ref is not None:
        d = ref - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum()
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() * tok_scale
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / max_len
    else:
        raise ConfigError(f"rl.loss_type: {loss_type!r}; allowed: dapo, grpo, dr_grpo")
    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
        metrics = {"clip_ratio": (clipped * mask).sum() * tok_scale,
                   "kl": (kl * mask).sum() * tok_scale if kl is not None else torch.zeros((), device=logp.device)}
    return loss, metrics


# ------------------------------------------------------------------------------------------------ rollouts
class RolloutStream:
    """The train stream of GRPO: micro-batches of rollouts made by `GRPO.before_step`. Its state (checkpointed by
    the trainer) is the prompt position and, when rl.iterations > 1 leaves rollouts pending, every rank's
    pending micro-batches (gathered to rank 0, which writes the checkpoint)."""

    def __init__(self, prompts: RowStream, rt, grad_accum: int):
        self.prompts, self.rt, self.grad_accum = prompts, rt, grad_accum
        self.buffer: list[Batch] = []  # this step's micro-batches
        self.uses_left = 0  # optimizer steps the buffer still serves
        self.cursor = 0

    def next(self) -> Batch:
        if not self.buffer:
            raise RuntimeError("GRPO: no rollouts; before_step makes them")
        batch = self.buffer[self.cursor]
        self.cursor += 1
        if self.cursor == len(self.buffer):
            self.cursor, self.uses_left = 0, self.uses_left - 1
            if self.uses_left == 0:
                self.buffer = []
        return batch

    def state_dict(self) -> dict:
        """Collective when several ranks train: every rank's pending rollouts, gathered."""
        mine = {"buffer": self.buffer, "uses_left": self.uses_left, "cursor": self.cursor}
        everyone = self.rt.all_gather_object(mine) if self.rt.world_size > 1 else [mine]
        return {"prompts": self.prompts.state_dict(), "pending": everyone}

    def load_state_dict(self, state: dict) -> None:
        self.prompts.load_state_dict(state["prompts"])
        pending = state.get("pending") or []
        if len(pending) != self.rt.world_size:
            if any(p["buffer"] for p in pending):
                raise ConfigError(f"GRPO: the checkpoint holds pending rollouts of {len(pending)} rank(s); resume it "
                                  f"on as many ranks")
            pending = [{"buffer": [], "uses_left": 0, "cursor": 0}] * self.rt.world_size
        mine = pending[self.rt.rank]
        self.buffer, self.uses_left, self.cursor = list(mine["buffer"]), int(mine["uses_left"]), int(mine["cursor"])


class GRPO(Objective):
    name = "grpo"
    unit = "completions"

    def __init__(self, cfg):
        super().__init__(cfg)
        from ..rewards import resolve, reward_name

        rl = cfg.rl
        self.reward_names = [reward_name(n) for n in rl.reward_funcs]
        if len(set(self.reward_names)) != len(self.reward_names):
            raise ConfigError(f"rl.reward_funcs: two functions share a name ({', '.join(rl.reward_funcs)})")
        self.reward_fns = [resolve(n) for n in rl.reward_funcs]
        self.reward_weights = list(rl.reward_weights) or [1.0] * len(self.reward_fns)
        self.reference = None
        self.rt = None

    # ------------------------------------------------------------------------------------------ data
    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        from ..data.prompts import load_prompts
        from ..data.tokenizer import tokenizer_fingerprint

        t, rl = cfg.train, cfg.rl
        fmt = chat_format(cfg, tokenizer)
        data = load_prompts(cfg)
        self.tokenizer, self.rt = tokenizer, rt
        self.eos = tokenizer.eos_token_id
        self.train_prompts = data.train
        self.train_ids = [fmt.prompt_ids(p.messages) for p in data.train]
        self.val_prompts = data.val
        self.val_ids = [fmt.prompt_ids(p.messages) for p in data.val]
        longest = max(map(len, self.train_ids))
        if longest + rl.max_completion_length > cfg.data.seq_len:
            raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is shorter than the longest prompt ({longest} "
                              f"tokens) + rl.max_completion_length ({rl.max_completion_length})")
        prompts = RowStream(len(data.train), t.batch_size, lambda idx: {"index": torch.as_tensor(idx)}, seed=t.seed,
                            rank=rt.rank, world_size=rt.world_size, what="prompts")
        self.stream = RolloutStream(prompts, rt, t.grad_accum)

        def val_batches() -> Iterator[Batch]:
            b, w = t.batch_size, rt.world_size
            for i in range(t.eval_batches):
                lo = (i * w + rt.rank) * b
                if lo >= len(self.val_prompts):
                    break
                yield {"val_index": torch.arange(lo, min(lo + b, len(self.val_prompts)))}

        import hashlib

        fingerprint = hashlib.sha256("\n".join(p.key() for p in data.train).encode()).hexdigest()[:16]
        rewards = " + ".join(f"{w:g}·{n}" for w, n in zip(self.reward_weights, self.reward_names, strict=True))
        manifest = {"data": {"prompts": len(data.train), "val_prompts": len(data.val), "template": fmt.name,
                             "rl": {k: getattr(rl, k) for k in ("num_generations", "max_completion_length", "beta",
                                                                "epsilon", "loss_type", "scale_rewards")}},
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": fingerprint}
        eps_high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
        lines = [f"data      {len(data.train):,} train / {len(data.val):,} held-out prompts × G={rl.num_generations} "
                 f"completions of ≤ {rl.max_completion_length} tokens, template {fmt.name}",
                 *data.lines,
                 f"grpo      reward = {rewards}; advantages ÷ {rl.scale_rewards} std; loss {rl.loss_type}; "
                 f"ε = {rl.epsilon:g}/{eps_high:g}; β = {rl.beta:g}"
                 + (f" (reference: {FrozenReference.kind(cfg)})" if rl.beta else " (no reference model)")
                 + (f"; μ = {rl.iterations}" if rl.iterations > 1 else "")]
        if not data.val:
            lines.append("WARNING   no held-out prompts (data.val_fraction): validation reward is not measured")
        tokenizer.chat_template = fmt.inference_template()
        return ObjectiveData(self.stream, val_batches, manifest, lines)

    def count(self, batch: Batch) -> torch.Tensor:
        key = "val_index" if "val_index" in batch else "input_ids"
        return torch.tensor(batch[key].shape[0], device=batch[key].device)

    def check_model(self, model) -> None:
        if self.cfg.train.strategy != "ddp":
            raise ConfigError(f"train.strategy: grpo runs under ddp only (rollouts on a {self.cfg.train.strategy} "
                              f"model are not supported)")
        if self.cfg.rl.beta != 0:
            self.reference = FrozenReference(self.cfg, model, key="rl.beta")
        super().check_model(model)

    def setup(self, model, wrapped, rt) -> None:
        self.rt = rt
        if self.reference is not None:
            self.reference.build(model, rt)

    # ------------------------------------------------------------------------------------------ rollouts
    def _generate(self, model, ids: list[list[int]], repeat: int, *, greedy: bool,
                  generator: torch.Generator | None) -> list[list[int]]:
        """Completion ids (each cut after its first end-of-text) for every prompt × `repeat`, in order; prompts
        of equal length share one batched call."""
        from ..generate import SamplingConfig, generate

        rl = self.cfg.rl
        sc = SamplingConfig(max_new_tokens=rl.max_completion_length, temperature=0.0 if greedy else rl.temperature,
                            top_k=rl.top_k, top_p=rl.top_p, eos_id=self.eos)
        device = next(model.parameters()).device
        out: list[list[int] | None] = [None] * (len(ids) * repeat)
        by_len: dict[int, list[int]] = {}
        for i, p in enumerate(ids):
            by_len.setdefault(len(p), []).append(i)
        for length in sorted(by_len):
            rows = [i for i in by_len[length] for _ in range(repeat)]
            x = torch.tensor([ids[i] for i in rows], device=device)
            with self.rt.autocast():
                seq = generate(model, x, sc, generator=generator)
            new = seq[:, length:].tolist()
            k = {}
            for r, i in enumerate(rows):
                j = k.get(i, 0)
                k[i] = j + 1
                toks = new[r]
                if self.eos is not None and self.eos in toks:
                    toks = toks[: toks.index(self.eos) + 1]
                out[i * repeat + j] = toks
        return out

    def _score(self, prompts: list, completions: list[str]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(weighted total (n,), raw per function (n, k), notes) for completions of `prompts` (one per completion)."""
        notes: list[str | None] = [None] * len(completions)
        columns = {"answer": [p.answer for p in prompts], "tests": [p.tests for p in prompts]}
        columns = {k: v for k, v in columns.items() if any(x is not None for x in v)}
        texts = [p.text() for p in prompts]
        raw = []
        for name, fn in zip(self.cfg.rl.reward_funcs, self.reward_fns, strict=True):
            values = fn(texts, completions, config=self.cfg.rl, notes=notes, **columns)
            if len(values) != len(completions):
                raise ConfigError(f"rl.reward_funcs: {name} returned {len(values)} rewards for {len(completions)} "
                                  f"completions")
            raw.append([float(v) if v is not None else float("nan") for v in values])
        per_fn = torch.tensor(raw, dtype=torch.float32).T.nan_to_num(0.0)  # (n, k); None (not applicable) → 0
        total = per_fn @ torch.tensor(self.reward_weights, dtype=torch.float32)
        return total, per_fn, notes

    @torch.no_grad()
    def before_step(self, model, step: int) -> None:
        s = self.stream
        if s.buffer:  # rl.iterations > 1: this step reuses the pending rollouts
            return
        rl, t = self.cfg.rl, self.cfg.train
        G = rl.num_generations
        gen = torch.Generator(device=next(model.parameters()).device)
        gen.manual_seed(int(t.seed) * 1_000_003 + step * 7_919 + self.rt.rank)  # fixed by (seed, step, rank)
        index = torch.cat([s.prompts.next()["index"] for _ in range(t.grad_accum)]).tolist()
        was = model.training
        model.eval()
        try:
            comps = self._generate(model, [self.train_ids[i] for i in index], G, greedy=False, generator=gen)
        finally:
            model.train(was)
        prompts = [self.train_prompts[i] for i in index for _ in range(G)]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in comps]
        total, per_fn, notes = self._score(prompts, texts)
        if rl.scale_rewards == "batch" and self.rt.world_size > 1:  # the std over every rank's rewards
            sums = self.rt.all_reduce_sum(torch.stack([total.sum(), (total ** 2).sum(), torch.tensor(
                float(total.numel()))]).to(self.rt.device)).cpu()
            n = sums[2]
            std = ((sums[1] - sums[0] ** 2 / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()
            adv, group_std = group_advantages(total, G, "none")
            adv = adv / (std + ADV_EPS)
        else:
            adv, group_std = group_advantages(total, G, rl.scale_rewards)
        n_tokens = torch.tensor(float(sum(len(c) for c in comps)))
        if self.rt.world_size > 1:
            n_tokens = self.rt.all_reduce_sum(n_tokens.to(self.rt.device)).cpu()
        n_seqs = float(len(comps) * self.rt.world_size)
        tok_scale = n_seqs / max(1.0, float(n_tokens))
        per_micro = t.batch_size * G
        batches = []
        for m in range(t.grad_accum):
            rows = range(m * per_micro, (m + 1) * per_micro)
            batches.append(self._micro_batch(model, [index[r // G] for r in rows], [comps[r] for r in rows],
                                             adv[rows.start:rows.stop], total[rows.start:rows.stop],
                                             per_fn[rows.start:rows.stop], group_std[rows.start:rows.stop], tok_scale))
        s.buffer, s.uses_left, s.cursor = batches, rl.iterations, 0
        logged = [k for k in range(step + 1, step + 1 + rl.iterations) if k % t.log_every == 0]
        if self.rt.is_main and rl.log_completions and logged:  # rollouts that serve a log step
            self._write_samples(logged[0], prompts, texts, total, per_fn, notes)

    def _micro_batch(self, model, index: list[int], comps: list[list[int]], adv, total, per_fn, group_std,
                     tok_scale: float) -> Batch:
        pad = self.eos if self.eos is not None else 0
        seqs = [self.train_ids[i] + c for i, c in zip(index, comps, strict=True)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        for r, (i, c) in enumerate(zip(index, comps, strict=True)):
            p = len(self.train_ids[i])
            ids[r, : p + len(c)] = torch.tensor(self.train_ids[i] + c)
            labels[r, p: p + len(c)] = torch.tensor(c, dtype=torch.long)
        lengths = torch.tensor([float(len(c)) for c in comps])
        batch = {"input_ids": ids, "labels": labels, "advantages": adv.clone(), "reward": total.clone(),
                 "rewards_each": per_fn.clone(), "group_std": group_std.clone(), "lengths": lengths,
                 "tok_scale": torch.tensor(tok_scale)}
        device = next(model.parameters()).device
        need_old = self.cfg.rl.iterations > 1
        if need_old or self.reference is not None:
            x, y = ids.to(device), labels.to(device)
            was = model.training
            model.eval()
            try:
                with self.rt.autocast():
                    if need_old:
                        batch["old_logps"] = lm_token_logps(model, lambda: model(input_ids=x), y, self.chunking).cpu()
                    if self.reference is not None:
                        batch["ref_logps"] = self.reference.token_logps(model, x, y, self.chunking).cpu()
            finally:
                model.train(was)
        return batch

    def _write_samples(self, step: int, prompts, texts, total, per_fn, notes) -> None:
        run = Path(self.cfg.run.out_dir) / str(self.cfg.run.name)
        if not run.is_dir():
            return
        n = min(self.cfg.rl.log_completions, len(texts))
        with open(run / "samples_grpo.jsonl", "a") as f:
            for i in range(n):
                rec = {"step": step, "prompt": prompts[i].text(), "completion": texts[i], "reward": float(total[i]),
                       "rewards": {k: float(per_fn[i, j]) for j, k in enumerate(self.reward_names)}}
                if prompts[i].answer is not None:
                    rec["answer"] = prompts[i].answer
                if notes[i]:
                    rec["note"] = notes[i]
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------------ the loss
    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if "val_index" in batch:
            return self._validate(model, batch)
        rl = self.cfg.rl
        logp = lm_token_logps(model, lambda: model(input_ids=batch["input_ids"]), batch["labels"], self.chunking)
        mask = batch["labels"][:, 1:] != IGNORE
        old = batch["old_logps"] if "old_logps" in batch else logp.detach()
        loss, metrics = grpo_terms(logp, old, batch.get("ref_logps"), batch["advantages"], mask,
                                   epsilon=rl.epsilon, epsilon_high=rl.epsilon if rl.epsilon_high is None else
                                   rl.epsilon_high, beta=rl.beta, loss_type=rl.loss_type,
                                   tok_scale=float(batch["tok_scale"]), max_len=rl.max_completion_length)
        zero_std = (batch["group_std"] == 0).float()
        metrics.update({"reward": batch["reward"].sum(), "reward_std": batch["group_std"].sum(),
                        "frac_reward_zero_std": zero_std.sum(), "completion_length": batch["lengths"].sum(),
                        **{f"rewards/{n}": batch["rewards_each"][:, j].sum()
                           for j, n in enumerate(self.reward_names)}})
        return loss, metrics

    def _validate(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = batch["val_index"].tolist()
        comps = self._generate(model, [self.val_ids[i] for i in index], 1, greedy=True, generator=None)
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in comps]
        total, per_fn, _ = self._score([self.val_prompts[i] for i in index], texts)
        device = batch["val_index"].device
        metrics = {"reward": total.sum().to(device), **{f"rewards/{n}": per_fn[:, j].sum().to(device)
                                                         for j, n in enumerate(self.reward_names)}}
        return -total.sum().to(device), metrics
