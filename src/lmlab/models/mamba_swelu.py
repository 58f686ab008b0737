"""MambaSWELU: Mamba blocks whose outputs pass through the learnable SWELU activation.

    tokens ─► wte + wpe (learned positions) ─► dropout
          ─► N × [ h ← h + dropout(SWELU_i(Mixer_i(Norm_i(h)))) ]
          ─► Norm_f ─► 3 dense layers d→h→h→d, each followed by SWELU
          ─► LM head (tied to wte)                                        (b, l, vocab)

Shapes: b batch, l sequence, d d_model, h dense_hidden. `activation: silu` swaps every SWELU for
SiLU (ablation); `swelu_learnable: false` freezes k and λ at their initial values.

Options that reproduce the first MambaSWELU code (docs/models.md has the fidelity table; the defaults
are lmlab's):
    mixer                 mamba (Mamba-1 selective scan) | simplified (the scan-less block, simplified_mamba.py)
    swelu_k_param         softplus (k = softplus(k_raw) + 0.05) | abs (k = |k_raw| + 1e-6, the original formula)
    swelu_lambda          True: learnable scale λ | False: no λ (the 124M run)
    dense_dropout         False | True: dropout after every dense layer but the last
    init_scheme           reference (Mamba's dt/A/D init, scaled out_proj) | normal (every Linear N(0, std),
                          biases 0, as the original; A_log, D and the conv keep their reference init)
    decay_all_parameters  False: weight decay on matrices only | True: on every parameter (read by the optimizer)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import GenerationMixin
from transformers import initialization as hf_init
from transformers.modeling_layers import GradientCheckpointingLayer

from .common import (
    CachedGenerationMixin,
    ForwardCall,
    LMConfig,
    LMOutput,
    LMPreTrainedModel,
    config_arguments,
    make_norm,
    run_blocks,
)
from .mamba import MambaCache, MambaMixer
from .simplified_mamba import SimplifiedMambaMixer
from .swelu import K_PARAMS, SWELU, make_activation

MIXERS = ("mamba", "simplified")
INIT_SCHEMES = ("reference", "normal")


class MambaSWELUConfig(LMConfig):
    model_type = "mamba_swelu"

    def __init__(
        self,
        vocab_size: int = 50257,
        d_model: int = 1024,
        n_layers: int = 6,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dense_hidden: int = 2048,
        n_dense: int = 3,
        max_seq_len: int = 1024,
        activation: str = "swelu",
        swelu_learnable: bool = True,
        swelu_k_init: float = 1.0,
        swelu_lam_init: float = 1.0,
        norm: str = "layernorm",
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        initializer_range: float = 0.02,
        scan_backend: str = "auto",
        mixer: str = "mamba",
        swelu_k_param: str = "softplus",
        swelu_lambda: bool = True,
        dense_dropout: bool = False,
        init_scheme: str = "reference",
        decay_all_parameters: bool = False,
        tie_word_embeddings: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        for key, value, allowed in (("mixer", mixer, MIXERS), ("swelu_k_param", swelu_k_param, K_PARAMS),
                                    ("init_scheme", init_scheme, INIT_SCHEMES)):
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        super().__init__(**config_arguments(MambaSWELUConfig.__init__, locals()))


def _norm(cfg: MambaSWELUConfig, dim: int) -> nn.Module:
    # every norm here feeds a Linear only (the mixer's in_proj, the first dense layer)
    return make_norm(cfg.norm, dim, cfg.norm_eps, feeds_matmul=True)


def _act(cfg: MambaSWELUConfig) -> nn.Module:
    return make_activation(cfg.activation, cfg.swelu_k_init, cfg.swelu_lam_init, cfg.swelu_learnable,
                           k_param=cfg.swelu_k_param, use_lambda=cfg.swelu_lambda)


class MambaSWELUBlock(GradientCheckpointingLayer):
    """h ← h + dropout(act(mixer(norm(h)))); recomputed in the backward under activation checkpointing."""

    def __init__(self, cfg: MambaSWELUConfig, layer_idx: int):
        super().__init__()
        self.norm = _norm(cfg, cfg.d_model)
        if cfg.mixer == "simplified":
            self.mixer = SimplifiedMambaMixer(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, _act(cfg),
                                              layer_idx=layer_idx)
        else:
            self.mixer = MambaMixer(cfg.d_model, cfg.d_state, cfg.d_conv, cfg.expand, cfg.dt_rank,
                                    scan_backend=cfg.scan_backend, layer_idx=layer_idx)
        self.act = _act(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h, cache=None, seq_idx=None, mask=None):
        out = self.mixer(self.norm(h), cache=cache, seq_idx=seq_idx, mask=mask)
        if isinstance(self.act, SWELU) and not (self.training and self.drop.p > 0):
            return self.act.residual(out, h)  # h + SWELU(out), in one pass on CPU
        return h + self.drop(self.act(out))


class DenseSWELU(nn.Module):
    """Linear followed by the activation (and dropout, with `dense_dropout`, on all but the last layer)."""

    def __init__(self, cfg: MambaSWELUConfig, d_in: int, d_out: int, last: bool = False):
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.act = _act(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dense_dropout and not last else nn.Identity()

    def forward(self, x):
        return self.drop(self.act(self.fc(x)))


class MambaSWELUPreTrainedModel(LMPreTrainedModel):
    config_class = MambaSWELUConfig
    _no_split_modules = ["MambaSWELUBlock"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Linear, Embedding and norms: the standard init (common.py); then SWELU and the mixers' own."""
        std = self.config.initializer_range
        super()._init_weights(module)
        if isinstance(module, SWELU):
            k_raw, lam = module.initial_values(self.config.swelu_k_init, self.config.swelu_lam_init)
            hf_init.copy_(module.k_raw, k_raw)
            hf_init.copy_(module.lam, lam)
        if isinstance(module, (MambaMixer, SimplifiedMambaMixer)):
            # conv keeps PyTorch's default (kaiming-uniform) init, as in the reference
            hf_init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                bound = 1 / math.sqrt(module.d_conv)
                hf_init.uniform_(module.conv1d.bias, -bound, bound)
        if isinstance(module, MambaMixer):
            if self.config.init_scheme == "normal":  # A_log, D as the reference; every Linear stays N(0, std)
                module.reset_ssm_parameters()
                hf_init.normal_(module.dt_proj.weight, mean=0.0, std=std)
                hf_init.zeros_(module.dt_proj.bias)
            else:
                module.reset_ssm_parameters()
                # GPT-2 style rescaling of the residual output projection
                hf_init.normal_(module.out_proj.weight, mean=0.0, std=std / math.sqrt(self.config.n_layers))


class MambaSWELUForCausalLM(CachedGenerationMixin, MambaSWELUPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "wte.weight"}

    def __init__(self, config: MambaSWELUConfig):
        super().__init__(config)
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.d_model)
        self.wpe = nn.Embedding(c.max_seq_len, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList([MambaSWELUBlock(c, i) for i in range(c.n_layers)])
        self.norm_f = _norm(c, c.d_model)
        dims = [c.d_model] + [c.dense_hidden] * (c.n_dense - 1) + [c.d_model]
        self.dense = nn.ModuleList([DenseSWELU(c, dims[i], dims[i + 1], last=i == c.n_dense - 1)
                                    for i in range(c.n_dense)])
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.post_init()

    def set_scan_backend(self, name: str) -> None:
        self.config.scan_backend = name
        for blk in self.blocks:
            if isinstance(blk.mixer, MambaMixer):
                blk.mixer.scan_backend = name

    def swelu_modules(self) -> dict[str, SWELU]:
        """Every SWELU by a stable short name: block.0 … block.N-1 (block.i.ssm: the simplified mixer's),
        dense.0 … dense.2."""
        out = {}
        for i, blk in enumerate(self.blocks):
            if isinstance(blk.act, SWELU):
                out[f"block.{i}"] = blk.act
            if isinstance(getattr(blk.mixer, "ssm_activation", None), SWELU):
                out[f"block.{i}.ssm"] = blk.mixer.ssm_activation
        for i, layer in enumerate(self.dense):
            if isinstance(layer.act, SWELU):
                out[f"dense.{i}"] = layer.act
        return out

    def new_cache(self) -> MambaCache:
        return MambaCache()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: MambaCache | None = None,
        seq_idx: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        cache_params: MambaCache | None = None,  # the name before transformers 5.24
        **kwargs,
    ) -> LMOutput | tuple:
        """The arguments of every lmlab family (common.py). Padded positions feed zero into every conv and
        scan; `seq_idx` keeps packed documents apart in them too. Mamba has no attention weights:
        `output_attentions` and `cache_position` are accepted and ignored.
        """
        call = ForwardCall.begin(self, input_ids, inputs_embeds, attention_mask, cache, cache_params, use_cache)
        if position_ids is None:
            position_ids = call.positions(seq_idx, self.wte.weight.device)
        if int(position_ids.max()) >= self.config.max_seq_len:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_seq_len {self.config.max_seq_len}")
        embeds = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        h = self.drop(embeds + self.wpe(position_ids))  # (b, l, d)
        h, states = run_blocks(self.blocks, h, output_hidden_states, cache=call.cache, seq_idx=seq_idx,
                               mask=call.mask)
        h = self.norm_f(h)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        for layer in self.dense:
            h = layer(h)
        return call.finish(self.lm_head(h), labels, states, return_dict)  # logits (b, l, vocab)
