"""What LoRA adapts and how many parameters it trains, read from the planner's meta model.

The targets are the trainer's own (`lmlab.models.lora.lora_targets`, what `lmlab.train.adapters.add_adapters`
puts adapters on), and the count is peft's: r·(in + out) for every adapted Linear (lora_A in → r, lora_B
r → out, no bias). QLoRA adds adapters to the same layers after they are quantised, so the count is the same.
"""

from __future__ import annotations

from ..errors import ConfigError
from .arch import Arch


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of `target_modules`: the module's qualified name is the target or ends with it."""
    return name == target or name.endswith("." + target)


def lora_targets_for(arch: Arch, targets: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The module names LoRA adapts: `targets` as given (module-name suffixes, as peft matches them;
    'all-linear' = every Linear but the output head), else the trainer's default for the family."""
    from ..models.lora import lora_targets

    names = {n.rsplit(".", 1)[-1] for n, _, _ in arch.linears}
    head_names: set[str] = set()
    if arch.meta_model is not None and hasattr(arch.meta_model, "get_output_embeddings"):
        out = arch.meta_model.get_output_embeddings()
        head_names = {n for n, mod in arch.meta_model.named_modules() if out is not None and mod is out}
    if targets:
        targets = list(targets)
        if targets == ["all-linear"]:
            return sorted({n.rsplit(".", 1)[-1] for n, _, _ in arch.linears if n not in head_names})
        missing = [t for t in targets if not any(_matches(n, t) for n, _, _ in arch.linears)]
        if missing:
            raise ConfigError(f"finetune.lora_targets: {', '.join(missing)} not among the model's linear layers "
                              f"({', '.join(sorted(names))})")
        return targets
    if arch.meta_model is None:
        raise ConfigError(f"finetune.lora_targets: {arch.label} was not built; name the targets")
    found = lora_targets(arch.meta_model)
    if not found:
        raise ConfigError(f"finetune.lora_targets: no linear layer to adapt in {arch.label}; "
                          f"name some of: {', '.join(sorted(names))}")
    return found


def lora_trainable(arch: Arch, rank: int, targets: list[str]) -> int:
    """peft's count: r·(in + out) for every Linear whose name matches a target."""
    return sum(rank * (i + o) for n, i, o in arch.linears if any(_matches(n, t) for t in targets))
