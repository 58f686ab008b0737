"""The commands and outputs shown in README.md and docs/*.md are the program's.

Every `lmlab` command shown (in ```bash blocks, and as `$ lmlab …` lines of output blocks) must name a command
of `lmlab.cli.COMMANDS` and parse with `build_parser` (a command whose module does not exist yet is left out
until it does), and every `section.key=value` override it shows must be a config key. The quick ones (models,
recipes, advise, estimate, `--help`) run on the spot; where an output block follows one, the output is
regenerated and compared on the lines that must match. The README's quickstart output keeps the structure
and the model/data/memory lines the quickstart prints today; its step numbers need a real run (slow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from pathlib import Path

import pytest

from lmlab.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
SHELLS = ("bash", "sh", "shell", "console")
FAST = ("models", "recipes", "advise", "estimate")  # commands cheap enough to run for every example shown


def _blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1) for m in FENCE.finditer(text)]


def _command_lines(body: str, prompt: bool) -> list[str]:
    """The shell command lines of a block (continuations joined); with `prompt`, only `$ …` lines."""
    out, cur = [], ""
    for raw in body.splitlines():
        line = raw.rstrip()
        if prompt:
            if not line.startswith("$ ") and not cur:
                continue
            line = line[2:] if line.startswith("$ ") else line
        cur = f"{cur} {line.strip()}" if cur else line.strip()
        if cur.endswith("\\"):
            cur = cur[:-1].rstrip()
            continue
        if cur:
            out.append(cur)
        cur = ""
    return out


def _lmlab_argvs(line: str) -> list[list[str]]:
    """Every lmlab invocation on a shell line: `lmlab …`, `python -m lmlab.cli …`, `torchrun … -m lmlab.cli …`,
    split at pipes and &&, with trailing comments and redirections dropped."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return []
    argvs, cur = [], None
    for w in [*words, "&&"]:
        if w in ("&&", "|", "||", ";"):
            if cur is not None:
                argvs.append(cur)
            cur = None
        elif w in ("lmlab", "lmlab.cli"):  # several commands on one line start a new one each
            if cur is not None:
                argvs.append(cur)
            cur = []
        elif cur is not None:
            cur.append(w)
    cleaned = []
    for argv in argvs:
        if ">" in argv:
            argv = argv[:argv.index(">")]
        if argv:
            cleaned.append(argv)
    return cleaned


def _shown_commands() -> list[tuple[str, list[str], str | None]]:
    """(where, argv, the error shown right after it or None) of every lmlab command shown in the docs."""
    found = []
    for path in DOCS:
        for lang, body, line in _blocks(path):
            lines = body.splitlines()
            for cmd in _command_lines(body, prompt=lang not in SHELLS):
                for argv in _lmlab_argvs(cmd):
                    after = next((lines[k + 1] for k, ln in enumerate(lines[:-1]) if ln == f"$ {cmd}"), "")
                    error = after.split(": error: ", 1)[1] if after.startswith(f"lmlab {argv[0]}: error: ") else None
                    found.append((f"{path.name}:{line}", argv, error))
    return found


def _module_exists(command: str) -> bool:
    module = COMMANDS[command][0]
    return importlib.util.find_spec(f"lmlab.commands.{module}") is not None


SHOWN = _shown_commands()


def test_the_docs_show_commands():
    assert len(SHOWN) > 40  # the extraction itself works
    assert {argv[0] for _, argv, _ in SHOWN} >= {"quickstart", "pretrain", "finetune", "estimate", "advise", "eval"}


@pytest.mark.parametrize("where,argv,error", SHOWN, ids=[f"{w} {' '.join(a)[:60]}" for w, a, _ in SHOWN])
def test_every_shown_command_parses(where, argv, error, tmp_path, monkeypatch):
    """The command exists, its flags are the parser's, and its KEY=VALUE overrides are config keys (or, where
    the docs show the error it gives, they give that error)."""
    from lmlab.config import apply_overrides, from_dict
    from lmlab.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # a command shown failing writes nothing, and nothing here

    assert argv[0] in COMMANDS, f"{where}: `lmlab {argv[0]}` is not a command ({', '.join(COMMANDS)})"
    if not _module_exists(argv[0]):
        pytest.skip(f"lmlab.commands.{COMMANDS[argv[0]][0]} is not written yet")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            args = build_parser(argv[0]).parse_args(argv)
        except SystemExit as e:
            shown = error and error.rstrip(". ").removesuffix("...").rstrip(", ")
            if shown and e.code == 2 and f"lmlab {argv[0]}: error: {shown}" in err.getvalue():
                return  # the docs show the one-line error the flag's own check gives
            pytest.fail(f"{where}: `lmlab {' '.join(argv)}` does not parse (exit {e.code}): {err.getvalue()[-400:]}")
    items = [o for o in getattr(args, "overrides", None) or [] if re.fullmatch(r"[a-z_]+\.[a-z_0-9]+=.*", o)]
    if error is not None:  # the docs show the error: the config layer, else the command itself, gives it
        shown = error.rstrip(". ").removesuffix("...").rstrip(", ")
        try:
            from_dict(apply_overrides({}, items))
        except ConfigError as e:
            assert str(e).startswith(shown), (where, str(e))
            return
        if not _runnable(argv) or any(a.startswith("runs/") for a in argv):
            return  # it needs a run folder that is not here: parsing is what can be checked
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main(argv) == 2, where
        assert f"lmlab {argv[0]}: error: {shown}" in err.getvalue(), (where, err.getvalue())
        return
    for item in items:
        from_dict(apply_overrides({}, [item]))  # a ConfigError names an unknown key or a bad value


def test_the_readme_names_every_command():
    """Every command of `lmlab --help` whose module exists appears in the README as `lmlab NAME`."""
    readme = (ROOT / "README.md").read_text()
    missing = [n for n in COMMANDS if _module_exists(n) and not re.search(rf"lmlab {re.escape(n)}\b", readme)]
    assert not missing, f"README.md does not show: {', '.join('lmlab ' + n for n in missing)}"


def _run(argv: list[str], monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "140")  # the width the docs' tables were printed at
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, argv
    return out.getvalue()


def _runnable(argv: list[str]) -> bool:
    """No placeholder, and every file it names is here (alpaca.yaml is written by the command before it)."""
    files = [a for a in argv if a.endswith((".yaml", ".yml", ".json", ".jsonl"))]
    return "<" not in " ".join(argv) and all((ROOT / f).is_file() or f == "alpaca.yaml" for f in files)


FAST_SHOWN = [(w, a) for w, a, err in SHOWN if a[0] in FAST and _runnable(a) and err is None]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_help(command, monkeypatch, capsys):
    if not _module_exists(command):
        pytest.skip(f"lmlab.commands.{COMMANDS[command][0]} is not written yet")
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: lmlab" in capsys.readouterr().out


def _cells(text: str) -> list[str]:
    """A printed table as its cell texts (box drawing and spacing removed), one entry per line."""
    out = []
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line) if c.strip()]
        if cells and not re.fullmatch(r"[─━┌┐└┘├┤┬┴┼┏┓┗┛┡┩╇╈┳┻╋ ]+", line.strip()):
            out.append(" | ".join(cells))
    return out


def _following_output(path: Path, argv: list[str]) -> str | None:
    """The output block right after the bash block that shows `argv`, if any."""
    blocks = _blocks(path)
    for i, (lang, body, _) in enumerate(blocks):
        if lang in SHELLS and any(a == argv for c in _command_lines(body, False) for a in _lmlab_argvs(c)):
            if i + 1 < len(blocks) and blocks[i + 1][0] in ("", "text"):
                return blocks[i + 1][1]
    return None


def test_the_planner_examples_print_what_the_docs_show(monkeypatch, tmp_path):
    """docs/planner.md: each `lmlab estimate` shown with its output prints that output (every cell)."""
    path = ROOT / "docs" / "planner.md"
    checked = 0
    for lang, body, line in _blocks(path):
        if lang not in SHELLS:
            continue
        for cmd in _command_lines(body, False):
            for argv in _lmlab_argvs(cmd):
                shown = _following_output(path, argv)
                if argv[0] != "estimate" or shown is None:
                    continue
                got = _cells(_run(argv, monkeypatch))
                assert got == _cells(shown), f"planner.md:{line}: `lmlab {' '.join(argv)}` prints otherwise"
                checked += 1
    assert checked >= 2


def test_the_quick_commands_shown_run(monkeypatch, tmp_path):
    """models, recipes, advise and estimate as the docs show them (placeholders left out)."""
    monkeypatch.chdir(tmp_path)
    ran = set()
    for where, argv in FAST_SHOWN:
        if argv[0] == "advise" and argv[1] == "alpaca.yaml":
            (tmp_path / "alpaca.yaml").write_text(_run(["recipes", "show", "alpaca"], monkeypatch))
        out = _run(argv, monkeypatch)
        assert out.strip(), where
        ran.add(argv[0])
    assert ran == set(FAST)


def test_the_advise_example_prints_what_the_docs_show(monkeypatch):
    """docs/finetuning.md's `$ lmlab advise production …` block: every criterion row and the overall line."""
    block = next(b for lang, b, _ in _blocks(ROOT / "docs" / "finetuning.md") if b.startswith("$ lmlab advise"))
    argv = shlex.split(block.splitlines()[0][2:])[1:]
    got = _cells(_run(argv, monkeypatch))
    shown = _cells("\n".join(block.splitlines()[1:]))
    assert got == shown


# ------------------------------------------------------------------------------------- the README quickstart
def _quickstart_block() -> list[str]:
    block = next(b for _, b, _ in _blocks(ROOT / "README.md") if b.startswith("lmlab quickstart: "))
    return block.splitlines()


def test_readme_quickstart_output_has_the_printed_structure():
    """Line prefixes in order, the model/data YAML the quickstart prints, and its memory line's components."""
    import yaml

    from lmlab.commands.quickstart import RECIPE
    from lmlab.config import load_config
    from lmlab.plan.estimate import memory_line
    from lmlab.runtime import setup_runtime

    lines = _quickstart_block()
    cfg = load_config(RECIPE, ["run.out_dir=runs"])
    printed = yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k in ("model", "data")},
                             default_flow_style=None, sort_keys=False).strip().splitlines()
    assert lines[1:1 + len(printed)] == printed
    prefixes = [ln.split()[0] for ln in lines[1 + len(printed):] if ln.strip() and ln[0] != " "]
    for want in ("model", "batch", "budget", "device", "data", "run", "memory", "step", "validation", "exported",
                 "sample", "next:"):
        assert want in prefixes, want
    shown = next(ln for ln in lines if ln.startswith("memory    "))
    rt = setup_runtime("cpu", "fp32", threads=2)
    now = memory_line(cfg, rt)
    host = re.compile(r" of [\d.]+ [GM]iB of host memory")
    assert host.sub("", now) == host.sub("", shown), (now, shown)


@pytest.mark.slow  # the whole quickstart: minutes on a CPU
def test_readme_quickstart_numbers(tmp_path, capsys):
    """The step-100 and final lines of the README's quickstart, to the digits shown (loss to 4 decimals)."""
    lines = _quickstart_block()
    assert main(["quickstart", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    for want in ("step    100  val_loss", "step    500  val_loss", "validation perplexity"):
        shown = next(ln for ln in lines if ln.startswith(want))
        got = next(ln for ln in out if ln.startswith(want))
        assert got.split("(")[0].strip() == shown.split("(")[0].strip()


def test_the_readme_serving_table_is_the_measured_one_in_docs_serving():
    """README's throughput table restates bench_serve's table in docs/serving.md (same run, same numbers)."""
    root = Path(__file__).resolve().parents[1]
    measured: dict[str, dict[str, tuple[str, str]]] = {}
    for line in (root / "docs" / "serving.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 7 and cells[1].isdigit():
            measured.setdefault(cells[0], {})[cells[1]] = (cells[2], cells[3])
    shown = 0
    for line in (root / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] in measured and re.fullmatch(r"[\d,]+( / [\d,]+)+", cells[1]):
            together, alone = cells[1].split(" / "), cells[2].split(" / ")
            want = measured[cells[0]]
            assert [(t, a) for t, a in zip(together, alone)] == [want[c] for c in ("1", "8", "32")], cells[0]
            shown += 1
    assert shown == len(measured) == 3
