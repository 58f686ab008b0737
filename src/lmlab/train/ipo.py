"""Identity preference optimisation (`train.objective=ipo`; Azar et al., 2023, "A General Theoretical Paradigm
to Understand Learning from Human Preferences"): DPO's pairs and frozen reference, with a squared loss that
regresses the log-ratio margin to a fixed target instead of pushing it to infinity.

With ℓ(y|x) the *length-averaged* log-probability of a reply (as the IPO paper and TRL's `loss_type="ipo"`):

    h = (ℓ_θ(y_w) − ℓ_ref(y_w)) − (ℓ_θ(y_l) − ℓ_ref(y_l))
    loss = (h − 1/(2τ))²                                   τ = finetune.ipo_tau (paper and TRL: 0.1)

A policy equal to its reference starts at (1/(2τ))² = 25 for τ = 0.1. Metrics (sums over pairs, the trainer
divides by the pairs), named as TRL's: rewards/chosen = τ·(ℓ_θ(y_w) − ℓ_ref(y_w)), rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected (ℓ_θ). Data and reference: as DPO's
(lmlab.train.dpo); the helpers here (stacked pairs, per-reply log-probabilities with their lengths, the
frozen reference) serve SimPO, ORPO and KTO too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.chat import IGNORE
from ..errors import ConfigError
from .dpo import DPO, frozen_copy
from .losses import LossChunking, lm_token_logps
from .objectives import Batch, upcast_half

SIDES = ("chosen", "rejected")


def reply_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """((b,) summed log-probabilities of the labelled tokens, (b,) their number); `labels` (b, l) unshifted,
    -100 where nothing is predicted. The plain path of `reply_sums` over `lm_token_logps` (lmlab.train.losses)."""
    targets = labels[:, 1:]
    logp = torch.log_softmax(upcast_half(logits[:, :-1]), dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def reply_sums(logps: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reply_logps` from per-token log-probabilities (b, l−1) (lmlab.train.losses.lm_token_logps)."""
    return logps.sum(-1), (labels[:, 1:] != IGNORE).sum(-1)


def stacked_pairs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected rows of a pair batch stacked (2b, l), right-padded to one width: one forward
    serves both."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    ids = torch.cat([F.pad(batch[f"{s}_input_ids"], (0, width - batch[f"{s}_input_ids"].shape[1]), value=0)
                     for s in SIDES])
    labels = torch.cat([F.pad(batch[f"{s}_labels"], (0, width - batch[f"{s}_labels"].shape[1]), value=IGNORE)
                        for s in SIDES])
    return ids, labels


class FrozenReference:
    """The reference policy of DPO-style objectives: for full fine-tuning a frozen copy of the starting weights
    (taken by `build` in the objective's setup, after the strategy placed and sharded the policy and before a
    checkpoint is restored, so a resumed run keeps it); for LoRA / QLoRA the same model with its adapters
    switched off (no second copy). Eval mode, no gradients. Constructed in check_model, which only validates."""

    def __init__(self, cfg, model, key: str = "train.objective"):
        self.cfg, self.copy = cfg, None
        if cfg.finetune.method != "full" and not hasattr(model, "disable_adapter"):
            raise ConfigError(f"finetune.method={cfg.finetune.method}: the model carries no adapters ({key})")

    def build(self, model, rt) -> None:
        """The frozen copy of full fine-tuning (lmlab.train.dpo.frozen_copy: FSDP2 shards copied as placed)."""
        if self.cfg.finetune.method == "full":
            self.copy = frozen_copy(model, rt, reshard_after_forward=self.cfg.train.fsdp_reshard)

    @staticmethod
    def kind(cfg) -> str:
        return "a frozen copy of the starting weights" if cfg.finetune.method == "full" else \
            "the base model (adapters off)"

    @torch.no_grad()
    def _run(self, model, device: torch.device, fn):
        """fn(the reference model) without gradients: the frozen copy (moved to `device`), or `model` with its
        adapters off."""
        if self.copy is not None:
            if next(self.copy.parameters()).device != device:
                self.copy.to(device)
            return fn(self.copy)
        core = getattr(model, "module", model)  # under DDP
        was = core.training
        core.eval()
        try:
            with core.disable_adapter():
                return fn(core)
        finally:
            core.train(was)

    def logits(self, model, ids: torch.Tensor) -> torch.Tensor:
        return self._run(model, ids.device, lambda ref: ref(input_ids=ids).logits)

    def token_logps(self, model, ids: torch.Tensor, labels: torch.Tensor, chunking: LossChunking) -> torch.Tensor:
        """(b, l−1) the reference's log-probability of each labelled next token (lm_token_logps)."""
        return self._run(model, ids.device,
                         lambda ref: lm_token_logps(ref, lambda: ref(input_ids=ids), labels, chunking))


def pair_metrics(beta: float, ratio_w: torch.Tensor, ratio_l: torch.Tensor, logp_w: torch.Tensor,
                 logp_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's pair metrics as sums over pairs: rewards = beta · (the objective's log-ratio or log-probability)."""
    r_w, r_l = beta * ratio_w.detach(), beta * ratio_l.detach()
    return {"rewards/chosen": r_w.sum(), "rewards/rejected": r_l.sum(), "rewards/margins": (r_w - r_l).sum(),
            "rewards/accuracies": (r_w > r_l).float().sum(), "logps/chosen": logp_w.detach().sum(),
            "logps/rejected": logp_l.detach().sum()}


def ipo_terms(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
              tau: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, summed metrics) of IPO from per-pair length-averaged log-probabilities (b,)."""
    h = (policy_w - ref_w) - (policy_l - ref_l)
    loss = ((h - 1 / (2 * tau)) ** 2).sum()
    return loss, pair_metrics(tau, policy_w - ref_w, policy_l - ref_l, policy_w, policy_l)


class PairObjective(DPO):
    """DPO's data (pairs, template, split, batches) and unit (pairs) with another loss; `hyper()` names the
    objective's hyper-parameters for the data line and the manifest."""

    uses_reference = True

    def hyper(self) -> dict[str, float]:
        raise NotImplementedError

    def data(self, cfg, tokenizer, rt):
        out = super().data(cfg, tokenizer, rt)
        out.manifest["data"].pop("beta", None)
        out.manifest["data"].update(self.hyper())
        hyper = ", ".join(f"{k}={v:g}" for k, v in self.hyper().items())
        ref = f"reference: {FrozenReference.kind(cfg)}" if self.uses_reference else "no reference model"
        out.lines[0] = out.lines[0].split(", β=")[0] + f", {hyper}, {ref}"
        return out

    def check_model(self, model) -> None:
        self.reference = FrozenReference(self.cfg, model) if self.uses_reference else None
        self.chunking.check(model)

    def setup(self, model, wrapped, rt) -> None:
        if self.reference is not None:
            self.reference.build(model, rt)

    def pair_logps(self, model, batch: Batch, reference: bool) -> tuple[torch.Tensor, ...]:
        """(policy sums (2b,), lengths (2b,), reference sums (2b,) or None) over chosen then rejected rows."""
        ids, labels = stacked_pairs(batch)
        policy, n = reply_sums(lm_token_logps(model, lambda: model(input_ids=ids), labels, self.chunking), labels)
        ref = self.reference.token_logps(model, ids, labels, self.chunking).sum(-1) if reference else None
        return policy, n, ref


class IPO(PairObjective):
    name = "ipo"

    def hyper(self) -> dict[str, float]:
        return {"tau": self.cfg.finetune.ipo_tau}

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy, n, ref = self.pair_logps(model, batch, reference=True)
        b = batch["chosen_input_ids"].shape[0]
        n = n.clamp(min=1)
        avg, ref_avg = policy / n, ref / n
        return ipo_terms(avg[:b], avg[b:], ref_avg[:b], ref_avg[b:], self.cfg.finetune.ipo_tau)
