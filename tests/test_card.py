"""Model cards: every export (the trainer's final/ included) writes a README.md that huggingface_hub's ModelCard
parses back, with the run's facts and the results `lmlab eval` wrote; a new evaluation shows after re-export."""

import json
import sys

import pytest
from huggingface_hub import ModelCard

from lmlab.cli import main
from lmlab.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from lmlab.data.tokenizer import train_bpe
    from lmlab.train.loop import train

    root = tmp_path_factory.mktemp("card")
    train_bpe("stdlib", 300, root / "tok", max_chars=100_000)
    train(load_config(None, [
        "model.name=llama-tiny", "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=2", "model.num_hidden_layers=1", "data.source=stdlib", "data.max_docs=20",
        f"data.tokenizer={root / 'tok'}", "data.seq_len=32", "train.batch_size=4", "train.max_steps=12",
        "train.eval_every=6", "train.eval_batches=1", "train.log_every=2", "train.threads=1", "train.progress=false",
        "train.sample_tokens=2", "train.warmup_steps=2", f"run.out_dir={root / 'runs'}", "run.name=tiny"]),
        echo=lambda *a: None)
    return root / "runs" / "tiny"


def _card(folder):
    return ModelCard.load(folder / "README.md")


def test_trainer_final_and_export_write_a_card_with_the_run_facts(run, tmp_path, capsys):
    manifest = json.loads((run / "run.json").read_text())
    final = _card(run / "final")  # written by the trainer's export
    assert final.data.pipeline_tag == "text-generation" and final.data.library_name == "transformers"
    assert main(["export", str(run), "-o", str(tmp_path / "out"), "--license", "apache-2.0"]) == 0
    card = _card(tmp_path / "out")
    d = card.data
    assert (d.library_name, d.pipeline_tag, d.license, d.model_name) == ("transformers", "text-generation",
                                                                         "apache-2.0", "tiny")
    assert {"lmlab", "llama"} <= set(d.tags) and d.base_model is None and d.eval_results is None
    params = manifest["parameters"]
    text = card.text
    assert f"| parameters | {params:,} " in text
    tokens = manifest["summary"]["tokens"]
    assert f"| tokens seen | {tokens:,} |" in text and f"| tokens / parameter | {tokens / params:.2f} |" in text
    assert f"| final validation loss | {manifest['summary']['val_loss']:.4f}" in text
    assert "| data | `stdlib` |" in text and "| steps | 12 |" in text and "## Limits" in text
    assert "AutoModelForCausalLM.from_pretrained" in text and "lmlab generate" in text
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG" and "](loss.png)" in text


def test_eval_results_enter_the_model_index_and_a_new_one_shows_after_reexport(run, tmp_path):
    from lmlab.commands.eval import evaluate_model

    first = evaluate_model(str(run), tasks=[], seq_len=32, max_tokens=2048, name="a")
    assert main(["export", str(run), "-o", str(tmp_path / "one")]) == 0
    (res,) = _card(tmp_path / "one").data.eval_results
    ppl = first["perplexity"]["validation"]["ppl"]
    assert (res.metric_type, res.metric_value, res.task_type) == ("perplexity", round(ppl, 4), "text-generation")
    # a later evaluation (shorter window: another value) replaces it at the next export
    second = evaluate_model(str(run), tasks=[], seq_len=16, max_tokens=1024, name="b")
    ppl2 = second["perplexity"]["validation"]["ppl"]
    assert round(ppl2, 4) != round(ppl, 4)
    assert main(["export", str(run), "-o", str(tmp_path / "two")]) == 0
    card = _card(tmp_path / "two")
    (res,) = card.data.eval_results
    assert res.metric_value == round(ppl2, 4)
    assert f"| validation | perplexity | {ppl2:.4f} |" in card.text


def test_fine_tuned_run_names_its_hub_base_and_task_results(tmp_path):
    """A synthetic run folder: an SFT run from a hub model, with benchmark results from the local fixtures."""
    from _runfolders import write_run

    from lmlab.ship.card import build_card

    r = write_run(tmp_path, "sft", status="finished", alive=False, n_logs=10)
    (r / "config.yaml").write_text("model:\n  name: meta-llama/Llama-3.2-1B\ndata:\n  source: [hf:tatsu-lab/alpaca]\n"
                                   "train:\n  objective: sft\nfinetune:\n  method: lora\n  template: chatml\n"
                                   "  lora_rank: 8\n  lora_alpha: 16\n")
    (r / "eval").mkdir()
    (r / "eval" / "x.json").write_text(json.dumps({"created": "2026-01-01T00:00:00", "tasks_from": "fixtures",
                                                   "perplexity": {}, "tasks": {"piqa": {"acc": 0.61, "n": 50}}}))
    card = build_card(run_dir=r, kind="adapter", parameters=1000, trainable=10, architecture="LlamaForCausalLM",
                      model_type="llama")
    d = card.data
    assert (d.base_model, d.datasets, d.library_name) == ("meta-llama/Llama-3.2-1B", ["tatsu-lab/alpaca"], "peft")
    assert {"peft", "lora"} <= set(d.tags)
    (res,) = d.eval_results
    assert (res.dataset_type, res.metric_type, res.metric_value) == ("piqa", "acc", 0.61)
    assert "local fixture, n=50" in res.dataset_name
    assert "chat template `chatml`" in card.text and "rank 8" in card.text and "PeftModel" in card.text
    assert ModelCard(str(card)).data.to_dict() == d.to_dict()  # it parses back to the same metadata


def test_without_matplotlib_the_card_says_so_and_has_no_image(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "loss.png").exists()
    assert "No loss curve: matplotlib is not installed" in _card(tmp_path / "out").text


def test_a_failing_card_never_costs_the_model(run, tmp_path, monkeypatch):
    import lmlab.ship.card as card_mod

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(card_mod, "write_card", broken)
    with pytest.warns(UserWarning, match="model card not written .*boom"):
        assert main(["export", str(run), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "README.md").exists()
