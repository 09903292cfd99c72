"""How ``vdsr upscale`` and serving may run the network: a :class:`Variant` is a backend (eager
PyTorch NCHW or channels_last, ``torch.compile``, ONNX Runtime or OpenVINO on the ONNX export) at a
precision (fp32 or bf16). bench/upscale.py measures every one against the exact fp32 NCHW pass of
:mod:`vdsr.inference` (docs/upscaling-speed.md); evaluation and training never go through here, so
this module and the exporter it imports are no dependency of their stages (dvc.yaml).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vdsr.evaluate import Upscaler
from vdsr.inference import DEFAULT_TILE, predict_y

if TYPE_CHECKING:
    import torch

# How ``vdsr upscale`` and serving may run the network; bench/upscale.py measures every one against
# the exact fp32 NCHW reference (docs/upscaling-speed.md). Evaluation never goes through this.
BACKENDS = ("torch", "torch-nchw", "torch-compile", "onnxruntime", "openvino")
UPSCALE_PRECISIONS = ("fp32", "bf16")
# The default (``auto``): the fastest variant within 0.02 dB of exact fp32 on Set5 and Set14 at
# every scale, as measured side by side by bench/upscale.py on whole images (table in
# docs/upscaling-speed.md, 2026-12-03): bf16 where the CPU computes it natively (AVX-512 BF16 or
# AMX: torch bf16 channels_last 3.3x the reference, 0.012 dB; OpenVINO bf16 4.0x, 0.012 dB), else
# fp32 (emulated bf16 is slow); OpenVINO where its optional extra is installed, else PyTorch eager
# channels_last. ONNX Runtime (fp32 only, 2.0x, within 5% of OpenVINO fp32) is not picked by
# ``auto``: its ``onnx`` extra is installed for ``vdsr export``, and the ONNX export it needs at
# every load would then fall on every ``vdsr upscale``. Off the CPU: torch fp32 (bf16's quality
# was measured on the CPU only).
DEFAULT_BACKEND = "auto"
AUTO_ORDER = ("openvino", "torch")  # the first one importable wins (on the CPU; torch elsewhere)
DEFAULT_PRECISION = "auto"  # --precision's default: DEFAULT_PRECISIONS of the backend
PRECISION_CHOICES = ("auto", *UPSCALE_PRECISIONS)
# "auto" for a backend: bf16 on a CPU with native bf16, else fp32 (:func:`resolve_variant`).
DEFAULT_PRECISIONS = {"torch": "auto", "torch-nchw": "fp32", "torch-compile": "auto", "onnxruntime": "fp32",
                      "openvino": "auto"}


class VariantError(ValueError):
    """A backend/precision pair that cannot run here (unknown, or its optional extra is missing)."""


@dataclass(frozen=True)
class Variant:
    """One way of running the network for upscaling: ``backend`` (:data:`BACKENDS`) at ``precision``.

    ``torch``: eager PyTorch with the weights in channels_last (NHWC) order; ``torch-nchw``: eager,
    NCHW (the exact reference in fp32); ``torch-compile``: ``torch.compile`` (inductor, dynamic
    shapes) of the channels_last model; ``onnxruntime``: the ONNX export (:func:`vdsr.export.onnx_program`)
    in ONNX Runtime's CPU provider (fp32 only); ``openvino``: the same ONNX model compiled by
    OpenVINO for the CPU with ``INFERENCE_PRECISION_HINT`` f32 or bf16 (extra ``openvino``).
    bf16 in PyTorch is autocast (:func:`network_numerics`).
    """

    backend: str = "torch"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise VariantError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.precision not in UPSCALE_PRECISIONS:
            raise VariantError(f"precision must be one of {', '.join(UPSCALE_PRECISIONS)}, got {self.precision!r}")
        if self.backend == "onnxruntime" and self.precision != "fp32":
            raise VariantError("backend onnxruntime runs fp32 only (its CPU provider has no bf16 convolutions)")

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"

    @property
    def channels_last(self) -> bool:
        return self.backend in ("torch", "torch-compile")


REFERENCE = Variant("torch-nchw", "fp32")  # what evaluation computes: exact fp32, NCHW


def resolve_variant(backend: str = DEFAULT_BACKEND, precision: str | None = None,
                    device: str | torch.device = "cpu") -> Variant:
    """The :class:`Variant` that ``vdsr upscale --backend BACKEND --precision PRECISION`` runs:
    backend ``auto`` is the first of :data:`AUTO_ORDER` whose package is installed (torch off the
    CPU); precision None or ``auto`` is the backend's :data:`DEFAULT_PRECISIONS`, whose ``auto`` is
    bf16 on a CPU that computes it natively (:func:`vdsr.runtime.cpu_has_native_bf16`), else fp32."""
    import importlib.util

    on_cpu = str(device) == "cpu" or getattr(device, "type", None) == "cpu"
    if backend == "auto":
        backend = next((name for name in AUTO_ORDER if name == "torch"
                        or (on_cpu and importlib.util.find_spec(name) is not None)), "torch")
    if precision is None or precision == "auto":
        precision = DEFAULT_PRECISIONS.get(backend, "fp32")
    if precision == "auto":
        from vdsr.runtime import cpu_has_native_bf16

        precision = "bf16" if on_cpu and cpu_has_native_bf16() else "fp32"
    return Variant(backend, precision)


def all_variants() -> list[Variant]:
    """Every backend/precision pair :func:`upscale_model` accepts, the reference first."""
    found = [Variant(backend, precision) for backend in BACKENDS for precision in UPSCALE_PRECISIONS
             if not (backend == "onnxruntime" and precision == "bf16")]
    return sorted(found, key=lambda v: v != REFERENCE)


class ExportedNetwork:
    """The network as an ONNX Runtime or OpenVINO model, called like the module it was exported from.

    ``source`` is that module (its convolutions give :func:`receptive_radius` and the widths); calls
    take and return (1, 1, H, W) float32 CPU tensors. Both keep the export's dynamic height and
    width: one compiled model serves every tile shape.
    """

    def __init__(self, source: torch.nn.Module, backend: str, precision: str):
        from vdsr.export import onnx_program

        self.source = source.cpu().eval()
        self.backend, self.precision = backend, precision
        proto = onnx_program(self.source).SerializeToString()
        if backend == "onnxruntime":
            import onnxruntime

            self._session = onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"])
        else:
            try:
                import openvino
            except ImportError as error:
                raise VariantError(f"backend openvino needs the openvino package ({error}): "
                                   "pip install -e '.[openvino]'") from None
            core = openvino.Core()
            hint = "bf16" if precision == "bf16" else "f32"
            self._compiled = core.compile_model(core.read_model(proto, b""), "CPU", {"INFERENCE_PRECISION_HINT": hint})

    def modules(self) -> Iterator[torch.nn.Module]:
        return self.source.modules()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        array = x.detach().float().cpu().contiguous().numpy()
        if self.backend == "onnxruntime":
            return torch.from_numpy(self._session.run(["sr"], {"y": array})[0])
        return torch.from_numpy(self._compiled(array)[0].copy())


def upscale_model(model: torch.nn.Module, variant: Variant) -> torch.nn.Module:
    """What runs ``variant``: a callable with ``model``'s signature and convolutions; ``model`` itself
    is left as it is (a channels_last copy, a compiled copy or an exported network is returned).

    ``torch-nchw`` returns ``model``. :class:`VariantError` when the backend's package is missing.
    """
    import copy

    import torch

    if variant.backend == "torch-nchw":
        return model
    if variant.backend in ("onnxruntime", "openvino"):
        if next(model.parameters()).device.type != "cpu":
            raise VariantError(f"backend {variant.backend} runs on the CPU only: use --device cpu or backend torch")
        try:
            return ExportedNetwork(model, variant.backend, variant.precision)  # type: ignore[return-value]
        except ImportError as error:
            raise VariantError(f"backend {variant.backend} needs the onnx extra ({error}): "
                               "pip install -e '.[onnx]'") from None
    nhwc = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    if variant.backend == "torch-compile":
        return torch.compile(nhwc, dynamic=True)  # type: ignore[return-value]  # its modules() are nhwc's
    return nhwc


def variant_upscaler(model: torch.nn.Module, device: torch.device, variant: Variant, *,
                     tile: int = DEFAULT_TILE) -> Upscaler:
    """An :data:`vdsr.evaluate.Upscaler` running ``model`` as ``variant`` (serving, bench/upscale.py);
    :func:`model_upscaler` is the exact one, for evaluation. Tiles as :func:`predict_y`."""
    network = upscale_model(model, variant)

    def upscaler(bicubic_y: np.ndarray, scale: int) -> np.ndarray:
        return predict_y(network, bicubic_y, device, tile, precision=variant.precision)

    return upscaler
