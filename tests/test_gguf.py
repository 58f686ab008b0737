"""GGUF export for llama.cpp: the file read back with gguf's reader (metadata, tokenizer, tensor names, shapes and
values against the safetensors weights), the RoPE row order against transformers' rotation, LoRA runs merged first,
the refusals for what llama.cpp cannot run, and (with llama-cpp-python installed) llama.cpp's own greedy tokens,
logits and perplexity against transformers."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmlab.cli import main
from lmlab.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
PROMPTS = ["def __init__(self", "if __name__", "self."]
BASE = ["model.name=llama-tiny", "model.hidden_size=64", "model.intermediate_size=128", "data.source=stdlib",
        "data.max_docs=60", "data.seq_len=64", "train.batch_size=8", "train.eval_batches=2", "train.log_every=5",
        "train.threads=1", "train.progress=false", "train.sample_tokens=4", "train.warmup_steps=4", "train.lr=3e-3"]


def _train(overrides):
    from lmlab.train.loop import train

    return train(load_config(None, overrides), echo=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A llama-tiny (d=64, 2 layers) trained 80 steps on the standard library: distinct top-2 logits."""
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("gguf")
    train_bpe("stdlib", 512, root / "tok", max_chars=300_000)
    _train([*BASE, f"data.tokenizer={root / 'tok'}", "train.max_steps=80", "train.eval_every=40",
            f"run.out_dir={root / 'runs'}", "run.name=llama"])
    return root


@pytest.fixture(scope="module")
def trained(runs):
    """The same shape trained 300 steps: greedy continuations that are not one repeated token."""
    _train([*BASE, f"data.tokenizer={runs / 'tok'}", "train.max_steps=300", "train.eval_every=300",
            "train.batch_size=16", f"run.out_dir={runs / 'runs'}", "run.name=trained"])
    return runs / "runs" / "trained"


def _export(run, out, dtype):
    assert main(["export", str(run), "--format", "gguf", "--dtype", dtype, "-o", str(out)]) == 0
    return out / f"model-{dtype}.gguf"


def _field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_reads_back_with_the_run_weights_and_tokenizer(runs, tmp_path, dtype):
    import gguf

    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.ship.gguf import rope_interleave

    run = runs / "runs" / "llama"
    path = _export(run, tmp_path / "out", dtype)
    assert (tmp_path / "out" / "README.md").is_file()
    r = gguf.GGUFReader(str(path))
    cfg = json.loads((run / "final" / "config.json").read_text())
    tok = load_tokenizer(str(run / "final"))
    assert _field(r, "general.architecture") == "llama"
    expect = {"llama.block_count": 2, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
              "llama.attention.head_count": 4, "llama.attention.head_count_kv": 4, "llama.context_length": 512,
              "llama.rope.dimension_count": 16, "llama.vocab_size": cfg["vocab_size"],
              "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
              "tokenizer.ggml.bos_token_id": tok.bos_token_id, "tokenizer.ggml.eos_token_id": tok.eos_token_id,
              "tokenizer.ggml.add_bos_token": False, "general.file_type":
                  {"f32": 0, "f16": 1, "q8_0": 7}[dtype]}
    assert {k: _field(r, k) for k in expect} == expect
    assert math.isclose(_field(r, "llama.rope.freq_base"), 10000.0)
    tokens = _field(r, "tokenizer.ggml.tokens")
    by_id = {i: t for t, i in tok.get_vocab().items()}
    assert tokens == [by_id.get(i, f"[PAD{i}]") for i in range(cfg["vocab_size"])]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL and types[300] == gguf.TokenType.NORMAL
    merges = json.loads((run / "final" / "tokenizer.json").read_text())["model"]["merges"]
    assert _field(r, "tokenizer.ggml.merges") == [" ".join(m) if isinstance(m, list) else m for m in merges]

    weights = load_file(str(run / "final" / "model.safetensors"))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    expected = {names.get_name(k, try_suffixes=(".weight",)): k for k in weights if k != "lm_head.weight"}
    assert {t.name for t in r.tensors} == set(expected)  # tied head: llama.cpp reuses token_embd
    for t in r.tensors:
        w = weights[expected[t.name]].float()
        if expected[t.name].endswith(("q_proj.weight", "k_proj.weight")):
            w = rope_interleave(w, 4)
        got = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        assert list(t.shape)[::-1] == list(w.shape), t.name
        got = got.reshape(w.shape)
        kind = t.tensor_type.name if w.ndim == 2 else "F32"
        assert kind == ("F32" if w.ndim == 1 else dtype.upper()), t.name
        if kind == "F32":
            assert torch.equal(got, w), t.name
        elif kind == "F16":
            assert torch.equal(got, w.half().float()), t.name
        else:  # q8_0: blocks of 32 int8 with one f16 scale d = amax/127: error ≤ d/2 + 127·|d − f16(d)|
            step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            err = (got.reshape(-1, 32) - w.reshape(-1, 32)).abs()
            assert bool((err <= step * (0.5 + 127 * 2**-11) + 1e-8).all()), t.name
            assert float(err.max()) > 0  # it was quantised


def test_rope_row_order_gives_transformers_attention_scores():
    """llama.cpp's `llama` rotates adjacent pairs; with the rows reordered, its q·k scores equal transformers'."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    from lmlab.ship.gguf import rope_interleave

    torch.manual_seed(0)
    heads, d, n, dm = 2, 8, 5, 16
    wq, wk, x = torch.randn(heads * d, dm), torch.randn(heads * d, dm), torch.randn(n, dm)
    pos = torch.arange(n)[None]
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(hidden_size=dm, num_attention_heads=heads, head_dim=d))(x[None], pos)
    q, k = (x @ wq.T).view(n, heads, d).transpose(0, 1)[None], (x @ wk.T).view(n, heads, d).transpose(0, 1)[None]
    qh, kh = apply_rotary_pos_emb(q, k, cos, sin)
    want = qh @ kh.transpose(-1, -2)

    def rotate_pairs(v):  # (heads, n, d): pairs (2i, 2i+1) turned by pos * 10000^(-2i/d)
        theta = pos[0, :, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        a, b = v[..., 0::2], v[..., 1::2]
        out = torch.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()
        return out

    qc = rotate_pairs((x @ rope_interleave(wq, heads).T).view(n, heads, d).transpose(0, 1))
    kc = rotate_pairs((x @ rope_interleave(wk, heads).T).view(n, heads, d).transpose(0, 1))
    torch.testing.assert_close(qc @ kc.transpose(-1, -2), want[0], rtol=1e-5, atol=1e-5)
    # without the reordering the scores differ: the test can tell
    qw = rotate_pairs((x @ wq.T).view(n, heads, d).transpose(0, 1))
    kw = rotate_pairs((x @ wk.T).view(n, heads, d).transpose(0, 1))
    assert not torch.allclose(qw @ kw.transpose(-1, -2), want[0], atol=1e-3)


def test_refusals_say_why_and_what_instead(runs, tmp_path, capsys):
    from lmlab.errors import ConfigError
    from lmlab.models.inl import INLConfig, INLForCausalLM
    from lmlab.models.mamba_swelu import MambaSWELUConfig, MambaSWELUForCausalLM
    from lmlab.ship.gguf import unsupported, write_gguf

    small = dict(vocab_size=64, d_model=16, n_layers=1, dense_hidden=16, max_seq_len=16)
    swelu = unsupported(MambaSWELUForCausalLM(MambaSWELUConfig(**small)))
    silu = unsupported(MambaSWELUForCausalLM(MambaSWELUConfig(activation="silu", **small)))
    inl = unsupported(INLForCausalLM(INLConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, ff_dim=16)))
    assert "no SWELU operation" in swelu and "lmlab serve" in swelu and "transformers" in swelu
    assert "position embeddings" in silu and "dense layers" in silu and "lmlab serve" in silu
    assert "no integrator" in inl and "lmlab serve" in inl
    with pytest.raises(ConfigError, match="llama.cpp has no SWELU"):
        write_gguf(MambaSWELUForCausalLM(MambaSWELUConfig(**small)), None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    # through the CLI: one line, exit 2, nothing written
    _train(["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=1",
            "model.dense_hidden=32", "data.source=stdlib", "data.max_docs=20", "data.seq_len=32",
            f"data.tokenizer={runs / 'tok'}", "train.batch_size=2", "train.max_steps=2", "train.eval_every=1000",
            "train.eval_batches=1", "train.threads=1", "train.progress=false", "train.sample_tokens=2",
            f"run.out_dir={tmp_path / 'runs'}", "run.name=mamba"])
    capsys.readouterr()
    assert main(["export", str(tmp_path / "runs" / "mamba"), "--format", "gguf", "-o", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab export: error: --format gguf: MambaSWELU with SWELU"), err
    assert not (tmp_path / "g").exists()


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_factors(runs, tmp_path):
    """llama.cpp divides each RoPE frequency by `rope_freqs`: the ratio of transformers' default and llama3 ones."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.ship.gguf import write_gguf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, rope_parameters=rope)
    write_gguf(LlamaForCausalLM(cfg), load_tokenizer(str(runs / "tok")), tmp_path / "m.gguf", dtype="f32")
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    (freqs,) = [t for t in r.tensors if t.name == "rope_freqs.weight"]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, torch.device("cpu"))
    default = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))  # head_dim 32
    got = torch.from_numpy(np.array(freqs.data))
    torch.testing.assert_close(got.double(), default.double() / scaled.double(), rtol=1e-5, atol=0)
    assert float(got.min()) == pytest.approx(1.0, abs=1e-5) and float(got.max()) == pytest.approx(8.0, abs=1e-4)
    assert r.fields["llama.attention.head_count_kv"].contents() == 1


def test_unknown_pretokenizer_is_refused():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmlab.errors import ConfigError
    from lmlab.ship.gguf import LLAMA3_PRE, pre_tokenizer

    base = Tokenizer(models.BPE())
    base.decoder = decoders.ByteLevel()
    base.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="unknown pre-tokenizer"):
        pre_tokenizer(PreTrainedTokenizerFast(tokenizer_object=base))
    from lmlab.ship.gguf import LLAMA3_SPLIT

    base.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert pre_tokenizer(PreTrainedTokenizerFast(tokenizer_object=base)) == LLAMA3_PRE


@pytest.mark.slow
def test_lora_run_is_merged_before_writing(runs, tmp_path):
    import gguf

    from lmlab.runs.load import load_run_model
    from lmlab.ship.gguf import rope_interleave

    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a} + {b} = {a + b}"}
            for a in range(9) for b in range(7)]
    (tmp_path / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train([f"model.name={runs / 'runs' / 'llama' / 'final'}", "train.objective=sft", "finetune.method=lora",
            f"data.source={tmp_path / 'add.jsonl'}", f"data.tokenizer={runs / 'runs' / 'llama' / 'final'}",
            "data.seq_len=48", "data.val_fraction=0.1", "train.batch_size=4", "train.max_steps=4",
            "train.eval_every=1000", "train.eval_batches=1", "train.threads=1", "train.progress=false",
            "train.sample_tokens=2", "train.warmup_steps=0", "train.lr=1e-2", "finetune.lora_rank=4",
            "finetune.lora_dropout=0.0", f"run.out_dir={tmp_path / 'runs'}", "run.name=lora"])
    run = tmp_path / "runs" / "lora"
    assert (run / "final" / "adapter_config.json").is_file()
    path = _export(run, tmp_path / "out", "f32")
    merged, _ = load_run_model(run, merge=True)
    base = load_file(str(runs / "runs" / "llama" / "final" / "model.safetensors"))
    q = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["blk.0.attn_q.weight"]
    got = torch.from_numpy(np.array(q.data)).reshape(64, 64)
    want = rope_interleave(merged.state_dict()["model.layers.0.self_attn.q_proj.weight"].float(), 4)
    assert torch.equal(got, want)
    assert not torch.equal(got, rope_interleave(base["model.layers.0.self_attn.q_proj.weight"].float(), 4))


# ------------------------------------------------------------------------------------------- llama.cpp itself
def _llama(path, n_ctx=512):
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (pip install 'lmlab[llamacpp]'; it builds llama.cpp "
                            "from source where no wheel exists)")
    # an f32 KV cache (llama.cpp's default is f16), so what differs from transformers is the weights' dtype alone
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=1, n_batch=512, logits_all=True,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)


def _hf(run):
    from lmlab.data.tokenizer import load_tokenizer
    from lmlab.models.hf import load_model

    return load_model(str(run / "final")).eval(), load_tokenizer(str(run / "final"))


def _cpp_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_llama_cpp_greedy_tokens_equal_transformers(trained, tmp_path, dtype):
    """llama.cpp decodes with its own KV cache and greedy sampler; transformers recomputes the whole sequence.

    Their logits differ by the export dtype's rounding, so the greedy tokens must agree wherever the top two
    logits are further apart than twice the largest deviation seen; from a prompt's first step closer than that
    (a near-tie the rounding may break either way) on, its continuations are not compared."""
    llm = _llama(_export(trained, tmp_path / "out", dtype))
    model, tok = _hf(trained)
    runs_ = []
    deviation = 0.0
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids  # same tokenization
        hf_ids, margins = list(ids), []
        with torch.no_grad():
            for _ in range(12):
                logits = model(torch.tensor([hf_ids])).logits[0, -1]
                top = logits.topk(2).values
                margins.append(float(top[0] - top[1]))
                hf_ids.append(int(logits.argmax()))
        cpp = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        cpp_ids = list(ids) + [next(cpp) for _ in range(12)]
        with torch.no_grad():
            want = model(torch.tensor([hf_ids])).logits[0]
        deviation = max(deviation, float((_cpp_logits(llm, hf_ids) - want).abs().max()))
        runs_.append((prompt, ids, hf_ids, cpp_ids, margins))
    assert deviation < (1e-4 if dtype == "f32" else 0.02), deviation
    compared, continuations = 0, []
    for prompt, ids, hf_ids, cpp_ids, margins in runs_:
        clear = next((i for i, m in enumerate(margins) if m <= 2 * deviation), len(margins))  # steps before a tie
        k = len(ids) + clear
        assert cpp_ids[:k] == hf_ids[:k], (prompt, tok.decode(hf_ids[len(ids):]), tok.decode(cpp_ids[len(ids):]))
        compared += clear
        continuations.append(hf_ids[len(ids):])
    # the equality means something: most steps were compared, and the model does not just repeat one token
    assert compared >= 2 * 12 * len(PROMPTS) // 3, (compared, deviation)
    assert len({t for c in continuations for t in c}) >= 6, [tok.decode(c) for c in continuations]


@pytest.mark.slow
def test_llama_cpp_q8_0_perplexity_within_one_percent(trained, tmp_path):
    import sysconfig
    from pathlib import Path

    run = trained
    llm = _llama(_export(run, tmp_path / "out", "q8_0"))
    model, tok = _hf(run)
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()
    ids = tok(text)["input_ids"][:500]
    with torch.no_grad():
        hf_nll = float(model(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    logp = torch.log_softmax(_cpp_logits(llm, ids)[:-1].double(), -1)
    cpp_nll = float(-logp.gather(1, torch.tensor(ids[1:])[:, None]).mean())
    hf_ppl, cpp_ppl = math.exp(hf_nll), math.exp(cpp_nll)
    assert abs(cpp_ppl / hf_ppl - 1) < 0.01, (hf_ppl, cpp_ppl)
