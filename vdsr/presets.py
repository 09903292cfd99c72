"""Named presets: validated sets of ``params.yaml`` overrides for ``dvc exp run -S`` (the paper's
recipe stays the default in ``params.yaml``; a preset is a faster recipe for another budget).

A preset is ``presets/<name>.yaml``: a mapping of dotted keys (``train.lr``) to plain values, each
naming a key that ``params.yaml`` has. ``python -m vdsr.presets NAME`` prints the ``-S`` options,
so one command runs it as a DVC experiment::

    dvc exp run -n release-cpu $(python -m vdsr.presets release-cpu)      # what `make release-cpu` does
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from vdsr.config import ParamsError, load_params, require

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"


def load_preset(name: str, presets_dir: Path = PRESETS_DIR, params_file: Path = Path("params.yaml")) -> dict[str, Any]:
    """The overrides of preset ``name``; :class:`ParamsError` for an unknown preset or key."""
    path = presets_dir / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in presets_dir.glob("*.yaml"))) or "none"
        raise ParamsError(f"{path}: no such preset (known: {known})")
    overrides = yaml.safe_load(path.read_text()) or {}
    require(isinstance(overrides, dict), str(path), "a mapping of dotted params keys to values", overrides)
    params = load_params(params_file)
    for key, value in overrides.items():
        section = params
        for part in str(key).split("."):
            require(isinstance(section, dict) and part in section, f"{path}: {key}",
                    f"a key of {params_file}", value)
            section = section[part]
        require(not isinstance(value, (dict, list)) or isinstance(section, type(value)), f"{path}: {key}",
                f"a value like {section!r}", value)
    return overrides


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
    except ParamsError as error:
        print(f"vdsr.presets: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
