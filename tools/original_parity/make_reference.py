"""Reference outputs and gradients from the ORIGINAL MambaSWELU / INL-LLM code, for tests/test_fidelity.py.

Run by hand (never in CI) against a local checkout of the original at a known commit:

    python tools/original_parity/make_reference.py --kind mamba-swelu --checkout /tmp/swelu-5c61e3d \\
        --commit 5c61e3d --name swelu-5c61e3d
    python tools/original_parity/make_reference.py --kind inl-v0 --checkout /tmp/inl-a3a6afc \\
        --commit a3a6afc --name inl-v0-a3a6afc

It imports the original's own modules from the checkout (`src/model.py` for MambaSWELU,
`integrator_language_model.py` for INL), builds a tiny model in float64, moves every parameter off its
initial value (so no path is trivially zero), and writes into --out:

    <name>.safetensors   state.<original key> (the weights), grad.<original key> (d loss / d weight),
                         input_ids, logits (b, l, V), loss
    <name>.json          kind, commit, the tiny hyper-parameters, what was run

Everything runs in eval mode (no dropout), with gradients. Nothing from the checkout is copied.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

B, L, VOCAB = 2, 11, 61


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def mamba_swelu(checkout: Path) -> tuple[torch.nn.Module, dict, dict]:
    sys.path.insert(0, str(checkout / "src"))
    from model import MambaSWELU  # the original's module, from the checkout

    hyper = dict(vocab_size=VOCAB, d_model=16, n_layers=2, d_state=4, d_conv=4, expand=2, max_seq_len=16,
                 dense_hidden_dim=24, swelu_k=1.0, dropout=0.1)
    torch.manual_seed(0)
    model = MambaSWELU(**hyper).double()
    _perturb(model, 1)
    with torch.no_grad():  # k spread over 0.4 … 1.6, one k_raw negative (k = |k_raw| + 1e-6)
        ks = [n for n, _ in model.named_parameters() if n.endswith(".k")]
        for i, name in enumerate(ks):
            value = 0.4 + 1.2 * i / max(1, len(ks) - 1)
            model.get_parameter(name).fill_(-value if i == 1 else value)
    ids = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(2))
    model.eval()
    logits = model(ids)["logits"]
    return model, hyper, {"input_ids": ids, "logits": logits}


def inl(checkout: Path, kind: str) -> tuple[torch.nn.Module, dict, dict]:
    sys.path.insert(0, str(checkout))
    from integrator_language_model import IntegratorLanguageModel  # the original's module

    hyper = dict(vocab_size=VOCAB, d_model=8, num_layers=2, num_iterations_per_layer=3, feedforward_dim=16,
                 max_seq_len=16, dropout=0.1)
    if kind == "inl-v1":
        hyper.update(num_heads=2, use_attention=True)
    torch.manual_seed(0)
    model = IntegratorLanguageModel(**hyper).double()
    _perturb(model, 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("global_step"):
                buf.fill_(5)  # V0's excitation clock, as a checkpoint after some training would hold
    ids = torch.randint(0, VOCAB, (B, L), generator=torch.Generator().manual_seed(2))
    model.eval()
    # no mask, as the original training script called it (V0's masked branch runs in float32 only)
    return model, hyper, {"input_ids": ids, "logits": model(ids)[0]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", required=True, choices=["mamba-swelu", "inl-v0", "inl-v1"])
    ap.add_argument("--checkout", required=True, type=Path, help="a local checkout of the original")
    ap.add_argument("--commit", required=True, help="the commit the checkout is at (recorded)")
    ap.add_argument("--name", required=True, help="file stem of the outputs")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/assets/fidelity")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.kind == "mamba-swelu":
        model, hyper, out = mamba_swelu(args.checkout)
    else:
        model, hyper, out = inl(args.checkout, args.kind)
    loss = _loss(out["logits"], out["input_ids"])
    loss.backward()
    tensors = {"loss": loss.detach().reshape(1), **{k: v.detach().contiguous() for k, v in out.items()}}
    for name, value in model.state_dict().items():
        if name.endswith("pos_encoding.pe") or name == "lm_head.weight":
            continue  # a fixed buffer / the tied copy of the embedding
        tensors[f"state.{name}"] = value.detach().clone().contiguous()
    for name, p in model.named_parameters():
        if p.grad is not None:
            tensors[f"grad.{name}"] = p.grad.detach().clone().contiguous()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / f"{args.name}.safetensors"))
    meta = {"kind": args.kind, "commit": args.commit, "hyper": hyper, "batch": B, "length": L, "dtype": "float64",
            "mode": "eval, gradients of the mean next-token cross-entropy"}
    (args.out / f"{args.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {args.name}: loss {float(loss):.6f}, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
