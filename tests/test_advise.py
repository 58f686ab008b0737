"""lmlab advise: configs that pass and fail each rule of thumb, the overall score, recipes, run folders, the CLI."""

import argparse
import json

import pytest
import yaml

from lmlab.config import from_dict, save_config, validate
from lmlab.errors import ConfigError
from lmlab.plan.advise import BAD, GOOD, INFO, WARN, advise, advise_spec, judge, pretrain_lr_of

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
M124 = 124_000_000


def cfg(train=None, finetune=None, data=None, model="mamba-swelu-tiny"):
    c = from_dict({"model": {"name": model}, "data": {"seq_len": 64, **(data or {})},
                   "train": {"objective": "sft", "max_steps": 3000, "warmup_steps": 100, "lr": 7e-6,
                             "batch_size": 8, "grad_accum": 16, **(train or {})},
                   "finetune": finetune or {}})
    validate(c)
    return c


def verdict(adv, name):
    return next(c for c in adv.criteria if c.name == name).verdict


def test_judge_scores_inside_and_outside():
    assert judge(5, 1, 10) == (GOOD, 10.0)
    v, s = judge(20, 1, 10, tol=2)
    assert v == WARN and s == pytest.approx(5.0)
    v, s = judge(100, 1, 10, tol=2)
    assert v == BAD and s == 0.0
    assert judge(0, 1, 10)[0] == BAD


@pytest.mark.parametrize("params,method,lr,want", [
    (M124, "full", 7e-6, GOOD), (M124, "full", 2e-5, GOOD), (M124, "full", 1e-4, GOOD), (M124, "full", 5e-4, WARN),
    (M124, "full", 3e-3, BAD), (M124, "full", 1.5e-6, WARN), (M124, "full", 1e-7, BAD),
    (1_000_000, "full", 1e-3, GOOD), (1_000_000, "full", 1e-5, WARN), (1_000_000, "full", 1e-6, BAD),
    (7_000_000_000, "full", 2e-5, GOOD), (7_000_000_000, "full", 1e-6, GOOD), (7_000_000_000, "full", 3e-4, BAD),
    (65_000_000_000, "full", 1e-5, GOOD), (65_000_000_000, "full", 1e-4, BAD),
    (M124, "lora", 1e-4, GOOD), (M124, "lora", 1e-5, BAD), (7_000_000_000, "lora", 2e-4, GOOD),
    (7_000_000_000, "lora", 1e-6, BAD), (M124, "qlora", 2e-4, GOOD),
])
def test_learning_rate_scales_with_model_size(params, method, lr, want):
    """Small models take higher LRs (the pretraining LR ∝ N^-0.4, GPT-3's table); adapters higher than full."""
    adv = advise(cfg({"lr": lr}, {"method": method}), params=params)
    assert verdict(adv, "learning rate") == want


def test_pretraining_lr_follows_the_gpt3_table():
    from lmlab.plan.advise import pretrain_lr_for

    assert pretrain_lr_for(125e6) == pytest.approx(6e-4)
    assert pretrain_lr_for(6.7e9) == pytest.approx(1.2e-4, rel=0.1)  # GPT-3 6.7B: 1.2e-4
    assert pretrain_lr_for(1e6) > 3e-3  # the quickstart pretrains its 1M model at 3e-3


def test_dpo_learning_rate_and_beta():
    good = advise(cfg({"objective": "dpo", "lr": 5e-7}, {"dpo_beta": 0.1}), params=M124)
    assert verdict(good, "learning rate") == GOOD and verdict(good, "DPO β") == GOOD
    bad = advise(cfg({"objective": "dpo", "lr": 1e-4}, {"dpo_beta": 2.0}), params=M124)
    assert verdict(bad, "learning rate") == BAD and verdict(bad, "DPO β") == BAD
    lora = advise(cfg({"objective": "dpo", "lr": 2e-5}, {"method": "lora"}), params=M124)
    assert verdict(lora, "learning rate") == GOOD


@pytest.mark.parametrize("objective,lr,want", [
    ("ipo", 1e-6, GOOD), ("ipo", 1e-4, BAD), ("simpo", 5e-7, GOOD), ("simpo", 1e-5, BAD), ("orpo", 8e-6, GOOD),
    ("kto", 5e-7, GOOD), ("grpo", 1e-6, GOOD), ("grpo", 1e-4, BAD),
])
def test_preference_objectives_use_their_papers_ranges(objective, lr, want):
    c = from_dict({"model": {"name": "mamba-swelu-tiny"}, "data": {"seq_len": 64},
                   "train": {"objective": objective, "max_steps": 1000, "warmup_steps": 30, "lr": lr}})
    assert verdict(advise(c, params=M124), "learning rate") == want


def test_an_objective_without_rules_is_not_scored():
    c = cfg()
    c.train.objective = "my-objective"  # a registered third-party objective: no LR rules, the rest still apply
    adv = advise(c, params=M124)
    lr = next(c for c in adv.criteria if c.name == "learning rate")
    assert lr.verdict == INFO and lr.score is None and "no rules for objective 'my-objective'" in lr.advice
    assert verdict(adv, "warmup") == GOOD


def test_fine_tune_lr_against_the_pretraining_lr(tmp_path):
    assert verdict(advise(cfg({"lr": 1e-5}), params=M124, pretrain_lr=4e-4), "LR vs pretraining") == GOOD  # ÷40
    assert verdict(advise(cfg({"lr": 1e-3}), params=M124, pretrain_lr=3e-3), "LR vs pretraining") == GOOD  # ÷3
    assert verdict(advise(cfg({"lr": 1e-6}), params=M124, pretrain_lr=3e-3), "LR vs pretraining") == BAD  # ÷3000
    assert verdict(advise(cfg({"lr": 1e-5}), params=M124), "LR vs pretraining") == INFO
    run = tmp_path / "pre"
    (run / "final").mkdir(parents=True)
    save_config(from_dict({"train": {"lr": 6e-4}}), run / "config.yaml")
    (run / "run.json").write_text("{}")
    assert pretrain_lr_of(str(run / "final")) == (6e-4, str(run))
    assert pretrain_lr_of(str(run)) == (6e-4, str(run))
    assert pretrain_lr_of(str(tmp_path / "elsewhere")) is None


@pytest.mark.parametrize("hardware,batch,accum,gpus,want", [
    ("rtx4090", 8, 24, 1, GOOD), ("rtx4090", 8, 4, 6, GOOD), ("rtx4090", 8, 8, 1, WARN), ("rtx4090", 8, 2, 1, BAD),
    ("a100-80", 8, 64, 1, GOOD), ("a100-80", 8, 16, 1, WARN), (None, 8, 16, 1, GOOD), (None, 4, 4, 1, BAD),
])
def test_effective_batch_by_gpu_memory(hardware, batch, accum, gpus, want):
    adv = advise(cfg({"batch_size": batch, "grad_accum": accum}), params=7_000_000_000, hardware=hardware, gpus=gpus)
    assert adv.effective_batch == batch * accum * gpus
    assert verdict(adv, "effective batch") == want


@pytest.mark.parametrize("params,eff,want", [(M124, 32, GOOD), (M124, 16, WARN), (1_000_000, 16, GOOD),
                                             (1_000_000, 8, GOOD), (1_000_000, 2, BAD), (7_000_000_000, 32, BAD)])
def test_small_models_train_with_smaller_batches(params, eff, want):
    adv = advise(cfg({"batch_size": eff, "grad_accum": 1}), params=params)
    assert verdict(adv, "effective batch") == want


def test_adapters_train_with_small_batches():
    adv = advise(cfg({"lr": 1e-4, "batch_size": 8, "grad_accum": 4}, {"method": "lora"}), params=M124)
    assert verdict(adv, "effective batch") == GOOD


def test_memory_fits_or_not():
    assert verdict(advise(cfg(), hardware="rtx4090"), "memory per GPU") == GOOD
    huge = cfg({"batch_size": 256, "grad_accum": 1}, data={"seq_len": 1024}, model="mamba-swelu-124m")
    adv = advise(huge, hardware="rtx3090")
    assert verdict(adv, "memory per GPU") == BAD
    assert "does not fit" in next(c.advice for c in adv.criteria if c.name == "memory per GPU")


@pytest.mark.parametrize("steps,examples,want", [(1219, 52002, GOOD), (25000, 114000, BAD), (300, 52002, BAD),
                                                 (600, 52002, WARN), (117, 1000, GOOD), (400, 1000, BAD)])
def test_epochs_when_the_data_size_is_known(steps, examples, want):
    adv = advise(cfg({"max_steps": steps, "warmup_steps": 100}), params=M124, examples=examples)
    assert verdict(adv, "epochs") == want
    assert verdict(advise(cfg(), params=M124), "epochs") == INFO  # unknown data size: not scored


def test_epochs_advice_gives_the_step_range():
    adv = advise(cfg({"max_steps": 25000, "warmup_steps": 1000, "batch_size": 8, "grad_accum": 24}), params=M124,
                 examples=114000)
    c = next(c for c in adv.criteria if c.name == "epochs")
    assert c.value.startswith("42.1") and "2–5 epochs = 1,188–2,968 steps" in c.advice


@pytest.mark.parametrize("steps,warmup,want", [
    (3000, 100, GOOD), (3000, 15, WARN), (3000, 1000, BAD), (10000, 300, GOOD), (10000, 20, BAD),
    (25000, 1000, GOOD), (75000, 150, GOOD), (25000, 10, BAD), (3000, 0, WARN),
    (30, 3, GOOD), (30, 50, BAD), (300, 30, GOOD), (40, 100, BAD),
])
def test_warmup_is_a_fraction_of_the_budget(steps, warmup, want):
    adv = advise(cfg({"max_steps": steps, "warmup_steps": warmup}), params=M124)
    assert verdict(adv, "warmup") == want


def test_a_warmup_longer_than_the_cap_says_what_the_trainer_does():
    adv = advise(cfg({"max_steps": 30, "warmup_steps": 100}), params=M124)
    c = next(c for c in adv.criteria if c.name == "warmup")
    assert c.verdict == BAD and "shortens it to 3 steps (10% of the budget)" in c.advice
    from lmlab.train.optim import warmup_steps

    assert warmup_steps(100, 30) == 3  # the trainer's own cap, the one advise quotes


@pytest.mark.parametrize("rank,alpha,want", [(16, 32, GOOD), (64, 128, GOOD), (8, 16, WARN), (256, 32, BAD)])
def test_lora_rank_and_alpha(rank, alpha, want):
    adv = advise(cfg({"lr": 1e-4}, {"method": "lora", "lora_rank": rank, "lora_alpha": alpha}), params=M124)
    assert verdict(adv, "LoRA rank / alpha") == want


def test_pretraining_configs_are_refused():
    c = from_dict({"model": {"name": "mamba-swelu-tiny"}})
    with pytest.raises(ConfigError, match="fine-tuning"):
        advise(c)


def test_overall_score_is_the_mean_of_scored_criteria():
    adv = advise(cfg({"lr": 3e-3, "max_steps": 25000, "warmup_steps": 1000}), params=M124, examples=1000)
    scored = [c.score for c in adv.criteria if c.score is not None]
    assert adv.score == pytest.approx(sum(scored) / len(scored), abs=0.05)
    assert adv.score < 8
    good = advise(cfg({"max_steps": 1219, "warmup_steps": 100, "lr": 7e-6}), params=M124, examples=52002,
                  pretrain_lr=6e-4)
    assert good.score == 10.0 and all(c.verdict in (GOOD, INFO) for c in good.criteria)


def test_the_production_recipe(tmp_path):
    adv = advise_spec("production", ["train.grad_accum=4"], hardware="rtx4090", gpus=6)
    assert adv.effective_batch == 192
    got = {c.name: c.verdict for c in adv.criteria}
    assert got["learning rate"] == GOOD and got["warmup"] == GOOD and got["effective batch"] == GOOD
    assert got["memory per GPU"] == GOOD and got["epochs"] == BAD  # 42 epochs of 114k examples


def test_a_run_folder_gives_its_data_size_and_devices(tmp_path):
    run = tmp_path / "sft-run"
    run.mkdir()
    c = cfg({"max_steps": 1000, "batch_size": 4, "grad_accum": 8, "warmup_steps": 100})
    save_config(c, run / "config.yaml")
    (run / "run.json").write_text(json.dumps({"tokens_per_step": 4 * 8 * 64 * 2, "data": {"examples": {"train":
                                                                                                       32000}}}))
    adv = advise_spec(str(run))
    assert adv.effective_batch == 64  # two ranks
    assert next(c for c in adv.criteria if c.name == "epochs").value.startswith("2.0")


def test_recipe_file_with_header_and_unknown_subject(tmp_path):
    from lmlab.recipes import RECIPES_DIR

    f = tmp_path / "mine.yaml"
    f.write_text((RECIPES_DIR / "alpaca.yaml").read_text())  # the `recipe:` header is not a config section
    adv = advise_spec(str(f))
    assert verdict(adv, "epochs") == GOOD  # the header's data size is used
    with pytest.raises(ConfigError, match="not a config file"):
        advise_spec("no-such-recipe")


def test_command_table_and_json(capsys):
    from lmlab.commands import advise as cmd

    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    assert cmd.run(p.parse_args(["alpaca", "train.lr=1e-5", "--hardware", "rtx4090"])) == 0
    out = capsys.readouterr().out
    for needle in ("criterion", "learning rate", "effective batch", "warmup", "overall:", "/10"):
        assert needle in out
    assert cmd.run(p.parse_args(["dolly", "--json"])) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["subject"] == "recipe dolly" and d["effective_batch"] == 32 and 0 <= d["score"] <= 10
    assert yaml.safe_dump(d)  # plain data


def test_every_shipped_recipe_scores_what_its_results_earn():
    """lmlab's own recipes (their sources' settings) score 7/10 or more; what keeps one below 10 is named."""
    from lmlab.recipes import list_recipes, load_recipe

    scores = {}
    for meta in list_recipes():
        if (load_recipe(meta["name"])[1].get("train") or {}).get("objective", "pretrain") == "pretrain":
            continue  # advise scores fine-tuning
        scores[meta["name"]] = advise_spec(meta["name"]).score
    assert "quickstart-sft" in scores and "quickstart" not in scores
    assert min(scores.values()) >= 7.0, scores
    assert scores["quickstart-sft"] == 10.0 and scores["alpaca"] == 10.0


def test_clearly_bad_settings_still_score_low():
    """The walk-through's tiny model at a 7B model's LR, a warmup longer than the run, a batch of 2."""
    bad = advise(cfg({"lr": 1e-7, "max_steps": 30, "warmup_steps": 100, "batch_size": 2, "grad_accum": 1}),
                 params=955_274, examples=6000)
    assert bad.score < 3.0 and all(c.verdict in (BAD, INFO) for c in bad.criteria)
    assert advise(cfg({"lr": 1e-2}), params=7_000_000_000).score < 8


def test_a_printed_recipe_file_keeps_its_data_size(tmp_path, capsys):
    """`lmlab recipes show alpaca > alpaca.yaml` then `lmlab advise alpaca.yaml`: the header is read back."""
    from lmlab.cli import main
    from lmlab.config import load_config

    assert main(["recipes", "show", "alpaca"]) == 0
    f = tmp_path / "alpaca.yaml"
    f.write_text(capsys.readouterr().out)
    load_config(f)  # still a config file every command reads
    adv = advise_spec(str(f))
    assert next(c for c in adv.criteria if c.name == "epochs").value.endswith("/ 52,002)")
    assert main(["recipes", "show", "alpaca", "--micro-batch", "4"]) == 0
    f.write_text(capsys.readouterr().out)
    load_config(f)
    assert verdict(advise_spec(str(f)), "epochs") == GOOD
