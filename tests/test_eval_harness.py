"""lmlab eval: lm-eval on the shipped fixtures scores what a hand computation says; perplexity per source."""

import argparse
import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lmlab.eval.harness import TASKS, evaluate_tasks, fixture_path, parse_tasks  # noqa: E402
from lmlab.eval.perplexity_sources import source_perplexity, token_perplexity  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
LIMIT = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and a small BPE trained on English text."""
    from lmlab.data.tokenizer import train_bpe
    from lmlab.models import build_config, build_model

    d = tmp_path_factory.mktemp("tiny")
    text = d / "text.txt"
    text.write_text("\n".join(json.loads(line)["text"] for line in fixture_path("lambada").open()) * 3)
    tok = train_bpe(str(text), 300, d / "tok")
    cfg = build_config("llama-tiny", vocab_size=len(tok), overrides=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    return model, tok, d


def _docs(task, n=LIMIT):
    return [json.loads(line) for line in fixture_path(task).open()][:n]


def _loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and whether it is the greedy continuation, as a causal LM scores it."""
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].double(), dim=-1)[-len(cont):]  # (len(cont), V)
    target = torch.tensor(cont)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def _hellaswag_clean(text):
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _by_hand(model, tok):
    """acc / acc_norm (log-likelihood over the choice's length in characters) from the stock task definitions."""
    out = {}
    lam = [_loglik(model, tok, " ".join(d["text"].split(" ")[:-1]), " " + d["text"].split(" ")[-1])
           for d in _docs("lambada")]
    out["lambada"] = {"acc": np.mean([g for _, g in lam]), "perplexity": math.exp(-np.mean([ll for ll, _ in lam]))}

    def choice_scores(items):  # items: (gold, [(context, continuation, choice_text)])
        acc, acc_norm = [], []
        for gold, pairs in items:
            lls = np.array([_loglik(model, tok, c, x)[0] for c, x, _ in pairs])
            lens = np.array([len(t) for _, _, t in pairs], dtype=float)
            acc.append(float(np.argmax(lls) == gold))
            acc_norm.append(float(np.argmax(lls / lens) == gold))
        return {"acc": np.mean(acc), "acc_norm": np.mean(acc_norm)}

    hs = []
    for d in _docs("hellaswag"):
        query = _hellaswag_clean(d["activity_label"] + ": " + d["ctx_a"] + " " + d["ctx_b"].capitalize())
        choices = [_hellaswag_clean(e) for e in d["endings"]]
        hs.append((int(d["label"]), [(query, " " + c, c) for c in choices]))
    out["hellaswag"] = choice_scores(hs)
    pq = [(d["label"], [(f"Question: {d['goal']}\nAnswer:", " " + s, s) for s in (d["sol1"], d["sol2"])])
          for d in _docs("piqa")]
    out["piqa"] = choice_scores(pq)
    wg = []
    for d in _docs("winogrande"):
        i = d["sentence"].index("_")
        ctxs = [d["sentence"][:i] + opt for opt in (d["option1"], d["option2"])]
        target = " " + d["sentence"][i + 1:].strip()
        wg.append((int(d["answer"]) - 1, [(c, target, c) for c in ctxs]))  # choices are the contexts
    out["winogrande"] = {"acc": choice_scores(wg)["acc"]}
    return out


def test_fixtures_have_the_stock_schemas():
    for d in _docs("lambada", 100):
        assert isinstance(d["text"], str) and " " in d["text"]
    for d in _docs("hellaswag", 100):
        assert {"activity_label", "ctx_a", "ctx_b", "endings", "label"} <= set(d) and len(d["endings"]) == 4
        assert d["label"] in {"0", "1", "2", "3"}
    for d in _docs("piqa", 100):
        assert {"goal", "sol1", "sol2"} <= set(d) and d["label"] in (0, 1)
    for d in _docs("winogrande", 100):
        assert d["sentence"].count("_") == 1 and d["answer"] in ("1", "2") and d["option1"] and d["option2"]
    assert all(len(_docs(t, 1000)) >= 50 for t in TASKS)  # --limit 50 has 50 items everywhere


def test_lm_eval_scores_match_a_hand_computation(tiny, monkeypatch):
    """…and the evaluation on the shipped data leaves the process's environment as it was (no offline switch
    left behind for a later hub evaluation or download in the same process)."""
    model, tok, _ = tiny
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    switches = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    before = {k: os.environ.get(k) for k in switches}
    got = evaluate_tasks(model, tok, "lambada,hellaswag,piqa,winogrande", limit=LIMIT, batch_size=4)
    assert {k: os.environ.get(k) for k in switches} == before
    want = _by_hand(model, tok)
    assert set(got) == set(want)
    for task, metrics in want.items():
        assert got[task]["n"] == LIMIT
        for m, v in metrics.items():
            assert got[task][m] == pytest.approx(v, rel=1e-4), (task, m)
    assert not model.training


def test_an_evaluation_outside_a_git_checkout_prints_nothing_from_git(tiny, tmp_path, monkeypatch, capfd):
    """lm-eval records the working directory's git commit; outside a checkout git's "fatal: not a git repository"
    must not reach the terminal (the probe runs quiet, and lm-eval's own probe is put back afterwards)."""
    import lm_eval.evaluator as evaluator

    model, tok, _ = tiny
    real = evaluator.get_git_commit_hash
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # tmp_path is in no checkout
    got = evaluate_tasks(model, tok, "piqa", limit=5, batch_size=4)
    assert got["piqa"]["n"] == 5
    assert "not a git repository" not in capfd.readouterr().err
    assert evaluator.get_git_commit_hash is real


def test_parse_tasks_accepts_stock_names_and_rejects_unknown():
    from lmlab.errors import ConfigError

    assert parse_tasks("lambada_openai, piqa,piqa") == ["lambada", "piqa"]
    with pytest.raises(ConfigError, match="unknown task"):
        parse_tasks("mmlu")


def test_token_perplexity_is_the_mean_loss_over_windows(tiny):
    model, tok, d = tiny
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(tok), size=5 * 24 + 7).astype(np.uint16)
    r = token_perplexity(model, tokens, 24, batch_size=2)
    x = torch.tensor(tokens[: 5 * 24 + 1].astype(np.int64))
    losses = []
    with torch.no_grad():
        for w in range(5):
            seg = x[w * 24: (w + 1) * 24 + 1]
            losses.append(F.cross_entropy(model(seg[None, :-1]).logits[0], seg[1:], reduction="sum"))
    assert r["windows"] == 5 and r["tokens"] == 120
    assert r["loss"] == pytest.approx(float(sum(losses)) / 120, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    src = source_perplexity(model, tok, str(d / "text.txt"), seq_len=16, max_tokens=64)
    assert src["windows"] == 4 and src["tokens"] == 64


def test_eval_command_writes_results_into_the_folder_and_prints_deltas(tiny, tmp_path, capsys):
    from lmlab.commands import eval as eval_cmd

    model, tok, d = tiny
    folders = []
    for i in range(2):
        folder = tmp_path / f"m{i}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        folders.append(str(folder))
    p = argparse.ArgumentParser()
    eval_cmd.add_arguments(p)
    args = p.parse_args([*folders, "--data", str(d / "text.txt"), "--tasks", "piqa", "--limit", "3",
                         "--seq-len", "16", "--max-tokens", "64", "--device", "cpu", "--name", "t"])
    assert eval_cmd.run(args) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "m0" / "eval" / "t.json").read_text())
    assert res["tasks"]["piqa"]["n"] == 3 and res["tasks_from"] == "fixtures"
    assert str(d / "text.txt") in res["perplexity"]
    assert (tmp_path / "m1" / "eval" / "t.json").is_file()
    assert "delta:" in out and re.search(r"piqa acc\s+\S+\s+\S+\s+\+0\.0000", out)
