"""docs/experiments.md against the real tools: what DVC does with an uncommitted ``params.yaml`` in
``--temp`` and ``--queue`` runs and how a failed workspace run is undone, checked on a one-stage
pipeline (a python one-liner, seconds per run); and every command of the page's shell blocks has an
argument shape its program accepts (DVC's own parser, the vdsr parser, the presets, the Makefile),
with no placeholder names."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, init_repo, repo_env, run_checked, run_child

from vdsr.presets import load_preset, preset_names, set_options

PAGE = REPO_ROOT / "docs" / "experiments.md"
RUN_TIMEOUT_S = 600  # a one-stage experiment takes seconds on a quiet machine; the bound only stops a hung one

# The stage refuses a key it does not know, as the train stage does (a typo run fails).
STAGE = ("import json, yaml; p = yaml.safe_load(open('params.yaml')); unknown = sorted(set(p) - {'a', 'b'}); "
         "assert not unknown, f'unknown key {unknown}'; json.dump(p, open('out.json', 'w'))")


def tiny_repo(tmp_path: Path, *, cached: bool) -> tuple[Path, dict[str, str]]:
    """A git + DVC repository whose one stage copies params.yaml (a, b) into out.json, committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text("# the committed values\na: 1\nb: 1\n")
    out = "out.json" if cached else {"out.json": {"cache": False}}
    stage = {"cmd": f"python -c {shlex.quote(STAGE)}", "params": [{"params.yaml": None}], "outs": [out]}  # all keys
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"copy": stage}}, sort_keys=False))
    env = repo_env(DVC_NO_ANALYTICS="1")
    init_repo(repo, env, "one stage")
    return repo, env


def experiment_file(repo: Path, env: dict[str, str], name: str, path: str) -> str:
    """``path`` as experiment ``name`` left it (an experiment is a git ref)."""
    refs = run_checked(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).stdout.split()
    ref = next(ref for ref in refs if ref.endswith(f"/{name}"))
    return run_checked(["git", "show", f"{ref}:{path}"], repo, env).stdout


def page_text() -> str:
    return " ".join(PAGE.read_text().split())  # sentences as one line, whatever the wrapping


def test_temp_and_queued_runs_carry_the_uncommitted_params(tmp_path):
    repo, env = tiny_repo(tmp_path, cached=False)
    params = repo / "params.yaml"
    params.write_text(params.read_text().replace("a: 1", "a: 2"))  # not committed
    run_checked(["dvc", "exp", "run", "--queue", "-n", "queued", "-S", "b=5"], repo, env, timeout=RUN_TIMEOUT_S)
    params.write_text(params.read_text().replace("a: 2", "a: 3"))  # after queueing, before the queue runs
    run_checked(["dvc", "exp", "run", "--temp", "-n", "temp", "-S", "b=7"], repo, env, timeout=RUN_TIMEOUT_S)
    log = repo / ".dvc" / "tmp" / "queue-start.log"
    with log.open("ab") as out:  # its workers keep the command's output open: to a file, not a pipe
        started = subprocess.run(["dvc", "queue", "start"], cwd=repo, env=env, timeout=120, check=False,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    assert started.returncode == 0, log.read_text()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while "/queued" not in run_checked(["git", "for-each-ref", "refs/exps"], repo, env).stdout:
        assert time.monotonic() < deadline, run_checked(["dvc", "queue", "status"], repo, env).stdout
        time.sleep(2)
    status = run_checked(["dvc", "queue", "status"], repo, env).stdout
    assert re.search(r"queued\s.*Success", status), status

    # What the page says: the workspace's uncommitted params.yaml as it was when queued, plus -S.
    assert json.loads(experiment_file(repo, env, "queued", "out.json")) == {"a": 2, "b": 5}
    assert json.loads(experiment_file(repo, env, "temp", "out.json")) == {"a": 3, "b": 7}
    assert yaml.safe_load(params.read_text()) == {"a": 3, "b": 1}  # the workspace keeps its edit
    assert not (repo / "out.json").exists() and not (repo / "dvc.lock").exists()
    text = page_text()
    assert ("`--temp` and `--queue` both start from the last commit *plus the workspace's uncommitted "
            "`params.yaml`*, then apply their `-S` values.") in text
    assert ("A queued experiment takes `params.yaml` as it was when `dvc exp run --queue` ran: edits made "
            "after queueing, before `dvc queue start`, do not reach it.") in text


def test_a_failed_workspace_run_is_undone_as_the_page_says(tmp_path):
    repo, env = tiny_repo(tmp_path, cached=True)
    run_checked(["dvc", "repro"], repo, env, timeout=RUN_TIMEOUT_S)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "results"], repo, env)
    committed = {name: (repo / name).read_bytes() for name in ("params.yaml", "dvc.lock", "out.json")}

    failed = run_child(["dvc", "exp", "run", "-S", "+c=1"], cwd=repo, env=env, timeout=RUN_TIMEOUT_S)
    assert failed.returncode != 0 and "unknown key ['c']" in failed.stdout + failed.stderr, failed
    assert "c: 1" in (repo / "params.yaml").read_text()  # the typo stays in the workspace

    undo = next(line for line in bash_lines() if line.startswith("git checkout params.yaml"))
    assert undo == "git checkout params.yaml && dvc checkout"
    run_checked(["bash", "-c", undo], repo, env, timeout=RUN_TIMEOUT_S)
    assert {name: (repo / name).read_bytes() for name in committed} == committed
    assert "up to date" in run_checked(["dvc", "status"], repo, env).stdout


# --- the page's commands ----------------------------------------------------------------------------


def bash_lines() -> list[str]:
    """The commands of the page's ```bash blocks: continuation lines joined, comments cut."""
    lines, block, pending = [], False, ""
    for raw in PAGE.read_text().splitlines():
        if raw.startswith("```"):
            block = raw == "```bash" and not block
            continue
        if not block:
            continue
        line = pending + raw.split("  #", 1)[0].strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def expand_presets(line: str) -> str:
    """``$(python -m vdsr.presets NAME)`` replaced by what it prints."""
    return re.sub(r"\$\(python -m vdsr\.presets ([\w-]+)\)",
                  lambda m: shlex.join(set_options(load_preset(m.group(1), params_file=REPO_ROOT / "params.yaml"))),
                  line)


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.MULTILINE))


REVISION_COMMANDS = {("exp", "apply"): 1, ("exp", "diff"): 2, ("metrics", "diff"): 2, ("plots", "diff"): 2,
                     ("queue", "logs"): 1}  # the dvc commands that name experiments, and how many


def test_the_page_recommends_temp_or_queue_with_the_smoke_preset():
    lines = bash_lines()
    assert "dvc exp run --temp $(python -m vdsr.presets smoke) -S train.vdsr.lr=0.0005" in lines
    runs = [line for line in lines if line.startswith("dvc exp run")]
    assert runs and all(("--temp" in line or "--queue" in line) and "vdsr.presets" in line for line in runs), runs
    assert "git checkout params.yaml && dvc checkout" in lines


@pytest.mark.parametrize("line", bash_lines())
def test_page_command_has_a_shape_its_program_accepts(line):
    from dvc.cli import DvcParserError, parse_args

    from vdsr.cli import build_parser

    for part in expand_presets(line).split(" && "):
        words = shlex.split(part)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]  # VAR=value before the command
        program, args = words[0], words[1:]
        if program == "dvc":
            try:
                parsed = parse_args(args)
            except DvcParserError:
                raise AssertionError(f"dvc does not accept: {part}") from None
            assert parsed.func, part
            assert not any("<" in word for word in args), f"placeholder in {part}"
            named = REVISION_COMMANDS.get(tuple(args[:2]))
            if named:
                names = [word for word in args[2:] if not word.startswith("-")][:named]
                given = set(re.findall(r"dvc exp run .*?-n ([\w.-]+)", PAGE.read_text())) | {"HEAD"}
                assert set(names) <= given, f"{part}: names an experiment the page does not make: {names}"
        elif program == "make":
            assert set(args) <= make_targets(), part
        elif program == "vdsr":
            build_parser().parse_args(args)
        elif program == "python" and args[:2] == ["-m", "vdsr.presets"]:
            assert args[2:] and args[2] in preset_names(), part
        elif program == "git":
            assert args[0] == "checkout" and all((REPO_ROOT / path).is_file() for path in args[1:]), part


def test_the_documented_drop_keeps_the_set5_psnr_of_each_evaluation():
    """The page's ``dvc exp show --drop`` regexes, matched as DVC matches them (``re.match`` of the
    joined patterns, dvc/commands/experiments/show.py), against the columns of both models'
    metrics, params and deps: only ``<model>.Set5.x2/x4.psnr`` (metrics/eval_<model>.json) and the
    params are left, whatever the model's name."""
    line = next(line for line in bash_lines() if line.startswith("dvc exp show --only-changed"))
    words = shlex.split(line)
    drop = re.compile("|".join(words[i + 1] for i, word in enumerate(words) if word == "--drop"))
    models, sets, scales = ("vdsr", "srcnn", "vdsr_wide"), ("Set5", "Set14", "B100", "Urban100"), ("x2", "x3", "x4")
    report = [f"{s}.{k}.{m}.{v}" for s in sets for k in scales for m in ("bicubic", *models)
              for v in ("psnr", "ssim", "paper_psnr", "paper_ssim", "psnr_vs_paper")]
    evaluation = [f"{m}.{s}.{k}.{v}" for m in models for s in sets for k in scales for v in ("psnr", "ssim")]
    train = [f"metrics/train_{m}.json:{key}" for m in models
             for key in ("epochs", "wall_time_s", "patches_per_s", "val_psnr_x2", "train_loss")]
    train += ["epochs", "wall_time_s", "patches_per_s", "val_psnr_x2", "val_psnr_x4", "train_loss"]  # one model
    deps = ["data/raw", "data/prepared", "models/vdsr.pt", "models", "results", "stages/train.py",
            "vdsr/models.py", "plots/train_vdsr.csv", "metrics"]
    params = ["train.vdsr.lr", "train.vdsr_wide.width", "evaluate.sets", "prepare.train_sets"]
    kept = [column for column in ["Created", *report, *evaluation, *train, *deps, *params] if not drop.match(column)]
    assert kept == [f"{m}.Set5.{k}.psnr" for m in models for k in ("x2", "x4")] + params, kept


# --- the MLflow link (README, docs/mlflow.md, the Makefile's smoke target) -------------------------------------

DASHBOARD = re.compile(r"http://127\.0\.0\.1:5000/#/experiments/1[/?][^\s`\"]+")


def test_the_dashboard_link_opens_the_set5_view_on_its_first_screen(tmp_path):
    """One link everywhere (vdsr.tracking.dashboard_url), and a real ``mlflow server`` with the store
    as the stages make it shows it in headless Chromium on a 1920x1080 screen: the saved view "Set5
    PSNR" (the experiment's tag), only the evaluated runs (not a report logged to a run of its
    own), best Set5 x2 first, each with its Duration, model and Set5 PSNR x2/x3/x4. The screenshot is
    kept with VDSR_TEST_ARTIFACTS=<folder>."""
    from mlflow.tracking import MlflowClient
    from mlflow_server import MlflowServer, keep_artifact, open_page, visible_text

    from vdsr import tracking

    links = {name: set(DASHBOARD.findall((REPO_ROOT / name).read_text()))
             for name in ("README.md", "docs/mlflow.md", "Makefile")}
    assert all(len(found) == 1 for found in links.values()) and len(set.union(*links.values())) == 1, links
    [link] = links["README.md"]
    assert link == tracking.dashboard_url("sqlite:///mlflow.db", "1"), link

    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    uri = f"sqlite:///{(folder / 'mlflow.db').as_posix()}"  # the store the server opens
    experiment = tracking._open_store(uri, "vdsr", folder / "artifacts")  # as the train stage opens it
    assert experiment == "1"  # the link's experiment: the first one of a new store
    client = MlflowClient(uri)
    runs = {"vdsr lr-small": ("vdsr", 30.1), "vdsr lr-large": ("vdsr", 30.4), "srcnn base": ("srcnn", 29.2),
            "vdsr lr-large report": ("vdsr", None)}
    for name, (model, psnr) in runs.items():
        run = client.create_run(experiment, run_name=name)
        client.log_param(run.info.run_id, "train.model", model)  # as tracking.flatten_params names it
        client.log_param(run.info.run_id, "train.lr", "0.001")
        if psnr is not None:  # what the evaluate stage logs; a report of its own run has none
            for offset, scale in enumerate((2, 3, 4)):
                client.log_metric(run.info.run_id, f"eval/Set5/x{scale}/psnr", psnr - 3 * offset)
            client.log_metric(run.info.run_id, "time_s", 100.0)
        client.set_terminated(run.info.run_id)
    with MlflowServer(folder, timeout_s=300) as server:  # ~10-15 s idle, minutes beside a training
        screenshot = tmp_path / "mlflow-set5-view.png"
        dom = open_page(server.url + link.removeprefix("http://127.0.0.1:5000"), tmp_path, screenshot, (1920, 1080))
    keep_artifact(screenshot)
    text = visible_text(dom)
    assert "Set5 PSNR You're viewing a shared view" in text and "Sort: eval/Set5/x2/psnr" in text, text[:3000]
    headers = "Run Name Created Parameters Metrics Duration train.model eval/Set5/x2/psnr eval/Set5/x3/psnr eval/Set5/x4/psnr"
    assert headers in text, text[:3000]
    names = re.findall(r"Pin run #\w+ (.+?) \d+ seconds? ago", text)
    assert names == ["vdsr lr-large", "vdsr lr-small", "srcnn base"], text[:3000]
    cells = r"\S+ms vdsr 30\.4 27\.4 24\.4 \S+ms vdsr 30\.1 27\.1 24\.1 \S+ms srcnn 29\.2 26\.2 23\.2 "
    assert re.search(cells, text), text[:3000]  # Duration, model, x2, x3, x4 in that order
    assert "3 matching runs" in text, text[:3000]


def test_the_installed_mlflow_ui_reads_the_view_as_written():
    """The names the view relies on are those of the installed MLflow UI's bundle (an upgrade that
    renames them fails here, not silently in a browser): the URL parameter, the tag prefix, the
    envelope's fields and the table-state keys."""
    import mlflow

    from vdsr import tracking

    bundle = "".join(path.read_text(errors="replace") for path in
                     (Path(mlflow.__file__).parent / "server/js/build/static/js").glob("*.js"))
    assert '"viewStateShareKey"' in bundle and f'"{tracking.SHARED_VIEW_TAG_PREFIX}"' in bundle
    assert "Invalid saved-view envelope" in bundle and "string `state`" in bundle
    for key in tracking.VIEW_STATE:
        assert f'"{key}"' in bundle, key
