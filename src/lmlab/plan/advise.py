"""Score a fine-tuning setup against the rules of thumb, before it spends GPU-hours.

    adv = advise_spec("production", hardware="rtx4090")     # a recipe, a config file or a run folder
    adv = advise(cfg, hardware="rtx4090", gpus=6, examples=114_000)
    adv.score, [(c.name, c.verdict) for c in adv.criteria]

The rules scale with the model and the budget (each criterion scores 0-10; the overall score is their mean):

    learning rate     SFT, by model size N: the size's pretraining LR, 6e-4 · (125M / N)^0.4 (the GPT-3 table:
                      6e-4 at 125M, 1.2e-4 at 6.7B; ~4e-3 at 1M, higher for smaller models), divided by 3–200
                      for full fine-tuning (Alpaca and Vicuna 2e-5 at 7B, LIMA 1e-5 at 65B, 1e-6–5e-6 the
                      cautious choice at 1–7B, the quickstart 1e-3 at 1M), × 1/10–3 with LoRA / QLoRA (LoRA
                      1e-4–3e-4 at 7B, QLoRA 2e-4 at 7B–13B and 1e-4 at 33B–65B)
                      preference objectives, full / LoRA-QLoRA (the papers' ranges, at 1–8B):
                      DPO, IPO 5e-7–5e-6 / 5e-6–5e-5; SimPO 3e-7–1e-6 / ×10; ORPO 3e-6–1e-5 (8e-6) / ×10;
                      KTO 5e-7–5e-6 / ×10; GRPO 5e-7–2e-6 (1e-6) / 5e-6–2e-5 (1e-5);
                      another objective: "no rules for objective X" (not scored)
    vs pretraining    SFT full: fine-tune LR = the base's pretraining LR / 3–200, when the base is an lmlab run
    effective batch   by GPU memory: < 24 GB 64–128, 24–40 GB 128–256, > 40 GB 256–512 (without a GPU given:
                      128–256); LoRA / QLoRA 16–64. Below 7B the low end shrinks with N^0.35 (GPT-3's batch:
                      0.5M tokens at 125M, 2M at 6.7B), to 8 at the least
    memory            the micro batch fits the GPU (lmlab.plan.estimate), when a GPU is given
    epochs            steps × effective batch / examples, when the data size is known: 2–5 (Alpaca, Vicuna 3,
                      Llama-2-chat 2); below 10k examples the high end grows by √(10k / examples) (LIMA: 15 on
                      1,000), from 200k the low end is 1 (Tulu 2: 2 on 326k)
    warmup            a fraction of the total steps: 1–10 % (Vicuna, QLoRA 3 %; SimPO, GRPO 10 %), long runs
                      at least 100 steps or 1 %, whichever is fewer; the trainer caps it at 10 % of the budget
                      (lmlab.train.optim), so a longer one is shortened
    LoRA              rank 16–64, alpha 16–128
    DPO β             0.1–0.5

Inside the range scores 10; a value off by a factor f scores 10 − 5·log f / log tol (tol: the factor still
called "warn", ×3 for the LR), floored at 0; past tol the verdict is "bad".
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, apply_overrides, from_dict, validate
from ..errors import ConfigError

GOOD, WARN, BAD, INFO = "good", "warn", "bad", "n/a"

# the pretraining LR of a model of N parameters: LR_125M · (125M / N)^LR_EXPONENT (GPT-3's table)
LR_125M, LR_EXPONENT = 6e-4, 0.4
SFT_FULL = (1 / 200, 1 / 3)  # full fine-tuning LR as a fraction of the size's pretraining LR
SFT_ADAPTERS = (1 / 10, 3.0)  # LoRA / QLoRA
ADAPTER_LR_FACTOR = 10.0  # preference objectives with adapters train at ~10× the full LR
# objective → ((low, high) full fine-tuning, (low, high) LoRA / QLoRA, source)
PREFERENCE_LR: dict[str, tuple[tuple[float, float], tuple[float, float], str]] = {
    "dpo": ((5e-7, 5e-6), (5e-6, 5e-5), "DPO: 1e-6 (Rafailov et al.), 5e-7 (Zephyr)"),
    "ipo": ((5e-7, 5e-6), (5e-6, 5e-5), "IPO: as DPO"),
    "simpo": ((3e-7, 1e-6), (3e-6, 1e-5), "SimPO: a grid of 3e-7, 5e-7, 1e-6 (Meng et al.)"),
    "orpo": ((3e-6, 1e-5), (3e-5, 1e-4), "ORPO: 8e-6 (Hong et al.)"),
    "kto": ((5e-7, 5e-6), (5e-6, 5e-5), "KTO: 5e-7–5e-6 (Ethayarajh et al., TRL)"),
    "grpo": ((5e-7, 2e-6), (5e-6, 2e-5), "GRPO: 1e-6 (DeepSeekMath), 1e-5 with LoRA (TRL)"),
}
PRETRAIN_RATIO = (3.0, 200.0)  # pretraining LR / fine-tuning LR
# (upper bound of GPU memory in GiB, (low, high) effective batch)
BATCH_BY_MEMORY = ((23.0, (64, 128), "< 24 GB"), (40.0, (128, 256), "24–40 GB"), (math.inf, (256, 512), "> 40 GB"))
BATCH_CONSENSUS = (128, 256)
BATCH_ADAPTERS = (16, 64)  # LoRA / QLoRA setups train with small batches whatever the GPU
BATCH_REF_PARAMS, BATCH_EXPONENT, BATCH_FLOOR = 7e9, 0.35, 8
EPOCHS = (2.0, 5.0)
EPOCHS_SMALL, EPOCHS_LARGE = 10_000, 200_000  # fewer examples: more epochs; more: 1 is enough
WARMUP = (0.01, 0.10)  # warmup steps as a fraction of the total
WARMUP_LONG_RUN = 100  # ... but 100 steps suffice in long runs (1 % of 75,000 would be 750)
WARMUP_CAP = 0.10  # the trainer shortens a longer warmup to this fraction (lmlab.train.optim.warmup_steps)
LORA_RANK = (16, 64)
LORA_ALPHA = (16.0, 128.0)
DPO_BETA = (0.1, 0.5)


def pretrain_lr_for(params: float) -> float:
    """The pretraining LR of a model of `params` parameters (GPT-3's table as a power law)."""
    return LR_125M * (125e6 / max(params, 1.0)) ** LR_EXPONENT


@dataclass
class Criterion:
    name: str
    value: str
    verdict: str  # good | warn | bad | n/a
    advice: str
    score: float | None  # 0-10; None: not scored (n/a)


@dataclass
class Advice:
    subject: str
    model: str
    params: int | None
    method: str
    objective: str
    effective_batch: int
    steps: int | None
    criteria: list[Criterion] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        scored = [c.score for c in self.criteria if c.score is not None]
        return round(sum(scored) / len(scored), 1) if scored else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "score": self.score}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ helpers
def lr_text(lr: float) -> str:
    """2e-05 → 2e-5, 2.5e-06 → 2.5e-6."""
    mantissa, exp = f"{lr:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exp)}"


def _off_by(value: float, lo: float, hi: float) -> float:
    """1 inside [lo, hi], else the factor by which `value` misses the range."""
    if value <= 0:
        return math.inf
    return lo / value if value < lo else (value / hi if value > hi else 1.0)


def judge(value: float, lo: float, hi: float, tol: float = 2.0) -> tuple[str, float]:
    """(verdict, score) of `value` against the range [lo, hi] with the tolerance factor `tol`."""
    f = _off_by(value, lo, hi)
    if f == 1.0:
        return GOOD, 10.0
    score = 0.0 if math.isinf(f) else max(0.0, 10.0 - 5.0 * math.log(f) / math.log(tol))
    return (WARN if f <= tol else BAD), round(score, 1)


def _band(value: float, table) -> tuple[tuple[float, float], str]:
    for upper, rng, label in table:
        if value < upper:
            return rng, label
    return table[-1][1], table[-1][2]


def _arch(cfg: Config):
    """The planner's view of the model (built on the meta device), or None when it cannot be had (offline hub)."""
    from .estimate import analyse

    try:
        return analyse(cfg.model.name, _vocab(cfg), cfg.model.overrides, cfg.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - an unreachable hub model: the size-based rules are skipped, not the rest
        return None


def _vocab(cfg: Config) -> int | None:
    from ..models import registry

    if cfg.model.name in registry.named_sizes() and cfg.data.tokenizer == "stdlib-bpe":
        return cfg.data.vocab_size
    return None


def _total_steps(cfg: Config, params: int | None, world: int) -> int | None:
    t = cfg.train
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.batch_size * t.grad_accum * world * cfg.data.seq_len
    if t.max_tokens is not None:
        return math.ceil(t.max_tokens / per_step)
    if t.token_ratio is not None and params:
        return math.ceil(t.token_ratio * params / per_step)
    return None


def pretrain_lr_of(model_name: str) -> tuple[float, str] | None:
    """(LR, run folder) when `model_name` is an lmlab pretraining run or a folder inside one (final/)."""
    p = Path(model_name)
    for folder in (p, p.parent, p.parent.parent):
        cfg_file = folder / "config.yaml"
        if cfg_file.is_file() and (folder / "run.json").is_file():
            try:
                d = yaml.safe_load(cfg_file.read_text()) or {}
                train = d.get("train") or {}
                if train.get("objective", "pretrain") == "pretrain" and "lr" in train:
                    return float(train["lr"]), str(folder)
            except (yaml.YAMLError, ValueError, TypeError, AttributeError):
                return None
            return None
    return None


def _gpu_memory_gib(hardware: str | None) -> tuple[float, str] | None:
    if hardware is None:
        return None
    from .hardware import GIB, get_hardware

    hw = get_hardware(hardware)
    return hw.memory_bytes / GIB, hw.label


# ------------------------------------------------------------------------------------------------ the rules
def advise(cfg: Config, *, subject: str = "config", hardware: str | None = None, gpus: int = 1,
           examples: int | None = None, pretrain_lr: float | None = None, params: int | None = None) -> Advice:
    """Score a validated fine-tuning config. `gpus`: devices the run uses (the effective batch is
    batch_size × grad_accum × gpus); `examples`: training examples, for the epochs rule; `pretrain_lr`: the
    base's pretraining LR (found from model.name when it is an lmlab run)."""
    t, ft = cfg.train, cfg.finetune
    if t.objective == "pretrain":
        raise ConfigError("train.objective: advise scores fine-tuning setups (sft, dpo, ...), got 'pretrain'")
    if gpus < 1:
        raise ConfigError(f"--gpus: must be >= 1, got {gpus}")
    arch = _arch(cfg) if params is None or hardware is not None else None
    if params is None and arch is not None:
        params = arch.params_total
    adapters = ft.method in ("lora", "qlora")
    eff = t.batch_size * t.grad_accum * gpus
    steps = _total_steps(cfg, params, gpus)
    adv = Advice(subject, cfg.model.name, params, ft.method, t.objective, eff, steps)
    add = adv.criteria.append

    # ---- learning rate: by model size (SFT), the papers' ranges (preference objectives)
    add(_lr_criterion(t.lr, t.objective, adapters, params))

    # ---- fine-tune LR vs the base's pretraining LR
    found = pretrain_lr_of(cfg.model.name) if pretrain_lr is None else (pretrain_lr, "given")
    lo_r, hi_r = PRETRAIN_RATIO
    if t.objective == "sft" and not adapters:
        if found is None:
            add(Criterion("LR vs pretraining", "—", INFO, "base is not an lmlab run: pretraining LR unknown "
                          f"(rule: fine-tune LR ≈ pretraining LR / {lo_r:g}–{hi_r:g})", None))
        else:
            pre, _ = found
            ratio = pre / t.lr
            verdict, score = judge(ratio, lo_r, hi_r)
            if verdict == GOOD:
                advice = f"pretraining LR {lr_text(pre)} / {ratio:.0f}: within / {lo_r:g}–{hi_r:g}"
            else:
                advice = (f"pretraining LR {lr_text(pre)} / {ratio:.0f}; / {lo_r:g}–{hi_r:g} gives "
                          f"{lr_text(pre / hi_r)}–{lr_text(pre / lo_r)}")
            add(Criterion("LR vs pretraining", f"÷{ratio:.0f}", verdict, advice, score))

    # ---- effective batch by GPU memory, smaller for small models
    mem = _gpu_memory_gib(hardware)
    if adapters:
        (lo_b, hi_b), where = BATCH_ADAPTERS, "LoRA/QLoRA"
    elif mem is None:
        (lo_b, hi_b), where = BATCH_CONSENSUS, "the usual consensus (give --hardware for a memory-based range)"
    else:
        (lo_b, hi_b), band = _band(mem[0], BATCH_BY_MEMORY)
        where = f"GPUs with {band} ({mem[1]})"
    if params is not None and params < BATCH_REF_PARAMS:
        shrink = (params / BATCH_REF_PARAMS) ** BATCH_EXPONENT
        lo_b = max(BATCH_FLOOR, min(lo_b, round(lo_b * shrink)))
        where += f", {params / 1e6:,.0f}M parameters"
    verdict, score = judge(eff, lo_b, hi_b, tol=2.0)
    split = f"{t.batch_size} × {t.grad_accum} accum" + (f" × {gpus} GPUs" if gpus > 1 else "")
    if verdict == GOOD:
        advice = f"{lo_b}–{hi_b} for {where}"
    elif eff < lo_b:
        advice = f"small for {where}: {lo_b}–{hi_b}; noisier steps (raise train.grad_accum)"
    else:
        advice = f"large for {where}: {lo_b}–{hi_b}; fewer updates per epoch"
    add(Criterion("effective batch", f"{eff} ({split})", verdict, advice, score))

    # ---- memory per GPU (does the micro batch fit?)
    if hardware is not None:
        add(_memory_criterion(cfg, hardware, gpus, arch))

    # ---- epochs
    if examples is None:
        add(Criterion("epochs", "—", INFO, "data size unknown (give --examples N): aim for 2–5 epochs", None))
    elif steps is None:
        add(Criterion("epochs", "—", INFO, "no step budget (train.max_steps)", None))
    else:
        epochs = steps * eff / examples
        lo_e, hi_e = epochs_range(examples)
        verdict, score = judge(epochs, lo_e, hi_e)
        lo_s = math.ceil(lo_e * examples / eff)
        hi_s = math.floor(hi_e * examples / eff)
        value = f"{epochs:.1f} ({steps:,} × {eff} / {examples:,})"
        span = f"{lo_e:g}–{hi_e:.0f} epochs = {lo_s:,}–{hi_s:,} steps"
        if verdict == GOOD:
            advice = f"within {span}"
        elif epochs > hi_e:
            advice = f"many passes over {examples:,} examples: overfitting risk; {span}"
        else:
            advice = f"under {lo_e:g} epochs: the format may not be learnt; {span}"
        add(Criterion("epochs", value, verdict, advice, score))

    # ---- warmup as a fraction of the total steps
    add(_warmup_criterion(t.warmup_steps, steps))

    # ---- adapters
    if adapters:
        v1, s1 = judge(ft.lora_rank, *LORA_RANK)
        v2, s2 = judge(ft.lora_alpha, *LORA_ALPHA, tol=4.0)
        verdict = BAD if BAD in (v1, v2) else (WARN if WARN in (v1, v2) else GOOD)
        advice = "rank 16–64, alpha 16–128 (alpha/rank sets the adapters' scale)"
        if verdict != GOOD:
            advice = f"usual: {advice}"
        add(Criterion("LoRA rank / alpha", f"r {ft.lora_rank}, α {ft.lora_alpha:g}", verdict, advice,
                      round(min(s1, s2), 1)))

    # ---- DPO
    if t.objective == "dpo":
        verdict, score = judge(ft.dpo_beta, *DPO_BETA)
        advice = "0.1–0.5; higher keeps the policy nearer the reference"
        add(Criterion("DPO β", f"{ft.dpo_beta:g}", verdict, advice if verdict == GOOD else f"usual: {advice}", score))
    return adv


def epochs_range(examples: int) -> tuple[float, float]:
    """(low, high) epochs for a data set of `examples` (see the module docstring)."""
    lo, hi = EPOCHS
    if examples < EPOCHS_SMALL:
        hi = hi * math.sqrt(EPOCHS_SMALL / examples)
    if examples >= EPOCHS_LARGE:
        lo = 1.0
    return lo, hi


def _lr_criterion(lr: float, objective: str, adapters: bool, params: int | None) -> Criterion:
    how = "LoRA/QLoRA" if adapters else "full"
    if objective in PREFERENCE_LR:
        full, lora, source = PREFERENCE_LR[objective]
        lo, hi = lora if adapters else full
        label = f"{objective.upper()}, {how}; {source}"
    elif objective == "sft":
        if params is None:
            return Criterion("learning rate", lr_text(lr), INFO, "model size unknown (not reachable offline?): "
                             "full fine-tuning takes the size's pretraining LR / 3–200 (2e-5 at 7B), LoRA ×1/10–3",
                             None)
        pre = pretrain_lr_for(params)
        lo, hi = (pre * f for f in (SFT_ADAPTERS if adapters else SFT_FULL))
        label = f"{params / 1e6:,.0f}M parameters, {how}; pretraining LR at that size ~{lr_text(float(f'{pre:.2g}'))}"
    else:
        return Criterion("learning rate", lr_text(lr), INFO, f"no rules for objective {objective!r}", None)
    verdict, score = judge(lr, lo, hi, tol=3.0)
    lo, hi = (float(f"{x:.2g}") for x in (lo, hi))  # a range to read, not to compute with
    rng = f"{lr_text(lo)}–{lr_text(hi)}"
    if verdict == GOOD:
        advice = f"in the usual range {rng} ({label})"
    elif lr > hi:
        advice = f"high: {rng} ({label}); risk of forgetting what pretraining taught (try {lr_text(hi)})"
    else:
        advice = f"low: {rng} ({label}); slow, little change from the base (try {lr_text(lo)})"
    return Criterion("learning rate", lr_text(lr), verdict, advice, score)


def _warmup_criterion(warmup: int, steps: int | None) -> Criterion:
    if steps is None:
        return Criterion("warmup", str(warmup), INFO, "no step budget to judge the warmup against", None)
    lo, hi = min(WARMUP[0], WARMUP_LONG_RUN / steps), WARMUP[1]
    frac = warmup / steps
    value = f"{warmup:,} ({frac:.1%} of {steps:,})"
    rng = f"{lo:.1%}–{hi:.0%} of the steps ({max(1, round(lo * steps)):,}–{max(1, round(hi * steps)):,})"
    if warmup == 0:
        return Criterion("warmup", value, WARN, f"no warmup: the first steps hit the base at full LR; {rng}", 5.0)
    verdict, score = judge(frac, lo, hi, tol=2.5)
    if verdict == GOOD:
        return Criterion("warmup", value, GOOD, rng, score)
    if frac > hi:
        from ..train.optim import warmup_steps  # the trainer's own cap

        cap = warmup_steps(warmup, steps)
        advice = f"long: {rng}; the trainer shortens it to {cap:,} steps ({WARMUP_CAP:.0%} of the budget)"
    else:
        advice = f"short: {rng}; early instability"
    return Criterion("warmup", value, verdict, advice, score)


def _memory_criterion(cfg: Config, hardware: str, gpus: int, arch) -> Criterion:
    from .estimate import estimate, gib, memory_fits

    t, ft = cfg.train, cfg.finetune
    try:
        precision = None if t.precision == "auto" else t.precision
        if ft.method == "qlora":
            precision = "4bit"
        elif precision is None:
            precision = "bf16"
        est = estimate(cfg.model.name, seq_len=cfg.data.seq_len, micro_batch=t.batch_size, grad_accum=t.grad_accum,
                       method=ft.method, precision=precision, lora_rank=ft.lora_rank,
                       lora_targets=ft.lora_targets or None, hardware=hardware, gpus=gpus,
                       checkpointing=t.activation_checkpointing, vocab_size=_vocab(cfg),
                       overrides=cfg.model.overrides, trust_remote_code=cfg.model.trust_remote_code,
                       arch=arch, suggest_methods=ft.method == "full", optimizer=t.optimizer, momentum=t.momentum,
                       objective=t.objective)
    except Exception as e:  # noqa: BLE001 - an unknown model: the rule is skipped, not the whole advice
        from ..fsutil import first_line

        return Criterion("memory per GPU", "—", INFO, f"not estimated ({first_line(e)})", None)
    ok, why = memory_fits(est)
    value = f"{gib(est.memory['total']):.1f} / {gib(est.gpu_memory):.0f} GiB"
    if est.fits:
        return Criterion("memory per GPU", value, GOOD, f"micro batch {t.batch_size} fits", 10.0)
    fix = est.suggestions[0] if est.suggestions else "lower train.batch_size, raise train.grad_accum"
    if est.fits_without_margin:
        return Criterion("memory per GPU", value, WARN, f"fits without the 10 % margin; {fix}", 5.0)
    return Criterion("memory per GPU", value, BAD, f"does not fit: {fix}", 0.0)


# ------------------------------------------------------------------------------------------------ inputs
def _examples_from_run(run_json: Path) -> int | None:
    try:
        d = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return None
    for holder in (d, d.get("manifest") or {}):
        n = ((holder.get("data") or {}).get("examples") or {}).get("train") if isinstance(holder, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def _world_from_run(run_json: Path, cfg: Config) -> int | None:
    try:
        d = json.loads(run_json.read_text())
    except (OSError, ValueError):
        return None
    tps = d.get("tokens_per_step") or (d.get("manifest") or {}).get("tokens_per_step")
    per_rank = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    if isinstance(tps, int) and tps > 0 and tps % per_rank == 0:
        return tps // per_rank
    return None


def load_subject(spec: str, overrides: list[str] | None = None) -> tuple[Config, dict[str, Any], str]:
    """(config, facts, label) for a recipe name, a config/recipe YAML file or a run folder. `facts` may hold
    `examples` (recipe header or run manifest) and `gpus` (a run's world size)."""
    from ..recipes import META_KEYS, RECIPES_DIR, header_of

    p = Path(spec)
    facts: dict[str, Any] = {}
    if p.is_dir():
        if not (p / "config.yaml").is_file():
            raise ConfigError(f"{spec}: no config.yaml (not a run folder)")
        d = yaml.safe_load((p / "config.yaml").read_text()) or {}
        label = f"run {p.name}"
    elif p.is_file():
        d = yaml.safe_load(p.read_text()) or {}
        label = p.name
    elif (RECIPES_DIR / f"{spec}.yaml").is_file():
        d = yaml.safe_load((RECIPES_DIR / f"{spec}.yaml").read_text()) or {}
        label = f"recipe {spec}"
    else:
        raise ConfigError(f"{spec}: not a config file, a run folder or a recipe (see `lmlab recipes`)")
    if not isinstance(d, dict):
        raise ConfigError(f"{spec}: expected a mapping of sections")
    meta = d.get("recipe") or (header_of(p.read_text()) if p.is_file() else {})
    if isinstance(meta.get("examples"), int):
        facts["examples"] = meta["examples"]
    cfg = from_dict(apply_overrides({k: v for k, v in d.items() if k not in META_KEYS}, overrides or []))
    validate(cfg)
    if p.is_dir() and (p / "run.json").is_file():
        n = _examples_from_run(p / "run.json")
        if n:
            facts["examples"] = n
        w = _world_from_run(p / "run.json", cfg)
        if w:
            facts["gpus"] = w
    return cfg, facts, label


def advise_spec(spec: str, overrides: list[str] | None = None, *, hardware: str | None = None,
                gpus: int | None = None, examples: int | None = None, pretrain_lr: float | None = None) -> Advice:
    cfg, facts, label = load_subject(spec, overrides)
    return advise(cfg, subject=label, hardware=hardware, gpus=gpus or facts.get("gpus", 1),
                  examples=examples or facts.get("examples"), pretrain_lr=pretrain_lr)
