"""DVC experiments on the tiny pipeline and the MLflow runs they leave in the repository's store
(``sqlite:///<repo>/mlflow.db``): named experiments one after another, how they look in
``dvc exp show`` and ``dvc plots show`` and how to get back to the committed state (docs/experiments.md), then two
queued ones run side by side by ``dvc queue start -j 2``."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from conftest import REPO_ROOT, run_checked, run_child, with_faulthandler
from mlflow.tracking import MlflowClient

pytest_plugins = ["mlflow_server"]  # the tiny_repo fixture

EXP_TIMEOUT_S = 1200  # each tiny experiment takes ~15-40 s, 10 min on a machine busy with a training; the bound only stops a hung one
QUEUE_TIMEOUT_S = 600


def store_runs(repo: Path) -> list:
    """The runs of experiment ``vdsr`` in the repository's default store, oldest first."""
    client = MlflowClient(f"sqlite:///{(repo / 'mlflow.db').as_posix()}")
    experiment = client.get_experiment_by_name("vdsr")
    assert experiment is not None, "no MLflow experiment 'vdsr' in the repository's store"
    return client, client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def exp_show(repo: Path, env: dict[str, str]) -> dict[str, dict]:
    """``dvc exp show --json`` as {experiment name: its train.vdsr params}."""
    shown = json.loads(run_checked(["dvc", "exp", "show", "--json"], repo, env).stdout)
    found = {}
    for baseline in shown:
        for exp in [baseline, *(baseline.get("experiments") or [])]:
            for revision in exp.get("revs", [exp]):
                name = revision.get("name")
                data = (revision.get("data") or {}) if isinstance(revision, dict) else {}
                params = data.get("params", {}).get("params.yaml", {}).get("data", {})
                if name:
                    found[name] = params.get("train", {}).get("vdsr", {})
    return found


def assert_complete_run(client: MlflowClient, run, name: str, lr: str) -> None:
    assert run.info.status == "FINISHED", (name, run.info)
    assert run.info.run_name == f"vdsr {name}" and run.data.tags["dvc.exp_name"] == name
    assert run.data.params["train.lr"] == lr
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_psnr_x2")] == [1, 2]
    assert {"eval/Set5/x2/psnr", "eval/Set5/x2/ssim"} <= set(run.data.metrics), run.data.metrics


def artifact_text(client: MlflowClient, run_id: str, path: str, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(client.download_artifacts(run_id, path, str(folder))).read_text()


EXPERIMENTS_PAGE = REPO_ROOT / "docs" / "experiments.md"


def docs_command(prefix: str) -> list[str]:
    """The command of docs/experiments.md that starts with ``prefix``, split as a shell would (no shell)."""
    import shlex

    for line in EXPERIMENTS_PAGE.read_text().splitlines():
        if line.startswith(prefix):
            return shlex.split(line.split(" #", 1)[0])
    raise AssertionError(f"docs/experiments.md has no line starting with {prefix!r}")


def documented_exp_show(repo: Path, env: dict[str, str]) -> dict[str, dict[str, str]]:
    """The page's ``dvc exp show`` line with ``--csv``: {experiment name: {column: value}}."""
    import csv
    import io

    table = run_checked([*docs_command("dvc exp show --only-changed"), "--csv"], repo, env).stdout
    return {row["Experiment"]: row for row in csv.DictReader(io.StringIO(table)) if row.get("Experiment")}


def experiment_psnr(repo: Path, env: dict[str, str], name: str) -> float:
    """Set5 x2 PSNR of VDSR in ``metrics/eval_vdsr.json`` as experiment ``name`` left it (a git ref)."""
    refs = run_checked(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).stdout.split()
    ref = next(ref for ref in refs if ref.endswith(f"/{name}"))
    return json.loads(run_checked(["git", "show", f"{ref}:metrics/eval_vdsr.json"], repo, env).stdout)["vdsr"]["Set5"]["x2"]["psnr"]


def assert_views(repo: Path, env: dict[str, str], experiments: dict[str, str]) -> None:
    """`dvc plots show` renders each defined plot once, its HTML folder is git-ignored, and the
    page's `dvc exp show` fits every experiment's PSNR (from evaluate@vdsr's metrics file, there
    with or without the report) and changed params in 120 columns; the training curves are also
    images (plots/curves, stage curves@<name>), which show without a network."""
    shown = json.loads(run_checked(["dvc", "plots", "show", "--json"], repo, env).stdout)
    plots = shown["data"]
    images = sorted(f"plots/comparison/{p.name}" for p in (repo / "plots/comparison").glob("*.png"))
    curves = [f"plots/curves/vdsr_{chart}.png" for chart in ("loss", "lr", "val_psnr")]  # VDSR only here
    assert sorted(p.relative_to(repo).as_posix() for p in (repo / "plots/curves").iterdir()) == curves
    assert images and sorted(plots) == sorted(["loss", "learning_rate", "validation_psnr", *images, *curves]), \
        sorted(plots)
    for curve in curves:  # a PNG image, listed as such (not a Vega chart)
        assert (repo / curve).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert [render["type"] for render in plots[curve]] == ["image"], plots[curve]
    # The tiny pipeline validates x2 only: validation_psnr (x2, x3, x4) cannot find the other two;
    # and it trains VDSR only, so each curve's plots/train_srcnn.csv is missing.
    expected = {("validation_psnr", "FieldNotFoundError")}
    expected |= {(name, "FileNotFoundError") for name in ("loss", "learning_rate", "validation_psnr")}
    assert {(e["name"], e["type"]) for e in shown.get("errors") or []} <= expected, shown.get("errors")
    for name, renders in plots.items():
        assert len(renders) == (0 if name == "validation_psnr" else 1), (name, renders)
    run_checked(["dvc", "plots", "show"], repo, env)
    assert (repo / "dvc_plots/index.html").is_file()
    assert "dvc_plots" not in run_checked(["git", "status", "--porcelain", "--untracked-files=all"], repo, env).stdout

    command = docs_command("dvc exp show --only-changed")
    table = run_checked(command, repo, {**env, "COLUMNS": "120"}).stdout
    print(f"{' '.join(command)}\n{table}")  # the page's example table
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120 and "…" not in table, table
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[1:] == ["vdsr.Set5.x2.psnr", "vdsr.Set5.x4.psnr", "train.vdsr.lr"], table
    as_csv = documented_exp_show(repo, env)
    for name, lr in experiments.items():
        psnr = experiment_psnr(repo, env, name)
        row = next(line for line in lines if f"[{name}]" in line)
        assert f"{psnr:.5g}" in row and row.split()[-1] == lr, (name, psnr, table)
        assert float(as_csv[name]["vdsr.Set5.x2.psnr"]) == psnr and float(as_csv[name]["vdsr.Set5.x4.psnr"]) > 0, \
            (name, as_csv[name])


def test_named_experiments_are_named_mlflow_runs(tiny_repo):
    repo, env = tiny_repo()
    run_checked(["dvc", "repro"], repo, env, timeout=EXP_TIMEOUT_S)  # a committed baseline, with its dvc.lock
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "baseline"], repo, env)
    committed = {path: (repo / path).read_bytes() for path in ("params.yaml", "dvc.lock", "metrics/eval.json")}
    for name, lr in (("lr-small", "0.0005"), ("lr-large", "0.002")):
        # another lr than the persisted checkpoint's: moved aside on request, never trained over (docs)
        done = run_checked(["dvc", "exp", "run", "-n", name, "-S", f"train.vdsr.lr={lr}"], repo,
                           {**env, "VDSR_START_OVER": "1"}, timeout=EXP_TIMEOUT_S)
        output = done.stdout + done.stderr
        assert "tracking is off" not in output and "not logged to MLflow" not in output, output

    head = run_checked(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    client, runs = store_runs(repo)
    runs = [run for run in runs if run.data.tags.get("dvc.exp_name")]  # not the baseline's
    assert [run.info.run_name for run in runs] == ["vdsr lr-small", "vdsr lr-large"]
    for run, (name, lr) in zip(runs, (("lr-small", "0.0005"), ("lr-large", "0.002")), strict=True):
        assert_complete_run(client, run, name, lr)
        assert run.data.tags["dvc.exp_baseline_rev"] == head
    shown = exp_show(repo, env)
    assert shown["lr-small"]["lr"] == 0.0005 and shown["lr-large"]["lr"] == 0.002, shown
    assert_views(repo, env, {"lr-small": "0.0005", "lr-large": "0.002"})

    # `dvc exp run` left the last experiment in the workspace; the page's way back to the commit:
    assert (repo / "params.yaml").read_bytes() != committed["params.yaml"]
    run_checked(docs_command("dvc exp apply HEAD"), repo, env)
    assert {path: (repo / path).read_bytes() for path in committed} == committed
    assert "up to date" in run_checked(["dvc", "status"], repo, env).stdout
    run_checked(["dvc", "exp", "apply", "lr-small"], repo, env)  # and to an experiment
    assert "lr: 0.0005" in (repo / "params.yaml").read_text()
    assert "up to date" in run_checked(["dvc", "status"], repo, env).stdout


def test_an_experiment_that_stops_at_evaluate_shows_its_psnr(tiny_repo):
    """``dvc exp run evaluate@vdsr`` (no report, no curves) from a fresh clone: the page's
    ``dvc exp show`` line has its Set5 PSNR, from evaluate@vdsr's own metrics file, in 120 columns."""
    repo, env = tiny_repo()
    done = run_checked(["dvc", "exp", "run", "--temp", "-n", "eval-only", "evaluate@vdsr", "-S", "train.vdsr.lr=0.003"],
                       repo, env, timeout=EXP_TIMEOUT_S)
    ran = set(re.findall(r"Running stage '([^']+)'", done.stdout))
    assert ran == {"download", "prepare", "train@vdsr", "evaluate@vdsr"}, done.stdout[-3000:]
    refs = run_checked(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).stdout.split()
    ref = next(ref for ref in refs if ref.endswith("/eval-only"))
    report = run_child(["git", "cat-file", "-e", f"{ref}:metrics/eval.json"], cwd=repo, env=env, timeout=60)
    assert report.returncode != 0, "the report ran: its metrics/eval.json is in the experiment"
    psnr = experiment_psnr(repo, env, "eval-only")

    as_csv = documented_exp_show(repo, env)
    assert float(as_csv["eval-only"]["vdsr.Set5.x2.psnr"]) == psnr > 20, as_csv["eval-only"]
    assert float(as_csv["eval-only"]["vdsr.Set5.x4.psnr"]) > 15, as_csv["eval-only"]
    table = run_checked(docs_command("dvc exp show --only-changed"), repo, {**env, "COLUMNS": "120"}).stdout
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120 and "…" not in table, table
    header = next(line for line in lines if "Experiment" in line).split()
    assert header[1:] == ["vdsr.Set5.x2.psnr", "vdsr.Set5.x4.psnr", "train.vdsr.lr"], table
    row = next(line for line in lines if "[eval-only]" in line)  # "!" only where no evaluation ran (main)
    assert f"{psnr:.5g}" in row and "!" not in row and row.split()[-1] == "0.003", (psnr, table)


def queue_status(repo: Path, env: dict[str, str]) -> dict[str, str]:
    """``dvc queue status`` as {experiment name: Queued | Running | Success | Failed}."""
    table = run_checked(["dvc", "queue", "status"], repo, env).stdout
    status = {}
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[-1] in ("Queued", "Running", "Success", "Failed"):
            status[fields[1]] = fields[-1]
    return status


def repo_processes(repo: Path) -> dict[int, str]:
    """{pid: command line} of every process (but this one) whose working directory is in ``repo``."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if int(proc.name) != os.getpid() and Path(os.readlink(proc / "cwd")).is_relative_to(repo):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return found


def start_queue_workers(repo: Path, env: dict[str, str], count: int) -> None:
    """``dvc queue start -j count``, returning as soon as the workers are started.

    DVC forks its workers with ``multiprocessing`` and they keep the command's stdout and stderr:
    read through pipes (:func:`run_checked`), the command would seem to run until every worker has
    exited. Its output goes to a file instead, like the workers' own (``.dvc/tmp/exps/celery``).
    """
    log = repo / ".dvc" / "tmp" / "queue-start.log"
    with log.open("ab") as out:
        done = subprocess.run(["dvc", "queue", "start", "-j", str(count)], timeout=120, check=False, cwd=repo,
                              env=with_faulthandler(env), stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    assert done.returncode == 0, f"dvc queue start exited {done.returncode}: {log.read_text()}"


def queue_diagnostics(repo: Path, env: dict[str, str], names) -> str:
    """What a stuck queue was doing: the stack of every Python process working in ``repo`` (SIGABRT;
    they run with PYTHONFAULTHANDLER and write to DVC's log files), the workers' logs and each
    experiment's log. The processes are killed."""
    pids = list(repo_processes(repo))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
    time.sleep(5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    parts = [f"processes in the repository: {pids}"]
    parts += [f"--- {log.relative_to(repo)} ---\n{log.read_text(errors='replace')[-4000:]}"
              for log in sorted((repo / ".dvc" / "tmp").rglob("*.out")) + sorted((repo / ".dvc" / "tmp").glob("*.log"))]
    for name in names:
        logs = run_child(["dvc", "queue", "logs", name], cwd=repo, env=env, timeout=60)
        parts.append(f"--- dvc queue logs {name} ---\n{(logs.stdout + logs.stderr)[-4000:]}")
    return "\n".join(parts)


def test_queued_experiments_in_parallel_share_one_store(tiny_repo):
    repo, env = tiny_repo()
    run_checked(["dvc", "repro", "prepare", "baseline"], repo, env, timeout=EXP_TIMEOUT_S)
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "data"], repo, env)  # queued experiments start from HEAD
    assert not (repo / "mlflow.db").exists()  # the two experiments create the store between them

    experiments = {"queued-a": "0.0007", "queued-b": "0.0015"}  # lrs unlike HEAD's: no run-cache hits
    for name, lr in experiments.items():
        run_checked(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.vdsr.lr={lr}"], repo, env)
    assert set(queue_status(repo, env).values()) == {"Queued"}
    started = time.monotonic()
    start_queue_workers(repo, env, 2)
    try:  # Poll with git, which is cheap: a finished experiment is a ref. Ask DVC now and then.
        for tick in itertools.count():
            refs = run_checked(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], repo, env).stdout
            finished = {name for name in experiments if re.search(rf"/{re.escape(name)}$", refs, re.MULTILINE)}
            stuck = None
            if finished == set(experiments) or tick % 10 == 9:
                status = queue_status(repo, env)
                if status and all(s in ("Success", "Failed") for s in status.values()):
                    break
                workers = [cmd for cmd in repo_processes(repo).values() if "queue-worker" in cmd]
                if "Queued" in status.values() and not workers and time.monotonic() - started > 60:
                    stuck = f"every worker has stopped with an experiment still queued: {status}"
            if time.monotonic() - started > QUEUE_TIMEOUT_S:
                stuck = f"queue not done after {QUEUE_TIMEOUT_S} s: {queue_status(repo, env)}"
            if stuck:
                raise AssertionError(f"{stuck}\n{queue_diagnostics(repo, env, experiments)}")
            time.sleep(1)
    finally:
        run_checked(["dvc", "queue", "stop", "--kill"], repo, env)
    elapsed = time.monotonic() - started
    logs = {name: run_checked(["dvc", "queue", "logs", name], repo, env).stdout for name in experiments}
    assert status == {name: "Success" for name in experiments}, (status, logs)
    for log in logs.values():
        assert "database is locked" not in log and "already exists" not in log, log
        assert "tracking is off" not in log and "not logged to MLflow" not in log, log

    client, runs = store_runs(repo)
    assert sorted(run.data.tags["dvc.exp_name"] for run in runs) == sorted(experiments)
    for run in runs:
        name = run.data.tags["dvc.exp_name"]
        assert_complete_run(client, run, name, experiments[name])
    assert len({run.data.tags["pipeline.run_id"] for run in runs}) == 2  # one id per experiment
    a, b = runs
    assert b.info.start_time < a.info.end_time, "the two experiments did not run at the same time"
    print(f"two queued experiments in {elapsed:.0f} s; MLflow runs overlapped "
          f"{(min(a.info.end_time, b.info.end_time) - b.info.start_time) / 1000:.1f} s")
    shown = exp_show(repo, env)
    assert {name: shown[name]["lr"] for name in experiments} == {k: float(v) for k, v in experiments.items()}, shown
    as_csv = documented_exp_show(repo, env)  # the queued runs' Set5 PSNR, in the page's view
    assert {name: float(as_csv[name]["vdsr.Set5.x2.psnr"]) for name in experiments} == \
        {name: experiment_psnr(repo, env, name) for name in experiments}, as_csv


def test_two_models_side_by_side_and_one_changed(tiny_repo, tmp_path):
    """SRCNN and VDSR in one pipeline: ``dvc repro`` trains and evaluates both (two MLflow runs
    with one pipeline.run_id), ``-S train.srcnn...`` re-runs SRCNN's stages and the report only,
    leaving VDSR's run of the commit as it was (the experiment's report of VDSR goes to a new run),
    and both models' numbers are in ``dvc metrics diff`` and ``dvc exp show``."""
    srcnn = {"model": "srcnn", "depth": 3, "width": 8, "optimizer": "adam", "lr": 1.0e-3, "momentum": 0.9,
             "weight_decay": 0.0, "lr_step_epochs": 20, "lr_gamma": 0.1, "epochs": 2, "steps_per_epoch": 10,
             "batch_size": 16, "clip": "none", "clip_theta": 1.0, "augment": True, "seed": 0, "device": "cpu"}
    repo, env = tiny_repo(train={"srcnn": srcnn})
    first = run_checked(["dvc", "repro"], repo, env, timeout=EXP_TIMEOUT_S)
    for stage in ("train@vdsr", "train@srcnn", "evaluate@vdsr", "evaluate@srcnn", "curves@vdsr", "curves@srcnn",
                  "report"):
        assert f"Running stage '{stage}'" in first.stdout, first.stdout[-3000:]
    client, runs = store_runs(repo)
    assert sorted(run.data.tags["pipeline.model"] for run in runs) == ["srcnn", "vdsr"]
    assert len({run.data.tags["pipeline.run_id"] for run in runs}) == 1  # one pipeline run, grouped
    for run in runs:
        assert {"eval/Set5/x2/psnr", "eval/Set5/seconds"} <= set(run.data.metrics), run.data.metrics
    table = json.loads((repo / "metrics/eval.json").read_text())["Set5"]["x2"]
    assert set(table) == {"bicubic", "srcnn", "vdsr"} and table["srcnn"]["paper_psnr"] == 36.66
    report = (repo / "reports/results.md").read_text()
    assert "| Set5 | x2 | 33.66 / 0.9299 |" in report and "gains most and least" in report
    run_checked(["git", "add", "-A"], repo, env)
    run_checked(["git", "commit", "-qm", "both models"], repo, env)
    for name in ("vdsr", "srcnn"):  # the committed hand-over files name the store without a machine path
        assert json.loads((repo / f"models/{name}.mlflow_run.json").read_text())["tracking_uri"] == "sqlite:///mlflow.db"
    baseline = {run.data.tags["pipeline.model"]: run for run in runs}
    vdsr_report = artifact_text(client, baseline["vdsr"].info.run_id, "report/results.md", tmp_path / "a")
    assert vdsr_report == report

    changed = run_checked(["dvc", "exp", "run", "-n", "srcnn-lr", "-S", "train.srcnn.lr=0.002"], repo,
                          {**env, "VDSR_START_OVER": "1"}, timeout=EXP_TIMEOUT_S)  # SRCNN's checkpoint moved aside
    ran = set(re.findall(r"Running stage '([^']+)'", changed.stdout))
    assert ran == {"train@srcnn", "evaluate@srcnn", "curves@srcnn", "report"}, changed.stdout[-3000:]
    # VDSR's stages were skipped: its run of the committed pipeline is left as it was, and the
    # experiment's report goes to a new run of its own beside it.
    vdsr_id = baseline["vdsr"].info.run_id
    after = client.get_run(vdsr_id)
    assert (after.info.end_time, after.data.tags) == (baseline["vdsr"].info.end_time, baseline["vdsr"].data.tags)
    assert artifact_text(client, vdsr_id, "report/results.md", tmp_path / "b") == vdsr_report
    assert (f"run {vdsr_id} belongs to the workspace (no DVC experiment), not to DVC experiment 'srcnn-lr': "
            "starting a new run for the report of vdsr") in changed.stdout + changed.stderr
    _, runs = store_runs(repo)
    mine = {run.info.run_name: run for run in runs if run.data.tags.get("dvc.exp_name") == "srcnn-lr"}
    assert sorted(mine) == ["srcnn srcnn-lr", "vdsr srcnn-lr report"], sorted(mine)
    assert mine["vdsr srcnn-lr report"].data.tags["pipeline.source_run_id"] == vdsr_id
    new_report = (repo / "reports/results.md").read_text()
    assert new_report != vdsr_report
    for run in mine.values():
        assert artifact_text(client, run.info.run_id, "report/results.md", tmp_path / run.info.run_id) == new_report
    diff = json.loads(run_checked(["dvc", "metrics", "diff", "--json"], repo, env).stdout)  # {file: {key: {old, new, diff}}}
    assert "Set5.x2.srcnn.psnr" in diff["metrics/eval.json"] and "Set5.x2.vdsr.psnr" not in diff["metrics/eval.json"]
    shown = json.dumps(json.loads(run_checked(["dvc", "exp", "show", "--json"], repo, env).stdout))
    assert "train_srcnn" in shown and "train_vdsr" in shown and '"srcnn-lr"' in shown
