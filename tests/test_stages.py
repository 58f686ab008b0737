"""Multi-stage runs: one spec, one run folder, each stage from the previous stage's model; a rerun skips
finished stages."""

import json

import pytest
import yaml

from lmlab.errors import ConfigError
from lmlab.train.stages import resume_stages, train_stages

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)


def test_two_stages_chain_and_rerun_skips(tmp_path, stdlib_tokenizer_dir):
    rows = [{"instruction": f"Double {a}.", "output": str(2 * a)} for a in range(40)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": f"Double {a}.", "chosen": str(2 * a), "rejected": str(a)} for a in range(1, 40)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    spec = {
        "model": {"name": "llama-tiny"},
        "data": {"tokenizer": str(stdlib_tokenizer_dir), "seq_len": 32, "val_fraction": 0.1},
        "train": {"batch_size": 4, "threads": 1, "progress": False, "sample_tokens": 2, "warmup_steps": 0,
                  "eval_every": 1000, "eval_batches": 1, "log_every": 1, "lr": 3e-3},
        "run": {"name": "chain", "out_dir": str(tmp_path / "runs")},
        "stages": [
            {"name": "sft", "data": {"source": str(tmp_path / "a.jsonl")},
             "train": {"objective": "sft", "max_steps": 3}},
            {"name": "dpo", "data": {"source": str(tmp_path / "p.jsonl")}, "finetune": {"method": "lora"},
             "train": {"objective": "dpo", "max_steps": 2, "lr": 1e-3}},
        ],
    }
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = train_stages(path, echo=lambda *a: None)
    summary = json.loads((run / "stages.json").read_text())
    assert [summary[s]["status"] for s in ("sft", "dpo")] == ["finished", "finished"]
    first, second = run / "stages" / "0-sft", run / "stages" / "1-dpo"
    cfg2 = yaml.safe_load((second / "config.yaml").read_text())
    assert cfg2["model"]["name"] == str((first / "final").resolve())  # stage 2 starts from stage 1's model
    assert cfg2["train"]["lr"] == 1e-3 and cfg2["data"]["seq_len"] == 32
    assert (second / "final" / "adapter_config.json").is_file()
    assert any(json.loads(x).get("rewards/margins") is not None
               for x in (second / "metrics.jsonl").read_text().splitlines())
    lines = []
    resume_stages(run, echo=lines.append)
    assert sum("finished already" in line for line in lines) == 2


def test_bad_stage_is_refused_before_any_compute(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"run": {"out_dir": str(tmp_path / "runs")},
                                    "stages": [{"name": "a", "train": {"max_steps": 1}},
                                               {"name": "b", "train": {"lr": -1}}]}))
    with pytest.raises(ConfigError, match=r"stages\[1\] \(b\): train.lr"):
        train_stages(path)
    assert not (tmp_path / "runs").exists()
