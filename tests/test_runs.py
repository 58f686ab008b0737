"""lmlab.runs on folders the real trainer wrote (tests/fixture_runs.py): the one rule for what a run is, the one
checkpoint lister, and the one loader from a run to a model — final/, the latest whole checkpoint, LoRA adapters
(final/ and checkpoint), a sharded (fsdp) checkpoint — each giving the same logits as the model the run exported."""

import json
import shutil

import pytest
import torch
from fixture_runs import copy_run

from lmlab import runs
from lmlab.errors import LmlabError
from lmlab.runs.load import build_model, load_for_inference, load_run_model, resolve_base

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, tok, text="def main(args):\n    return"):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def _without_final(run, tmp_path):
    """The run as a trainer killed after its last checkpoint, before the export, leaves it."""
    copy = copy_run(run, tmp_path / run.name)
    shutil.rmtree(copy / "final")
    return copy


# ------------------------------------------------------------------------------------------- what a run is
def test_one_rule_for_a_run_folder_and_the_folders_made_from_it(pretrain_run, lora_run, tmp_path):
    root = pretrain_run.parent
    assert runs.is_run(pretrain_run) and runs.is_run(lora_run)
    assert not runs.is_run(pretrain_run / "final")  # a model folder (config.json), inside a run
    assert not runs.is_run(pretrain_run / "checkpoints") and not runs.is_run(root) and not runs.is_run(tmp_path)
    assert runs.run_of(pretrain_run / "final") == pretrain_run.resolve()
    assert runs.run_of(pretrain_run / "checkpoints" / "step-00000005") == pretrain_run.resolve()
    assert runs.run_of(tmp_path) is None
    assert runs.base_label(str(pretrain_run / "final")) == "pretrain"
    assert runs.base_label(str(tmp_path)) == tmp_path.name
    found = runs.find_runs([root])
    assert {p.name for p in found} >= {"pretrain", "lora"} and all(runs.is_run(p) for p in found)
    assert runs.find_runs([pretrain_run, pretrain_run]) == [pretrain_run]  # a run's own folders are not searched
    with pytest.raises(LmlabError, match="no such folder"):
        runs.find_runs([tmp_path / "missing"])


def test_one_lister_with_the_facts_the_readers_need(pretrain_run):
    listed = runs.list_checkpoints(pretrain_run / "checkpoints")
    facts = runs.checkpoints(pretrain_run)
    assert [c.path for c in facts] == listed and [c.step for c in facts] == [5, 10]
    assert [c.name for c in facts] == ["step-00000005", "step-00000010"] and facts[0].mtime <= facts[1].mtime
    manifest = json.loads((listed[-1] / runs.MANIFEST).read_text())
    assert manifest["step"] == 10 and facts[-1].mtime == (listed[-1] / runs.MANIFEST).stat().st_mtime
    assert runs.latest_checkpoint(pretrain_run / "checkpoints") == listed[-1]


# ------------------------------------------------------------------------------------------- the loader
def test_a_whole_checkpoint_loads_to_the_exported_model(pretrain_run, tmp_path):
    final, tok = load_for_inference(str(pretrain_run), "cpu")
    copy = _without_final(pretrain_run, tmp_path)
    latest, tok2 = load_for_inference(str(copy), "cpu")  # step 10, the weights final/ was exported from
    assert len(tok2) == len(tok)
    assert torch.equal(_logits(final, tok), _logits(latest, tok))
    fresh = build_model(json_cfg(copy), tok2)  # the model the config describes, before the trained weights
    assert not torch.allclose(_logits(fresh.eval(), tok), _logits(latest, tok))
    shutil.rmtree(copy / "checkpoints")  # killed before its first save
    with pytest.raises(LmlabError, match="neither final/ nor a complete checkpoint"):
        load_run_model(copy)


def json_cfg(run):
    from lmlab.config import load_config

    return load_config(run / "config.yaml")


def test_a_sharded_checkpoint_loads_in_one_process_to_the_exported_model(sharded_run, tmp_path):
    from lmlab.runs.load import is_sharded

    latest = runs.latest_checkpoint(sharded_run / "checkpoints")
    assert is_sharded(latest) and not (latest / "model.safetensors").exists()
    exported, tok = load_for_inference(str(sharded_run), "cpu")
    model, _ = load_for_inference(str(_without_final(sharded_run, tmp_path)), "cpu")
    assert torch.equal(_logits(exported, tok), _logits(model, tok))


def test_a_lora_run_loads_from_its_adapter_folder_and_from_its_checkpoint(lora_run, tmp_path):
    from peft import PeftModel

    adapter, tok = load_for_inference(str(lora_run), "cpu")
    assert isinstance(adapter, PeftModel) and (lora_run / "final" / "adapter_config.json").is_file()
    copy = _without_final(lora_run, tmp_path)
    ckpt, _ = load_run_model(copy)  # the adapters of step 6 on the base the run started from
    assert isinstance(ckpt, PeftModel)
    want = _logits(adapter, tok)
    assert torch.equal(want, _logits(ckpt, tok))
    merged, _ = load_run_model(lora_run, merge=True)
    assert not isinstance(merged, PeftModel)
    torch.testing.assert_close(_logits(merged, tok), want, rtol=1e-5, atol=1e-5)
    base, _ = load_for_inference(str(lora_run / ".." / "pretrain"), "cpu")
    assert not torch.allclose(_logits(base, tok), want)  # the adapters changed something


def test_resolve_base_makes_a_model_folder_of_a_run_once(pretrain_run, lora_run, tmp_path):
    assert resolve_base(str(pretrain_run)) == str((pretrain_run / "final").resolve())  # nothing written
    lora = copy_run(lora_run, tmp_path / "lora")
    merged = resolve_base(str(lora))
    assert merged == str((lora / "merged").resolve()) and (lora / "merged" / "config.json").is_file()
    stamp = (lora / "merged" / "config.json").stat().st_mtime_ns
    assert resolve_base(str(lora)) == merged and (lora / "merged" / "config.json").stat().st_mtime_ns == stamp
    assert runs.base_label(merged) == "lora"
    bare = _without_final(pretrain_run, tmp_path / "b")
    out = resolve_base(str(bare))
    assert out == str((bare / "exports" / "step-00000010").resolve())
    model, tok = load_for_inference(out, "cpu")
    final, _ = load_for_inference(str(pretrain_run), "cpu")
    assert torch.equal(_logits(model, tok), _logits(final, tok))
    assert resolve_base("mamba-swelu-tiny") == "mamba-swelu-tiny"
