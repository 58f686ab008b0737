import torch

from lmlab.generate import SamplingConfig, TextStreamer, filter_logits, generate
from lmlab.models.mamba_swelu import MambaSWELUConfig, MambaSWELUForCausalLM


def _model():
    torch.manual_seed(0)
    cfg = MambaSWELUConfig(vocab_size=61, d_model=32, n_layers=2, dense_hidden=32, max_seq_len=128,
                           scan_backend="ref")
    return MambaSWELUForCausalLM(cfg).eval()


def test_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, True, False, False, False]]
    p = logits.softmax(-1)[0]  # [0.636, 0.234, 0.086, ...]
    p1 = filter_logits(logits, top_p=float(p[0]) - 1e-3)
    assert torch.isfinite(p1).sum() == 1  # the top token alone reaches top_p
    p2 = filter_logits(logits, top_p=float(p[0] + p[1]) - 1e-3)
    assert torch.isfinite(p2).sum() == 2


def test_cached_generation_equals_recompute():
    model = _model()
    prompt = torch.randint(0, 61, (2, 7))
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.0)
    fast = generate(model, prompt, cfg, use_cache=True)
    slow = generate(model, prompt, cfg, use_cache=False)
    assert torch.equal(fast, slow) and fast.shape == (2, 32)
    cfg = SamplingConfig(max_new_tokens=25, temperature=0.9, top_k=10, top_p=0.9)
    a = generate(model, prompt, cfg, generator=torch.Generator().manual_seed(3))
    b = generate(model, prompt, cfg, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert torch.equal(a, b)


def test_stops_at_eos_and_streams():
    model = _model()
    prompt = torch.randint(0, 61, (1, 4))
    greedy = generate(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0))
    eos = int(greedy[0, 6])  # make the third generated token the EOS
    seen = []
    out = generate(model, prompt, SamplingConfig(max_new_tokens=10, temperature=0, eos_id=eos),
                   on_token=seen.append)
    first = next(i for i, t in enumerate(out[0, 4:].tolist()) if t == eos)
    assert out.shape[1] == 4 + first + 1 and seen == out[0, 4:].tolist()


def test_text_streamer_waits_for_complete_characters():
    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    pieces = []
    s = TextStreamer(Tok(), pieces.append)
    for b in "é!".encode():
        s(b)
    assert "".join(pieces) == "é!" and "\ufffd" not in "".join(pieces)


def test_transformers_generate_uses_the_recurrent_cache_and_matches_full_recompute():
    model = _model()
    model.generation_config.pad_token_id = 0
    prompt = torch.randint(1, 61, (2, 6))
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[1]), with_kwargs=True)
    hf = model.generate(prompt, max_new_tokens=8, do_sample=False)
    hook.remove()
    assert calls == [6] + [1] * 7  # prompt once, then one new token per step
    ours = generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0.0), use_cache=False)
    assert torch.equal(hf, ours)
    # beam search runs with the cache and agrees with beam search that recomputes everything
    beam = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
    beam_slow = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    assert torch.equal(beam, beam_slow)


def test_reorder_cache_moves_the_recurrent_state_with_its_row():
    model = _model()
    prompt = torch.randint(1, 61, (3, 9))
    nxt = torch.randint(1, 61, (3, 1))
    with torch.no_grad():
        cache = model.new_cache()
        model(prompt, cache=cache)
        cache.reorder_cache(torch.tensor([2, 0, 0]))
        got = model(nxt, cache=cache).logits[:, -1]
        want = model(torch.cat([prompt[[2, 0, 0]], nxt], 1)).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
