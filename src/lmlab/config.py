"""Typed, validated run configuration: YAML files plus dotted `key=value` overrides.

    cfg = load_config("run.yaml", ["train.lr=1e-3", "model.name=mamba-swelu-small"])

Every key is checked against the dataclasses below before anything is built: an unknown key or a
bad value raises ConfigError naming the key and the allowed values (the CLI prints it, exit 2).
`model.*` keys other than `name` and `trust_remote_code` are overrides of the model family's config
(e.g. `model.d_model=512`, `model.activation=silu`) and are checked against that family.
The resolved config is saved as `config.yaml` in every run folder and reloaded by `lmlab resume`.

Each key is written once below: its type (a `Literal` for a choice of values), its default and its help text
(`doc`). `keys()` lists them; `lmlab <command> --help` and the short flags that alias keys are generated from
them (lmlab.commands._common).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

Device = Literal["auto", "cpu", "cuda", "mps"]  # train.device and every command's --device
Template = Literal["auto", "tokenizer", "plain", "chatml", "llama3"]  # finetune.template, chat/serve --template
Method = Literal["full", "lora", "qlora"]  # finetune.method, estimate --method


def doc(default: Any, help: str) -> Any:
    """A config key's default and its help text (shown by `lmlab <command> --help`); a list default is copied
    for each Config."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = doc("mamba-swelu-tiny", "a named size (lmlab models), a model folder, a run folder or a hub id")
    trust_remote_code: bool = doc(False, "allow a hub model's own Python code")
    overrides: dict[str, Any] = field(default_factory=dict)  # family-specific keys (model.d_model=…)


@dataclass
class DataConfig:
    source: Any = doc("stdlib", "a string or a list of them: stdlib, files, folders, globs, .jsonl, .parquet, "
                                "hf:NAME (fine-tuning: instruction or preference files, stdlib-instruct)")
    text_field: str = doc("text", "the text field of .jsonl / .parquet / hub rows")
    tokenizer: str = doc("stdlib-bpe", "the embedded default, a tokenizer folder or file, or a hub id")
    vocab_size: int = doc(4096, "vocabulary of the embedded stdlib-bpe tokenizer (only)")
    seq_len: int = doc(256, "tokens per training sequence")
    val_fraction: float = doc(0.02, "documents held out for validation")
    max_docs: int | None = doc(None, "read at most this many documents (null: all)")
    document_masking: bool = doc(False, "reset the model's state at document boundaries inside packed rows")
    split_seed: int | None = doc(None, "seed of the train/validation split (null: train.seed); fix it so runs with "
                                       "different train.seed are validated on the same documents (studies)")

    def split_seed_for(self, train_seed: int) -> int:
        return train_seed if self.split_seed is None else self.split_seed


@dataclass
class TrainConfig:
    max_steps: int | None = doc(None, "the budget in optimizer steps (set one of max_steps, max_tokens, "
                                      "token_ratio)")
    max_tokens: int | None = doc(None, "the budget in training tokens")
    token_ratio: float | None = doc(None, "the budget in tokens per parameter: 20 (Chinchilla), 100 (LLaMA-style)")
    batch_size: int = doc(8, "sequences per device per micro-step")
    grad_accum: int = doc(1, "micro-steps per optimizer step")
    lr: float = doc(3e-4, "peak learning rate, reached after warmup_steps")
    min_lr_ratio: float = doc(0.1, "final LR = lr × min_lr_ratio (cosine, linear)")
    schedule: Literal["cosine", "linear", "constant"] = doc("cosine", "LR schedule after the warmup")
    warmup_steps: int = doc(100, "steps of linear LR warmup")
    weight_decay: float = doc(0.1, "decoupled weight decay (not on norms and biases)")
    beta1: float = doc(0.9, "AdamW β1")
    beta2: float = doc(0.95, "AdamW β2")
    eps: float = doc(1e-8, "AdamW ε")
    optimizer: Literal["adamw", "sgd"] = doc("adamw", "adamw (decoupled weight decay) or sgd (momentum, no decay "
                                                      "on norms/biases either)")
    momentum: float = doc(0.9, "sgd only: heavy-ball momentum (0: plain SGD)")
    grad_clip: float = doc(1.0, "gradient-norm clipping (0 disables)")
    activation_checkpointing: bool = doc(False, "recompute each layer in the backward: less memory, ~1/3 more "
                                                "compute")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "auto", "auto: fp32 on CPU, bf16 on GPUs that support it, fp16 + loss scaling otherwise")
    device: Device = doc("auto", "auto: the GPU when there is one, else the CPU")
    seed: int = doc(1337, "seed of the weights' initialisation, the data order and sampling")
    threads: int | None = doc(None, "torch CPU threads (null: torch's default)")
    log_every: int = doc(10, "steps between metric records")
    eval_every: int = doc(200, "steps between validation passes")
    eval_batches: int = doc(20, "batches per validation pass")
    save_every: int = doc(500, "steps between checkpoints")
    keep_last: int = doc(3, "checkpoints kept (older ones are deleted)")
    sample_every: int = doc(0, "steps between text samples (0: only at the end)")
    sample_prompts: list[str] = doc(["def ", "The "], "prompts of the text samples")
    sample_tokens: int = doc(48, "new tokens per sample")
    progress: bool = doc(True, "show a progress bar")
    early_stop_patience: int = doc(0, "stop after this many evaluations without a new best val loss (0: off)")
    early_stop_min_delta: float = doc(0.0, "what counts as a new best: lower by more than this")
    system_every: float = doc(10.0, "seconds between system-stat records (CPU, RAM, GPUs); 0 turns them off")
    objective: str = doc("pretrain", "what is optimised: pretrain (next token), sft, dpo, ipo, simpo, orpo, kto, "
                                     "grpo (lmlab.train.objectives)")
    guard: Literal["skip", "rollback", "stop", "off"] = doc(
        "skip", "what a non-finite or spiking step does (lmlab.train.guard)")
    guard_window: int = doc(128, "steps of loss / gradient-norm history a spike is measured against")
    guard_warmup: int = doc(64, "steps in the window before spikes are judged (non-finite values always are)")
    guard_sigma: float = doc(6.0, "a spike: above mean + sigma·std of the window")
    guard_max_skips: int = doc(10, "bad steps in a row before a skipping run stops")
    guard_max_rollbacks: int = doc(3, "rollbacks before the run stops")
    guard_lr_factor: float = doc(0.5, "LR multiplier after each rollback")
    guard_keep: bool = doc(True, "keep the last good state in memory (one copy of the trainable weights and "
                                 "optimizer state) for stop and rollback; false: a stop saves the current state, "
                                 "a rollback goes to the last checkpoint")
    strategy: str = doc("ddp", "several ranks: ddp, fsdp (FSDP2, sharded), deepspeed (ZeRO 1-2), or a strategy "
                               "registered with lmlab.train.strategies.register_strategy")
    fsdp_reshard: bool = doc(True, "fsdp: free gathered weights after each block's forward (false: ZeRO-2-like)")
    zero_stage: Literal[1, 2] = doc(2, "deepspeed: 1 (optimizer state sharded) or 2 (+ gradients)")
    offload_optimizer: bool = doc(False, "deepspeed: optimizer state and step in CPU memory")
    compile: bool = doc(False, "torch.compile each block (the selective scan stays out of the graph)")
    chunked_loss: Literal["auto", "on", "off"] = doc(
        "auto", "LM head + loss a chunk of tokens at a time, the full logits never stored; auto: when a "
                "micro-batch's logits exceed loss_chunk_mb, and always on CPU (faster there)")
    loss_chunk_mb: int = doc(256, "fp32 logits per chunk of the chunked loss, in MiB (> 0)")


@dataclass
class FinetuneConfig:
    """Instruction and preference tuning (train.objective sft or dpo); model.name is the base to tune."""

    method: Method = doc("full", "full, lora, or qlora (4-bit NF4 base + LoRA)")
    lora_rank: int = doc(16, "LoRA rank r")
    lora_alpha: float = doc(32.0, "LoRA α (updates are scaled by α / r)")
    lora_dropout: float = doc(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = doc([], "module-name suffixes to adapt (empty: the family's defaults)")
    template: Template = doc("auto", "chat template; chatml/llama3 add their special tokens when the tokenizer "
                                     "lacks them (the model's embeddings grow to match)")
    system_prompt: str | None = doc(None, "system prompt of examples that have none")
    train_on: Literal["assistant", "all"] = doc("assistant", "assistant: loss on assistant tokens only; all: every "
                                                             "token")
    packing: bool = doc(True, "several examples per row, kept apart (state resets / block-diagonal attention)")
    max_len: int | None = doc(None, "longest example in tokens (null: data.seq_len)")
    overlong: Literal["truncate", "drop"] = doc("truncate", "what happens to an example longer than max_len")
    on_error: Literal["skip", "fail"] = doc("skip", "a malformed example: skip (counted) or fail")
    weights: list[float] = doc([], "per data.source, for mixing (empty: equal)")
    max_examples: list[int] = doc([], "per data.source cap (empty: none)")
    dpo_beta: float = doc(0.1, "dpo: β of the sigmoid loss")
    dpo_reference: Literal["auto"] = doc("auto", "auto: the base with adapters off (LoRA) or a frozen copy (full)")
    ipo_tau: float = doc(0.1, "ipo: the regulariser τ; the loss is (h − 1/(2τ))² on length-averaged log-ratios")
    simpo_beta: float = doc(2.0, "simpo: reward scale β on length-averaged log-probabilities (no reference)")
    simpo_gamma: float = doc(1.0, "simpo: target margin γ (γ/β = 0.5 with the default β)")
    orpo_lambda: float = doc(0.1, "orpo: weight λ of the odds-ratio term beside the NLL of the chosen reply")
    kto_beta: float = doc(0.1, "kto: β of the implicit reward β·(log π − log π_ref)")
    kto_desirable_weight: float = doc(1.0, "kto: λ_D, weight of desirable examples")
    kto_undesirable_weight: float = doc(1.0, "kto: λ_U, weight of undesirable examples")


@dataclass
class RLConfig:
    """Reinforcement learning with verifiable rewards (train.objective=grpo, lmlab.train.grpo): data.source holds
    the prompts (arithmetic, a question/answer .jsonl, stdlib-functions; lmlab.data.prompts)."""

    num_generations: int = doc(8, "G: completions sampled per prompt (a group); train.batch_size counts prompts")
    max_completion_length: int = doc(32, "new tokens per completion at most")
    temperature: float = doc(1.0, "sampling temperature of the rollouts")
    top_k: int = doc(0, "top-k sampling of the rollouts (0: off)")
    top_p: float = doc(1.0, "nucleus sampling of the rollouts (1: off)")
    beta: float = doc(0.0, "KL coefficient to a frozen reference (0: no reference model is built; GRPO paper: 0.04)")
    epsilon: float = doc(0.2, "clip range below 1 of the probability ratio (PPO / GRPO)")
    epsilon_high: float | None = doc(None, "clip range above 1 (DAPO's clip-higher: 0.28); null: epsilon")
    scale_rewards: Literal["group", "batch", "none"] = doc(
        "group", "group: advantages / group std (GRPO); batch: / batch std; none (Dr. GRPO)")
    loss_type: Literal["dapo", "grpo", "dr_grpo"] = doc(
        "dapo", "dapo: token-level mean; grpo: per-sequence mean; dr_grpo: / (G·max length)")
    iterations: int = doc(1, "μ: optimizer steps on each rollout batch (>1: the clipped ratio matters)")
    reward_funcs: list[str] = doc(["format", "answer"], "built-in reward functions or module:function")
    reward_weights: list[float] = doc([], "one per reward function (empty: all 1)")
    format_regex: str = doc(r"^\s*-?\d+\s*$", "format reward: 1 when the whole completion matches")
    answer_regex: str = doc("", "answer reward: the answer is group 1 of this regex's first match (empty: the "
                                "whole completion, stripped); equal to the reference answer (as numbers if both "
                                "are)")
    arithmetic_digits: int = doc(2, "data.source=arithmetic: operand digits")
    arithmetic_ops: str = doc("+", "data.source=arithmetic: operators to draw from, of + - *")
    arithmetic_prompts: int = doc(5000, "data.source=arithmetic: distinct generated problems (before the split)")
    sandbox_timeout: float = doc(2.0, "code reward: wall-clock seconds per completion")
    sandbox_cpu: float = doc(2.0, "code reward: CPU seconds (RLIMIT_CPU)")
    sandbox_memory_mb: int = doc(512, "code reward: address space in MiB (RLIMIT_AS)")
    sandbox_workers: int = doc(2, "code reward: completions run at once (one process each)")
    log_completions: int = doc(8, "completions (with their rewards) written to samples_grpo.jsonl per log step")


@dataclass
class RunConfig:
    name: str | None = doc(None, "the run folder's name (null: <model>-<yyyymmdd-hhmmss>)")
    out_dir: str = doc("runs", "parent folder of the run folder")
    if_exists: Literal["refuse", "resume"] = doc(
        "refuse", "the folder out_dir/name exists: refuse, or resume it (restarts under torchrun)")


@dataclass
class LogConfig:
    """Optional copies of the run's records in Weights & Biases and trackio (lmlab.monitor.trackers)."""

    wandb: bool = doc(False, "copy the records to Weights & Biases (pip install 'lmlab[wandb]')")
    wandb_project: str = doc("lmlab", "the W&B project")
    wandb_mode: Literal["offline", "online", "disabled"] = doc(
        "offline", "offline: files in the run folder, nothing sent (wandb sync later)")
    trackio: bool = doc(False, "copy the records to trackio, local SQLite storage in TRACKIO_DIR (pip install "
                               "'lmlab[trackio]')")
    trackio_project: str = doc("lmlab", "the trackio project")


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


# --------------------------------------------------------------------------------------------------- the keys
@dataclass(frozen=True)
class Key:
    """One config key: what `lmlab <command> --help` lists and what a flag aliasing it is typed by."""

    name: str  # section.key
    type: Any  # the resolved annotation
    default: Any
    help: str
    choices: tuple | None  # a Literal's values

    def shown_default(self) -> str:
        return show(self.default)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@functools.cache
def keys() -> dict[str, Key]:
    """Every config key (`section.key`, in the dataclasses' order) except the family-specific `model.*` ones."""
    out, cfg = {}, Config()
    for sec in dataclasses.fields(Config):
        obj = getattr(cfg, sec.name)
        hints = _hints(type(obj))
        for f in dataclasses.fields(obj):
            if f.name == "overrides":
                continue
            tp = hints[f.name]
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
            out[f"{sec.name}.{f.name}"] = Key(f"{sec.name}.{f.name}", tp, getattr(obj, f.name),
                                              f.metadata.get("help", ""), choices)
    return out


def show(value: Any) -> str:
    """A value as it is written after `key=` on the command line (YAML)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, str):
        plain = value != "" and value == value.strip() and isinstance(yaml.safe_load(value), str) \
            and not any(c in value for c in ",[]{}#")
        return value if plain else repr(value)
    return str(value)


def coerce(key: str, value: Any) -> Any:
    """`value` (a string from the command line, or a YAML value) as config key `key`'s type; ConfigError if it
    is not one. A string is read as YAML unless the key takes text (a name, a path, a choice of words)."""
    k = keys().get(key)
    if k is None:
        raise ConfigError(f"{key}: unknown key")
    if isinstance(value, str) and not _takes_text(k.type):
        value = _parse_scalar(value)
    return _coerce(key, value, k.type)


def _takes_text(tp: Any) -> bool:
    if tp is str or tp is Any:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(_takes_text(a) for a in typing.get_args(tp))


# ------------------------------------------------------------------------------------------------ parsing
def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert `value` to the annotated type `tp` or raise ConfigError naming `key`."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing) | {"Any": Any})  # annotations are strings (from __future__)
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, bool) and all(isinstance(a, str) for a in allowed):
            # YAML reads off/on/no/yes as booleans: a choice spelled so is meant as text
            value = next((a for a in allowed if yaml.safe_load(a) is value), value)
        try:
            v = _coerce(key, value, type(allowed[0]))
        except ConfigError:
            v = value
        if isinstance(v, bool) or v not in allowed:
            raise ConfigError(f"{key}: invalid value {value!r}; allowed: {', '.join(map(str, allowed))}")
        return v
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
        setattr(obj, key, _coerce(full, value, _hints(type(obj))[key]))


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
    for key in (k for k in keys().values() if k.choices):  # set in code, a value never went through _coerce
        section, name = key.name.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(not isinstance(value, bool) and value in key.choices, key.name,
               f"invalid value {value!r}; allowed: {', '.join(map(str, key.choices))}")
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
    _check(t.loss_chunk_mb >= 1, "train.loss_chunk_mb", f"must be > 0 (MiB), got {t.loss_chunk_mb}")
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
    # train.objective and train.strategy are checked against their registries (lmlab.train.objectives,
    # lmlab.train.strategies) before the run folder is made
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
