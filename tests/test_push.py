"""lmlab push, up to the upload call (no network here): HfApi.create_repo and upload_folder are replaced by
recorders, so the tests see the repository id, the private flag and the exact files that would be sent."""

import json

import pytest

from lmlab.cli import main
from lmlab.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
COMMON = ["data.source=stdlib", "data.max_docs=20", "train.batch_size=4", "train.eval_every=1000",
          "train.eval_batches=1", "train.log_every=2", "train.threads=1", "train.progress=false",
          "train.sample_tokens=2", "train.warmup_steps=0"]


def _train(overrides):
    from lmlab.train.loop import train

    train(load_config(None, overrides), echo=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny llama pretraining run and a LoRA run on top of it."""
    from lmlab.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("push")
    train_bpe("stdlib", 300, root / "tok", max_chars=100_000)
    _train(["model.name=llama-tiny", "model.hidden_size=32", "model.intermediate_size=64",
            "model.num_hidden_layers=1", *COMMON, f"data.tokenizer={root / 'tok'}", "data.seq_len=32",
            "train.max_steps=4", f"run.out_dir={root / 'runs'}", "run.name=base"])
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"} for a in range(6) for b in range(6)]
    (root / "add.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _train([f"model.name={root / 'runs' / 'base' / 'final'}", "train.objective=sft", "finetune.method=lora",
            *COMMON, f"data.source={root / 'add.jsonl'}", f"data.tokenizer={root / 'runs' / 'base' / 'final'}",
            "data.seq_len=32", "data.val_fraction=0.1", "train.max_steps=2", "finetune.lora_rank=2",
            f"run.out_dir={root / 'runs'}", "run.name=lora"])
    return root / "runs"


@pytest.fixture
def hub(monkeypatch):
    """Record what HfApi would do; a token in HF_TOKEN; offline mode (set for the whole suite) lifted."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw, self.token))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        from lmlab.ship.push import folder_files

        calls.append(("upload_folder", repo_id, kw, sorted(f for f, _ in folder_files(folder_path))))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    from lmlab.hub import OFFLINE_VARS

    for var in OFFLINE_VARS:  # every variable lmlab reads as offline mode (lm-eval runs set HF_DATASETS_OFFLINE)
        monkeypatch.delenv(var, raising=False)
    return calls


def test_push_creates_a_private_repo_and_uploads_model_tokenizer_and_card(runs, hub, capsys):
    assert main(["push", str(runs / "base"), "me/tiny"]) == 0
    (_, repo, kw, token), (_, repo2, up, files) = hub
    assert (repo, repo2, token) == ("me/tiny", "me/tiny", "hf_test_token")
    assert kw["private"] is True and kw["exist_ok"] is True and kw["repo_type"] == "model"
    assert files == ["README.md", "config.json", "generation_config.json", "loss.png", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]
    assert up["allow_patterns"] == files
    assert "pushed    https://huggingface.co/me/tiny/commit/abc" in capsys.readouterr().out


def test_public_flag_and_lora_adapter_or_merged_by_choice(runs, hub):
    assert main(["push", str(runs / "lora"), "me/adapter", "--public"]) == 0
    assert hub[0][2]["private"] is False
    adapter = hub[1][3]
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(adapter)
    assert "model.safetensors" not in adapter
    hub.clear()
    assert main(["push", str(runs / "lora"), "me/merged", "--merge"]) == 0
    merged = hub[1][3]
    assert {"config.json", "model.safetensors", "README.md"} <= set(merged) and "adapter_config.json" not in merged


def test_gguf_push_uploads_the_file_and_its_card(runs, hub):
    assert main(["push", str(runs / "base"), "me/gguf", "--format", "gguf", "--dtype", "q8_0"]) == 0
    assert hub[1][3] == ["README.md", "loss.png", "model-q8_0.gguf"]


def test_dry_run_lists_files_and_sends_nothing(runs, hub, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(runs / "base"), "me/tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert hub == []
    assert "would upload 7 files" in out and "model.safetensors" in out and "README.md" in out
    assert "dry run: nothing sent (no token found" in out


@pytest.mark.parametrize("argv, message", [
    (["me/tiny"], "no Hugging Face token: set HF_TOKEN or run `hf auth login`"),
    (["not a repo"], "repository 'not a repo': expected ORG/NAME"),
    (["me/tiny", "--adapter-only"], "--adapter-only: "),
    (["me/tiny", "--dtype", "q8_0"], "--dtype applies to --format gguf"),
])
def test_refusals_are_one_line_and_exit_2(runs, hub, monkeypatch, capsys, argv, message):
    if "no Hugging Face token" in message:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(runs / "base"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmlab push: error: ") and message in err[0], err
    assert hub == []


def test_offline_mode_refuses_before_any_call(runs, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(runs / "base"), "me/tiny"]) == 2
    assert "offline mode is set" in capsys.readouterr().err
    assert hub == []


def test_an_exported_folder_is_uploaded_as_it_is(runs, hub, tmp_path):
    assert main(["export", str(runs / "base"), "-o", str(tmp_path / "out")]) == 0
    (tmp_path / "out" / "notes.txt").write_text("mine\n")
    assert main(["push", str(tmp_path / "out"), "me/as-is"]) == 0
    assert "notes.txt" in hub[1][3] and "README.md" in hub[1][3]
    assert main(["push", str(tmp_path / "out"), "me/as-is", "--merge"]) == 2  # flags are for run folders
