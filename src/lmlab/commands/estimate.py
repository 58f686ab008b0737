"""lmlab estimate: parameters, memory per GPU, speed, time and cost of a training run, before running it."""

from __future__ import annotations

EPILOG = """examples:
  lmlab estimate --model mamba-swelu-124m --hardware h100 --token-ratio 100 --batch 16
  lmlab estimate --model inl-3b --hardware all --batch 1 --checkpointing
  lmlab estimate --model meta-llama/Llama-3.2-1B --method qlora --hardware rtx4090
  lmlab estimate --model run.yaml                       # the run config's model, batch and budget
  lmlab estimate --model mamba-swelu-small --seq-len 256 --batch 8 --measure   # check against one real step
"""


def add_arguments(p) -> None:
    import argparse

    from ..plan.estimate import PRECISIONS
    from ._common import BUDGET, CONFIG_DEFAULT, add_alias_flags, add_device_flag, add_hardware_flags

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = EPILOG
    p.add_argument("--model", default="mamba-swelu-124m",
                   help="named size (lmlab models), run config .yaml, HF config.json, model folder or hub id "
                        "(default: mamba-swelu-124m)")
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="model config override, repeatable (e.g. --set n_iterations=8 --set context=projection)")
    p.add_argument("--vocab-size", type=int,
                   help="vocabulary (default: a named size gets the default data.tokenizer's, stdlib-bpe with 4,096 "
                        "tokens, as `lmlab pretrain` builds it; any other model its own)")
    p.add_argument("--tokenizer", help="a named size's tokenizer (stdlib-bpe, a tokenizer folder or a cached hub id): "
                                       "plan its vocabulary")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom code from a hub model")
    g = p.add_argument_group("training")
    add_alias_flags(p, ("--seq-len", "--batch", "--grad-accum"), group=g,
                    help={"--seq-len": "tokens per sequence (default 1024, or the run config's)",
                          "--batch": "micro batch per GPU (default 8, or the run config's)",
                          "--grad-accum": "gradient accumulation steps (default 1)"})
    add_alias_flags(p, ("--method", "--lora-rank", "--optimizer", "--momentum", "--checkpointing"), group=g,
                    default=CONFIG_DEFAULT)
    g.add_argument("--precision", choices=PRECISIONS,
                   help="fp32, bf16, fp16 (mixed precision) or 4bit (QLoRA); default bf16, 4bit for qlora")
    g.add_argument("--lora-targets", help="comma-separated Linear names, or all-linear (default: attention/mixer "
                                          "projections)")
    g.add_argument("--objective", default="pretrain",
                   help="pretrain, sft, or a preference objective (dpo, ipo, kto, simpo, orpo, grpo): pairs count "
                        "two sequences, and full fine-tuning with a reference keeps a frozen copy (default pretrain)")
    g.add_argument("--scan", default="auto",
                   help="Mamba scan for the activation model: auto, ref, chunked, cpu, triton, mamba_ssm")
    h = p.add_argument_group("hardware and money")
    add_hardware_flags(h, hardware="h100", gpus=1, hardware_help="or all for a table over every GPU")
    h.add_argument("--mfu", type=float, default=0.35, help="assumed model-FLOPs utilisation (default 0.35)")
    h.add_argument("--kwh-price", type=float, default=0.25, help="electricity, USD per kWh (default 0.25)")
    h.add_argument("--pue", type=float, default=1.0, help="power usage effectiveness of the room (default 1.0)")
    b = p.add_argument_group("budget (one of; default: the run config's, else none)")
    add_alias_flags(p, BUDGET, group=b)
    b.add_argument("--params", type=float, help="plan for this parameter count instead of the model's own")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="machine-readable output")
    o.add_argument("--measure", action="store_true",
                   help="also run two real training steps here (CPU, or the local GPU) and compare the peak "
                        "memory with the estimate")
    add_device_flag(o, help="device for --measure")


def _model_overrides(items: list[str]) -> dict:
    from ..config import _parse_scalar
    from ..errors import ConfigError

    out = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. --set n_layers=8)")
        out[key.strip()] = _parse_scalar(raw)
    return out


def _vocabulary(args) -> tuple[int | None, str, bool]:
    """(vocabulary to plan, where it comes from, whether the run trains from scratch) for --model."""
    from ..config import load_config
    from ..errors import ConfigError
    from ..models import registry
    from ..plan.estimate import default_tokenizer, run_tokenizer

    name = args.model
    if name.endswith((".yaml", ".yml")) and not args.vocab_size and not args.tokenizer:
        try:
            cfg = load_config(name)
        except (OSError, ConfigError):
            return None, "the run config's", True  # analyse() says what is wrong with the file
        vocab, label = run_tokenizer(cfg)
        return vocab, label, cfg.train.objective == "pretrain" and cfg.model.name in registry.named_sizes()
    if name not in registry.named_sizes():
        if args.tokenizer:
            raise ConfigError(f"--tokenizer: {name} is a pretrained model with its own vocabulary; "
                              f"--tokenizer applies to named sizes (lmlab models)")
        if args.vocab_size:
            return args.vocab_size, f"--vocab-size {args.vocab_size:,}", False
        return None, "the model's own vocabulary", False
    if args.tokenizer:
        from ..config import Config

        cfg = Config()
        cfg.model.name, cfg.data.tokenizer = name, args.tokenizer
        if args.vocab_size:
            cfg.data.vocab_size = args.vocab_size
        vocab, label = run_tokenizer(cfg)
        if vocab is None:
            raise ConfigError(f"--tokenizer: {args.tokenizer} cannot be read here (a tokenizer folder or file, a "
                              f"cached hub id, or stdlib-bpe); give --vocab-size instead")
        return vocab, label, True
    if args.vocab_size:
        return args.vocab_size, f"--vocab-size {args.vocab_size:,}", True
    vocab, label = default_tokenizer()
    return vocab, label + "; --tokenizer or --vocab-size to change", True


def _estimate(args, arch, hardware):
    from ..plan.estimate import estimate

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    return estimate(arch=arch, seq_len=args.seq_len, micro_batch=args.batch, grad_accum=args.grad_accum,
                    method=args.method, precision=args.precision, lora_rank=args.lora_rank, lora_targets=targets,
                    hardware=hardware, gpus=args.gpus, checkpointing=args.checkpointing, scan=args.scan,
                    mfu=args.mfu, tokens=args.tokens, token_ratio=args.token_ratio, steps=args.steps,
                    params=args.params, price_per_hour=args.price_per_hour, kwh_price=args.kwh_price, pue=args.pue,
                    optimizer=args.optimizer, momentum=args.momentum, objective=args.objective,
                    tokenizer=args.tokenizer_label, suggest_methods=not args.from_scratch)


def run(args) -> int:
    import json

    from ..errors import ConfigError
    from ..plan.estimate import analyse
    from ..plan.hardware import HARDWARE

    if args.vocab_size is not None and args.vocab_size < 1:
        raise ConfigError(f"--vocab-size: must be a positive integer, got {args.vocab_size}")
    if not 0 <= args.momentum < 1:
        raise ConfigError(f"--momentum: must be in [0, 1), got {args.momentum}")
    overrides = _model_overrides(args.model_set) or None
    vocab, args.tokenizer_label, args.from_scratch = _vocabulary(args)
    arch = analyse(args.model, vocab, overrides, args.trust_remote_code)
    if args.hardware.lower() == "all":
        if args.measure:
            raise ConfigError("--measure: name one --hardware (the table compares GPUs; it measures nothing)")
        ests = [_estimate(args, arch, hw) for hw in HARDWARE]
        if args.json:
            print(json.dumps([e.to_dict() for e in ests], indent=1))
        else:
            _print_hardware_table(ests)
        return 0
    est = _estimate(args, arch, args.hardware)
    measured = _measure(args, est, arch, overrides) if args.measure else None
    if args.json:
        d = est.to_dict()
        if measured is not None:
            d["measured"] = measured
        print(json.dumps(d, indent=1))
        return 0
    _print_plan(est)
    if measured is not None:
        _print_measured(est, measured)
    return 0


def _measure(args, est, arch, overrides: dict | None) -> dict:
    from ..errors import ConfigError
    from ..plan.estimate import estimate
    from ..plan.hardware import cpu_hardware, hardware_from_device
    from ..plan.measure import measure_training_peak

    if est.method != "full":
        raise ConfigError("--measure: measures full training (LoRA/QLoRA are planned, not measured here)")
    import torch

    device = args.device
    if device == "mps":
        raise ConfigError("--device mps: --measure measures on the CPU or a CUDA GPU")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    precision = est.precision if device != "cpu" else "fp32"
    m = measure_training_peak(args.model, seq_len=est.seq_len, micro_batch=est.micro_batch, precision=precision,
                              device=device, vocab_size=est.vocab_size,
                              overrides=overrides, checkpointing=est.checkpointing,
                              trust_remote_code=args.trust_remote_code)
    # the estimate for the device that was measured
    hw = cpu_hardware() if device == "cpu" else hardware_from_device(torch.device(device))
    local = estimate(arch=arch, seq_len=est.seq_len, micro_batch=est.micro_batch, precision=precision, hardware=hw,
                     checkpointing=est.checkpointing, scan=args.scan)
    mem = local.memory
    m["estimated_peak_bytes"] = mem["total"] - (0 if device == "cpu" else mem["overhead"])
    # after a step: fp32 weights and AdamW's states (autocast's bf16 copies are gone by then)
    m["estimated_state_bytes"] = 4 * local.params_total + mem["optimizer"] + (mem["overhead"] if device == "cpu" else 0)
    m["precision"] = precision
    return m


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _print_plan(est) -> None:
    from rich.table import Table

    from ..plan.estimate import fmt_hours, memory_fits
    from ._common import console

    c = console()
    tr = "" if est.method == "full" else f"  ({est.params_trainable:,} trainable, {est.method} r={est.lora_rank})"
    t = Table(title=f"lmlab estimate: {est.model}", show_header=False, title_justify="left")
    t.add_column("what", style="bold", no_wrap=True)
    t.add_column("value")
    t.add_row("parameters", f"{est.params_total:,}{tr}")
    t.add_row("vocabulary", f"{est.vocab_size:,} ({est.tokenizer})")
    where = "CPU" if est.hardware == "cpu" else f"{est.gpus} x {est.gpu_label}"
    per = "" if est.hardware == "cpu" else f" x {est.gpus} GPU"
    t.add_row("setup", f"{where}, {est.precision}, batch {est.micro_batch} x seq {est.seq_len}"
                       f" x accum {est.grad_accum}{per} = {est.tokens_per_step:,} tokens/step")
    m = est.memory
    t.add_row("weights", _gib(m["weights"]))
    t.add_row("gradients", _gib(m["gradients"]))
    states = {"adamw": "AdamW m, v"}.get(est.optimizer, "SGD momentum" if m["optimizer"] else "SGD, no state")
    if "reference" in m:
        t.add_row("reference", _gib(m["reference"]) + f" (frozen copy for {est.objective})")
    t.add_row("optimizer", _gib(m["optimizer"]) + f" ({states})")
    t.add_row("activations", f"{_gib(est.activations_full)} without checkpointing, "
                             f"{_gib(est.activations_checkpointed)} with (per micro batch; {est.activation_model})")
    t.add_row("overhead", _gib(m["overhead"]))
    ok, msg = memory_fits(est)
    t.add_row("memory" if est.hardware == "cpu" else "memory per GPU", f"[{'green' if ok else 'red'}]{msg}[/]")
    t.add_row("FLOPs/token", f"{est.flops_per_token / 1e9:.3f} GFLOP training, "
                             f"{est.flops_per_token_inference / 1e9:.3f} GFLOP inference")
    if est.hardware != "cpu":
        t.add_row("speed", f"{est.tokens_per_second:,.0f} tokens/s at MFU {est.mfu:.0%} of "
                           f"{est.peak_tflops:g} TFLOP/s per GPU; {est.hours_per_billion_tokens:.1f} h per 1B tokens")
    if est.steps is not None:
        t.add_row("budget", f"{est.tokens:,} tokens = {est.steps:,} steps "
                            f"({est.tokens / est.params_total:.1f} tokens/param)")
    if est.hours is not None:
        t.add_row("time", fmt_hours(est.hours))
        t.add_row("cost", f"{est.gpu_hours:,.1f} GPU-h x {est.price_per_hour:.2f} = {est.cost:,.0f} "
                          f"{est.currency}; electricity {est.energy_kwh:,.0f} kWh x {est.kwh_price:.2f} = "
                          f"{est.energy_cost:,.0f} {est.currency}")
    for note in est.notes:
        t.add_row("note", note)
    c.print(t)


def _print_hardware_table(ests) -> None:
    from rich.table import Table

    from ..plan.estimate import fmt_hours
    from ._common import console

    e0 = ests[0]
    t = Table(title=f"lmlab estimate: {e0.model}, {e0.params_total:,} params, {e0.method} {e0.precision}, "
                    f"batch {e0.micro_batch} x seq {e0.seq_len} x accum {e0.grad_accum}, {e0.gpus} GPU(s)"
                    f"{', checkpointing' if e0.checkpointing else ''}", title_justify="left")
    for col in ("hardware", "memory/GPU", "fits", "tokens/s", "time", "cost"):
        t.add_column(col, justify="left" if col in ("hardware", "fits") else "right", no_wrap=True)
    for e in ests:
        need = e.memory["total"]
        fits = "[green]yes[/]" if e.fits else ("[yellow]tight[/]" if e.fits_without_margin else "[red]no[/]")
        t.add_row(e.hardware, f"{_gib(need)} / {e.gpu_memory / 2**30:g} GiB", fits,
                  f"{e.tokens_per_second:,.0f}", fmt_hours(e.hours) if e.hours is not None else "-",
                  f"{e.cost:,.0f} {e.currency}" if e.cost is not None else "-")
    console().print(t)


def _print_measured(est, m: dict) -> None:
    from ._common import console

    ratio = m["estimated_peak_bytes"] / max(m["peak_bytes"], 1)
    console().print(
        f"measured  one training step on {m['device']} ({m['precision']}, {m['params']:,} params): peak "
        f"{_gib(m['peak_bytes'])}, estimate {_gib(m['estimated_peak_bytes'])} (estimate/measured {ratio:.2f}); "
        f"weights + optimizer {_gib(m['state_bytes'])} measured, {_gib(m['estimated_state_bytes'])} estimated; "
        f"{m['seconds']:.2f} s/step")
