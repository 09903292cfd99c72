"""dvc.yaml's deps proven against the code: each stage depends on every project module its script
reaches through imports (module-level and function-level, ``TYPE_CHECKING`` blocks excepted),
so that changing any of them makes ``dvc status`` call the stage's outputs stale."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

# Modules that cannot change a stage's outputs, so a stage need not depend on them (it may):
NEVER_CHANGE_OUTPUTS = {
    "vdsr/__init__.py",  # the package marker
    "vdsr/io.py",  # atomic writes, hashes, error messages: I/O helpers
    "vdsr/config.py",  # params.yaml validation: a bad value stops the stage, a good one passes through
    "vdsr/tracking.py",  # MLflow logging: records outputs, does not compute them
}


def _imports(path: Path) -> set[str]:
    """Project files imported by ``path``: ``vdsr.x`` modules and the stages' own ``paths``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports are for type hints only
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skipped.update(id(inner) for stmt in node.body for inner in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "vdsr":
                found.update(f"vdsr/{alias.name}.py" for alias in node.names)
            elif node.module.startswith("vdsr."):
                found.add(node.module.replace(".", "/") + ".py")
            elif node.module == "paths" and path.parent.name == "stages":
                found.add("stages/paths.py")
        elif isinstance(node, ast.Import):
            found.update(alias.name.replace(".", "/") + ".py" for alias in node.names if alias.name.startswith("vdsr."))
    return {name for name in found if (REPO_ROOT / name).is_file()}


def reached(script: str) -> set[str]:
    """``script`` and every project file it reaches through imports, transitively."""
    seen, todo = set(), [script]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imports(REPO_ROOT / name) - seen)
    return seen


def stages() -> dict[str, tuple[str, list[str]]]:
    """Stage name -> (script, deps), foreach stages instantiated for the key ``vdsr``."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in spec.items():
        body = stage.get("do", stage)
        cmd, deps = body["cmd"].replace("${key}", "vdsr"), [d.replace("${key}", "vdsr") for d in body.get("deps", [])]
        script = next(word for word in cmd.split() if word.endswith(".py"))
        out[name] = (script, deps)
    return out


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_depends_on_every_module_it_imports(stage: str) -> None:
    script, deps = stages()[stage]
    missing = sorted(reached(script) - set(deps) - NEVER_CHANGE_OUTPUTS)
    assert not missing, f"dvc.yaml stage {stage!r} ({script}) imports but does not depend on: {', '.join(missing)}"


@pytest.mark.parametrize("stage", sorted(stages()))
def test_stage_deps_exist(stage: str) -> None:
    _, deps = stages()[stage]
    absent = [d for d in deps if d.endswith(".py") and not (REPO_ROOT / d).is_file()]
    assert not absent, f"dvc.yaml stage {stage!r} depends on files that do not exist: {absent}"


def test_the_import_walk_sees_function_level_imports(tmp_path: Path) -> None:
    """The walk itself: a function-level import counts, a TYPE_CHECKING one does not."""
    assert "vdsr/upscale.py" in _imports(REPO_ROOT / "vdsr" / "cli.py")  # imported inside functions there
    assert "vdsr/train.py" not in _imports(REPO_ROOT / "vdsr" / "checkpoints.py")  # TYPE_CHECKING only


def test_evaluate_writes_the_metrics_file_dvc_yaml_declares() -> None:
    """evaluate@<name>'s ``metrics:`` entry is the file stages/evaluate.py writes, not cached (git keeps it)."""
    import importlib.util
    import sys

    body = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["evaluate"]["do"]
    declared = {path: options for entry in body["metrics"] for path, options in entry.items()}
    sys.path.insert(0, str(REPO_ROOT / "stages"))  # the stage imports its neighbour `paths`
    try:
        spec = importlib.util.spec_from_file_location("evaluate_stage", REPO_ROOT / "stages" / "evaluate.py")
        stage = sys.modules["evaluate_stage"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(stage)
    finally:
        sys.path.remove(str(REPO_ROOT / "stages"))
        sys.modules.pop("evaluate_stage", None)
    assert declared == {stage.ModelPaths("${key}").eval_metrics.as_posix(): {"cache": False}}, declared


def test_every_shipped_model_is_a_declared_artifact() -> None:
    """dvc.yaml's ``artifacts:`` (DVC's model registry) names every weights file in ``pretrained/``,
    each as a ``model`` with the card beside it, and nothing that is not there."""
    artifacts = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["artifacts"]
    declared = {spec["path"] for spec in artifacts.values()}
    shipped = {f"pretrained/{p.name}" for p in (REPO_ROOT / "pretrained").glob("*.pt")}
    assert declared == shipped
    from vdsr.release import release_files

    for name, spec in artifacts.items():
        assert spec["type"] == "model" and "released" in spec["labels"], name
        kind, _, scale = Path(spec["path"]).stem.partition("_x")  # srcnn_x2.pt: srcnn at x2
        card = f"pretrained/{release_files(kind, int(scale) if scale else None).card}"
        assert card in spec["desc"] and (REPO_ROOT / card).is_file(), (name, card)
