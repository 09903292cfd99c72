"""How the network runs on a device: precision, memory layout, compilation -- one small value.

Training, validation and inference receive a :class:`Runtime` instead of testing ``device.type``;
only what truly needs CUDA (fused optimizer kernels, pinned copies, cuDNN autotuning, NCCL) stays
behind a device check, so every other branch runs in the CPU test suite.

Precision. ``bf16`` trains under ``torch.autocast(device, bfloat16)``: convolutions in bfloat16,
weights, optimizer state, loss and gradient clipping in fp32 (mixed precision, Micikevicius et
al. 2018; bf16 keeps fp32's exponent range, so no loss scaling is needed). ``auto`` picks bf16
where the hardware runs it natively -- CUDA GPUs that support it (``torch.cuda.is_bf16_supported``,
Ampere and later) and CPUs with AVX-512 BF16 (AMD Zen 4 and later, Intel Cooper Lake) or AMX
(Intel Sapphire Rapids and later), as PyTorch's CPU feature probe reports
(``torch.backends.cpu.get_cpu_capability`` / ``torch.cpu._is_avx512_bf16_supported`` /
``torch.cpu._is_amx_tile_supported``) -- and fp32 elsewhere, where bf16 would be emulated and slower.

Evaluation is exact everywhere: :func:`exact_fp32` turns autocast off and sets every fp32
backend to IEEE fp32 (no TF32 on CUDA, whose cuDNN convolutions default to TF32 in torch 2.13;
no reduced-precision oneDNN on the CPU) for the duration of a block, then restores the flags.

Freed memory. Evaluation on a whole image spends a third of its time in the kernel unless
:func:`keep_freed_memory` is called first (see there): it is, by the processes that evaluate or train.

Reproducibility. On the CPU training runs with deterministic algorithms, so two runs with the same
settings give bit-identical weights, in fp32 and in bf16. On CUDA cuDNN autotuning picks the
fastest kernels, which is not bit-reproducible.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn


log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
# Backends whose fp32 convolutions / matmuls may run in reduced precision (TF32, bf16) unless set to "ieee".
_FP32_BACKENDS = ("cudnn.conv", "cudnn.rnn", "cuda.matmul", "mkldnn.conv", "mkldnn.matmul", "mkldnn.rnn")


@dataclass(frozen=True)
class Runtime:
    """Resolved runtime choices for one device (see :func:`resolve_runtime`)."""

    device: torch.device
    precision: str = "fp32"  # "fp32" | "bf16": what autocast runs the forward pass in
    channels_last: bool = False  # NHWC memory layout for weights and activations
    compile: str = "none"  # torch.compile mode, or "none" for eager

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward pass's precision: bf16 autocast, or nothing (fp32)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def tags(self) -> dict[str, str]:
        """What was actually used, for MLflow tags."""
        return {"runtime.device": device_description(self.device), "runtime.precision": self.precision,
                "runtime.channels_last": str(self.channels_last).lower(), "runtime.compile": self.compile}

    def __str__(self) -> str:
        layout = "channels_last" if self.channels_last else "NCHW"
        compiled = f", compile {self.compile}" if self.compile != "none" else ""
        return f"{self.device} {self.precision} {layout}{compiled}"


def cpu_has_native_bf16() -> bool:
    """True if this CPU computes bf16 natively: AVX-512 BF16 (Zen 4+, Cooper Lake+) or AMX (Sapphire Rapids+)."""
    probe = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(probe, name, lambda: False)()) for name in checks)


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``precision: auto`` chooses bf16 on ``device`` (module docstring)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_runtime(device: torch.device, precision: str = "auto", channels_last: bool = True,
                    compile: str = "none") -> Runtime:
    """The :class:`Runtime` for ``device``: ``precision`` auto -> bf16 where native, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if precision == "auto":
        precision = "bf16" if bf16_is_native(device) else "fp32"
    return Runtime(device=device, precision=precision, channels_last=channels_last, compile=compile)


def device_description(device: torch.device) -> str:
    """The device actually used, in words: the GPU's name, or the CPU and its threads."""
    import platform

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@contextlib.contextmanager
def training_flags(runtime: Runtime) -> Iterator[None]:
    """Deterministic algorithms on the CPU, cuDNN autotuning on CUDA, for the block only."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    benchmark = torch.backends.cudnn.benchmark
    try:
        if runtime.cuda:
            torch.backends.cudnn.benchmark = True  # fastest conv algorithms: not bit-reproducible
        else:
            torch.use_deterministic_algorithms(True)
            # Deterministic mode also NaN-fills every new buffer (a debugging aid, ~10% of a CPU
            # step); results do not depend on it, since nothing reads memory it did not write.
            torch.utils.deterministic.fill_uninitialized_memory = False
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark = benchmark


def _fp32_backends() -> dict[str, object]:
    """The backends of :data:`_FP32_BACKENDS` that this torch build has, by dotted path."""
    found = {}
    for path in _FP32_BACKENDS:
        target: object = torch.backends
        try:
            for part in path.split("."):
                target = getattr(target, part)
        except AttributeError:
            continue
        if hasattr(target, "fp32_precision"):
            found[path] = target
    return found


def fp32_precisions() -> dict[str, str]:
    """Each backend's fp32 precision setting (``ieee``, ``tf32``, ``bf16``, or ``none``: inherit)."""
    return {path: backend.fp32_precision for path, backend in _fp32_backends().items()}


@contextlib.contextmanager
def exact_fp32(device: torch.device | str = "cpu") -> Iterator[None]:
    """Inside the block: no autocast and IEEE fp32 in every backend (no TF32, no bf16 shortcuts)."""
    device = torch.device(device)
    backends = list(_fp32_backends().values())
    saved = [backend.fp32_precision for backend in backends]
    try:
        for backend in backends:
            backend.fp32_precision = "ieee"
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value


def compiled(module: nn.Module, runtime: Runtime) -> nn.Module:
    """``torch.compile(module, mode=runtime.compile)``, or the module itself for ``none``.

    Under DDP, pass the DDP-wrapped module: compiling the wrapper lets TorchDynamo's DDPOptimizer
    split the graph at DDP's bucket boundaries, so gradient all-reduce overlaps backward (PyTorch's
    "DDP + torch.compile" guidance). ``reduce-overhead`` records CUDA graphs (a 64-patch VDSR step
    is launch-bound on a large GPU); on the CPU it behaves like ``default``.
    """
    if runtime.compile == "none":
        return module
    return torch.compile(module, mode=runtime.compile)  # type: ignore[return-value]


# glibc <malloc.h>: mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_FREED_MEMORY_ENV = "VDSR_KEEP_FREED_MEMORY"  # "0": leave glibc's malloc as it is


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of giving it back to the kernel.

    glibc serves a block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
    unmaps it on ``free``; a VDSR feature map of a 480x320 image is 39 MB (64 fp32 channels), so
    every layer of every pass gets new pages, each faulted in and zeroed by the kernel: 548,000
    minor faults (2.2 GB) and a third of the wall time per full-image pass on a 2-core Zen 4.
    ``mallopt(M_MMAP_MAX, 0)`` serves every block from the heap and ``mallopt(M_TRIM_THRESHOLD,
    INT_MAX)`` never shrinks it, so the same pages are reused (0 faults per pass; the same
    kernels, so results are bit-identical; ``vdsr evaluate`` of Set14 1.52x as fast). The process
    keeps its peak footprint, and about a third more for the heap's fragmentation (that Set14
    evaluation: 678 -> 890 MiB; docs/benchmarks.md): called by the processes that
    evaluate or train (``vdsr evaluate``, ``python -m vdsr.release``, ``stages/train.py``,
    ``stages/evaluate.py``), not by ``vdsr upscale`` and ``vdsr serve``, whose memory is bounded
    by their own estimate. ``bench/freed_memory.py`` measures it.

    Process-wide and not undone. Returns True if applied; False off glibc, or with
    ``VDSR_KEEP_FREED_MEMORY=0`` in ``environ`` (default ``os.environ``).
    """
    environ = os.environ if environ is None else environ
    if environ.get(KEEP_FREED_MEMORY_ENV, "1") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    applied = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not applied:
        log.warning("runtime: glibc's mallopt refused M_MMAP_MAX/M_TRIM_THRESHOLD; freed memory goes back to the kernel")
    return applied
