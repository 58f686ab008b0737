"""The command line itself: every command is listed, `--help` stays light, and errors are one line."""

import importlib
import json
import subprocess
import sys

import pytest

from lmlab.cli import COMMANDS


def test_every_command_module_matches_the_listing():
    """Each listed command has its module; its one-line help is the listing's alone (a module keeps no copy)."""
    for name, (module, help_line) in COMMANDS.items():
        mod = importlib.import_module(f"lmlab.commands.{module}")
        assert callable(mod.add_arguments) and callable(mod.run), name
        assert not hasattr(mod, "HELP"), f"lmlab.commands.{module}.HELP repeats lmlab.cli.COMMANDS[{name!r}]"
        assert help_line and "\n" not in help_line, name


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, json\nfrom lmlab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert "pretrain" in out.stdout and "quickstart" in out.stdout


def test_a_command_help_loads_only_its_module():
    code = ("import sys\nfrom lmlab.cli import main\ntry:\n    main(['models', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in sys.modules if m.startswith('lmlab.commands.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "'lmlab.commands.models'" in out.stdout and "'lmlab.commands.pretrain'" not in out.stdout


# ------------------------------------------------------------------------------------------- the hub, offline
_TIMED_LOADS = """
import json, time
from lmlab.errors import LmlabError
from lmlab.data.tokenizer import load_tokenizer
from lmlab.models import hf, registry
out = {}
for what, call in (("kind", lambda: registry.describe_kind("mamba-swelu-tny")), ("model", lambda: hf.load_model(NAME)),
                   ("config", lambda: hf.load_config(NAME)), ("tokenizer", lambda: load_tokenizer(NAME))):
    t = time.perf_counter()
    try:
        call()
        msg = "loaded"
    except LmlabError as e:
        msg = str(e)
    out[what] = [time.perf_counter() - t, msg]
print(json.dumps(out))
"""


def _timed_loads(name: str, env: dict) -> dict:
    import os

    env = {**{k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}, **env}
    code = _TIMED_LOADS.replace("NAME", repr(name))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two fresh processes importing transformers
def test_a_name_neither_local_nor_cached_fails_at_once_offline(tmp_path):
    """HF_HUB_OFFLINE=1, or a hub that cannot be reached (a closed loopback port): one line at once, no retries.
    Timed inside the process, after the imports."""
    cache = {"HF_HOME": str(tmp_path / "hf")}
    for env in ({"HF_HUB_OFFLINE": "1", **cache}, {"HF_ENDPOINT": "http://127.0.0.1:9", **cache}):
        got = _timed_loads("no-such-org/no-such-model", env)
        assert "did you mean mamba-swelu-tiny?" in got["kind"][1]
        for what in ("model", "config", "tokenizer"):
            seconds, msg = got[what]
            assert seconds < 5, (env, what, seconds)
            assert "not found locally and the Hugging Face hub is unreachable" in msg, (env, what, msg)


def test_cache_only_refuses_requests_and_restores():
    from huggingface_hub import constants

    from lmlab import hub

    before = constants.HF_HUB_OFFLINE
    with hub.cache_only():
        assert constants.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE == before


# ---------------------------------------------------------------------------------------- multi-stage runs
def test_a_multi_stage_folder_opens_as_its_last_finished_stage(tmp_path):
    """runs/x with stages/0-sft (finished) and stages/1-dpo (running): chat/eval/compare/generate load stage 0."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lmlab.errors import LmlabError
    from lmlab.inference import load_for_inference
    from lmlab.models import registry
    from lmlab.runs import resolve_stage

    run = tmp_path / "x"
    (run / "stages").mkdir(parents=True)
    (run / "stages.yaml").write_text("spec: {}\n")
    with pytest.raises(LmlabError, match="no finished stage yet"):
        resolve_stage(run)
    for i, (name, status) in enumerate((("sft", "finished"), ("dpo", "running"))):
        d = run / "stages" / f"{i}-{name}"
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"status": status}))
    final = run / "stages" / "0-sft" / "final"
    model = registry.build_model(registry.build_config("mamba-swelu-tiny", vocab_size=64))
    model.save_pretrained(final)
    vocab = {f"w{i}": i for i in range(63)} | {"<eos>": 63}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                            eos_token="<eos>").save_pretrained(final)
    assert resolve_stage(run) == run / "stages" / "0-sft"
    assert resolve_stage(final) == final  # anything else is itself
    loaded, tok = load_for_inference(str(run), "cpu")
    assert loaded.config.vocab_size == 64 and len(tok) == 64


@pytest.mark.slow
def test_a_reader_that_leaves_early_ends_the_command_quietly():
    """`lmlab doctor runs/* | head`: the pipe closes; no BrokenPipeError traceback, exit 0."""
    import subprocess
    import sys

    p = subprocess.run(f"{sys.executable} -m lmlab.cli models | head -c 10", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
