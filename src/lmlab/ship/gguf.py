"""GGUF files for llama.cpp (and Ollama, LM Studio, llama-cpp-python), written with the `gguf` package.

    write_gguf(model, tokenizer, "out/model-f16.gguf", dtype="f16")
    export_gguf(model, tokenizer, "out", run_dir=run, dtype="q8_0")   the file + its model card, atomically
    unsupported(model) -> str | None        why llama.cpp cannot run this model (None: it can)

What llama.cpp runs is what its graph code expresses. Of lmlab's models that is the Llama baselines (plain
`LlamaForCausalLM`), and so any Hugging Face Llama-family model and the merged LoRA runs of either. MambaSWELU
(with SWELU or with SiLU) and INL-LLM are refused with the reason: llama.cpp's `mamba` architecture has no
learned position embeddings, no activation between the mixer and the residual and no dense stack after the
blocks, and nothing in llama.cpp computes SWELU or INL's integrator (docs/shipping.md names the source files).

The layout follows llama.cpp's own converter (`convert_hf_to_gguf.py`, class `LlamaModel`):
- tensors are renamed with gguf's `get_tensor_name_map` for `llama`; q_proj and k_proj rows are reordered
  per head from Hugging Face's rotate-half RoPE layout to the interleaved pairs llama.cpp's `llama` rotates;
  a tied output head is left out (llama.cpp reuses `token_embd`); norms and every 1-D tensor stay f32;
- the tokenizer is llama.cpp's "gpt2" BPE: the token strings in their byte-level form, padded to the model's
  vocabulary with `[PAD<i>]` (unused), added tokens typed control (special, or `<|...|>`-shaped) or
  user-defined, the merges and bos/eos ids read by gguf's `SpecialVocab`, and the pre-tokenizer named by
  what the tokenizer does: GPT-2's byte-level regex ("gpt-2": lmlab's own BPE) or Llama 3's split ("llama-bpe").
  Sentencepiece-style tokenizers (byte fallback) are refused with a pointer to llama.cpp's converter.
- f16 and q8_0 apply to matrices; a matrix whose rows do not split into q8_0 blocks of 32 is stored f16.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError

DTYPES = ("f32", "f16", "q8_0")
GPT2_PRE = "gpt-2"
LLAMA3_PRE = "llama-bpe"
# Llama 3's pre-tokenizer split, as its tokenizer.json spells it (llama.cpp's "llama-bpe")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
ROPE_TYPES = ("default", "linear", "llama3")
INSTEAD = "serve it with `lmlab serve RUN` or load the exported folder with transformers"


def unsupported(model) -> str | None:
    """One sentence saying why llama.cpp cannot run `model`, or None when `write_gguf` can write it."""
    cfg = model.config
    kind = getattr(cfg, "model_type", None)
    if kind == "mamba_swelu":
        act = getattr(cfg, "activation", "swelu")
        if act == "swelu":
            return (f"MambaSWELU with SWELU cannot run in llama.cpp: llama.cpp has no SWELU operation (nor learned "
                    f"position embeddings or dense layers after the Mamba blocks); {INSTEAD}")
        return (f"MambaSWELU (activation={act}) cannot run in llama.cpp: its `mamba` architecture has no learned "
                f"position embeddings, no activation between the mixer and the residual and no dense layers after "
                f"the blocks (docs/shipping.md); {INSTEAD}")
    if kind in ("inl", "inl_llm"):
        return f"INL-LLM cannot run in llama.cpp: llama.cpp has no integrator-neuron operation; {INSTEAD}"
    if kind != "llama":
        return (f"--format gguf writes Llama-family models; {type(model).__name__} (model_type {kind!r}) is not one: "
                f"convert it with llama.cpp's convert_hf_to_gguf.py, or {INSTEAD}")
    if getattr(cfg, "mlp_bias", False):
        return "a Llama model with mlp_bias=true: llama.cpp's `llama` graph has no MLP biases"
    rope = _rope(cfg)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        return (f"RoPE scaling {rope.get('rope_type')!r}: lmlab writes GGUF for {', '.join(ROPE_TYPES)}; convert this "
                f"model with llama.cpp's convert_hf_to_gguf.py")
    return None


def write_gguf(model, tokenizer, path: str | os.PathLike, dtype: str = "f16", name: str | None = None) -> dict:
    """Write `model` (a Llama-family `transformers` model, adapters merged) and its tokenizer as one GGUF file.

    dtype: f32 | f16 | q8_0 for the matrices. Returns {"path", "tensors", "parameters", "dtype", "pre"}.
    Raises ConfigError (one line) for a model or tokenizer llama.cpp cannot run; nothing is written then."""
    import gguf

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    why = unsupported(model)
    if why:
        raise ConfigError(why)
    cfg = model.config
    vocab_size = int(cfg.vocab_size)
    tokens, types, pre = gpt2_vocab(tokenizer, vocab_size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(str(tmp), "llama")
    try:
        _hparams(writer, cfg, name or path.stem, dtype)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        _special_tokens(writer, tokenizer, cfg, vocab_size)
        n_tensors, n_params = _tensors(writer, model, dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": str(path), "tensors": n_tensors, "parameters": n_params, "dtype": dtype, "pre": pre}


def export_gguf(model, tokenizer, out: str | os.PathLike, *, run_dir: Path | None = None, dtype: str = "f16",
                license: str | None = None) -> Path:
    """The folder `lmlab export --format gguf` writes: `out`/model-<dtype>.gguf and its model card (README.md,
    loss.png), put into place atomically. Returns the GGUF path."""
    from ..fsutil import atomic_dir
    from ..models.export import write_model_card

    out = Path(out)
    name = f"model-{dtype}.gguf"
    with atomic_dir(out) as tmp:
        write_gguf(model, tokenizer, tmp / name, dtype=dtype, name=Path(run_dir).name if run_dir else out.name)
        write_model_card(model, tmp, run_dir, kind="gguf", gguf_file=name, license=license)
    return out / name


# ------------------------------------------------------------------------------------------------ hparams
def _rope(cfg) -> dict:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope = {**rope, "rope_theta": cfg.rope_theta}
    return dict(rope)


def _head_dim(cfg) -> int:
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def _hparams(w, cfg, name: str, dtype: str) -> None:
    import gguf

    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    heads = int(cfg.num_attention_heads)
    head_dim = _head_dim(cfg)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(int(cfg.vocab_size))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_head_count(heads)
    w.add_head_count_kv(int(getattr(cfg, "num_key_value_heads", None) or heads))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_rope_dimension_count(head_dim)
    if head_dim * heads != int(cfg.hidden_size):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


# ------------------------------------------------------------------------------------------------ tokenizer
def pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for what the tokenizer's pre-tokenizer does, read from its tokenizer.json."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("--format gguf needs a fast tokenizer (tokenizer.json)")
    spec = json.loads(backend.to_str())
    model, pre, dec = spec.get("model") or {}, spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or dec.get("type") != "ByteLevel":
        raise ConfigError(f"--format gguf: the tokenizer is not a byte-level BPE ({model.get('type')} model, "
                          f"{dec.get('type')} decoder); convert this model with llama.cpp's convert_hf_to_gguf.py")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return GPT2_PRE
    steps = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(steps) == 2 and steps[0].get("type") == "Split"
            and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
            and not steps[1].get("add_prefix_space")):
        return LLAMA3_PRE
    raise ConfigError(f"--format gguf: unknown pre-tokenizer ({json.dumps(pre)[:120]}); lmlab writes GPT-2's and "
                      f"Llama 3's byte-level BPE; convert this model with llama.cpp's convert_hf_to_gguf.py")


def gpt2_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(token strings, token types, pre-tokenizer name) of a byte-level BPE for llama.cpp's "gpt2" model.

    Ids the tokenizer does not use (a vocabulary padded past the tokenizer) become `[PAD<i>]`, unused. Added
    tokens are control tokens when special or shaped like `<|...|>`, else user-defined; llama.cpp matches
    them as written, so a non-normalised one is stored as the tokenizer encodes and decodes it."""
    import gguf

    pre = pre_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ConfigError(f"--format gguf: the tokenizer has id {max(vocab.values())} but the model's vocabulary "
                          f"is {vocab_size}")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        text = by_id[i]
        if i in added:
            tok = added[i]
            if not tok.normalized:
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            looks_special = text.startswith("<|") and text.endswith("|>")
            types.append(int(gguf.TokenType.CONTROL if tok.special or looks_special else gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(text)
    return tokens, types, pre


def _adds(tokenizer, which: str) -> bool:
    """Whether encoding a text puts the bos (which="bos") first or the eos last, as the tokenizer does it."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if len(ids) == len(plain):
        return False
    tid = tokenizer.bos_token_id if which == "bos" else tokenizer.eos_token_id
    return tid is not None and ids[0 if which == "bos" else -1] == tid


def _special_tokens(w, tokenizer, cfg, vocab_size: int) -> None:
    """Merges, bos/eos/pad ids and the chat template through gguf's SpecialVocab, which reads them from a saved
    tokenizer folder as llama.cpp's converter does; whether bos/eos are added is what the tokenizer does."""
    import gguf

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
        (Path(tmp) / "config.json").write_text(json.dumps({k: v for k, v in ids.items() if v is not None}))
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ConfigError("--format gguf: the tokenizer has no BPE merges")
    special.add_special_token["bos"] = _adds(tokenizer, "bos")
    special.add_special_token["eos"] = _adds(tokenizer, "eos")
    special.add_to_gguf(w, quiet=True)


# ------------------------------------------------------------------------------------------------ tensors
def rope_interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the rows of q_proj/k_proj (or their bias) within each head from Hugging Face's rotate-half layout
    (pairs i and i + d/2) to the adjacent pairs (2i, 2i+1) that llama.cpp's `llama` architecture rotates."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _tensors(w, model, dtype: str) -> tuple[int, int]:
    import gguf

    cfg = model.config
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[dtype]
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    n_tensors = n_params = 0
    for key, value in model.state_dict().items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ConfigError(f"--format gguf: no llama.cpp name for tensor {key!r}")
        t = value.detach().to(torch.float32).cpu()
        if key.endswith(("q_proj.weight", "q_proj.bias")):
            t = rope_interleave(t, heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            t = rope_interleave(t, kv_heads)
        _add(w, new, t.numpy(), qtype)
        n_tensors += 1
        n_params += t.numel()
    freqs = _llama3_freq_factors(cfg)
    if freqs is not None:
        _add(w, gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs, qtype)
        n_tensors += 1
    return n_tensors, n_params


def _add(w, name: str, data: np.ndarray, qtype) -> None:
    import gguf

    if data.ndim <= 1 or name.endswith("_norm.weight"):
        qtype = gguf.GGMLQuantizationType.F32
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # rows not a whole number of q8_0 blocks
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    w.add_tensor(name, packed, raw_dtype=qtype)


def _llama3_freq_factors(cfg) -> np.ndarray | None:
    """Llama 3's RoPE scaling as llama.cpp takes it: per-frequency divisors (default inverse frequency over the
    scaled one, from transformers' own llama3 RoPE initialisation)."""
    rope = _rope(cfg)
    if rope.get("rope_type") != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = _head_dim(cfg)
    base = float(rope.get("rope_theta", 10000.0))
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    return (default / scaled.to(torch.float64)).to(torch.float32).numpy()
