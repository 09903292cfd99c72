"""The vdsr command: evaluate a model on a folder of images, upscale your own pictures, export a
model file to Keras 3 or ONNX, register it in MLflow for serving. Library code: no DVC needed (the
pipeline is dvc repro). Each command's --help lists its options and their defaults."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vdsr import evaluate
from vdsr.config import ParamsError
from vdsr.images import ImageError
from vdsr.io import error_message, write_json_atomic

log = logging.getLogger("vdsr")


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    summary = "PSNR/SSIM (Y channel, border = scale) of bicubic or a trained model on a folder of HR images"
    parser = subparsers.add_parser(
        "evaluate", help=summary,
        description=f"{summary}: each image is mod-cropped to the scale, shrunk with MATLAB's bicubic imresize, "
                    "upscaled again by the model (exact fp32) and compared on Y (BT.601, as MATLAB's rgb2ycbcr) "
                    "with the scale's pixels shaved at the border -- the protocol of the paper's Table 3. Prints a "
                    "table; --json also writes it.",
    )
    parser.add_argument("--images", required=True, type=Path, help="folder of HR images; its name is the dataset key")
    parser.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4], choices=[2, 3, 4],
                        help="scales to evaluate (default: 2 3 4)")
    parser.add_argument("--model", help="a trained model file, or 'bicubic' (default: the released weights, "
                        "pretrained/vdsr.pt)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if present) | cpu | cuda[:N]")
    parser.add_argument("--self-ensemble", action="store_true",
                        help="x8 self-ensemble (VDSR+): average the model over the 8 flips/rotations of each "
                        "image; 8x the time; reported as its own numbers, not the plain model's")
    parser.add_argument("--json", type=Path, help="also write {dataset: {x2: {psnr, ssim}}} to this file "
                        "(default: print only)")
    parser.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    if args.model == "bicubic":
        upscaler = evaluate.bicubic_upscaler
    else:
        from vdsr.inference import load_upscaler  # torch is imported only when a model is used
        from vdsr.runtime import keep_freed_memory
        from vdsr.upscale import model_or_released

        keep_freed_memory()  # a third less time per whole-image pass

        upscaler = load_upscaler(model_or_released(args.model and Path(args.model)), args.device,
                                 scales=args.scales)  # a single-scale model at another: refused now
    if args.self_ensemble:
        from vdsr.inference import self_ensemble

        upscaler = self_ensemble(upscaler)
        log.info("x8 self-ensemble: each image through the 8 flips/rotations, averaged (8x the time)")
    dataset = args.images.resolve().name
    table = {dataset: evaluate.summary(evaluate.evaluate_folder(args.images, args.scales, upscaler))}
    print(evaluate.format_table(table))
    if args.json:
        write_json_atomic(args.json, table)
        log.info("wrote %s", args.json)
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    summary = "write a model file as Keras 3 (.keras, extra 'keras') or ONNX (extra 'onnx')"
    parser = subparsers.add_parser(
        "export", help=summary,
        description=f"{summary}. The exported network takes the bicubic-upscaled luma Y/255 as (N, 1, H, W) "
                    "(Keras: (N, H, W, 1)) and returns the HR luma, unclipped; the file records the source model's "
                    "sha256 and training provenance. Written atomically.",
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="model file (vdsr.models.save_model)")
    parser.add_argument("--format", required=True, choices=["keras", "onnx"], help="output format")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="output file, required (.keras for Keras, .onnx for ONNX)")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from vdsr.export import export_model  # keras / onnx are imported only here

    export_model(args.model, args.format, args.output)
    return 0


def _add_register(subparsers: argparse._SubParsersAction) -> None:
    summary = ("log a model file as an MLflow pyfunc model, register it and alias it "
               "(then: mlflow models serve -m models:/NAME@champion; docs/serving.md)")
    parser = subparsers.add_parser(
        "register", help=summary,
        description=f"{summary}. The run and the registered model go to the store of MLFLOW_TRACKING_URI "
                    "(default: sqlite:///mlflow.db, artifacts in mlartifacts/, both in the current folder).",
    )
    parser.add_argument("model", nargs="?", type=Path, metavar="MODEL",
                        help="model file (default: the released weights, pretrained/vdsr.pt)")
    parser.add_argument("--name", default="vdsr", help="registered model name (default: vdsr)")
    parser.add_argument("--alias", default="champion", help="alias set on the new version (default: champion)")
    parser.add_argument("--max-pixels", type=int,
                        help="the served model refuses images declaring more pixels, with HTTP 400 "
                        "(default: 4,000,000, vdsr.serve.SERVE_MAX_PIXELS)")
    parser.set_defaults(run=_run_register)


def _run_register(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException  # mlflow is imported only here

    from vdsr.serve import register_model
    from vdsr.upscale import model_or_released

    try:
        limits = {} if args.max_pixels is None else {"max_pixels": args.max_pixels}
        done = register_model(model_or_released(args.model), args.name, alias=args.alias, repo_root=Path.cwd(),
                              **limits)
    except MlflowException as error:
        print(f"vdsr register: error: MLflow: {error.message}", file=sys.stderr)
        return 2
    moved = f" (was version {done.previous})" if done.previous and done.previous != done.version else ""
    log.info("registered model %r version %s from run %s; alias %r -> version %s%s", done.name, done.version,
             done.run_id, done.alias, done.version, moved)
    log.info("serve it: MLFLOW_TRACKING_URI=%s mlflow models serve -m 'models:/%s@%s' --env-manager local "
             "-h 127.0.0.1 -p 5001", _shown_uri(done.tracking_uri), done.name, done.alias)
    return 0


def _shown_uri(uri: str) -> str:
    """``uri`` for a log line: a SQLite store under the current folder as ``sqlite:///<relative path>``,
    a server's without its user and password."""
    import urllib.parse

    prefix = "sqlite:///"
    if uri.startswith(prefix):
        try:
            return prefix + Path(uri[len(prefix):]).resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return urllib.parse.urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))
    return uri


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdsr", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_evaluate(subparsers)
    from vdsr.upscale import add_arguments as add_upscale_arguments

    add_upscale_arguments(subparsers.add_parser("upscale", help="super-resolve your own images"))
    _add_export(subparsers)
    _add_register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImageError, ParamsError, ValueError, OSError) as error:
        print(f"vdsr {args.command}: error: {error_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
