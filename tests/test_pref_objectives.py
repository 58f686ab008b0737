"""IPO, SimPO, ORPO and KTO: each loss and its gradient against a hand computation on made-up log-probabilities,
the known first-step constants (DPO log 2, IPO (1/(2τ))²), TRL's metric names, KTO's data format, and a tiny
real run of each through the trainer (slow)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.config import load_config
from lmlab.train.dpo import dpo_terms
from lmlab.train.ipo import ipo_terms, reply_logps
from lmlab.train.kto import kto_terms
from lmlab.train.orpo import log1mexp, orpo_terms
from lmlab.train.simpo import simpo_terms

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
PAIR_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"}


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _leaf(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def test_a_policy_equal_to_its_reference_starts_at_the_known_constants():
    lp = torch.tensor([-7.0, -3.0, -11.0])
    loss, _ = dpo_terms(lp, lp - 1, lp, lp - 1, beta=0.1)
    assert loss.item() / 3 == pytest.approx(math.log(2), rel=1e-6)
    loss, m = ipo_terms(lp, lp - 1, lp, lp - 1, tau=0.1)
    assert loss.item() / 3 == pytest.approx(25.0, rel=1e-6)  # (1/(2τ))²
    assert m["rewards/margins"].item() == 0 and set(m) == PAIR_METRICS


def test_ipo_loss_and_gradient_by_hand():
    pw, pl = _leaf(-1.0, -2.0), _leaf(-1.5, -0.5)
    rw, rl = torch.tensor([-1.2, -2.0], dtype=torch.float64), torch.tensor([-1.4, -1.0], dtype=torch.float64)
    tau = 0.5  # target 1/(2τ) = 1
    loss, m = ipo_terms(pw, pl, rw, rl, tau)
    h = [(-1.0 + 1.2) - (-1.5 + 1.4), (-2.0 + 2.0) - (-0.5 + 1.0)]  # 0.3, -0.5
    assert loss.item() == pytest.approx(sum((x - 1) ** 2 for x in h))
    loss.backward()
    assert pw.grad.tolist() == pytest.approx([2 * (x - 1) for x in h])
    assert pl.grad.tolist() == pytest.approx([-2 * (x - 1) for x in h])
    assert m["rewards/chosen"].item() == pytest.approx(tau * (0.2 + 0.0))
    assert m["rewards/accuracies"].item() == 1.0  # pair 1: 0.1 > −0.05; pair 2: 0 > 0.25 is false


def test_simpo_loss_and_gradient_by_hand():
    w, lo = _leaf(-0.8, -2.0), _leaf(-1.6, -1.5)
    beta, gamma = 2.0, 1.0
    loss, m = simpo_terms(w, lo, beta, gamma)
    u = [beta * (-0.8 + 1.6) - gamma, beta * (-2.0 + 1.5) - gamma]  # 0.6, -2.0
    assert loss.item() == pytest.approx(sum(-math.log(_sig(x)) for x in u))
    loss.backward()
    assert w.grad.tolist() == pytest.approx([-beta * _sig(-x) for x in u])
    assert lo.grad.tolist() == pytest.approx([beta * _sig(-x) for x in u])
    assert m["rewards/chosen"].item() == pytest.approx(beta * (-2.8))
    assert m["rewards/margins"].item() == pytest.approx(beta * (0.8 - 0.5))
    assert set(m) == PAIR_METRICS


def test_orpo_loss_and_gradient_by_hand():
    w, lo = _leaf(-0.5, -2.0), _leaf(-1.0, -0.3)
    lam = 0.1
    loss, m = orpo_terms(w, lo, lam)
    expect, gw, gl, odds = 0.0, [], [], []
    for a, b in ((-0.5, -1.0), (-2.0, -0.3)):
        L = (a - b) - (math.log(1 - math.exp(a)) - math.log(1 - math.exp(b)))
        odds.append(L)
        expect += -a - lam * math.log(_sig(L))
        gw.append(-1 - lam * _sig(-L) / (1 - math.exp(a)))
        gl.append(lam * _sig(-L) / (1 - math.exp(b)))
    assert loss.item() == pytest.approx(expect)
    loss.backward()
    assert w.grad.tolist() == pytest.approx(gw)
    assert lo.grad.tolist() == pytest.approx(gl)
    assert m["log_odds_chosen"].item() == pytest.approx(sum(odds))
    assert m["nll_loss"].item() == pytest.approx(2.5)
    assert set(m) == PAIR_METRICS | {"nll_loss", "log_odds_ratio", "log_odds_chosen"}
    x = torch.tensor([-1e-6, -0.1, -5.0, -50.0], dtype=torch.float64)
    assert log1mexp(x).tolist() == pytest.approx([math.log(1 - math.exp(v)) for v in x.tolist()], rel=1e-9)


def test_kto_loss_and_gradient_by_hand():
    pol, ref = _leaf(-3.0, -4.0, -2.0), torch.tensor([-3.5, -3.0, -2.5], dtype=torch.float64)
    pol_kl = torch.tensor([-6.0, -5.0, -7.0], dtype=torch.float64)
    ref_kl = torch.tensor([-6.3, -5.3, -6.9], dtype=torch.float64)  # mean(policy − ref) = 0.5/3
    good = torch.tensor([True, False, True])
    beta, wd, wu = 0.5, 1.0, 1.5
    loss, m = kto_terms(pol, ref, pol_kl, ref_kl, good, beta, wd, wu)
    z = 0.5 / 3
    r = [0.5, -1.0, 0.5]
    terms = [wd * (1 - _sig(beta * (r[0] - z))), wu * (1 - _sig(beta * (z - r[1]))), wd * (1 - _sig(beta * (r[2] - z)))]
    assert loss.item() == pytest.approx(sum(terms))
    loss.backward()
    s = [_sig(beta * (r[0] - z)), _sig(beta * (z - r[1])), _sig(beta * (r[2] - z))]
    assert pol.grad.tolist() == pytest.approx([-wd * beta * s[0] * (1 - s[0]), wu * beta * s[1] * (1 - s[1]),
                                               -wd * beta * s[2] * (1 - s[2])])
    assert m["kl"].item() / 3 == pytest.approx(z)
    assert m["rewards/chosen"].item() / 3 == pytest.approx(beta * 0.5)  # mean over the desirable examples
    assert m["rewards/rejected"].item() / 3 == pytest.approx(beta * -1.0)
    assert set(m) == PAIR_METRICS - {"rewards/accuracies"} | {"kl"}
    # the KL estimate is clamped at 0 and carries no gradient
    loss0, m0 = kto_terms(pol.detach(), ref, pol_kl, pol_kl + 1, good, beta)
    assert m0["kl"].item() == 0


def test_reply_logps_sum_and_count_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(1, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 6, -100]])
    lp = torch.log_softmax(logits, -1)
    s, n = reply_logps(logits, labels)
    assert s.item() == pytest.approx((lp[0, 1, 3] + lp[0, 2, 6]).item(), rel=1e-6) and n.item() == 2


def test_unpaired_rows_both_forms_and_the_kl_pairs(tmp_path, setup):
    from lmlab.data.unpaired import collate_unpaired, encode_unpaired, load_unpaired
    from lmlab.errors import DataError

    rows = [{"prompt": "Say hi", "completion": "hi", "label": True},
            {"messages": [{"role": "user", "content": "Say bye"}, {"role": "assistant", "content": "no"}],
             "label": False},
            {"prompt": "x", "completion": "y", "label": "maybe"},
            {"prompt": "x", "completion": "y"}]
    path = tmp_path / "fb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_unpaired([str(path)], val_fraction=0.0)
    assert [(e.prompt[-1]["content"], e.completion, e.desirable) for e in data.train] == \
        [("Say hi", "hi", True), ("Say bye", "no", False)]
    assert sum(data.summary.sources[str(path)].dropped.values()) == 2
    with pytest.raises(DataError, match=r"fb.jsonl:3.*label"):
        load_unpaired([str(path)], on_error="fail")

    from lmlab.data.chat import ChatFormat
    from lmlab.data.tokenizer import load_tokenizer

    tok = load_tokenizer(str(setup / "tok"))
    fmt = ChatFormat(tok, "plain")
    enc = [encode_unpaired(e, fmt) for e in data.train]
    b = collate_unpaired(enc, 0)
    assert b["desirable"].tolist() == [True, False]
    # row 0's KL pair is prompt 0 with row 1's reply, and the reverse
    kl0 = b["kl_input_ids"][0][b["kl_labels"][0] != -100].tolist()
    assert kl0 == enc[1].completion_ids and b["kl_input_ids"][0][: len(enc[0].prompt_ids)].tolist() == enc[0].prompt_ids


# ------------------------------------------------------------------------------------------- tiny real runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory, stdlib_tokenizer_dir):
    import shutil

    root = tmp_path_factory.mktemp("pref")
    shutil.copytree(stdlib_tokenizer_dir, root / "tok")  # a copy of the session's tokenizer, beside the data
    pairs = [{"prompt": f"Is {a} less than {b}?", "chosen": "yes" if a < b else "no",
              "rejected": "no" if a < b else "yes, certainly"} for a in range(8) for b in range(8) if a != b]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    fb = [{"prompt": f"Is {a} less than {b}?", "completion": c, "label": c == "yes"}  # a preference for "yes"
          for a in range(8) for b in range(8) if a != b for c in ("yes", "no, never")]
    (root / "fb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fb))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("objective, first_loss", [("ipo", 25.0), ("simpo", None), ("orpo", None), ("kto", 0.5)])
def test_tiny_run_of_each_objective_lowers_its_loss(setup, objective, first_loss):
    from lmlab.train.loop import train

    data = setup / ("fb.jsonl" if objective == "kto" else "pairs.jsonl")
    cfg = load_config(None, [
        "model.name=llama-tiny", f"train.objective={objective}", f"data.source={data}",
        f"data.tokenizer={setup / 'tok'}", "data.seq_len=32", "data.val_fraction=0.2", "train.batch_size=8",
        "train.max_steps=8", "train.eval_every=8", "train.eval_batches=2", "train.log_every=1", "train.threads=1",
        "train.progress=false", "train.sample_tokens=2", "train.warmup_steps=0", "train.lr=1e-3",
        "train.system_every=0", f"run.out_dir={setup / 'runs'}", f"run.name={objective}"])
    run = train(cfg, echo=lambda *a: None)
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["kind"] == "train"]
    if first_loss is not None:  # policy == reference at the first step: IPO (1/(2τ))², KTO 1 − σ(0)
        assert steps[0]["loss"] == pytest.approx(first_loss, rel=1e-4)
    if objective == "kto":  # its loss moves with the KL estimate: the desirable replies must gain on the others
        assert sum(e["rewards/margins"] for e in steps[-4:]) > 0
    else:
        assert steps[-1]["loss"] < steps[0]["loss"]
    names = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    assert names <= set(steps[-1]) and all(math.isfinite(steps[-1][k]) for k in names)
    ev = [e for e in events if e["kind"] == "eval"][-1]
    assert "val_rewards/chosen" in ev and math.isfinite(ev["val_loss"])
    assert (run / "final").is_dir()
