"""Typed, validated run configuration: YAML files plus dotted `key=value` overrides.

    cfg = load_config("run.yaml", ["train.lr=1e-3", "model.name=mamba-swelu-small"])

Every key is checked against the dataclasses below before anything is built: an unknown key or a
bad value raises ConfigError naming the key and the allowed values (the CLI prints it, exit 2).
`model.*` keys other than `name` and `trust_remote_code` are overrides of the model family's config
(e.g. `model.d_model=512`, `model.activation=silu`) and are checked against that family.
The resolved config is saved as `config.yaml` in every run folder and reloaded by `lmlab resume`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    name: str = "mamba-swelu-tiny"
    trust_remote_code: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # family-specific keys (model.d_model=…)


@dataclass
class DataConfig:
    source: Any = "stdlib"  # a string or a list of strings: stdlib, files, folders, globs, .jsonl, hf:NAME
    text_field: str = "text"
    tokenizer: str = "stdlib-bpe"  # embedded default, a tokenizer folder/file, or a hub id
    vocab_size: int = 4096  # only for the embedded stdlib-bpe tokenizer
    seq_len: int = 256
    val_fraction: float = 0.02
    max_docs: int | None = None
    document_masking: bool = False  # reset the model's state at document boundaries inside packed rows
    split_seed: int | None = None  # seed of the train/validation split (default train.seed); fix it so runs with
    #                                different train.seed are validated on the same documents (studies)

    def split_seed_for(self, train_seed: int) -> int:
        return train_seed if self.split_seed is None else self.split_seed


@dataclass
class TrainConfig:
    max_steps: int | None = None  # the budget: exactly one of max_steps, max_tokens, token_ratio
    max_tokens: int | None = None
    token_ratio: float | None = None  # tokens per parameter: 20 (Chinchilla), 100 (LLaMA-style)
    batch_size: int = 8  # sequences per device per micro-step
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # final LR = lr × min_lr_ratio (cosine, linear)
    schedule: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: str = "adamw"  # adamw (decoupled weight decay) | sgd (momentum, no decay on norms/biases either)
    momentum: float = 0.9  # sgd only: heavy-ball momentum (0: plain SGD)
    grad_clip: float = 1.0  # 0 disables clipping
    activation_checkpointing: bool = False  # recompute each layer in the backward: less memory, ~1/3 more compute
    precision: str = "auto"  # auto: fp32 on CPU, bf16 on GPUs that support it, fp16 + loss scaling otherwise
    device: str = "auto"
    seed: int = 1337
    threads: int | None = None  # torch CPU threads (None: leave torch's default)
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 20
    save_every: int = 500
    keep_last: int = 3
    sample_every: int = 0  # 0: samples only at the end
    sample_prompts: list[str] = field(default_factory=lambda: ["def ", "The "])
    sample_tokens: int = 48
    progress: bool = True
    early_stop_patience: int = 0  # stop after this many evaluations without a new best val loss (0 = off)
    early_stop_min_delta: float = 0.0  # what counts as a new best: lower by more than this
    system_every: float = 10.0  # seconds between system-stat records (CPU, RAM, GPUs); 0 turns them off
    objective: str = "pretrain"  # what is optimised: pretrain (next token); see lmlab.train.objectives
    guard: str = "skip"  # a non-finite or spiking step: skip | rollback | stop | off (lmlab.train.guard)
    guard_window: int = 128  # steps of loss / gradient-norm history a spike is measured against
    guard_warmup: int = 64  # steps in the window before spikes are judged (non-finite values always are)
    guard_sigma: float = 6.0  # a spike: above mean + sigma·std of the window
    guard_max_skips: int = 10  # bad steps in a row before a skipping run stops
    guard_max_rollbacks: int = 3
    guard_lr_factor: float = 0.5  # LR multiplier after each rollback
    guard_keep: bool = True  # keep the last good state in memory (one copy of the trainable weights and optimizer
    #                          state) for stop and rollback; false: a stop saves the current state, a rollback
    #                          goes to the last checkpoint
    strategy: str = "ddp"  # several ranks: ddp | fsdp (FSDP2, sharded) | deepspeed (ZeRO 1-2); lmlab.train.strategy
    fsdp_reshard: bool = True  # fsdp: free gathered weights after each block's forward (False: ZeRO-2-like)
    zero_stage: int = 2  # deepspeed: 1 (optimizer state sharded) or 2 (+ gradients)
    offload_optimizer: bool = False  # deepspeed: optimizer state and step in CPU memory
    compile: bool = False  # torch.compile each block (the selective scan stays out of the graph)
    chunked_loss: str = "auto"  # LM head + loss a chunk of tokens at a time, the full logits never stored:
    #                             auto (when a micro-batch's logits exceed loss_chunk_mb) | on | off
    loss_chunk_mb: int = 256  # fp32 logits per chunk of the chunked loss, in MiB


@dataclass
class FinetuneConfig:
    """Instruction and preference tuning (train.objective sft or dpo); model.name is the base to tune."""

    method: str = "full"  # full | lora | qlora (4-bit NF4 base + LoRA)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=list)  # module-name suffixes; empty: the family's defaults
    template: str = "auto"  # auto | tokenizer | plain | chatml | llama3
    system_prompt: str | None = None
    train_on: str = "assistant"  # assistant: loss on assistant tokens only; all: every token
    packing: bool = True  # several examples per row, kept apart (state resets / block-diagonal attention)
    max_len: int | None = None  # longest example in tokens (default data.seq_len)
    overlong: str = "truncate"  # truncate | drop
    on_error: str = "skip"  # a malformed example: skip (counted) | fail
    weights: list[float] = field(default_factory=list)  # per data.source, for mixing (default: equal)
    max_examples: list[int] = field(default_factory=list)  # per data.source cap (default: none)
    dpo_beta: float = 0.1
    dpo_reference: str = "auto"  # auto: the base with adapters off (LoRA) or a frozen copy (full)
    ipo_tau: float = 0.1  # ipo: the regulariser τ; the loss is (h − 1/(2τ))² on length-averaged log-ratios
    simpo_beta: float = 2.0  # simpo: reward scale β on length-averaged log-probabilities (no reference)
    simpo_gamma: float = 1.0  # simpo: target margin γ (γ/β = 0.5 with the default β)
    orpo_lambda: float = 0.1  # orpo: weight λ of the odds-ratio term beside the NLL of the chosen reply
    kto_beta: float = 0.1  # kto: β of the implicit reward β·(log π − log π_ref)
    kto_desirable_weight: float = 1.0  # kto: λ_D, weight of desirable examples
    kto_undesirable_weight: float = 1.0  # kto: λ_U, weight of undesirable examples


@dataclass
class RLConfig:
    """Reinforcement learning with verifiable rewards (train.objective=grpo, lmlab.train.grpo): data.source holds
    the prompts (arithmetic, a question/answer .jsonl, stdlib-functions; lmlab.data.prompts)."""

    num_generations: int = 8  # G: completions sampled per prompt (a group); train.batch_size counts prompts
    max_completion_length: int = 32  # new tokens per completion at most
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    beta: float = 0.0  # KL coefficient to a frozen reference (0: no reference model is built; GRPO paper: 0.04)
    epsilon: float = 0.2  # clip range below 1 of the probability ratio (PPO / GRPO)
    epsilon_high: float | None = None  # clip range above 1 (DAPO's clip-higher: 0.28); default: epsilon
    scale_rewards: str = "group"  # group: advantages / group std (GRPO) | batch: / batch std | none (Dr. GRPO)
    loss_type: str = "dapo"  # dapo: token-level mean | grpo: per-sequence mean | dr_grpo: / (G·max length)
    iterations: int = 1  # μ: optimizer steps on each rollout batch (>1: the clipped ratio matters)
    reward_funcs: list[str] = field(default_factory=lambda: ["format", "answer"])  # built-ins or module:function
    reward_weights: list[float] = field(default_factory=list)  # one per reward function (default: all 1)
    format_regex: str = r"^\s*-?\d+\s*$"  # format reward: 1 when the whole completion matches
    answer_regex: str = ""  # answer reward: the answer is group 1 of this regex's first match (default: the
    #                         whole completion, stripped); equal to the reference answer (as numbers if both are)
    arithmetic_digits: int = 2  # data.source=arithmetic: operand digits
    arithmetic_ops: str = "+"  # data.source=arithmetic: operators to draw from, of + - *
    arithmetic_prompts: int = 5000  # data.source=arithmetic: distinct generated problems (before the split)
    sandbox_timeout: float = 2.0  # code reward: wall-clock seconds per completion
    sandbox_cpu: float = 2.0  # code reward: CPU seconds (RLIMIT_CPU)
    sandbox_memory_mb: int = 512  # code reward: address space (RLIMIT_AS)
    sandbox_workers: int = 2  # code reward: completions run at once (one process each)
    log_completions: int = 8  # completions (with their rewards) written to samples_grpo.jsonl per log step


@dataclass
class RunConfig:
    name: str | None = None  # default: <model>-<yyyymmdd-hhmmss>
    out_dir: str = "runs"
    if_exists: str = "refuse"  # the folder out_dir/name exists: refuse | resume (continue it: restarts under torchrun)


@dataclass
class LogConfig:
    """Optional copies of the run's records in Weights & Biases and trackio (lmlab.monitor.trackers)."""

    wandb: bool = False  # needs `pip install 'lmlab[wandb]'`
    wandb_project: str = "lmlab"
    wandb_mode: str = "offline"  # offline: files in the run folder, nothing sent (wandb sync later) | online | disabled
    trackio: bool = False  # needs `pip install 'lmlab[trackio]'`; local SQLite storage (TRACKIO_DIR)
    trackio_project: str = "lmlab"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    run: RunConfig = field(default_factory=RunConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"name": self.model.name, "trust_remote_code": self.model.trust_remote_code,
                      **self.model.overrides}
        return d


CHOICES = {
    "train.schedule": ("cosine", "linear", "constant"),
    "train.guard": ("skip", "rollback", "stop", "off"),
    "train.optimizer": ("adamw", "sgd"),
    "finetune.method": ("full", "lora", "qlora"),
    "finetune.template": ("auto", "tokenizer", "plain", "chatml", "llama3"),
    "finetune.train_on": ("assistant", "all"),
    "finetune.overlong": ("truncate", "drop"),
    "finetune.on_error": ("skip", "fail"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.chunked_loss": ("auto", "on", "off"),
    "train.device": ("auto", "cpu", "cuda", "mps"),
    "train.strategy": ("ddp", "fsdp", "deepspeed"),
    "train.zero_stage": (1, 2),
    "run.if_exists": ("refuse", "resume"),
    "rl.scale_rewards": ("group", "batch", "none"),
    "rl.loss_type": ("dapo", "grpo", "dr_grpo"),
    "log.wandb_mode": ("offline", "online", "disabled"),
}


# ------------------------------------------------------------------------------------------------ parsing
def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the annotated type `tp` or raise ConfigError naming `key`."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Any": Any})  # annotations are strings (from __future__)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, bool):  # YAML reads off/on/no/yes as booleans: a choice spelled so is meant as text
            spelled = [c for c in CHOICES.get(key, ()) if isinstance(c, str)
                       and isinstance(yaml.safe_load(c), bool) and yaml.safe_load(c) is value]
            if spelled:
                return spelled[0]
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _apply_section(obj: Any, section: str, values: dict[str, Any]) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        full = f"{section}.{key}"
        if section == "model" and key not in fields:
            obj.overrides[key] = value  # checked against the model family in validate()
            continue
        if key not in fields or key == "overrides":
            allowed = ", ".join(k for k in fields if k != "overrides")
            raise ConfigError(f"{full}: unknown key; allowed: {allowed}")
        setattr(obj, key, _coerce(full, value, fields[key].type))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def from_dict(d: dict[str, Any]) -> Config:
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(cfg)}
    for section, values in (d or {}).items():
        if section not in sections:
            raise ConfigError(f"{section}: unknown section; allowed: {', '.join(sorted(sections))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {values!r}")
        _apply_section(getattr(cfg, section), section, values)
    return cfg


def apply_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings (YAML-typed values) to a nested dict."""
    d = {k: dict(v or {}) for k, v in (d or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value (e.g. train.lr=1e-3)")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override {item!r}: key must be section.key (e.g. train.lr, model.name)")
        d.setdefault(parts[0], {})[parts[1]] = _parse_scalar(raw)
    return d


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    base: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            base = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(base, dict):
            raise ConfigError(f"{p}: expected a mapping of sections (model, data, train, run)")
    cfg = from_dict(apply_overrides(base, overrides or []))
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------- validation
def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Value checks that need no compute. The model name and overrides are checked too."""
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, key, f"invalid value {value!r}; allowed: {', '.join(map(str, allowed))}")
    t, d, ft = cfg.train, cfg.data, cfg.finetune
    rl = cfg.rl
    for name, section in (("train", t), ("data", d), ("finetune", ft), ("rl", rl)):
        for f in dataclasses.fields(section):
            v = getattr(section, f.name)
            if isinstance(v, float):
                _check(math.isfinite(v), f"{name}.{f.name}", f"must be a finite number, got {v}")
    _check(ft.lora_rank >= 1, "finetune.lora_rank", f"must be >= 1, got {ft.lora_rank}")
    _check(ft.lora_alpha > 0, "finetune.lora_alpha", f"must be > 0, got {ft.lora_alpha}")
    _check(0 <= ft.lora_dropout < 1, "finetune.lora_dropout", f"must be in [0, 1), got {ft.lora_dropout}")
    _check(ft.max_len is None or ft.max_len >= 2, "finetune.max_len", f"must be >= 2, got {ft.max_len}")
    _check(ft.dpo_beta > 0, "finetune.dpo_beta", f"must be > 0, got {ft.dpo_beta}")
    for k in ("ipo_tau", "simpo_beta", "kto_beta", "orpo_lambda"):
        _check(getattr(ft, k) > 0, f"finetune.{k}", f"must be > 0, got {getattr(ft, k)}")
    for k in ("simpo_gamma", "kto_desirable_weight", "kto_undesirable_weight"):
        _check(getattr(ft, k) >= 0, f"finetune.{k}", f"must be >= 0, got {getattr(ft, k)}")
    _validate_rl(rl)
    _check(all(w > 0 for w in ft.weights), "finetune.weights", f"must all be > 0, got {ft.weights}")
    _check(all(m >= 1 for m in ft.max_examples), "finetune.max_examples", f"must all be >= 1, got {ft.max_examples}")
    _check(cfg.run.if_exists == "refuse" or bool(cfg.run.name), "run.if_exists",
           "resume needs a fixed run.name (the default name carries the start time, so a restart would not "
           "find its folder)")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, "train.grad_accum", f"must be >= 1, got {t.grad_accum}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    for k in ("log_every", "eval_every", "save_every"):
        _check(getattr(t, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(t, k)}")
    _check(t.eval_batches >= 1, "train.eval_batches", f"must be >= 1, got {t.eval_batches}")
    _check(t.keep_last >= 1, "train.keep_last", f"must be >= 1, got {t.keep_last}")
    _check(t.sample_every >= 0, "train.sample_every", f"must be >= 0, got {t.sample_every}")
    _check(t.threads is None or t.threads >= 1, "train.threads", f"must be >= 1, got {t.threads}")
    _check(t.early_stop_patience >= 0 and t.early_stop_min_delta >= 0, "train.early_stop_patience/min_delta",
           "must be >= 0")
    _check(t.system_every >= 0, "train.system_every", f"must be >= 0 (0 turns it off), got {t.system_every}")
    _check(t.sample_tokens >= 1, "train.sample_tokens", f"must be >= 1, got {t.sample_tokens}")
    _check(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    _check(0 <= t.momentum < 1, "train.momentum", f"must be in [0, 1), got {t.momentum}")
    _check(t.guard_window >= 2 and t.guard_warmup >= 1, "train.guard_window/guard_warmup",
           f"need window >= 2 and warmup >= 1, got {t.guard_window}, {t.guard_warmup}")
    _check(t.guard_warmup <= t.guard_window, "train.guard_warmup",
           f"{t.guard_warmup} exceeds train.guard_window {t.guard_window}")
    _check(t.guard_sigma > 0, "train.guard_sigma", f"must be > 0, got {t.guard_sigma}")
    _check(t.guard_max_skips >= 0 and t.guard_max_rollbacks >= 0, "train.guard_max_skips/guard_max_rollbacks",
           "must be >= 0")
    _check(0 < t.guard_lr_factor <= 1, "train.guard_lr_factor", f"must be in (0, 1], got {t.guard_lr_factor}")
    _check(t.strategy != "fsdp" or t.sample_every == 0, "train.sample_every",
           "samples during training need the whole model on one rank; with train.strategy=fsdp use 0 (end only)")
    _check(not t.offload_optimizer or t.strategy == "deepspeed", "train.offload_optimizer",
           f"needs train.strategy=deepspeed, got {t.strategy}")
    _check(t.strategy == "ddp" or cfg.finetune.method == "full", "train.strategy",
           f"{t.strategy} trains full models only; use ddp with finetune.method={cfg.finetune.method}")
    # train.objective is checked against the registry by lmlab.train.objectives.make_objective, first thing
    budgets = [k for k in ("max_steps", "max_tokens", "token_ratio") if getattr(t, k) is not None]
    _check(len(budgets) <= 1, "train", f"set only one budget of max_steps, max_tokens, token_ratio "
                                       f"(got {', '.join(budgets)})")
    for k in budgets:
        _check(getattr(t, k) > 0, f"train.{k}", f"must be > 0, got {getattr(t, k)}")
    _check(d.seq_len >= 1, "data.seq_len", f"must be >= 1, got {d.seq_len}")
    _check(0 <= d.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _check(d.vocab_size >= 260, "data.vocab_size", f"must be >= 260 (256 bytes + specials), got {d.vocab_size}")
    _check(d.max_docs is None or d.max_docs >= 1, "data.max_docs", f"must be >= 1, got {d.max_docs}")
    _check(isinstance(d.source, (str, list)) and bool(d.source), "data.source",
           "must be a source string or a non-empty list of them")
    _validate_log(cfg)
    _validate_model(cfg)


def _validate_rl(rl: RLConfig) -> None:
    import re

    _check(rl.num_generations >= 2, "rl.num_generations", f"must be >= 2 (advantages compare within a group), "
                                                          f"got {rl.num_generations}")
    for k in ("max_completion_length", "iterations", "arithmetic_digits", "arithmetic_prompts", "sandbox_memory_mb",
              "sandbox_workers"):
        _check(getattr(rl, k) >= 1, f"rl.{k}", f"must be >= 1, got {getattr(rl, k)}")
    _check(rl.log_completions >= 0, "rl.log_completions", f"must be >= 0, got {rl.log_completions}")
    _check(rl.temperature > 0, "rl.temperature", f"must be > 0 (rollouts are sampled), got {rl.temperature}")
    _check(rl.top_k >= 0, "rl.top_k", f"must be >= 0 (0: off), got {rl.top_k}")
    _check(0 < rl.top_p <= 1, "rl.top_p", f"must be in (0, 1], got {rl.top_p}")
    _check(rl.beta >= 0, "rl.beta", f"must be >= 0 (0: no reference model), got {rl.beta}")
    _check(0 < rl.epsilon < 1, "rl.epsilon", f"must be in (0, 1), got {rl.epsilon}")
    _check(rl.epsilon_high is None or rl.epsilon_high > 0, "rl.epsilon_high", f"must be > 0, got {rl.epsilon_high}")
    _check(rl.sandbox_timeout > 0 and rl.sandbox_cpu > 0, "rl.sandbox_timeout/sandbox_cpu", "must be > 0")
    _check(bool(rl.reward_funcs), "rl.reward_funcs", "needs at least one reward function")
    _check(not rl.reward_weights or len(rl.reward_weights) == len(rl.reward_funcs), "rl.reward_weights",
           f"{len(rl.reward_weights)} weights for {len(rl.reward_funcs)} reward functions")
    _check(bool(rl.arithmetic_ops) and set(rl.arithmetic_ops) <= set("+-*"), "rl.arithmetic_ops",
           f"must be some of + - *, got {rl.arithmetic_ops!r}")
    for k in ("format_regex", "answer_regex"):
        try:
            re.compile(getattr(rl, k))
        except re.error as e:
            raise ConfigError(f"rl.{k}: not a valid regular expression ({e})") from None


def _validate_log(cfg: Config) -> None:
    from .monitor.trackers import missing_package

    lg = cfg.log
    for key in ("wandb_project", "trackio_project"):
        v = getattr(lg, key)
        _check(bool(v) and len(v) <= 128 and not any(c in v for c in "/\\#?%:"), f"log.{key}",
               f"must be 1-128 characters without / \\ # ? % :, got {v!r}")
    for service in ("wandb", "trackio"):
        if getattr(lg, service) and not (service == "wandb" and lg.wandb_mode == "disabled"):
            _check(not missing_package(service), f"log.{service}",
                   f"the {service} package is not installed; install it with: pip install 'lmlab[{service}]'")


def _validate_model(cfg: Config) -> None:
    from .models import registry

    kind = registry.describe_kind(cfg.model.name)
    if kind == "named":
        family = registry.named_sizes()[cfg.model.name]
        cfg.model.overrides = _typed_overrides(family.config_cls, cfg.model.overrides)
        cfg_obj = registry.build_config(cfg.model.name, overrides=cfg.model.overrides)
        registry.check_trainable(cfg.model.name, cfg_obj)  # eval-only variants are refused before any work
        seq_limit = getattr(cfg_obj, "max_seq_len", None) or getattr(cfg_obj, "max_position_embeddings", None)
        if seq_limit is not None:
            _check(cfg.data.seq_len <= seq_limit, "data.seq_len",
                   f"{cfg.data.seq_len} exceeds the model's maximum sequence length {seq_limit} "
                   f"(raise model.max_seq_len or lower data.seq_len)")
        act = getattr(cfg_obj, "activation", None)
        if act is not None:
            _check(act in ("swelu", "silu"), "model.activation", f"invalid value {act!r}; allowed: swelu, silu")
        backend = getattr(cfg_obj, "scan_backend", None)
        if backend is not None:  # resolved for the run's device, as the trainer will (lmlab.models.scan)
            from .models import scan
            from .runtime import pick_device

            scan.resolve_backend(backend, pick_device(cfg.train.device))
        _build_on_meta(cfg_obj, cfg.model.name)
    elif cfg.model.overrides:
        key = next(iter(cfg.model.overrides))
        raise ConfigError(f"model.{key}: overrides apply only to lmlab's named sizes, not to {cfg.model.name!r}")


def _typed_overrides(config_cls: type, overrides: dict[str, Any]) -> dict[str, Any]:
    """Each `model.*` override converted to the type its family's config declares, with range checks."""
    import inspect

    params = inspect.signature(config_cls.__init__).parameters
    out = {}
    for key, value in overrides.items():
        p = params.get(key)
        if p is None:  # the family reports unknown keys with the allowed list
            out[key] = value
            continue
        if p.annotation is not inspect.Parameter.empty:
            value = _coerce(f"model.{key}", value, p.annotation)
        if isinstance(value, float):
            _check(math.isfinite(value), f"model.{key}", f"must be a finite number, got {value}")
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            _check(0 <= value < 1, f"model.{key}", f"must be in [0, 1), got {value}")
        default = p.default
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(default, int) \
                and not isinstance(default, bool) and default >= 1:
            _check(value >= 1, f"model.{key}", f"must be >= 1, got {value}")
        out[key] = value
    return out


def _build_on_meta(cfg_obj: Any, name: str) -> None:
    """Build the model on the meta device (no memory, no compute): what its constructor refuses, we refuse now."""
    from .models import registry

    try:
        registry.build_model(cfg_obj, device="meta")
    except Exception as e:  # noqa: BLE001 - any constructor error is a bad model.* value
        from .fsutil import first_line

        raise ConfigError(f"model: {name} cannot be built with these model.* values ({first_line(e)})") from None
