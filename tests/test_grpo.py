"""GRPO: advantages and the clipped loss (three aggregations, KL, clip-higher) against hand computations; the
built-in rewards and prompt sets; tiny runs through the trainer (slow): the logs and sample file, a learnable
reward rising, exact resume after a SIGKILL with rollouts pending (and a control that drops them, which must
differ), 2-rank DDP, hostile code in the sandbox while training, and an SFT → GRPO multi-stage run.

Run as a script (`python tests/test_grpo.py KILL_AT RUN_DIR_OR_- ARGS…`) this file trains with a SIGKILL at the
start of step KILL_AT (or resumes RUN_DIR with `--drop-rollouts` as the control)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.config import load_config
from lmlab.train.grpo import group_advantages, grpo_terms, token_logps

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny runs: one intra-op thread (conftest)
HERE = Path(__file__).resolve()
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONUNBUFFERED": "1"}


# ------------------------------------------------------------------------------------------- the maths
def test_group_advantages_normalise_within_each_group():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, std = group_advantages(r, 4, "group")
    s = torch.tensor([1.0, 0, 0, 0]).std().item()  # unbiased, as TRL
    assert adv[:4].tolist() == pytest.approx([0.75 / (s + 1e-4), -0.25 / (s + 1e-4), -0.25 / (s + 1e-4),
                                              -0.25 / (s + 1e-4)])
    assert adv[4:].tolist() == [0.0] * 4 and std[4:].tolist() == [0.0] * 4 and std[0].item() == pytest.approx(s)
    none, _ = group_advantages(r, 4, "none")  # Dr. GRPO: no division
    assert none.tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    batch, _ = group_advantages(r, 4, "batch")
    assert batch.tolist() == pytest.approx((none / (r.std() + 1e-4)).tolist())


def _case():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.5, -2.0, -0.1], [-0.3, -0.2, 0.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.2, -1.8, -0.4], [-0.5, -1.1, 0.0]], dtype=torch.float64)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return logp, old, ref, adv, mask


def _hand(logp, old, ref, adv, mask, eps_lo, eps_hi, beta):
    """Per-token loss, its derivative and the KL, one token at a time."""
    out = []
    for i in range(2):
        for t in range(3):
            if not mask[i, t]:
                continue
            lp, o, rf, a = logp[i, t].item(), old[i, t].item(), ref[i, t].item(), adv[i].item()
            rho = math.exp(lp - o)
            c = min(max(rho, 1 - eps_lo), 1 + eps_hi)
            unclipped = rho * a <= c * a  # min(ρA, clip(ρ)A) picks ρA: the gradient flows
            loss = -min(rho * a, c * a)
            grad = -rho * a if unclipped else 0.0
            kl = math.exp(rf - lp) - (rf - lp) - 1
            loss += beta * kl
            grad += beta * (-math.exp(rf - lp) + 1)
            clipped = (rho < 1 - eps_lo and a < 0) or (rho > 1 + eps_hi and a > 0)
            out.append((i, t, loss, grad, kl, clipped))
    return out


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_clipped_loss_and_gradient_by_hand(loss_type):
    logp, old, ref, adv, mask = _case()
    eps_lo, eps_hi, beta, max_len = 0.2, 0.28, 0.04, 4
    n_tok = int(mask.sum())
    tok_scale = 2 / n_tok  # completions / completion tokens of the step
    loss, m = grpo_terms(logp, old, ref, adv, mask, epsilon=eps_lo, epsilon_high=eps_hi, beta=beta,
                         loss_type=loss_type, tok_scale=tok_scale, max_len=max_len)
    toks = _hand(logp, old, ref, adv, mask, eps_lo, eps_hi, beta)
    lens = [int(mask[i].sum()) for i in range(2)]
    weight = {"grpo": lambda i: 1 / lens[i], "dapo": lambda i: tok_scale, "dr_grpo": lambda i: 1 / max_len}[loss_type]
    assert loss.item() == pytest.approx(sum(w * weight(i) for i, _, w, *_ in toks))
    loss.backward()
    expect = torch.zeros(2, 3, dtype=torch.float64)
    for i, t, _, g, _, _ in toks:
        expect[i, t] = g * weight(i)
    assert logp.grad.flatten().tolist() == pytest.approx(expect.flatten().tolist())
    # the trainer divides by 2 completions: kl and clip_ratio become means over the 5 completion tokens
    assert m["kl"].item() / 2 == pytest.approx(sum(k for *_, k, _ in toks) / n_tok)
    assert m["clip_ratio"].item() / 2 == pytest.approx(sum(c for *_, c in toks) / n_tok)
    assert sum(c for *_, c in toks) >= 1  # the case exercises clipping: ρ = e^0.5 > 1.28 with A > 0


def test_at_the_sampling_policy_the_loss_is_minus_the_mean_advantage_and_no_kl_without_beta():
    logp, _, _, adv, mask = _case()
    loss, m = grpo_terms(logp, logp.detach(), None, adv, mask, epsilon=0.2, epsilon_high=0.2, beta=0.0,
                         loss_type="grpo", tok_scale=1.0, max_len=3)
    assert loss.item() == pytest.approx(-(1.0 - 2.0)) and m["kl"].item() == 0 and m["clip_ratio"].item() == 0


def test_token_logps_are_the_labelled_next_token_log_probabilities():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    labels = torch.tensor([[-100, -100, 2, 5]])
    lp = torch.log_softmax(logits, -1)
    assert token_logps(logits, labels).tolist()[0] == pytest.approx([0.0, lp[0, 1, 2].item(), lp[0, 2, 5].item()])


def test_built_in_rewards_and_prompt_sets(tmp_path):
    from lmlab.data.prompts import arithmetic_problems, doctest_source, doctest_tests
    from lmlab.errors import ConfigError
    from lmlab.rewards import answer_reward, format_reward, resolve

    cfg = load_config(None, ["rl.answer_regex='answer: (-?\\d+)'"])  # quoted: YAML would read a mapping
    assert format_reward([""] * 3, [" 46", "46 apples", "-3\n"], config=cfg.rl) == [1.0, 0.0, 1.0]
    assert answer_reward([""] * 3, ["answer: 46", "answer: 045", "46"], answer=["46", "45", "46"],
                         config=cfg.rl) == [1.0, 1.0, 0.0]
    probs = arithmetic_problems(2, "+-", 50)
    assert len(set(probs)) == 50 and all(str(eval(q)) == a for q, a in probs)
    assert arithmetic_problems(2, "+-", 50) == probs  # a fixed set
    with pytest.raises(ConfigError, match="rl.reward_funcs: unknown reward"):
        resolve("nonsense")
    with pytest.raises(ConfigError, match="cannot import"):
        resolve("no_such_module_x:fn")
    src = 'def double(x):\n    """Twice x.\n\n    >>> double(2)\n    4\n    """\n    return 2 * x\n'
    name, doc = doctest_source(src)
    assert name == "double"
    ns: dict = {}
    exec(src, ns)
    exec(doctest_tests(doc), ns)  # passes for the reference
    ns2: dict = {}
    exec("def double(x):\n    return x\n", ns2)
    with pytest.raises(AssertionError):
        exec(doctest_tests(doc), ns2)


def test_bad_rl_values_are_refused_with_the_key():
    from lmlab.errors import ConfigError

    for override, key in [("rl.num_generations=1", "rl.num_generations"), ("rl.loss_type=ppo", "rl.loss_type"),
                          ("rl.reward_weights=[1, 2, 3]", "rl.reward_weights"),
                          ("rl.format_regex=(", "rl.format_regex"), ("rl.arithmetic_ops=/", "rl.arithmetic_ops"),
                          ("rl.epsilon=1.5", "rl.epsilon")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])


# ------------------------------------------------------------------------------------------- tiny runs
def letter_reward(prompts, completions, **kw):
    """A reward a random policy already varies on: the fraction of letters in the completion."""
    return [sum(ch.isalpha() for ch in c) / max(1, len(c)) for c in completions]


def _args(tok: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["model.name=mamba-swelu-tiny", "model.d_model=32", "model.n_layers=2", "model.dense_hidden=32",
            "train.objective=grpo", "data.source=arithmetic", f"data.tokenizer={tok}", "data.seq_len=48",
            "data.val_fraction=0.02", "rl.arithmetic_prompts=300", "rl.num_generations=4",
            "rl.max_completion_length=6", "rl.reward_funcs=[format, test_grpo:letter_reward]", "train.batch_size=2",
            "train.grad_accum=2", "train.max_steps=8", "train.eval_every=4", "train.eval_batches=1",
            "train.log_every=2", "train.threads=1", "train.progress=false", "train.sample_tokens=2",
            "train.warmup_steps=0", "train.lr=3e-3", "train.system_every=0", "train.save_every=3",
            f"run.out_dir={out}", f"run.name={name}", *extra]


def _events(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_step_moves_the_policy_towards_the_better_completions(stdlib_tokenizer_dir, monkeypatch):
    """Rollouts, rewards and the loss through the objective's own calls; one SGD step on them must raise the
    log-probability of completions with positive advantage relative to the others: Σ A·Δlog π > 0."""
    from lmlab.runtime import setup_runtime
    from lmlab.train.grpo import GRPO
    from lmlab.train.setup import build_model

    monkeypatch.syspath_prepend(str(HERE.parent))
    cfg = load_config(None, _args(stdlib_tokenizer_dir, Path("/nonexistent"), "x", "train.grad_accum=1",
                                  "train.batch_size=4"))
    rt = setup_runtime("cpu", "fp32", 1)
    obj = GRPO(cfg)
    from lmlab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(stdlib_tokenizer_dir))
    data = obj.data(cfg, tokenizer, rt)
    model = build_model(cfg, tokenizer)
    obj.check_model(model)
    obj.setup(model, model, rt)
    model.train()
    obj.before_step(model, 0)
    batch = data.train.next()
    assert batch["input_ids"].shape[0] == 4 * 4 and batch["advantages"].abs().sum() > 0

    def seq_logps():
        with torch.no_grad():
            return token_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"]).sum(-1)

    before = seq_logps()
    loss, metrics = obj.loss(model, batch)
    assert set(metrics) >= {"reward", "rewards/format", "rewards/letter_reward", "kl", "clip_ratio"}
    assert metrics["reward"].item() == pytest.approx(batch["reward"].sum().item())
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    moved = (batch["advantages"] * (seq_logps() - before)).sum().item()
    assert moved > 0, moved


@pytest.mark.slow
def test_a_tiny_run_logs_trls_names_and_samples(stdlib_tokenizer_dir, tmp_path, monkeypatch):
    from lmlab.train.loop import train

    monkeypatch.syspath_prepend(str(HERE.parent))
    cfg = load_config(None, _args(stdlib_tokenizer_dir, tmp_path, "learn", "rl.beta=0.04", "rl.epsilon_high=0.28"))
    run = train(cfg, echo=lambda *a: None)
    steps = [e for e in _events(run) if e["kind"] == "train"]
    for k in ("reward", "rewards/format", "rewards/letter_reward", "reward_std", "frac_reward_zero_std", "kl",
              "completion_length", "clip_ratio"):
        assert k in steps[-1] and math.isfinite(steps[-1][k]), k
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert steps[-1]["kl"] > 0
    assert 0 < steps[0]["completion_length"] <= 6
    assert steps[0]["reward"] == pytest.approx(steps[0]["rewards/format"] + steps[0]["rewards/letter_reward"])
    ev = [e for e in _events(run) if e["kind"] == "eval"][-1]
    assert {"val_loss", "val_reward", "val_rewards/format"} <= set(ev)
    assert ev["val_loss"] == pytest.approx(-ev["val_reward"], abs=1e-6)
    samples = [json.loads(x) for x in (run / "samples_grpo.jsonl").read_text().splitlines()]
    assert sorted({s["step"] for s in samples}) == [2, 4, 6, 8] and len(samples) == 4 * 8
    assert all({"prompt", "completion", "reward", "rewards", "answer"} <= set(s) for s in samples)


def _kill_script(argv: list[str]) -> int:
    """`KILL_AT - ARGS…`: train, SIGKILL at the start of step KILL_AT; `0 RUN [--drop-rollouts]`: resume RUN."""
    sys.path.insert(0, str(HERE.parent))
    from lmlab.train import grpo
    from lmlab.train.loop import train

    kill_at, run_dir, rest = int(argv[0]), argv[1], argv[2:]
    if run_dir != "-":
        if "--drop-rollouts" in rest:  # the control: resume without the pending rollouts
            load = grpo.RolloutStream.load_state_dict

            def drop(self, state):
                load(self, state)
                self.buffer, self.uses_left, self.cursor = [], 0, 0

            grpo.RolloutStream.load_state_dict = drop
        train(load_config(Path(run_dir) / "config.yaml"), Path(run_dir), echo=lambda *a: None)
        return 0
    before = grpo.GRPO.before_step

    def before_then_die(self, model, step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return before(self, model, step)

    grpo.GRPO.before_step = before_then_die
    train(load_config(None, rest), echo=lambda *a: None)
    return 0


def _script(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE), *argv], env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_killed_run_resumes_bitwise_with_its_pending_rollouts(stdlib_tokenizer_dir, tmp_path):
    # μ = 2: the rollouts of step 2 still serve step 3 when the checkpoint after 3 steps is written
    extra = ("rl.iterations=2", "rl.beta=0.04", "model.dropout=0.1")
    straight = _script("-1", "-", *_args(stdlib_tokenizer_dir, tmp_path, "straight", *extra))
    assert straight.returncode == 0, straight.stderr[-3000:]
    died = _script("5", "-", *_args(stdlib_tokenizer_dir, tmp_path, "killed", *extra))
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    killed = tmp_path / "killed"
    assert [p.name for p in (killed / "checkpoints").glob("step-*")] == ["step-00000003"]
    ck = torch.load(killed / "checkpoints" / "step-00000003" / "trainer.pt", weights_only=True)
    assert ck["loader"]["pending"][0]["uses_left"] == 1 and len(ck["loader"]["pending"][0]["buffer"]) == 2
    resumed = _script("0", str(killed))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _same(_weights(tmp_path / "straight"), _weights(killed)), "the resumed run differs from the straight one"
    # the control: the same kill, resumed without the pending rollouts, ends elsewhere
    assert _script("5", "-", *_args(stdlib_tokenizer_dir, tmp_path, "control", *extra)).returncode == -signal.SIGKILL
    assert _script("0", str(tmp_path / "control"), "--drop-rollouts").returncode == 0
    assert not _same(_weights(tmp_path / "straight"), _weights(tmp_path / "control"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_rank_ddp_run(stdlib_tokenizer_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "lmlab.cli", "grpo",
           *_args(stdlib_tokenizer_dir, tmp_path, "ddp", "rl.beta=0.04", "train.max_steps=4")]
    p = subprocess.run(cmd, env={**ENV, "PYTHONPATH": str(HERE.parent)}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "ddp"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    steps = [e for e in _events(run) if e["kind"] == "train"]
    assert [e["step"] for e in steps] == [2, 4] and all(math.isfinite(e["reward"]) for e in steps)
    samples = [json.loads(x) for x in (run / "samples_grpo.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 8  # rank 0 alone writes: rl.log_completions per log step
    assert (run / "final" / "model.safetensors").is_file()


HOSTILE = ["while True:\n    pass\n", "import os\nwhile True:\n    os.fork()\n", "x = bytearray(10 * 1024 ** 3)\n",
           "open('/tmp/lmlab-grpo-hostile', 'w').write('x')\n", "import os\nos.system('id')\n",
           "import socket\nsocket.create_connection(('127.0.0.1', 1))\n", "print(open('/etc/passwd').read())\n",
           "def double(x):\n    return 2 * x\n"]


def hostile_code_reward(prompts, completions, **kw):
    """The code reward fed hostile programs in place of the model's completions (and one correct one)."""
    from lmlab.rewards import code_reward

    progs = [HOSTILE[i % len(HOSTILE)] for i in range(len(completions))]
    return code_reward(prompts, progs, **{**kw, "tests": ["assert double(3) == 6"] * len(completions)})


@pytest.mark.slow
def test_the_trainer_goes_on_while_the_sandbox_fails_hostile_programs(stdlib_tokenizer_dir, tmp_path, monkeypatch):
    from lmlab.train.loop import train

    monkeypatch.syspath_prepend(str(HERE.parent))
    cfg = load_config(None, _args(stdlib_tokenizer_dir, tmp_path, "hostile", "train.max_steps=2", "train.log_every=1",
                                  "rl.reward_funcs=[test_grpo:hostile_code_reward]", "rl.sandbox_timeout=1",
                                  "rl.sandbox_cpu=1", "rl.sandbox_memory_mb=256", "rl.num_generations=8",
                                  "train.batch_size=1", "train.grad_accum=1", "rl.log_completions=8"))
    run = train(cfg, echo=lambda *a: None)
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    steps = [e for e in _events(run) if e["kind"] == "train"]
    assert [e["rewards/hostile_code_reward"] for e in steps] == [pytest.approx(1 / 8)] * 2  # the correct one
    samples = [json.loads(x) for x in (run / "samples_grpo.jsonl").read_text().splitlines()]
    notes = [s.get("note") for s in samples[:8]]
    assert notes[-1] is None and all(n and n.startswith("code: ") for n in notes[:-1]), notes
    assert not Path("/tmp/lmlab-grpo-hostile").exists()


@pytest.mark.slow
def test_sft_then_grpo_in_one_multi_stage_run(stdlib_tokenizer_dir, tmp_path, monkeypatch):
    import yaml

    from lmlab.data.prompts import arithmetic_problems
    from lmlab.train.stages import train_stages

    monkeypatch.syspath_prepend(str(HERE.parent))
    rows = [{"instruction": q, "output": a} for q, a in arithmetic_problems(2, "+", 64)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"name": "mamba-swelu-tiny", "d_model": 32, "n_layers": 2, "dense_hidden": 32}
    spec = {"model": model, "data": {"tokenizer": str(stdlib_tokenizer_dir), "seq_len": 48, "val_fraction": 0.05},
            "train": {"batch_size": 2, "threads": 1, "progress": False, "sample_tokens": 2, "warmup_steps": 0,
                      "eval_every": 1000, "eval_batches": 1, "log_every": 1, "lr": 3e-3, "system_every": 0},
            "rl": {"num_generations": 4, "max_completion_length": 6, "arithmetic_prompts": 200},
            "run": {"name": "chain", "out_dir": str(tmp_path / "runs")},
            "stages": [{"name": "sft", "data": {"source": str(tmp_path / "sft.jsonl")},
                        "train": {"objective": "sft", "max_steps": 3}},
                       {"name": "grpo", "data": {"source": "arithmetic"}, "train": {"objective": "grpo",
                                                                                   "max_steps": 2}}]}
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = train_stages(path, echo=lambda *a: None)
    summary = json.loads((run / "stages.json").read_text())
    assert [summary[s]["status"] for s in ("sft", "grpo")] == ["finished", "finished"]
    second = run / "stages" / "1-grpo"
    cfg2 = yaml.safe_load((second / "config.yaml").read_text())
    assert cfg2["model"]["name"] == str((run / "stages" / "0-sft" / "final").resolve())
    assert any("reward" in json.loads(x) for x in (second / "metrics.jsonl").read_text().splitlines())


if __name__ == "__main__":
    sys.exit(_kill_script(sys.argv[1:]))
