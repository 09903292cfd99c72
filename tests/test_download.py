"""The download stage against real loopback HTTP servers and local folders (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import init_repo, repo_env, run_checked, run_child

from vdsr.download import (
    DownloadError,
    Manifest,
    ManifestError,
    backoff_delay,
    download_sets,
    file_url,
    load_manifest,
    repository_root,
    resolve_source,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = REPO_ROOT / "data" / "manifest.json"
FAST = dict(workers=4, retries=1, timeout_s=5.0, backoff_s=0.01, progress=False)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MANIFEST)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def copy_mirror(manifest: Manifest, shared: Path, target: Path, sets: list[str]) -> Path:
    """A writable copy of the source files of ``sets``, laid out like the public source."""
    for set_name in sets:
        for entry in manifest.sets[set_name]:
            (target / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared / entry.path, target / entry.path)
    return target


def assert_exact(root: Path, manifest: Manifest, sets: list[str]) -> None:
    """``root`` holds exactly the selected sets under canonical names, each with its manifest hash."""
    expected = sorted(f"{s}/{e.name}" for s in sets for e in manifest.sets[s])
    assert all_files(root) == expected
    for set_name in sets:
        for entry in manifest.sets[set_name]:
            assert sha256(root / set_name / entry.name) == entry.sha256


# --- over HTTP ----------------------------------------------------------------------------------


def test_http_download_gives_verified_canonical_files(tmp_path, manifest, shared_datasets, http_server):
    server = http_server(shared_datasets)
    report = download_sets(manifest, ["Set5", "Set14"], tmp_path / "raw", source=server.url, **FAST)
    assert_exact(tmp_path / "raw", manifest, ["Set5", "Set14"])
    assert (report.fetched, report.skipped, report.removed) == (19, 0, 0)
    assert (tmp_path / "raw" / "Set5" / "baby.png").is_file()
    assert len(server.requests) == 19


def test_second_run_fetches_nothing(tmp_path, manifest, shared_datasets, http_server):
    server = http_server(shared_datasets)
    download_sets(manifest, ["Set5"], tmp_path / "raw", source=server.url, **FAST)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "raw").rglob("*")}
    requests_before = len(server.requests)

    report = download_sets(manifest, ["Set5"], tmp_path / "raw", source=server.url, **FAST)
    assert (report.fetched, report.skipped) == (0, 5)
    assert len(server.requests) == requests_before
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "raw").rglob("*")} == mtimes


def test_wrong_file_is_refetched_and_strays_are_removed(tmp_path, manifest, shared_datasets, http_server):
    server = http_server(shared_datasets)
    root = tmp_path / "raw"
    download_sets(manifest, ["Set5"], root, source=server.url, **FAST)
    (root / "Set5" / "bird.png").write_bytes(b"not the bird")
    (root / "Set5" / "notes.txt").write_text("stray")
    (root / "Set5" / ".bird.png.abc.tmp").write_bytes(b"left by a killed run")
    (root / "T91").mkdir()
    (root / "T91" / "t1.bmp").write_bytes(b"unselected set")
    server.requests.clear()

    report = download_sets(manifest, ["Set5"], root, source=server.url, **FAST)
    assert_exact(root, manifest, ["Set5"])
    assert server.requests == ["/data/set5/img_002.png"]
    assert (report.fetched, report.skipped, report.removed) == (1, 4, 4)


# --- local mirror -------------------------------------------------------------------------------


def test_local_folder_mirror(tmp_path, manifest, shared_datasets):
    source = resolve_source(manifest.base_urls["Set5"], str(shared_datasets))
    assert source.startswith("file://")
    download_sets(manifest, ["Set5"], tmp_path / "raw", source=source, **FAST)
    assert_exact(tmp_path / "raw", manifest, ["Set5"])


def test_new_sets_are_pinned_to_their_public_sources(manifest, shared_datasets):
    """B100 comes from the Set5 repository and commit, Urban100 (colour) from its own; all 100
    files each, with the sha256 of the mirror's SHA256SUMS (../shared/datasets/SOURCES.md)."""
    sums = dict(reversed(line.split(None, 1)) for line in (shared_datasets / "SHA256SUMS").read_text().splitlines())
    sums = {path.strip(): digest for path, digest in sums.items()}
    assert manifest.base_urls["B100"] == manifest.base_urls["Set5"] == (
        "https://raw.githubusercontent.com/jiny2001/dcscn-super-resolution/d382bc30d41c94ac72f8cb148d61cc4864b3b380/")
    assert manifest.base_urls["Urban100"] == (
        "https://raw.githubusercontent.com/majedelhelou/denoising_datasets/58234876fef6f1b56306705c78dfd40cdb837b86/")
    for set_name, folder in (("B100", "data/bsd100/"), ("Urban100", "CUrban100/")):
        entries = manifest.sets[set_name]
        assert [e.name for e in entries] == [f"img_{i:03d}.png" for i in range(1, 101)]
        assert all(e.path == folder + e.name and e.sha256 == sums[e.path] for e in entries)


def test_each_set_comes_from_its_own_source(tmp_path, manifest, shared_datasets, http_server):
    """Two sources on two loopback servers: each set is fetched from its own one; a mirror serves both."""
    sets = {"Set5": manifest.sets["Set5"], "Urban100": manifest.sets["Urban100"][:2]}
    servers = {}
    for set_name, entries in sets.items():
        folder = tmp_path / f"source-{set_name}"
        for entry in entries:
            (folder / entry.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared_datasets / entry.path, folder / entry.path)
        servers[set_name] = http_server(folder)
    two_sources = Manifest(sets=sets, base_urls={name: server.url for name, server in servers.items()})
    report = download_sets(two_sources, list(sets), tmp_path / "raw", **FAST)
    assert report.fetched == 7 and report.source == "manifest sources"
    assert_exact(tmp_path / "raw", two_sources, list(sets))
    for set_name, server in servers.items():
        assert sorted(server.requests) == sorted(f"/{e.path}" for e in sets[set_name])

    mirror = http_server(shared_datasets)  # both sources at their public paths, as SOURCES.md says
    report = download_sets(two_sources, list(sets), tmp_path / "from-mirror", source=mirror.url, **FAST)
    assert report.fetched == 7 and report.source == mirror.url
    assert_exact(tmp_path / "from-mirror", two_sources, list(sets))


def test_manifest_source_errors_name_the_field(tmp_path):
    entry = {"name": "baby.png", "path": "data/set5/img_001.png", "sha256": "0" * 64}
    cases = {
        "sources.local.base_url: expected an http(s) URL, got 'ftp://x/'":
            {"sources": {"local": {"base_url": "ftp://x/"}}, "sets": {"Set5": {"source": "local", "files": [entry]}}},
        "sets.Set5.source: expected one of local, got 'elsewhere'":
            {"sources": {"local": {"base_url": "http://127.0.0.1:1/"}},
             "sets": {"Set5": {"source": "elsewhere", "files": [entry]}}},
        "sets.Set5: expected {source, files}, got list":
            {"sources": {"local": {"base_url": "http://127.0.0.1:1/"}}, "sets": {"Set5": [entry]}},
    }
    for message, data in cases.items():
        path = tmp_path / "manifest.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ManifestError, match=re.escape(f"{path}: {message}")):
            load_manifest(path)


def test_mirror_choice(tmp_path, manifest):
    base_url = manifest.base_urls["Set5"]
    assert resolve_source(base_url, None) == base_url
    assert resolve_source(base_url, "http://127.0.0.1:8765") == "http://127.0.0.1:8765/"
    with pytest.raises(DownloadError, match="VDSR_DATA_MIRROR"):
        resolve_source(base_url, str(tmp_path / "missing"))
    entry = manifest.sets["Set5"][0]
    assert file_url(base_url, entry) == base_url + entry.path


# --- failures -----------------------------------------------------------------------------------


def test_corrupted_file_is_reported_and_not_left_behind(tmp_path, manifest, shared_datasets, http_server):
    mirror = copy_mirror(manifest, shared_datasets, tmp_path / "mirror", ["Set5"])
    bird = mirror / "data/set5/img_002.png"
    data = bytearray(bird.read_bytes())
    data[1000] ^= 0xFF
    bird.write_bytes(bytes(data))
    server = http_server(mirror)
    root = tmp_path / "raw"

    with pytest.raises(DownloadError) as caught:
        download_sets(manifest, ["Set5"], root, source=server.url, **FAST)
    message = str(caught.value)
    assert "1 of 5" in message and "Set5/bird.png" in message and "sha256 mismatch" in message
    assert f"{server.url}data/set5/img_002.png" in message
    assert all_files(root) == ["Set5/baby.png", "Set5/butterfly.png", "Set5/head.png", "Set5/woman.png"]


def test_404_is_clear_and_not_retried(tmp_path, manifest, shared_datasets, http_server):
    mirror = copy_mirror(manifest, shared_datasets, tmp_path / "mirror", ["Set5"])
    (mirror / "data/set5/img_005.png").unlink()
    server = http_server(mirror)

    with pytest.raises(DownloadError) as caught:
        download_sets(manifest, ["Set5"], tmp_path / "raw", source=server.url, **{**FAST, "retries": 3})
    message = str(caught.value)
    assert "Set5/woman.png: HTTP 404" in message and f"{server.url}data/set5/img_005.png" in message
    assert server.requests.count("/data/set5/img_005.png") == 1
    assert all_files(tmp_path / "raw" / "Set5") == ["baby.png", "bird.png", "butterfly.png", "head.png"]


def test_missing_file_in_local_mirror(tmp_path, manifest, shared_datasets):
    mirror = copy_mirror(manifest, shared_datasets, tmp_path / "mirror", ["Set5"])
    (mirror / "data/set5/img_001.png").unlink()
    with pytest.raises(DownloadError, match=r"Set5/baby.png: not found in the mirror folder.*img_001\.png"):
        download_sets(manifest, ["Set5"], tmp_path / "raw", source=resolve_source("", str(mirror)), **FAST)


def test_unreachable_host_fails_fast_naming_every_file(tmp_path, manifest, closed_port_url):
    start = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        download_sets(manifest, ["Set5"], tmp_path / "raw", source=closed_port_url, **FAST)
    assert time.monotonic() - start < 5
    message = str(caught.value)
    assert "5 of 5" in message and "cannot connect" in message and "after 2 attempt(s)" in message
    for entry in manifest.sets["Set5"]:
        assert f"Set5/{entry.name}" in message and closed_port_url + entry.path in message
    assert all_files(tmp_path / "raw") == []


def test_silent_server_times_out(tmp_path, manifest, silent_server_url):
    start = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        download_sets(
            manifest, ["Set5"], tmp_path / "raw", source=silent_server_url, **{**FAST, "workers": 5, "timeout_s": 0.3}
        )
    assert time.monotonic() - start < 5
    assert "Set5/baby.png: timed out after 0.3 s" in str(caught.value)
    assert all_files(tmp_path / "raw") == []


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(i, 0.5) for i in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert backoff_delay(20, 0.5) == backoff_delay(5000, 0.5) == 30.0


# --- safety -------------------------------------------------------------------------------------


def write_manifest(path: Path, entry: dict) -> Path:
    sources = {"local": {"base_url": "http://127.0.0.1:1/"}}
    path.write_text(json.dumps({"sources": sources, "sets": {"Set5": {"source": "local", "files": [entry]}}}))
    return path


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "../x"),
        ("name", "/abs"),
        ("name", "a/b"),
        ("name", ".."),
        ("path", "../etc/passwd"),
        ("path", "/etc/passwd"),
        ("path", "data/../../x"),
        ("path", "data//x"),
        ("sha256", "abc"),
    ],
)
def test_malicious_manifest_is_refused(tmp_path, field, value):
    entry = {"name": "baby.png", "path": "data/set5/img_001.png", "sha256": "0" * 64, field: value}
    with pytest.raises(ManifestError, match=field):
        load_manifest(write_manifest(tmp_path / "manifest.json", entry))


def test_symlink_escape_is_refused(tmp_path, manifest):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "raw"
    root.mkdir()
    (root / "Set5").symlink_to(outside)
    with pytest.raises(DownloadError, match="outside"):
        download_sets(manifest, ["Set5"], root, source="http://127.0.0.1:1/", **FAST)
    assert list(outside.iterdir()) == []
    assert (root / "Set5").is_symlink()


# --- the stage script ---------------------------------------------------------------------------


def run_stage(workdir: Path, params: str, mirror: str, **extra_env: str) -> subprocess.CompletedProcess:
    (workdir / "data").mkdir(exist_ok=True)
    shutil.copyfile(MANIFEST, workdir / "data" / "manifest.json")
    (workdir / "params.yaml").write_text(params)
    env = {**{k: v for k, v in os.environ.items() if k != "DVC_ROOT"}, "VDSR_DATA_MIRROR": mirror, **extra_env}
    return run_child([sys.executable, str(REPO_ROOT / "stages" / "download.py")], cwd=workdir, env=env, timeout=60)


def test_stage_downloads_from_mirror(tmp_path, manifest, shared_datasets):
    params = "download:\n  sets: [Set5]\n  workers: 2\n  retries: 0\n  timeout_s: 5\n"
    result = run_stage(tmp_path, params, str(shared_datasets))
    assert result.returncode == 0, result.stderr
    assert f"VDSR_DATA_MIRROR={shared_datasets}" in result.stderr
    assert "fetched 5, skipped 0" in result.stderr
    assert_exact(tmp_path / "data" / "raw", manifest, ["Set5"])


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("workers: 0", "download.workers"),
        ("sets: [Set6]", "download.sets[0]"),
        ("timeout_s: -1", "download.timeout_s"),
        ("retries: many", "download.retries"),
    ],
)
def test_stage_rejects_bad_params(tmp_path, shared_datasets, line, key):
    values = {"sets": "[Set5]", "workers": "2", "retries": "0", "timeout_s": "5"}
    name, value = line.split(": ")
    values[name] = value
    params = "download:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items())
    result = run_stage(tmp_path, params, str(shared_datasets))
    assert result.returncode != 0
    assert f"download: error: params.yaml: {key}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_stage_reports_download_failure(tmp_path, closed_port_url):
    params = "download:\n  sets: [Set5]\n  workers: 5\n  retries: 0\n  timeout_s: 2\n"
    result = run_stage(tmp_path, params, closed_port_url)
    assert result.returncode != 0
    assert "download: error: 5 of 5 file(s) failed" in result.stderr and closed_port_url in result.stderr
    assert "Traceback" not in result.stderr


# --- a relative mirror folder ---------------------------------------------------------------------

SET5_PARAMS = "download:\n  sets: [Set5]\n  workers: 2\n  retries: 0\n  timeout_s: 5\n"


def test_relative_mirror_is_taken_from_the_repository_root(tmp_path, manifest, shared_datasets, monkeypatch):
    repo, elsewhere = tmp_path / "repo", tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "standalone" / "tmp1"
    elsewhere.mkdir(parents=True)
    copy_mirror(manifest, shared_datasets, repo / "mirror", ["Set5"])
    monkeypatch.chdir(elsewhere)  # where the stage of a --temp experiment runs: a copy without the mirror
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert repository_root() == repo.resolve()  # the copy under .dvc/tmp/exps is cut back
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert repository_root(tmp_path) == repo.resolve()  # DVC's word wins over the folder
    assert resolve_source("", "mirror") == (repo / "mirror").resolve().as_uri() + "/"
    assert resolve_source("", "./mirror/../mirror", root=repo) == (repo / "mirror").resolve().as_uri() + "/"
    assert resolve_source("", str(shared_datasets), root=elsewhere) == shared_datasets.resolve().as_uri() + "/"
    with pytest.raises(DownloadError) as refused:
        resolve_source("", "../missing", root=repo)
    message = str(refused.value)
    assert message.startswith("VDSR_DATA_MIRROR=../missing: neither an http(s) URL nor an existing folder "
                              f"(a relative folder is taken from the repository root, {repo})"), message
    assert f"{(tmp_path / 'missing')} does not exist; set VDSR_DATA_MIRROR to the absolute path" in message


def test_stage_refuses_a_missing_relative_mirror_with_the_fix(tmp_path):
    result = run_stage(tmp_path, SET5_PARAMS, "datasets")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert (f"download: error: VDSR_DATA_MIRROR=datasets: neither an http(s) URL nor an existing folder (a relative "
            f"folder is taken from the repository root, {tmp_path.resolve()})") in result.stderr, result.stderr
    assert "set VDSR_DATA_MIRROR to the absolute path" in result.stderr
    assert not (tmp_path / "data" / "raw").exists()


def test_relative_mirror_works_in_a_temp_experiment(tmp_path, manifest, shared_datasets):
    """`VDSR_DATA_MIRROR=mirror dvc exp run --temp`: the stage runs in a copy under .dvc/tmp/exps/
    that has no mirror/ (git-ignored), and still reads the repository's."""
    repo = tmp_path / "repo"
    (repo / "stages").mkdir(parents=True)
    shutil.copyfile(REPO_ROOT / "stages" / "download.py", repo / "stages" / "download.py")
    (repo / "data").mkdir()
    shutil.copyfile(MANIFEST, repo / "data" / "manifest.json")
    (repo / "params.yaml").write_text(SET5_PARAMS)
    (repo / "dvc.yaml").write_text("stages:\n  download:\n    cmd: python stages/download.py\n"
                                   "    deps: [stages/download.py, data/manifest.json]\n    params: [download]\n"
                                   "    outs: [data/raw]\n")
    (repo / ".gitignore").write_text("/mirror/\n")
    copy_mirror(manifest, shared_datasets, repo / "mirror", ["Set5"])
    env = repo_env({k: v for k, v in os.environ.items() if k != "DVC_ROOT"}, VDSR_DATA_MIRROR="mirror",
                   PYTHONPATH=str(REPO_ROOT), DVC_NO_ANALYTICS="1")
    init_repo(repo, env, "download only")
    done = run_child(["dvc", "exp", "run", "--temp", "-n", "relative"], cwd=repo, env=env, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"download: source {(repo / 'mirror').resolve().as_uri()}/ (VDSR_DATA_MIRROR=mirror)" in output, output
    assert "fetched 5, skipped 0" in output, output
    assert not (repo / "data" / "raw").exists()  # --temp: the workspace is left as it was
    run_checked(["dvc", "exp", "apply", "relative"], repo, env, timeout=120)
    assert_exact(repo / "data" / "raw", manifest, ["Set5"])
