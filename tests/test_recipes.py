"""Recipes: every preset loads and validates with its sources' numbers, adapts to devices keeping the effective
batch, prints as a config file, and runs end to end (a few steps of a tiny model on CPU) with its numbers kept
in the run's resolved config.yaml."""

import argparse
import importlib
import json
import random

import pytest
import torch
import yaml

from lmlab.config import from_dict, load_config, validate
from lmlab.errors import ConfigError
from lmlab.recipes import adapt_to_devices, effective_batch, list_recipes, load_recipe, recipe_text

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)

QUICKSTART = ("quickstart", "quickstart-sft")  # the quickstart's own settings, not fine-tuning presets
TUNING = [r["name"] for r in list_recipes() if r["name"] not in QUICKSTART]
# the recipes this file runs end to end: SFT and DPO (each other objective's recipe is run by its own tests)
SFT_DPO = [n for n in TUNING if (load_recipe(n)[1].get("train") or {}).get("objective") in ("sft", "dpo")]

# name -> what its sources say: train.*, finetune.*, data.* values and the effective batch
EXPECTED = {
    "alpaca": dict(lr=2e-5, batch=128, warmup_steps=100, epochs=3, max_steps=1219, method="full"),
    "vicuna": dict(lr=2e-5, batch=128, seq_len=2048, warmup_steps=49, max_steps=1641),
    "lora": dict(lr=1e-4, batch=32, method="lora", lora_rank=16, lora_alpha=32.0),
    "llama2-chat": dict(lr=1e-5, final_lr=5e-6, schedule="cosine", batch=256, seq_len=4096),
    "dolly": dict(lr=1e-5, batch=32, warmup_steps=50),
    "qlora": dict(lr=2e-4, method="qlora"),
    "lima": dict(lr=1e-5, batch=32, max_examples=[1000], examples=1000),
    "dpo": dict(lr=5e-7, objective="dpo", dpo_beta=0.1),
    "grpo": dict(lr=1e-6, objective="grpo", batch=64),
    "orpo": dict(lr=8e-6, objective="orpo", batch=64),
    "kto": dict(lr=5e-7, objective="kto", batch=64),
    "simpo": dict(lr=6e-7, objective="simpo", batch=128),
    "multistage": dict(stage_lrs=[1e-5, 5e-6, 2e-6]),
    "production": dict(lr=5e-6, batch=192, warmup_steps=1000, max_steps=25000, examples=114000,
                       sources=["hf:tatsu-lab/alpaca", "hf:databricks/databricks-dolly-15k",
                                "hf:OpenAssistant/oasst1"]),
    "production-fast": dict(lr=1e-5, warmup_steps=500, max_steps=15000),
    "production-ultrafast": dict(lr=2e-5, warmup_steps=200, max_steps=5000),
}


def test_every_recipe_is_listed_and_documented():
    names = [r["name"] for r in list_recipes()]
    assert set(EXPECTED) <= set(names) and "quickstart" in names
    for r in list_recipes():
        assert r["description"], r["name"]
        if r["name"] not in QUICKSTART:
            assert r["source"] and r["effective_batch"] >= 1, r["name"]


@pytest.mark.parametrize("name", TUNING)
def test_recipe_validates_with_its_numbers(name):
    meta, d = load_recipe(name)
    assert "recipe" not in d and "stages" not in d  # meta blocks are not config sections
    cfg = from_dict(d)
    validate(cfg)
    assert cfg.train.objective != "pretrain"
    assert meta["effective_batch"] == effective_batch(d) == cfg.train.batch_size * cfg.train.grad_accum
    exp = EXPECTED.get(name, {})
    t, ft = cfg.train, cfg.finetune
    checks = {
        "lr": t.lr, "batch": meta["effective_batch"], "warmup_steps": t.warmup_steps, "max_steps": t.max_steps,
        "method": ft.method, "lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha, "dpo_beta": ft.dpo_beta,
        "objective": t.objective, "seq_len": cfg.data.seq_len, "schedule": t.schedule,
        "max_examples": ft.max_examples, "sources": cfg.data.source, "epochs": meta.get("epochs"),
        "examples": meta.get("examples"), "final_lr": t.lr * t.min_lr_ratio,
    }
    for key, want in exp.items():
        if key == "stage_lrs":
            continue
        got = checks[key]
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, (name, key, got, want)
    if "epochs" in exp:  # the step budget is the stated number of epochs of the stated data
        assert t.max_steps == -(-exp["epochs"] * meta["examples"] // meta["effective_batch"])  # rounded up
    if cfg.data.seq_len > 1024:  # long contexts raise the named size's limit with it
        assert cfg.model.overrides["max_seq_len"] >= cfg.data.seq_len


def test_lora_and_warmup_ranges_as_stated():
    _, lora = load_recipe("lora")
    assert 16 <= lora["finetune"]["lora_rank"] <= 64 and 32 <= lora["finetune"]["lora_alpha"] <= 128
    _, vicuna = load_recipe("vicuna")
    assert vicuna["train"]["warmup_steps"] == round(0.03 * vicuna["train"]["max_steps"])


def test_multistage_stages_lower_the_lr():
    meta, d = load_recipe("multistage")
    assert len(meta["stages"]) == 3
    lrs = []
    for k in (1, 2, 3):
        m, sd = load_recipe("multistage", stage=k)
        cfg = from_dict(sd)
        validate(cfg)
        lrs.append(cfg.train.lr)
    assert lrs == pytest.approx(EXPECTED["multistage"]["stage_lrs"])
    assert from_dict(d).train.lr == lrs[0]  # the shared sections are stage 1's
    with pytest.raises(ConfigError, match="stages 1 to 3"):
        load_recipe("multistage", stage=4)
    with pytest.raises(ConfigError, match="no stages"):
        load_recipe("alpaca", stage=1)


def test_unknown_recipe_names_the_available_ones():
    with pytest.raises(ConfigError, match="available: .*alpaca"):
        load_recipe("alpacca")


@pytest.mark.parametrize("name", TUNING)
def test_shown_recipe_is_a_loadable_config(name, tmp_path):
    path = tmp_path / f"{name}.yaml"
    path.write_text(recipe_text(name))
    assert "\nrecipe:" not in "\n" + path.read_text()  # the header is commented out
    if name == "multistage":
        from lmlab.train.stages import load_spec, stage_configs  # the finetune command's stage runner

        lrs = [c.train.lr for _, c in stage_configs(load_spec(path))]
        assert lrs == pytest.approx(EXPECTED[name]["stage_lrs"])
    else:
        assert load_config(path).train.lr == pytest.approx(load_recipe(name)[1]["train"]["lr"])


@pytest.mark.parametrize("name", ["alpaca", "production", "llama2-chat", "lora"])
@pytest.mark.parametrize("micro,world", [(1, 1), (4, 2), (3, 1), (8, 4), (64, 1), (5, 2)])
def test_adapt_to_devices_keeps_the_effective_batch(name, micro, world):
    _, d = load_recipe(name)
    target = effective_batch(d)
    if target % world:
        pytest.skip("not evenly divisible")
    out = adapt_to_devices(d, micro, world)
    t = out["train"]
    assert t["batch_size"] * t["grad_accum"] * world == target
    assert 1 <= t["batch_size"] <= micro
    assert d["train"]["batch_size"] * d["train"]["grad_accum"] == target  # the input is not modified
    validate(from_dict(out))


def test_adapt_to_devices_refuses_what_cannot_be_split():
    _, d = load_recipe("production")  # 192
    with pytest.raises(ConfigError, match="cannot be split evenly over 5 devices"):
        adapt_to_devices(d, 8, 5)
    out = adapt_to_devices(d, 8, 6)  # the users' 6 GPUs: 8 × 4 × 6
    assert (out["train"]["batch_size"], out["train"]["grad_accum"]) == (8, 4)
    assert adapt_to_devices(d, 7, 1)["train"]["batch_size"] == 6  # the largest divisor of 192 under 7


def _command(name):
    """The command's module run as `lmlab NAME ...` would run it."""
    from lmlab import cli

    def run(argv):
        if name in cli.COMMANDS:
            return cli.main([name, *argv])
        mod = importlib.import_module(f"lmlab.commands.{name}")
        p = argparse.ArgumentParser(prog=f"lmlab {name}")
        mod.add_arguments(p)
        return mod.run(p.parse_args(argv))

    return run


def test_recipes_command_lists_and_shows(capsys):
    assert _command("recipes")([]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        assert name in out
    assert _command("recipes")(["show", "dolly"]) == 0
    assert "warmup_steps: 50" in capsys.readouterr().out
    assert _command("recipes")(["show", "production", "--micro-batch", "8", "--devices", "6"]) == 0
    shown = capsys.readouterr().out
    assert "effective batch 192" in shown
    assert yaml.safe_load(shown)["train"]["grad_accum"] == 4
    assert _command("recipes")(["--json"]) == 0
    assert {r["name"] for r in json.loads(capsys.readouterr().out)} >= set(EXPECTED)


# ------------------------------------------------------------------------------------------------ end to end
TINY = ["model.name=mamba-swelu-tiny", "model.d_model=16", "model.n_layers=1", "model.dense_hidden=32",
        "data.seq_len=32", "train.max_steps=2", "train.eval_every=1000", "train.eval_batches=1",
        "train.save_every=1000", "train.log_every=1", "train.threads=1", "train.progress=false",
        "train.sample_tokens=2", "train.sample_prompts=[hi]"]
KEPT_TRAIN = ("lr", "warmup_steps", "schedule", "min_lr_ratio", "batch_size", "grad_accum", "weight_decay",
              "objective", "grad_clip")
KEPT_FINETUNE = ("method", "lora_rank", "lora_alpha", "lora_dropout", "dpo_beta", "max_examples")


@pytest.fixture(scope="module")
def e2e_data(tmp_path_factory):
    pytest.importorskip("lmlab.train.sft")
    from lmlab.data.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("recipe-e2e")
    tok = train_bpe("stdlib", 512, d / "tok", max_chars=200_000)
    assert len(tok) > 256
    r = random.Random(0)
    with open(d / "sft.jsonl", "w") as f:
        for _ in range(300):
            a, b = r.randint(0, 99), r.randint(0, 99)
            f.write(json.dumps({"instruction": f"Add {a} and {b}.", "input": "", "output": str(a + b)}) + "\n")
    with open(d / "pairs.jsonl", "w") as f:
        for i in range(150):
            a, b = r.randint(0, 99), r.randint(0, 99)
            pair = {"prompt": f"Add {a} and {b}.", "chosen": str(a + b), "rejected": str(a + b + 1 + i % 3)}
            f.write(json.dumps(pair) + "\n")
    return d


@pytest.mark.parametrize("name", SFT_DPO)
@pytest.mark.slow
def test_recipe_runs_end_to_end_and_keeps_its_numbers(name, e2e_data, tmp_path):
    pytest.importorskip("lmlab.train.sft")
    meta, d = load_recipe(name)
    cfg_file = tmp_path / f"{name}.yaml"
    cfg_file.write_text(recipe_text(name))
    objective = d["train"]["objective"]
    data = e2e_data / ("pairs.jsonl" if objective == "dpo" else "sft.jsonl")
    overrides = [*TINY, f"data.tokenizer={e2e_data / 'tok'}", f"data.source=[{data}]", f"run.out_dir={tmp_path}",
                 f"run.name={name}"]
    expected = from_dict(d)
    if expected.finetune.method == "qlora" and not torch.cuda.is_available():
        overrides.append("finetune.method=lora")  # 4-bit bases need CUDA (bitsandbytes); the rest is kept
    command = "dpo" if objective == "dpo" else "finetune"
    assert _command(command)(["-c", str(cfg_file), *overrides]) == 0

    if meta["stages"]:
        run_dirs = sorted((tmp_path / name / "stages").iterdir())
        assert len(run_dirs) == len(meta["stages"])
        expectations = [from_dict(load_recipe(name, stage=k)[1]) for k in range(1, len(run_dirs) + 1)]
    else:
        run_dirs, expectations = [tmp_path / name], [expected]
    for run_dir, exp in zip(run_dirs, expectations):
        resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
        for key in KEPT_TRAIN:
            assert resolved["train"][key] == getattr(exp.train, key), (name, key)
        for key in KEPT_FINETUNE:
            if key == "method" and "finetune.method=lora" in overrides:
                continue
            assert resolved["finetune"][key] == getattr(exp.finetune, key), (name, key)
        assert resolved["train"]["max_steps"] == 2
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_steps = [m for m in metrics if m.get("kind") == "train"]
        assert train_steps and all(m["loss"] == m["loss"] for m in train_steps)  # finite, logged
        assert (run_dir / "final").is_dir()
