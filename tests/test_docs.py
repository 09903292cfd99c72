"""The README and docs/ as a newcomer reads them: every shell command in a ```bash block is
checked against the arguments its program accepts (the ``vdsr`` CLI's argparse, the stage and
bench scripts, ``python -m`` tools, torchrun, dvc, mlflow, make targets, pip extras); the quick
ones are also run, in a temporary folder, against 127.0.0.1 only; every relative link and anchor
resolves; the README lists every module and stays an introduction (at most 300 lines).

Commands are split the way a POSIX shell splits them (``shlex``, ``&&``, ``|``, ``;``, ``$( )``,
backslash continuations); ``<placeholder>`` words stand for any value.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, load_script, run_checked, run_child

DOCS = sorted((REPO_ROOT / "docs").glob("*.md"))
PAGES = [REPO_ROOT / "README.md", *DOCS, REPO_ROOT / "tests" / "README.md"]
README_MAX_LINES = 300
COMMAND_TIMEOUT_S = 300  # one documented quick command, on a loaded 2-core machine
OPERATORS = {"&&", "||", "|", ";", "&", "(", ")", "$(", "`"}
SHELL_BUILTINS = {".", "source", "cd", "export", "read", "rm", "printf", "curl", "base64", "apt-get", "git",
                  "echo", "mkdir", "ls"}  # not this project's: taken as written
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    """One simple command of a documented ```bash block: its words (environment assignments
    before the program kept apart) and where it is written."""

    env: dict[str, str]
    words: list[str]
    where: str

    @property
    def text(self) -> str:
        return shlex.join([*(f"{k}={v}" for k, v in self.env.items()), *self.words])


def bash_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, body) of each ```bash block of a Markdown page."""
    text = page.read_text()
    return [(text[:match.start()].count("\n") + 2, match[1])
            for match in re.finditer(r"^```bash\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def split_commands(block: str, where: str) -> list[Command]:
    """The simple commands of a shell block, split at operators and command substitutions."""
    block = re.sub(r"<[A-Za-z][^<>\n]*>", "PLACEHOLDER", block.replace("\\\n", " "))
    commands = []
    for number, line in enumerate(block.splitlines()):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        words: list[str] = []
        outer: list[list[str]] = []  # the commands a $( ) substitution interrupts, innermost last
        for token in [*lexer, ";"]:
            if token not in OPERATORS:
                words.append(token[:-1] if token.endswith("$") and "=" in token else token)
                continue
            substitution = token == "(" and words and (words[-1] == "$" or words[-1].endswith("="))
            if substitution and words[-1] == "$":
                words.pop()  # its output is not known here: the command is checked without it
            env: dict[str, str] = {}
            while words and ASSIGNMENT.match(words[0]) and len(words) > 1 and not substitution:
                name, value = words.pop(0).split("=", 1)
                env[name] = value
            if substitution:
                outer.append(words)
            elif words:
                commands.append(Command(env, words, f"{where}+{number}"))
            words = outer.pop() if token == ")" and outer else []
    return commands


def documented_commands() -> list[Command]:
    found = []
    for page in PAGES:
        if page.is_file():
            for line, block in bash_blocks(page):
                found += split_commands(block, f"{page.relative_to(REPO_ROOT)}:{line}")
    return found


# --- argument shapes ----------------------------------------------------------------------------


class Parsed(Exception):
    """Raised in place of running a program once its arguments have been parsed."""


def parse_only(monkeypatch: pytest.MonkeyPatch, run, argv: list[str], prog: str) -> argparse.Namespace:
    """Call ``run()`` (a script's main) with ``argv`` as ``sys.argv[1:]``, stopped right after
    argparse accepted them; a rejected argument fails with argparse's own message."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
        patch.setattr(sys, "argv", [prog, *argv])
        try:
            run()
        except Parsed as parsed:
            return parsed.args[0]
        except SystemExit as exit_:
            raise AssertionError(f"{prog} {shlex.join(argv)}: its parser refused it (exit {exit_.code})") from None
    raise AssertionError(f"{prog} {shlex.join(argv)}: ran without parsing arguments")


def train_sections() -> set[str]:
    return set(yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"])


def check_script(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``python stages/X.py ...`` or ``python bench/X.py ...``."""
    script, argv = Path(words[0]), words[1:]
    path = REPO_ROOT / script
    assert path.is_file() and script.parts[0] in {"stages", "bench"}, f"{script}: no such script"
    if script.parts[0] == "stages":
        if script.stem in {"train", "evaluate"}:  # one argument: the name of a train section
            assert len(argv) == 1 and argv[0] in train_sections(), f"{script} needs one of {train_sections()}"
        else:
            assert argv == [], f"{script} takes no arguments"
        return
    module = load_script(path, f"docs_{script.stem}")
    parse_only(monkeypatch, module.main, argv, str(script))


def check_python(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    if words[0] == "-c":
        compile(words[1], "<python -c>", "exec")
    elif words[0] == "-m":
        module, argv = words[1], words[2:]
        if module in {"vdsr.release", "vdsr.table3"}:
            main = importlib.import_module(module).main
            parse_only(monkeypatch, lambda: main(None), argv, f"python -m {module}")
        elif module == "vdsr.presets":  # one argument: a file of presets/
            assert len(argv) == 1 and (REPO_ROOT / "presets" / f"{argv[0]}.yaml").is_file(), argv
        else:
            assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    else:
        check_script(words, monkeypatch)


def check_torchrun(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(argv)  # exits 2 on an option torchrun does not know
    check_script([args.training_script, *args.training_script_args], monkeypatch)


def check_mlflow(argv: list[str]) -> None:
    """Click's own parsing of ``mlflow ...`` down to the subcommand, without running it."""
    import click
    from mlflow.cli import cli

    try:
        context = cli.make_context("mlflow", list(argv))
        while isinstance(context.command, click.Group):
            rest = [*getattr(context, "_protected_args", []), *context.args]
            name, command, rest = context.command.resolve_command(context, rest)
            context = command.make_context(name, rest, parent=context)
    except click.ClickException as error:
        raise AssertionError(f"mlflow {shlex.join(argv)}: {error.format_message()}") from None


def check_pip(argv: list[str]) -> None:
    import tomllib

    extras = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    assert argv[0] == "install", argv
    for word in argv:
        if match := re.fullmatch(r"\.\[([a-z0-9,_-]+)\]", word):
            assert set(match[1].split(",")) <= extras, f"{word}: pyproject.toml's extras are {sorted(extras)}"


def check_dvc(argv: list[str]) -> None:
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    try:
        get_main_parser().parse_args(argv)
    except DvcParserError:
        raise AssertionError(f"dvc {shlex.join(argv)}: dvc's parser refused it") from None


def makefile_targets() -> set[str]:
    """The Makefile's rule targets (``a b:`` names both; ``X :=``/``X ?=`` assignments are not rules)."""
    rules = re.findall(r"^([A-Za-z0-9_-]+(?: +[A-Za-z0-9_-]+)*) *:(?!=)", (REPO_ROOT / "Makefile").read_text(),
                       re.MULTILINE)
    return {target for rule in rules for target in rule.split()}


def check_command(command: Command, monkeypatch: pytest.MonkeyPatch) -> None:
    program, argv = command.words[0], command.words[1:]
    if "VDSR_TORCHRUN" in command.env:
        check_torchrun([*shlex.split(command.env["VDSR_TORCHRUN"]), "stages/train.py", "vdsr"], monkeypatch)
    if program == "vdsr":
        from vdsr.cli import build_parser

        build_parser().parse_args(argv)
    elif program in {"python", "python3"}:
        check_python(argv, monkeypatch)
    elif program == "torchrun":
        check_torchrun(argv, monkeypatch)
    elif program == "dvc":
        check_dvc(argv)
    elif program == "mlflow":
        check_mlflow(argv)
    elif program == "pip":
        check_pip(argv)
    elif program == "make":
        targets = [word for word in argv if not ASSIGNMENT.match(word)]
        assert set(targets) <= makefile_targets(), f"make {targets}: the Makefile has {sorted(makefile_targets())}"
    else:
        assert program in SHELL_BUILTINS, f"{program}: a program this test does not know"


COMMANDS = documented_commands()


def test_the_docs_have_commands_to_check() -> None:
    programs = {command.words[0] for command in COMMANDS}
    assert {"vdsr", "dvc", "make", "python", "torchrun", "mlflow", "pip"} <= programs, programs
    assert len(COMMANDS) > 50


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_has_the_arguments_its_program_accepts(
    command: Command, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        check_command(command, monkeypatch)
    except SystemExit as exit_:  # argparse's refusal (its message is on stderr, in the report)
        raise AssertionError(f"{command.where}: {command.text}: refused (exit {exit_.code})") from None


@pytest.mark.parametrize("text", [
    "torchrun --standalone --nproc-per-node=8 stages/train.py",  # what the README said before: exit 2
    'VDSR_TORCHRUN="--standalone --nproc-per-node=8 --no-such-option" dvc repro',
    "vdsr upscale a.png --scale 5 -o out/", "dvc exp shwo", "dvc repro --no-such-option", "make smoky",
    "python stages/prepare.py extra", "python stages/evaluate.py nosuchmodel", "pip install -e '.[kears]'",
    "mlflow ui --no-such-option", "mlflow models srve", "python -m vdsr.release publish",
    "python bench/train.py --stepz 3", "python -m vdsr.presets no-such-preset", "python -c 'print('",
    "frobnicate --all",
])
def test_the_checker_refuses_what_the_programs_refuse(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    (command,) = split_commands(text, "test")
    with pytest.raises((AssertionError, SystemExit, SyntaxError)):
        check_command(command, monkeypatch)


def test_shell_splitting() -> None:
    commands = split_commands('A=1 B="x y" dvc repro && git add -A | cat; export K=$(python -c "print(1)")  # c\n'
                              "dvc exp run \\\n  -n x <name>", "t")
    assert [(c.env, c.words) for c in commands] == [
        ({"A": "1", "B": "x y"}, ["dvc", "repro"]), ({}, ["git", "add", "-A"]), ({}, ["cat"]),
        ({}, ["python", "-c", "print(1)"]), ({}, ["export", "K="]), ({}, ["dvc", "exp", "run", "-n", "x", "PLACEHOLDER"])]
    # a substitution inside a command: its own command, and the options after it stay the outer one's
    commands = split_commands("dvc exp run --temp $(python -m vdsr.presets smoke) -S train.vdsr.lr=1", "t")
    assert [c.words for c in commands] == [["python", "-m", "vdsr.presets", "smoke"],
                                           ["dvc", "exp", "run", "--temp", "-S", "train.vdsr.lr=1"]]


# --- the quick commands, run ----------------------------------------------------------------------

PRESET = "python -m vdsr.presets release-cpu"
BICUBIC = "vdsr evaluate --images data/raw/Set5 --scales 2 3 4 --model bicubic --json out/set5.json"
REMOTE = ["dvc remote add --default team s3://my-bucket/vdsr",
          "dvc remote modify team endpointurl https://minio.example.org",
          "dvc remote modify --local team access_key_id AKIA...",
          "dvc remote modify --local team secret_access_key ...",
          "git add .dvc/config && git commit -m 'DVC remote: team'"]


def test_the_run_commands_are_the_documented_ones() -> None:
    """The commands the tests below run are written as the docs write them (a change there shows here)."""
    texts = {" ".join(c.words) for c in COMMANDS}
    for text in [PRESET, BICUBIC, *REMOTE]:
        for part in text.split(" && "):
            assert " ".join(shlex.split(part)) in texts, part


def test_preset_command_prints_options_dvc_accepts() -> None:
    # from the repository root, as documented: it reads params.yaml and presets/, and writes nothing
    done = run_checked([sys.executable, *shlex.split(PRESET)[1:]], cwd=REPO_ROOT, timeout=COMMAND_TIMEOUT_S)
    options = shlex.split(done.stdout)
    assert options[::2] == ["-S"] * (len(options) // 2) and len(options) % 2 == 0, done.stdout
    recipe = yaml.safe_load((REPO_ROOT / "presets" / "release-cpu.yaml").read_text())
    section = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]["vdsr"]
    printed = dict(option.split("=", 1) for option in options[1::2])
    assert set(printed) == set(recipe) and all(key.removeprefix("train.vdsr.") in section for key in printed)
    assert all(yaml.safe_load(printed[key]) == value for key, value in recipe.items()), printed
    from dvc.cli.parser import get_main_parser

    get_main_parser().parse_args(["exp", "run", "-n", "release-cpu", *options, "evaluate@vdsr"])  # the Makefile's


def test_bicubic_evaluation_prints_the_documented_baseline(set5_dir: Path, tmp_path: Path) -> None:
    """``vdsr evaluate ... --model bicubic`` on Set5 writes the numbers docs/data.md shows for it."""
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "Set5").symlink_to(set5_dir)
    vdsr = Path(sys.executable).parent / "vdsr"
    run_checked([str(vdsr), *shlex.split(BICUBIC)[1:]], cwd=tmp_path, timeout=COMMAND_TIMEOUT_S)
    measured = json.loads((tmp_path / "out" / "set5.json").read_text())["Set5"]
    page = (REPO_ROOT / "docs" / "data.md").read_text()
    row = re.search(r"^\| Set5 \| ([\d.]+) dB / ([\d.]+) \| ([\d.]+) / ([\d.]+) \| ([\d.]+) / ([\d.]+) \|$", page, re.MULTILINE)
    assert row, "docs/data.md: no Set5 row in the bicubic table"
    for i, scale in enumerate(("x2", "x3", "x4")):
        assert f"{measured[scale]['psnr']:.2f}" == row[2 * i + 1], (scale, measured[scale])
        assert f"{measured[scale]['ssim']:.4f}" == row[2 * i + 2], (scale, measured[scale])


def test_remote_setup_writes_the_remote_and_keeps_the_keys_local(tmp_path: Path) -> None:
    """docs/remotes.md's setup block (without its pip line) in a fresh git + DVC repository: the
    remote is committed in .dvc/config, the keys stay in the git-ignored .dvc/config.local."""
    import os

    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@127.0.0.1",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run_checked(["git", "init", "-q", "-b", "main"], tmp_path, env)
    run_checked(["dvc", "init", "-q"], tmp_path, env)
    for line in REMOTE:
        for part in line.split(" && "):
            run_checked(shlex.split(part), tmp_path, env, timeout=COMMAND_TIMEOUT_S)
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "remote = team" in config and "url = s3://my-bucket/vdsr" in config
    assert "endpointurl = https://minio.example.org" in config and "AKIA" not in config
    local = (tmp_path / ".dvc" / "config.local").read_text()
    assert "access_key_id = AKIA..." in local and "secret_access_key = ..." in local
    committed = run_child(["git", "show", "--stat", "HEAD"], cwd=tmp_path, env=env, timeout=60).stdout
    assert "DVC remote: team" in committed and ".dvc/config " in committed and "config.local" not in committed


# --- links, layout, length ------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    return {slug(match[1]) for match in re.finditer(r"^#+ (.*)$", text, re.MULTILINE)}


def links(page: Path) -> list[tuple[str, Path, str]]:
    """(link as written, file it points to, anchor) of each relative link of a page."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        found.append((target, (page.parent / path).resolve() if path else page, anchor))
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of a page whose file, or heading, is missing."""
    broken = []
    for written, target, anchor in links(page):
        if not target.exists():
            broken.append(f"{written}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{written}: no heading with anchor #{anchor} in {target.name}")
    return broken


@pytest.mark.parametrize("page", [p for p in PAGES if p.is_file()], ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert not broken_links(page), f"{page.relative_to(REPO_ROOT)}: {broken_links(page)}"


def test_broken_links_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](nope.md) [here](page.md#top) [no](page.md#bottom) [web](https://x.org)"
                    "\n\n```bash\n# not a heading\n```\n")
    assert broken_links(page) == ["nope.md: no such file", "page.md#bottom: no heading with anchor #bottom in page.md"]


def test_slugs_are_githubs() -> None:
    assert slug("Training on a CPU: `make release-cpu`") == "training-on-a-cpu-make-release-cpu"
    assert slug("The bicubic baseline against the paper") == "the-bicubic-baseline-against-the-paper"


def test_readme_lists_every_module_and_script_once() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    files = sorted(p.relative_to(REPO_ROOT).as_posix() for folder in ("vdsr", "stages", "bench")
                   for p in (REPO_ROOT / folder).glob("*.py"))
    missing = [name for name in files if f"| `{name}` |" not in readme]
    assert not missing, f"README's layout lacks {missing}"
    listed = re.findall(r"^\| `((?:vdsr|stages|bench)/[\w/]+\.py)` \|", readme, re.MULTILINE)
    assert sorted(listed) == files, sorted(set(listed) ^ set(files))  # none twice, none that is gone


def test_readme_is_an_introduction() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    install = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert sum(page.read_text().count(install) for page in PAGES if page.is_file()) == 1  # the install line once
    for page in DOCS:
        assert f"(docs/{page.name})" in readme, f"README does not link docs/{page.name}"


def test_named_functions_exist() -> None:
    """Every ``vdsr.<module>.<name>`` a page names is defined in that module."""
    missing = []
    for page in PAGES:
        if not page.is_file():
            continue
        for module, name in set(re.findall(r"`vdsr\.([a-z_]+)\.([A-Za-z_]+)", page.read_text())):
            source = REPO_ROOT / "vdsr" / f"{module}.py"
            pattern = rf"^(?:def|class) {name}\b|^{name}\b.*="
            if not source.is_file() or not re.search(pattern, source.read_text(), re.MULTILINE):
                missing.append(f"{page.relative_to(REPO_ROOT)}: vdsr.{module}.{name}")
    assert not missing, missing
