"""Checkpoints of the original MambaSWELU and INL-LLM code → lmlab configs and state dicts.

The originals saved `torch.save({"model_state_dict": ..., "config": {...}, ...})`. Their parameters map
one to one onto lmlab's (only names and a few concatenations differ):

    MambaSWELU       token_embedding → wte, position_embedding → wpe, mamba_stack.layers.i.{norm, mamba,
                     activation} → blocks.i.{norm, mixer, act}, mamba_stack.norm → norm_f, dense1..3 and
                     swelu1..3 → dense.0..2.{fc, act}, SWELU k → k_raw (lam stays lam)
    INL V0           layers.i.context_projection → blocks.i.context.proj; the first layers of the four
                     controller MLPs (mlp_alpha, mlp_beta, mlp_gate, mlp_v_cand) stacked into `controller`,
                     their second layers → to_alpha, to_beta, to_gate, to_vcand; excitation_gamma/phi →
                     gamma/phi; global_step → step_count; ff.0/ff.3 → mlp.fc_in/fc_out
    INL V1           attention.in_proj_weight/bias split into q/k/v_proj, attention.out_proj → o_proj;
                     controller_h/x/v side by side → controller (their three biases summed into one);
                     controller_mlp.1's four row blocks → the four heads; the scalar excitation amplitude
                     → a (d,) buffer

`detect_kind` tells the three apart from the keys; `convert` returns (config, state_dict).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PretrainedConfig

from .inl import INLConfig
from .mamba_swelu import MambaSWELUConfig

KINDS = ("mamba-swelu", "inl-v0", "inl-v1")
_STRIP = ("module.", "_orig_mod.")  # DistributedDataParallel and torch.compile prefixes


def _clean(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        for prefix in _STRIP:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def unwrap_checkpoint(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, hyper-parameters) from a loaded original `.pt` (a checkpoint dict or a bare state dict)."""
    if isinstance(obj, dict) and "model_state_dict" in obj:
        hyper = dict(obj.get("config") or {})
        if "vocab_size" in obj and "vocab_size" not in hyper:
            hyper["vocab_size"] = obj["vocab_size"]
        return _clean(obj["model_state_dict"]), hyper
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _clean(obj), {}
    raise ValueError("not an original checkpoint: expected a state dict or a dict with 'model_state_dict'")


def detect_kind(sd: dict[str, torch.Tensor]) -> str:
    if any(k.startswith("mamba_stack.") for k in sd):
        return "mamba-swelu"
    if any(".inl.controller_h." in k for k in sd):
        return "inl-v1"
    if any(".inl.mlp_alpha." in k for k in sd):
        return "inl-v0"
    raise ValueError(f"unrecognised checkpoint; known kinds: {', '.join(KINDS)}")


def _n_layers(sd: dict[str, torch.Tensor], pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(pattern, k)))


# ------------------------------------------------------------------------------------------- MambaSWELU
def mamba_swelu_config(sd: dict[str, torch.Tensor], hyper: dict[str, Any] | None = None) -> MambaSWELUConfig:
    """The lmlab config of an original MambaSWELU state dict (shapes say everything; dropout from `hyper`)."""
    hyper = hyper or {}
    vocab, d = sd["token_embedding.weight"].shape
    pre = "mamba_stack.layers.0.mamba."
    real = pre + "A_log" in sd
    d_inner = sd[pre + "in_proj.weight"].shape[0] // 2
    return MambaSWELUConfig(
        vocab_size=vocab, d_model=d, n_layers=_n_layers(sd, r"mamba_stack\.layers\.(\d+)\."),
        d_state=sd[pre + "A_log"].shape[1] if real else sd[pre + "x_proj.weight"].shape[0],
        d_conv=sd[pre + "conv1d.weight"].shape[-1], expand=d_inner // d,
        dt_rank=sd[pre + "dt_proj.weight"].shape[1] if real else "auto",
        dense_hidden=sd["dense1.weight"].shape[0], max_seq_len=sd["position_embedding.weight"].shape[0],
        mixer="mamba" if real else "simplified", swelu_k_param="abs",
        swelu_lambda=any(k.endswith(".lam") for k in sd), dropout=float(hyper.get("dropout", 0.1)),
        dense_dropout=True, init_scheme="normal", decay_all_parameters=True,
    )


def mamba_swelu_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        new = key
        new = re.sub(r"^token_embedding\.", "wte.", new)
        new = re.sub(r"^position_embedding\.", "wpe.", new)
        new = re.sub(r"^mamba_stack\.norm\.", "norm_f.", new)
        new = re.sub(r"^mamba_stack\.layers\.(\d+)\.mamba\.", r"blocks.\1.mixer.", new)
        new = re.sub(r"^mamba_stack\.layers\.(\d+)\.activation\.", r"blocks.\1.act.", new)
        new = re.sub(r"^mamba_stack\.layers\.(\d+)\.norm\.", r"blocks.\1.norm.", new)
        new = re.sub(r"^dense(\d)\.", lambda m: f"dense.{int(m.group(1)) - 1}.fc.", new)
        new = re.sub(r"^swelu(\d)\.", lambda m: f"dense.{int(m.group(1)) - 1}.act.", new)
        new = re.sub(r"\.k$", ".k_raw", new)
        if new == "lm_head.weight":
            continue  # tied to wte
        out[new] = value
    return out


# ------------------------------------------------------------------------------------------- INL
def inl_config(kind: str, sd: dict[str, torch.Tensor], hyper: dict[str, Any] | None = None) -> INLConfig:
    """The lmlab config of an original INL state dict; `hyper` (the checkpoint's 'config') gives the
    iterations per layer, which the weights cannot tell."""
    from . import INL_V0, INL_V1  # the option sets of the named -v0 / -v1 sizes

    hyper = hyper or {}
    vocab, d = sd["token_embedding.weight"].shape
    if "num_iterations_per_layer" not in hyper:
        raise ValueError("the INL checkpoint has no 'config' with num_iterations_per_layer; pass --iterations")
    if kind == "inl-v0":
        k = sd["layers.0.inl.mlp_alpha.0.weight"].shape[0]
        options = dict(INL_V0)
    else:
        k = sd["layers.0.inl.controller_h.weight"].shape[0]
        options = dict(INL_V1)
        amp = sd.get("layers.0.inl.excitation_amplitude")
        if amp is not None:
            options["excitation_init"] = float(amp)
    options["dropout"] = float(hyper.get("dropout", options["dropout"]))
    return INLConfig(
        vocab_size=vocab, d_model=d, n_layers=_n_layers(sd, r"layers\.(\d+)\."),
        n_heads=int(hyper.get("num_heads", 8 if kind == "inl-v1" else 1)),
        n_iterations=int(hyper["num_iterations_per_layer"]), ff_dim=sd["layers.0.ff.0.weight"].shape[0],
        max_seq_len=int(hyper.get("max_seq_len", 2048)), controller_hidden=k, **options,
    )


_HEADS = ("alpha", "beta", "gate", "vcand")
_V0_MLPS = ("mlp_alpha", "mlp_beta", "mlp_gate", "mlp_v_cand")


def inl_state_dict(kind: str, sd: dict[str, torch.Tensor], *, gradients: bool = False) -> dict[str, torch.Tensor]:
    """lmlab names for an original INL state dict. With `gradients`, the input holds gradients of the
    original parameters: V1's three controller biases (summed for weights) share one gradient."""
    out: dict[str, torch.Tensor] = {}
    n = _n_layers(sd, r"layers\.(\d+)\.")
    for key, value in sd.items():
        if key.startswith("layers.") or key == "lm_head.weight" or key.startswith("pos_encoding."):
            continue
        out[key.replace("token_embedding.", "wte.").replace("final_norm.", "norm_f.")] = value
    for i in range(n):
        src, dst = f"layers.{i}.", f"blocks.{i}."

        def take(name, src=src):
            return sd.get(src + name)

        for a, b in (("norm1", "norm1"), ("norm2", "norm2"), ("norm_attn", "norm_attn"), ("ff.0", "mlp.fc_in"),
                     ("ff.3", "mlp.fc_out"), ("context_projection", "context.proj"), ("attention.out_proj",
                                                                                      "context.o_proj")):
            for p in ("weight", "bias"):
                if take(f"{a}.{p}") is not None:
                    out[f"{dst}{b}.{p}"] = take(f"{a}.{p}")
        for a, b in (("mu", "mu"), ("excitation_gamma", "gamma"), ("excitation_phi", "phi"),
                     ("global_step", "step_count")):
            if take(f"inl.{a}") is not None:
                out[f"{dst}inl.{b}"] = take(f"inl.{a}")
        if take("attention.in_proj_weight") is not None:
            for name, w in zip(("q", "k", "v"), take("attention.in_proj_weight").chunk(3, dim=0)):
                out[f"{dst}context.{name}_proj.weight"] = w
            for name, bias in zip(("q", "k", "v"), take("attention.in_proj_bias").chunk(3, dim=0)):
                out[f"{dst}context.{name}_proj.bias"] = bias
        if kind == "inl-v0":
            if take("inl.mlp_alpha.0.weight") is not None:
                out[f"{dst}inl.controller.weight"] = torch.cat([take(f"inl.{m}.0.weight") for m in _V0_MLPS])
                out[f"{dst}inl.controller.bias"] = torch.cat([take(f"inl.{m}.0.bias") for m in _V0_MLPS])
            for m, h in zip(_V0_MLPS, _HEADS):
                for p in ("weight", "bias"):
                    if take(f"inl.{m}.2.{p}") is not None:
                        out[f"{dst}inl.to_{h}.{p}"] = take(f"inl.{m}.2.{p}")
        else:
            if take("inl.controller_h.weight") is not None:
                out[f"{dst}inl.controller.weight"] = torch.cat(
                    [take(f"inl.controller_{s}.weight") for s in ("h", "x", "v")], dim=1)
                biases = [take(f"inl.controller_{s}.bias") for s in ("h", "x", "v")]
                out[f"{dst}inl.controller.bias"] = biases[0] if gradients else biases[0] + biases[1] + biases[2]
            for p in ("weight", "bias"):
                if take(f"inl.controller_mlp.1.{p}") is not None:
                    for h, part in zip(_HEADS, take(f"inl.controller_mlp.1.{p}").chunk(4, dim=0)):
                        out[f"{dst}inl.to_{h}.{p}"] = part
            amp = take("inl.excitation_amplitude")
            if amp is not None and not gradients:
                d = out[f"{dst}inl.mu"].shape[0]
                out[f"{dst}inl.amplitude"] = amp.reshape(()).expand(d).clone()
    return out


def convert(sd: dict[str, torch.Tensor], hyper: dict[str, Any] | None = None, kind: str | None = None,
            ) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """(lmlab config, lmlab state dict) for an original state dict and its hyper-parameters."""
    sd = _clean(sd)
    kind = kind or detect_kind(sd)
    if kind == "mamba-swelu":
        return mamba_swelu_config(sd, hyper), mamba_swelu_state_dict(sd)
    if kind in ("inl-v0", "inl-v1"):
        return inl_config(kind, sd, hyper), inl_state_dict(kind, sd)
    raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
