"""Named presets: validated sets of ``params.yaml`` overrides for ``dvc exp run -S`` (the paper's
recipe stays the default in ``params.yaml``; a preset is a faster recipe for another budget).

A preset is ``presets/<name>.yaml``: a mapping of dotted keys (``train.vdsr.lr``) to plain values,
each naming a key that ``params.yaml`` has. ``python -m vdsr.presets NAME`` prints the ``-S``
options, so one command runs it as a DVC experiment::

    dvc exp run -n release-cpu $(python -m vdsr.presets release-cpu)      # what `make release-cpu` does

A preset is checked as the stages will see it: applied to a copy of params.yaml, every
``train.<name>`` section is validated with the train stage's schema (:mod:`vdsr.recipe`), so a
preset that passes here is not refused by the stage later; the keys of the other sections keep
the kind of value params.yaml gives them (their stages' schemas live in ``stages/``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from vdsr.config import ParamsError, load_params, read_yaml, require
from vdsr.io import error_message
from vdsr.recipe import check_train_sections

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def preset_names(presets_dir: Path | None = None) -> list[str]:
    """The presets there are: the stems of ``presets_dir/*.yaml`` (default :data:`PRESETS_DIR`), sorted."""
    return sorted(path.stem for path in (presets_dir or PRESETS_DIR).glob("*.yaml"))


def load_preset(name: str, presets_dir: Path | None = None, params_file: Path = Path("params.yaml")) -> dict[str, Any]:
    """The overrides of preset ``name`` of ``presets_dir`` (default :data:`PRESETS_DIR`), checked
    against ``params_file`` (:func:`apply_preset`); :class:`ParamsError` naming the file and key for
    an unknown preset, bad YAML, an unknown key or a value its stage would refuse."""
    presets_dir = presets_dir or PRESETS_DIR
    known = preset_names(presets_dir)
    if name not in known:  # also keeps a name like ../params or a/b inside presets/
        raise ParamsError(f"{name!r}: no such preset; a preset is one of the files {presets_dir.name}/*.yaml "
                          f"(known: {', '.join(known) or 'none'})")
    path = presets_dir / f"{name}.yaml"
    overrides = read_yaml(path)
    overrides = {} if overrides is None else overrides
    require(isinstance(overrides, dict), str(path), "a mapping of dotted params keys to values", overrides)
    apply_preset(overrides, load_params(params_file), path, params_file)
    return overrides


def apply_preset(overrides: dict[str, Any], params: dict[str, Any], path: Path, params_file: Path) -> dict[str, Any]:
    """A copy of ``params`` with ``overrides`` (preset file ``path``) applied, validated as the
    stages validate it: every ``train.<name>`` by :class:`vdsr.recipe.TrainParams`, the other
    sections' keys by the kind of value ``params_file`` has there."""
    merged = copy.deepcopy(params)
    for key, value in overrides.items():
        parts = str(key).split(".")
        section = merged
        for part in parts[:-1]:
            require(isinstance(section, dict) and part in section, f"{path}: {key}", f"a key of {params_file}", value)
            section = section[part]
        require(isinstance(section, dict) and parts[-1] in section, f"{path}: {key}", f"a key of {params_file}", value)
        before = section[parts[-1]]
        if parts[0] != "train":  # train.<name> sections: the schema below
            require(_same_kind(before, value), f"{path}: {key}", f"a value like {params_file}'s {before!r}", value)
        elif isinstance(before, dict):  # train.vdsr: a whole section
            require(isinstance(value, dict), f"{path}: {key}", "a mapping (a whole train section)", value)
        section[parts[-1]] = value
    check_train_sections(merged, f"{path} (applied to {params_file})")
    return merged


def _same_kind(before: Any, value: Any) -> bool:
    """Whether ``value`` may stand where params.yaml has ``before``: the same type (an integer where a
    number is, a list of such items where a list is)."""
    if isinstance(before, bool) or isinstance(value, bool):
        return isinstance(before, bool) and isinstance(value, bool)
    if isinstance(before, float):
        return isinstance(value, (int, float))
    if isinstance(before, list):
        return isinstance(value, list) and (not before or all(_same_kind(before[0], item) for item in value))
    if isinstance(before, dict):
        return isinstance(value, dict)
    return before is None or type(value) is type(before)


def set_options(overrides: dict[str, Any]) -> list[str]:
    """``dvc exp run`` options: ``-S key=value``, values as YAML without spaces (``true``, ``1.0e-05``,
    ``["T91","BSD200"]``), so that the shell's word splitting of ``$(python -m vdsr.presets NAME)`` keeps them whole."""
    options = []
    for key, value in overrides.items():
        if isinstance(value, (list, dict)):
            text = json.dumps(value, separators=(",", ":"))  # JSON is YAML
        else:
            text = yaml.safe_dump(value, width=10**6).strip().removesuffix("...").strip()
        if any(c.isspace() for c in text):
            raise ParamsError(f"preset value of {key} must not contain spaces, got {value!r}")
        options += ["-S", f"{key}={text}"]
    return options


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vdsr.presets NAME   (prints dvc exp run -S options)", file=sys.stderr)
        return 2
    try:
        print(" ".join(set_options(load_preset(args[0]))))  # no spaces inside values: $(...) splits them right
    except (ParamsError, OSError) as error:
        print(f"vdsr.presets: error: {error_message(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
