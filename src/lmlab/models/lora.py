"""Default LoRA target modules per model family (module-name suffixes, as `peft`'s `target_modules`).

    mamba_swelu   the Mamba mixer's in_proj, x_proj, dt_proj, out_proj and the dense SWELU layers' fc
                  (the simplified mixer's x_proj and dt_proj take no part in the forward and are left out)
    inl_llm       the context (q/k/v/o_proj with attention, proj with the projection context) and the
                  integrator's controller and its four heads (to_alpha, to_beta, to_gate, to_vcand)
    llama, …      attention q/k/v/o_proj and the MLP gate/up/down_proj

Every model of lmlab calls these modules whenever they are not plain, hook-free nn.Linear layers (it reads a
plain one's weight only to fuse it with what follows), so an adapter or a 4-bit layer in their place takes part in
the forward and receives gradients. Any other model: every Linear layer but the output head.
"""

from __future__ import annotations

from torch import nn

_TRANSFORMER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "mamba_swelu": ["in_proj", "x_proj", "dt_proj", "out_proj", "fc"],
    "inl_llm": ["q_proj", "k_proj", "v_proj", "o_proj", "proj",
                "controller", "to_alpha", "to_beta", "to_gate", "to_vcand"],
    "llama": _TRANSFORMER,
    "mistral": _TRANSFORMER,
    "qwen2": _TRANSFORMER,
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)  # bitsandbytes' 4-bit and 8-bit layers subclass nn.Linear


def lora_targets(model: nn.Module) -> list[str]:
    """The LoRA target suffixes for `model`: its family's defaults that it has, else every Linear but the head."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    linear_names = [name for name, mod in model.named_modules() if _is_linear(mod)]
    present = {name.rsplit(".", 1)[-1] for name in linear_names}
    if model_type in DEFAULT_LORA_TARGETS:
        wanted = list(DEFAULT_LORA_TARGETS[model_type])
        if model_type == "mamba_swelu" and getattr(config, "mixer", "mamba") == "simplified":
            wanted = [t for t in wanted if t not in ("x_proj", "dt_proj")]  # unused by that mixer
        return [t for t in wanted if t in present]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {name for name, mod in model.named_modules() if head is not None and mod is head}
    return sorted({name.rsplit(".", 1)[-1] for name in linear_names if name not in heads} - {"lm_head"})
