"""Direct preference optimisation (`train.objective=dpo`): prefer the chosen reply to the rejected one,
relative to a frozen reference model.

For a pair (x, y_w chosen, y_l rejected), with log π(y|x) summed over the reply tokens and its end-of-turn:

    r_w = β · (log π_θ(y_w|x) − log π_ref(y_w|x))        implicit reward of the chosen reply
    r_l = β · (log π_θ(y_l|x) − log π_ref(y_l|x))        of the rejected one
    loss = −log σ(r_w − r_l)                              the sigmoid loss, β = finetune.dpo_beta

Reference (finetune.dpo_reference=auto): for LoRA / QLoRA the same model with its adapters switched off
(no second copy in memory); for full fine-tuning a frozen copy of the starting weights, taken in `setup` once
the strategy has placed and wrapped the policy (a copy of its shards under FSDP) and before a checkpoint is
restored, so a resumed run keeps the same reference. It runs in eval mode (no dropout), without gradients.

Metrics (sums over pairs; the trainer divides by the number of pairs): rewards/chosen, rewards/rejected,
rewards/margins (r_w − r_l), rewards/accuracies (r_w > r_l); on the held-out pairs as val_rewards/….
Data: data.source holds preference sources (lmlab.data.preference), split by data.val_fraction.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..data.chat import IGNORE
from ..data.examples import (
    RowStream,
    chat_format,
    encode_kept,
    format_lines,
    load_tuning_data,
    pad_id,
    summary_lines,
    val_slices,
)
from ..errors import ConfigError
from .losses import lm_token_logps
from .objectives import Batch, Objective, ObjectiveData, upcast_half

SIDES = ("chosen", "rejected")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b,) summed log-probabilities of the labelled tokens; `labels` (b, l) unshifted, -100 where none. The plain
    path of `lm_token_logps(…).sum(-1)` (lmlab.train.losses), which the objective runs."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(upcast_half(logits[:, :-1]), dim=-1)  # (b, l-1, V), fp32 or wider
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (b, l-1)
    return (picked * mask).sum(-1)


def frozen_copy(model: torch.nn.Module, rt, reshard_after_forward: bool = True) -> torch.nn.Module:
    """An eval-mode copy of `model` without gradients. A model sharded by FSDP2 (which refuses deepcopy) is copied
    shard by shard: the same architecture built on the meta device, sharded the same way
    (lmlab.train.strategies.fsdp.shard), then each rank's local shards and the buffers copied in."""
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in model.parameters()):
        return copy.deepcopy(model).eval().requires_grad_(False)
    from .strategies.fsdp import shard

    with torch.device("meta"):
        ref = type(model)._from_config(model.config)
    shard(ref, rt, reshard_after_forward=reshard_after_forward)
    ref.to_empty(device=rt.device)

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    with torch.no_grad():
        for (name, a), (other, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            if name != other or local(a).shape != local(b).shape:
                raise RuntimeError(f"reference copy: {name} and {other} do not match")  # a sharding that differs
            local(b).copy_(local(a))
        for (_, a), (_, b) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
            local(b).copy_(local(a))
    for a, b in zip(model.modules(), ref.modules(), strict=True):  # settings chosen after construction
        if hasattr(a, "scan_backend"):
            b.scan_backend = a.scan_backend
    return ref.eval().requires_grad_(False)


def dpo_terms(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, summed metrics) of the sigmoid DPO loss from per-pair log-probabilities (b,)."""
    r_w = beta * (policy_w - ref_w)
    r_l = beta * (policy_l - ref_l)
    loss = -F.logsigmoid(r_w - r_l).sum()
    r_w, r_l = r_w.detach(), r_l.detach()
    return loss, {"rewards/chosen": r_w.sum(), "rewards/rejected": r_l.sum(), "rewards/margins": (r_w - r_l).sum(),
                  "rewards/accuracies": (r_w > r_l).float().sum()}


def _pad_to(x: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(x, (0, width - x.shape[1]), value=value)


def _both(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rows stacked (2b, l): one forward serves both (right padding leaves a causal
    model's earlier positions untouched)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ids = torch.cat([_pad_to(batch[f"{s}_input_ids"], width, 0) for s in SIDES])
    labels = torch.cat([_pad_to(batch[f"{s}_labels"], width, IGNORE) for s in SIDES])
    return ids, labels


class DPO(Objective):
    name = "dpo"
    unit = "pairs"
    reference: torch.nn.Module | None = None  # set by setup() for full fine-tuning

    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        from ..data.preference import collate_pairs, encode_pair, load_preference

        ft, t = cfg.finetune, cfg.train
        fmt = self.format = chat_format(cfg, tokenizer)
        data, max_len = load_tuning_data(load_preference, cfg)
        train, val = (encode_kept(rows, encode_pair, fmt, max_len, ft.overlong) for rows in (data.train, data.val))
        if not train:
            raise ConfigError(f"finetune.max_len: no preference pair fits in {max_len} tokens")
        pad = pad_id(tokenizer)
        stream = RowStream(len(train), t.batch_size, lambda idx: collate_pairs([train[i] for i in idx], pad),
                           seed=t.seed, rank=rt.rank, world_size=rt.world_size, what="preference pairs")

        def val_batches() -> Iterator[Batch]:
            for r in val_slices(len(val), t.batch_size, t.eval_batches, rt.rank, rt.world_size):
                yield collate_pairs(val[r.start: r.stop], pad)

        from ..data.tokenizer import tokenizer_fingerprint

        fingerprint = hashlib.sha256("\n".join(p.key() for p in data.train).encode()).hexdigest()[:16]
        manifest = {"data": {"pairs": data.summary.to_dict(), "template": fmt.name, "beta": ft.dpo_beta},
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": fingerprint}
        lines = [f"data      {len(train):,} train / {len(val):,} held-out preference pairs, template {fmt.name}, "
                 f"β={ft.dpo_beta:g}, reference: {self._reference_kind()}"]
        lines += summary_lines(data.summary, "pairs") + format_lines(fmt) + stream.note("preference pairs")
        if not val:
            lines.append("WARNING   no held-out pairs (data.val_fraction): validation loss is not measured")
        tokenizer.chat_template = fmt.inference_template()
        return ObjectiveData(stream, val_batches, manifest, lines)

    def _reference_kind(self) -> str:
        if self.cfg.finetune.method == "full":
            return "a frozen copy of the starting weights"
        return "the base model (adapters off)"

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["chosen_input_ids"].shape[0], device=batch["chosen_input_ids"].device)

    def check_model(self, model) -> None:
        if self.cfg.finetune.method != "full" and not hasattr(model, "disable_adapter"):
            raise ConfigError(f"finetune.method={self.cfg.finetune.method}: the model carries no adapters")
        super().check_model(model)

    def setup(self, model, wrapped, rt) -> None:
        """The frozen reference of full fine-tuning: a copy of the policy as placed (and sharded) by the strategy,
        before any step or restored checkpoint. Adapter runs need none (the base with adapters off)."""
        self.reference = None
        if self.cfg.finetune.method == "full":
            self.reference = frozen_copy(model, rt, reshard_after_forward=self.cfg.train.fsdp_reshard)

    def _reference_logps(self, model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        core = getattr(model, "module", model)  # under DDP
        with torch.no_grad():
            if self.reference is not None:
                ref = self.reference
                if next(ref.parameters()).device != ids.device:
                    ref.to(ids.device)
                return lm_token_logps(ref, lambda: ref(ids), labels, self.chunking).sum(-1)
            was = core.training
            core.eval()
            try:
                with core.disable_adapter():
                    return lm_token_logps(core, lambda: core(input_ids=ids), labels, self.chunking).sum(-1)
            finally:
                core.train(was)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, labels = _both(batch)
        b = batch["chosen_input_ids"].shape[0]
        policy = lm_token_logps(model, lambda: model(input_ids=ids), labels, self.chunking).sum(-1)
        ref = self._reference_logps(model, ids, labels)
        return dpo_terms(policy[:b], policy[b:], ref[:b], ref[b:], self.cfg.finetune.dpo_beta)
