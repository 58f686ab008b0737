"""Kahneman-Tversky optimisation (`train.objective=kto`; Ethayarajh et al., 2024, "KTO: Model Alignment as Prospect
Theoretic Optimization"): learns from unpaired replies marked desirable or undesirable (lmlab.data.unpaired),
against a frozen reference, as TRL's KTOTrainer (loss_type="kto").

With r(y|x) = log π_θ(y|x) − log π_ref(y|x) (summed over the reply tokens and its end-of-turn):

    z = max(0, mean over the batch of r(y'|x))    the KL estimate: each prompt with another row's reply y'
                                                  (the batch rotated by one), without gradient
    desirable:    λ_D · (1 − σ(β·(r − z)))
    undesirable:  λ_U · (1 − σ(β·(z − r)))       β = finetune.kto_beta (0.1), λ_D, λ_U = finetune.kto_*_weight (1, 1)

z is estimated per micro-batch (TRL gathers it over the processes of a step). Metrics, named as TRL's:
rewards/chosen and rewards/rejected (β·r over the desirable / undesirable examples), rewards/margins (their
difference), logps/chosen, logps/rejected, kl (z). The trainer divides sums by the examples of a step; for
the per-label means each micro-batch contributes its own mean over that label (0 when it has none), so they
are means of micro-batch means. A batch needs at least 2 examples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

from ..data.examples import RowStream, chat_format, encode_kept, load_tuning_data, pad_id, summary_lines
from ..errors import ConfigError
from .ipo import FrozenReference
from .losses import lm_token_logps
from .objectives import Batch, Objective, ObjectiveData


def kto_terms(policy: torch.Tensor, ref: torch.Tensor, policy_kl: torch.Tensor, ref_kl: torch.Tensor,
              desirable: torch.Tensor, beta: float, w_desirable: float = 1.0,
              w_undesirable: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, summed metrics) from per-example summed log-probabilities (b,) of the policy and the
    reference, on the examples' own replies and on the mismatched KL pairs; `desirable` (b,) bool."""
    z = (policy_kl - ref_kl).detach().mean().clamp(min=0)
    ratio = policy - ref
    losses = torch.where(desirable, w_desirable * (1 - torch.sigmoid(beta * (ratio - z))),
                         w_undesirable * (1 - torch.sigmoid(beta * (z - ratio))))
    b = desirable.numel()
    r, lp = beta * ratio.detach(), policy.detach()
    d = desirable.float()
    n_d, n_u = d.sum(), (1 - d).sum()

    def mean_of(x, mask, n):  # the micro-batch's mean over one label, × b (the trainer divides by examples)
        return torch.where(n > 0, (x * mask).sum() / n.clamp(min=1), x.new_zeros(())) * b

    chosen, rejected = mean_of(r, d, n_d), mean_of(r, 1 - d, n_u)
    return losses.sum(), {"rewards/chosen": chosen, "rewards/rejected": rejected,
                          "rewards/margins": chosen - rejected, "logps/chosen": mean_of(lp, d, n_d),
                          "logps/rejected": mean_of(lp, 1 - d, n_u), "kl": z * b}


class KTO(Objective):
    name = "kto"
    unit = "examples"

    def data(self, cfg, tokenizer, rt) -> ObjectiveData:
        from ..data.tokenizer import tokenizer_fingerprint
        from ..data.unpaired import collate_unpaired, encode_unpaired, load_unpaired

        ft, t = cfg.finetune, cfg.train
        if t.batch_size < 2:
            raise ConfigError("train.batch_size: KTO needs at least 2 examples per batch (its KL estimate pairs "
                              "each prompt with another example's reply)")
        fmt = chat_format(cfg, tokenizer)
        data, max_len = load_tuning_data(load_unpaired, cfg)
        train, val = (encode_kept(rows, encode_unpaired, fmt, max_len, ft.overlong) for rows in (data.train, data.val))
        if not train:
            raise ConfigError(f"finetune.max_len: no example fits in {max_len} tokens")
        pad = pad_id(tokenizer)
        stream = RowStream(len(train), t.batch_size, lambda idx: collate_unpaired([train[i] for i in idx], pad),
                           seed=t.seed, rank=rt.rank, world_size=rt.world_size, what="KTO examples")

        def val_batches() -> Iterator[Batch]:
            b, w = t.batch_size, rt.world_size
            for i in range(t.eval_batches):
                lo = (i * w + rt.rank) * b
                if lo + 2 > len(val):
                    break
                yield collate_unpaired(val[lo: lo + b], pad)

        n_good = sum(e.desirable for e in train)
        fingerprint = hashlib.sha256("\n".join(e.key() for e in data.train).encode()).hexdigest()[:16]
        manifest = {"data": {"examples": data.summary.to_dict(), "template": fmt.name, "beta": ft.kto_beta,
                             "desirable_weight": ft.kto_desirable_weight,
                             "undesirable_weight": ft.kto_undesirable_weight},
                    "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "data_fingerprint": fingerprint}
        lines = [f"data      {len(train):,} train ({n_good:,} desirable, {len(train) - n_good:,} undesirable) / "
                 f"{len(val):,} held-out examples, template {fmt.name}, β={ft.kto_beta:g}, "
                 f"λ_D={ft.kto_desirable_weight:g}, λ_U={ft.kto_undesirable_weight:g}, "
                 f"reference: {FrozenReference.kind(cfg)}"]
        lines += summary_lines(data.summary)
        tokenizer.chat_template = fmt.inference_template()
        return ObjectiveData(stream, val_batches, manifest, lines)

    def count(self, batch: Batch) -> torch.Tensor:
        return torch.tensor(batch["input_ids"].shape[0], device=batch["input_ids"].device)

    def check_model(self, model) -> None:
        self.reference = FrozenReference(self.cfg, model)
        super().check_model(model)

    def setup(self, model, wrapped, rt) -> None:
        self.reference.build(model, rt)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ft, chunking = self.cfg.finetune, self.chunking
        ids, labels, kl_ids, kl_labels = (batch[k] for k in ("input_ids", "labels", "kl_input_ids", "kl_labels"))
        policy = lm_token_logps(model, lambda: model(input_ids=ids), labels, chunking).sum(-1)
        ref = self.reference.token_logps(model, ids, labels, chunking).sum(-1)
        with torch.no_grad():
            policy_kl = lm_token_logps(model, lambda: model(input_ids=kl_ids), kl_labels, chunking).sum(-1)
        ref_kl = self.reference.token_logps(model, kl_ids, kl_labels, chunking).sum(-1)
        return kto_terms(policy, ref, policy_kl, ref_kl, batch["desirable"], ft.kto_beta, ft.kto_desirable_weight,
                         ft.kto_undesirable_weight)
