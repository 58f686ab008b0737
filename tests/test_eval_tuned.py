"""`lmlab eval BASE TUNED` on fine-tuned runs: an SFT run's split is its held-out examples (assistant turns, the
run's template) and gives the trainer's validation loss again; a DPO run's split is its held-out pairs; both
models are scored on both splits; a split that cannot be rebuilt says so in its row and the table still prints."""

import json

import pytest

from lmlab.cli import main
from lmlab.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MAMBA = ["model.d_model=32", "model.n_layers=2", "model.dense_hidden=32"]
COMMON = ["data.seq_len=64", "data.val_fraction=0.2", "train.batch_size=4", "train.eval_batches=2",
          "train.log_every=1", "train.threads=1", "train.progress=false", "train.sample_tokens=2",
          "train.warmup_steps=0", "train.lr=3e-3"]




@pytest.fixture(scope="module")
def runs(tmp_path_factory, stdlib_tokenizer_dir):
    from lmlab.train.loop import train

    root = tmp_path_factory.mktemp("eval_tuned")
    rows = [{"prompt": f"Is {a} less than {b}?", "chosen": "yes" if a < b else "no",
             "rejected": "no" if a < b else "yes, certainly"} for a in range(8) for b in range(8) if a != b]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    quiet = dict(echo=lambda *a: None)
    base = train(load_config(None, ["model.name=mamba-swelu-tiny", *MAMBA, *COMMON, "data.source=stdlib",
                                    "data.max_docs=60", f"data.tokenizer={stdlib_tokenizer_dir}", "train.max_steps=4",
                                    "train.eval_every=4", f"run.out_dir={root}", "run.name=base"]), **quiet)
    tuned = [f"model.name={base / 'final'}", f"data.tokenizer={base / 'final'}", *COMMON, "train.max_steps=4",
             "train.eval_every=4", f"run.out_dir={root}"]
    sft = train(load_config(None, [*tuned, "train.objective=sft", "data.source=stdlib-instruct",
                                   "finetune.max_examples=[120]", "run.name=sft"]), **quiet)
    dpo = train(load_config(None, [*tuned, "train.objective=dpo", f"data.source={root / 'pairs.jsonl'}",
                                   "finetune.dpo_beta=0.5", "run.name=dpo"]), **quiet)
    return root, base, sft, dpo


def _eval(capsys, *specs, name):
    rc = main(["eval", *map(str, specs), "--tasks", "none", "--max-tokens", "1024", "--seq-len", "64",
               "--name", name])
    out = capsys.readouterr().out
    results = [json.loads((p / "eval" / f"{name}.json").read_text()) for p in specs]
    return rc, out, results


def _last_eval(run):
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["kind"] == "eval"][-1]


def test_eval_base_against_sft_run(runs, capsys):
    root, base, sft, _ = runs
    rc, out, (rb, rs) = _eval(capsys, base, sft, name="vs-sft")
    assert rc == 0, out
    own = rs["perplexity"]["validation"]
    assert own["split"] == "held-out examples (assistant turns, template plain)"
    assert own["loss"] == pytest.approx(_last_eval(sft)["val_loss"], rel=1e-6)  # the trainer's number again
    # both models on both splits, under the run's name; the two different 'validation' splits are not subtracted
    for r in (rb, rs):
        assert {"val base", "val sft"} <= set(r["perplexity"]) and "error" not in r["perplexity"]["val sft"]
    assert rb["perplexity"]["val sft"]["tokens"] == own["tokens"]
    table = out[out.index("delta:"):]
    assert "ppl val sft" in table and "ppl val base" in table and "ppl validation" not in table
    row = next(line for line in table.splitlines() if "ppl val sft" in line).split()
    assert float(row[-1]) == pytest.approx(rs["perplexity"]["val sft"]["ppl"] - rb["perplexity"]["val sft"]["ppl"],
                                           abs=1e-3)


def test_eval_base_against_dpo_run_and_a_split_that_cannot_be_rebuilt(runs, capsys):
    root, base, _, dpo = runs
    rc, out, (rb, rd) = _eval(capsys, base, dpo, name="vs-dpo")
    assert rc == 0, out
    own = rd["perplexity"]["validation"]
    assert own["split"].startswith("held-out preference pairs") and own["pairs"] == 8  # 2 batches of 4
    assert 0 <= own["preference_accuracy"] <= 1 and own["tokens"] > 0
    assert "pref_acc val dpo" in out[out.index("delta:"):]
    # the pairs file is gone: the row says why, the rest of the comparison still prints, exit 0
    (root / "pairs.jsonl").rename(root / "moved.jsonl")
    try:
        rc, out, (rb, rd) = _eval(capsys, base, dpo, name="gone")
    finally:
        (root / "moved.jsonl").rename(root / "pairs.jsonl")
    assert rc == 0
    assert "pairs.jsonl" in rd["perplexity"]["validation"]["error"]
    table = out[out.index("delta:"):]
    assert "not measured" in table and "pairs.jsonl" in table and "ppl val base" in table
