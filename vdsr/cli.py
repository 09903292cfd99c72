"""The vdsr command: evaluate a model on a folder of images, upscale your own pictures, export a
model file to Keras 3 or ONNX. Library code: no DVC needed (the pipeline is `dvc repro`)."""

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
        from vdsr.upscale import load_upscaler, model_or_released  # torch is imported only when a model is used

        upscaler = load_upscaler(model_or_released(args.model and Path(args.model)), args.device)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vdsr", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_evaluate(subparsers)
    from vdsr.upscale import add_arguments as add_upscale_arguments

    add_upscale_arguments(subparsers.add_parser("upscale", help="super-resolve your own images"))
    _add_export(subparsers)
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
