"""Runtime choices (precision, layout, compilation) run by the same code on every device, each
exercised on the CPU: bf16 learns like fp32, resume is exact in each mode, a checkpoint crosses
precisions, evaluation is exact fp32 whatever the surroundings, and the recipe's schedules."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch

from vdsr import evaluate
from vdsr.checkpoints import load_checkpoint
from vdsr.distributed import gpu_index
from vdsr.images import list_images, read_image
from vdsr.inference import model_upscaler, predict_y
from vdsr.models import ModelConfig, build_model
from vdsr.runtime import (
    KEEP_FREED_MEMORY_ENV,
    bf16_is_native,
    cpu_has_native_bf16,
    fp32_precisions,
    keep_freed_memory,
    resolve_runtime,
)
from vdsr.train import (
    LOG_EVERY,
    TrainConfig,
    TrainingInterrupted,
    announce_estimate,
    cosine_lr,
    learning_rate,
    sr_loss,
    train,
    validate,
)

CPU = torch.device("cpu")
TINY = ModelConfig("vdsr", depth=3, width=8)
QUICK = TrainConfig(optimizer="adam", lr=1e-3, clip="norm", clip_theta=1.0, epochs=2, batch_size=8,
                    steps_per_epoch=2 * LOG_EVERY, seed=3, loss="mse")
MODES = {
    "fp32": resolve_runtime(CPU, "fp32", channels_last=False),
    "fp32-channels_last": resolve_runtime(CPU, "fp32", channels_last=True),
    "bf16-channels_last": resolve_runtime(CPU, "bf16", channels_last=True),
}


def first_96(set5_x2_arrays):
    """96 patches and two small validation images of ``set5_x2_arrays`` (conftest.py)."""
    lr, hr, validation = set5_x2_arrays
    return lr[:96], hr[:96], {2: [v for v in validation[2] if v[0] in {"bird", "butterfly"}]}


# --- choosing -----------------------------------------------------------------------------------


def test_auto_picks_bf16_exactly_where_the_cpu_has_it_natively():
    flags = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert cpu_has_native_bf16() == flags == bf16_is_native(CPU)
    assert resolve_runtime(CPU, "auto").precision == ("bf16" if flags else "fp32")
    assert resolve_runtime(CPU, "fp32").precision == "fp32"
    runtime = resolve_runtime(CPU, "bf16", channels_last=True, compile="default")
    assert runtime.tags() == {"runtime.device": runtime.tags()["runtime.device"], "runtime.precision": "bf16",
                              "runtime.channels_last": "true", "runtime.compile": "default"}
    assert runtime.tags()["runtime.device"].startswith("cpu (")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_runtime(CPU, "fp16")
    with pytest.raises(ValueError, match="compile must be one of"):
        resolve_runtime(CPU, "fp32", compile="fast")


def test_one_gpu_per_process_launchers_use_cuda_0():
    assert gpu_index(local_rank=3, visible=8) == 3
    assert gpu_index(local_rank=3, visible=1) == 0  # CUDA_VISIBLE_DEVICES set per process
    with pytest.raises(ValueError, match="local rank 4 has no GPU: this node has 2"):
        gpu_index(local_rank=4, visible=2)


# --- evaluation is exact ------------------------------------------------------------------------


class FlagProbe(torch.nn.Module):
    """Wraps a model and records, at each forward, the autocast state and fp32 backend settings."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[tuple[bool, dict[str, str], torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        self.seen.append((torch.is_autocast_enabled("cpu"), fp32_precisions(), out.dtype))
        return out


def test_validation_and_inference_run_in_exact_fp32_whatever_the_surroundings(set5_x2_arrays, set5_dir):
    probe = FlagProbe(build_model(TINY)).eval()
    _, _, validation = set5_x2_arrays
    image = read_image(next(iter(list_images(set5_dir))))
    before = fp32_precisions()
    torch.backends.mkldnn.conv.fp32_precision = "bf16"  # a caller that allows reduced precision ...
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # ... inside bf16 autocast (as training is)
            validate(probe, {2: validation[2][:1]}, CPU)
            evaluate.evaluate_images([("x", image)], [2], model_upscaler(probe, CPU))
            predict_y(probe, np.full((40, 40), 0.5), CPU)  # `vdsr upscale`'s default
        assert len(probe.seen) == 3
        for autocast_on, precisions, dtype in probe.seen:
            assert not autocast_on and dtype == torch.float32
            assert set(precisions.values()) == {"ieee"}, precisions  # no TF32 (cudnn/cuda), no bf16 (mkldnn)
        assert fp32_precisions()["mkldnn.conv"] == "bf16"  # the caller's setting is restored
        predict_y(probe, np.full((40, 40), 0.5), CPU, precision="bf16")  # the option: bf16 on request
        assert probe.seen[-1][0]  # autocast on (the residual sum with the fp32 input comes out fp32)
    finally:
        torch.backends.mkldnn.conv.fp32_precision = before["mkldnn.conv"]


# --- training in each mode ----------------------------------------------------------------------


def test_bf16_learns_like_fp32(set5_x2_arrays, set5_dir):
    lr, hr, validation = set5_x2_arrays
    config = TrainConfig(clip_theta=1e-4, epochs=3, batch_size=16, seed=0)  # the paper's recipe, as test_train
    images = [(p.stem, read_image(p)) for p in list_images(set5_dir)]
    bicubic = evaluate.evaluate_images(images, [2], evaluate.bicubic_upscaler)["x2"]["psnr"]
    gains = {}
    for name in ("fp32", "bf16-channels_last"):
        result = train(lr, hr, {2: validation[2]}, ModelConfig("vdsr", 5, 16), config, runtime=MODES[name],
                       progress=False)
        trained = evaluate.evaluate_images(images, [2], model_upscaler(result.model, CPU))["x2"]["psnr"]
        gains[name] = trained - bicubic
    assert gains["fp32"] > 0.1, gains
    # within a third of fp32's gain: bf16 rounds differently where it is native (AVX-512 BF16 on AMD: a
    # gap under 0.03 dB seen; AMX on an Intel Xeon: 0.19 of 0.77 dB) and where oneDNN emulates it (AVX2:
    # 0.12 of 0.78 dB) after these 3 short epochs of a 5-layer model; a bf16 that breaks learning fails
    assert abs(gains["bf16-channels_last"] - gains["fp32"]) < gains["fp32"] / 3, gains


@pytest.mark.parametrize("mode", sorted(MODES))
def test_stopped_mid_epoch_and_resumed_equals_uninterrupted(set5_x2_arrays, tmp_path, mode):
    lr, hr, validation = first_96(set5_x2_arrays)
    runtime = MODES[mode]
    whole = train(lr, hr, validation, TINY, QUICK, runtime=runtime, progress=False)
    again = train(lr, hr, validation, TINY, QUICK, runtime=runtime, progress=False)
    for a, b in zip(whole.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)  # bit-reproducible on the CPU in every mode

    polls = iter(range(10**6))
    stop_at = LOG_EVERY + 7  # mid-epoch 1, between two progress updates

    def stop() -> bool:
        return next(polls) + 1 >= stop_at

    checkpoint = tmp_path / "last.pt"
    with pytest.raises(TrainingInterrupted) as stopped:
        train(lr, hr, validation, TINY, QUICK, runtime=runtime, progress=False, checkpoint_path=checkpoint, stop=stop,
              checkpoint_extra={"run": "first"})
    assert (stopped.value.position.epoch, stopped.value.position.step) == (0, stop_at)
    assert load_checkpoint(checkpoint)["step"] == stop_at
    seen = []
    resumed = train(lr, hr, validation, TINY, QUICK, runtime=runtime, progress=False, checkpoint_path=checkpoint,
                    on_start=lambda position, extra: seen.append((position.step, extra)))
    assert seen == [(stop_at, {"run": "first"})]
    assert resumed.history[-1]["train_loss"] == whole.history[-1]["train_loss"]
    for a, b in zip(whole.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_timed_checkpoints_are_written_mid_epoch(set5_x2_arrays, tmp_path):
    lr, hr, validation = first_96(set5_x2_arrays)
    writes = []
    checkpoint = tmp_path / "last.pt"

    def stop() -> bool:  # polled between steps: record what the checkpoint holds then
        if checkpoint.exists():
            writes.append(load_checkpoint(checkpoint)["step"])
        return False

    train(lr, hr, validation, TINY, QUICK, runtime=MODES["fp32"], progress=False, checkpoint_path=checkpoint,
          checkpoint_every_s=1e-9, stop=stop)
    assert 1 in writes and 2 * LOG_EVERY - 2 in writes  # every step of the epoch, not only at its end


def test_a_checkpoint_resumes_in_another_precision(set5_x2_arrays, tmp_path, caplog):
    lr, hr, validation = first_96(set5_x2_arrays)
    checkpoint = tmp_path / "last.pt"
    one = dataclasses.replace(QUICK, epochs=1)
    train(lr, hr, validation, TINY, one, runtime=MODES["bf16-channels_last"], progress=False, checkpoint_path=checkpoint)
    with caplog.at_level(logging.INFO):
        result = train(lr, hr, validation, TINY, QUICK, runtime=MODES["fp32"], progress=False,
                       checkpoint_path=checkpoint)
    assert result.resumed_from == 1 and len(result.history) == 2
    assert "ignoring checkpoint" not in caplog.text and "resuming from" in caplog.text
    assert all(p.dtype == torch.float32 for p in result.model.parameters())


def test_compiled_training_matches_eager(set5_x2_arrays):
    lr, hr, validation = first_96(set5_x2_arrays)
    config = dataclasses.replace(QUICK, epochs=1, steps_per_epoch=3)
    eager = train(lr, hr, validation, TINY, config, runtime=MODES["fp32"], progress=False)
    compiled = train(lr, hr, validation, TINY, config, runtime=resolve_runtime(CPU, "fp32", False, "default"),
                     progress=False)
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)
    for a, b in zip(eager.model.state_dict().values(), compiled.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- the recipe ---------------------------------------------------------------------------------


def test_cosine_schedule_with_warm_up_by_hand():
    assert cosine_lr(0, 100, 1.0, 0.0, 0) == 1.0
    assert cosine_lr(99, 100, 1.0, 0.1, 0) == pytest.approx(0.1)
    assert cosine_lr(50, 101, 1.0, 0.0, 0) == pytest.approx(0.5)
    config = TrainConfig(lr=1e-3, lr_schedule="cosine", min_lr=1e-5, warmup_steps=10, epochs=2)
    # 2 epochs of 55 steps: warm-up over steps 0..9, then the cosine from step 10 to 109
    assert learning_rate(config, 1, 0, 55) == pytest.approx(1e-4)
    assert learning_rate(config, 1, 9, 55) == pytest.approx(1e-3 * cosine_lr(9, 110, 1, 0.01, 10))
    assert learning_rate(config, 1, 10, 55) == pytest.approx(1e-3)
    assert learning_rate(config, 2, 54, 55) == pytest.approx(1e-5)
    mid = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 50 / 99))
    assert learning_rate(config, 2, 5, 55) == pytest.approx(mid)  # step 60 overall
    paper = TrainConfig()
    assert learning_rate(paper, 21, 0, 1447) == pytest.approx(0.01)  # the step schedule, per epoch
    assert TrainConfig(lr_schedule="cosine").schedule_needs_total and not paper.schedule_needs_total


def test_losses_by_hand():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 0.0, 0.0]).view(2, 1, 2, 2)
    assert sr_loss(prediction, target, "l2").item() == pytest.approx(0.5 * (4 + 4) / 2)
    assert sr_loss(prediction, target, "mse").item() == pytest.approx(8 / 8)
    assert sr_loss(prediction, target, "l1").item() == pytest.approx(6 / 8)
    assert sr_loss(prediction.bfloat16(), target).dtype == torch.float32  # the loss is taken in fp32


def test_loss_border_leaves_the_patch_sides_out():
    """``loss_border`` b: the loss of the inner (H - 2b, W - 2b) alone, as an unpadded network's valid output."""
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.rand(3, 1, 9, 9, generator=generator), torch.rand(3, 1, 9, 9, generator=generator)
    for kind in ("l2", "mse", "l1"):
        inner = sr_loss(prediction[..., 2:7, 2:7].clone(), target[..., 2:7, 2:7].clone(), kind)
        assert sr_loss(prediction, target, kind, border=2).item() == pytest.approx(inner.item()), kind
    changed = target.clone()
    changed[..., :2, :] = 5.0  # the border does not count
    changed[..., :, -2:] = -5.0
    assert sr_loss(prediction, changed, "l1", border=2).item() == pytest.approx(sr_loss(prediction, target, "l1", 2).item())
    assert sr_loss(prediction, changed, "l1").item() != pytest.approx(sr_loss(prediction, target, "l1").item())
    with pytest.raises(ValueError, match="loss_border 5 leaves nothing of \\(9, 9\\) patches"):
        sr_loss(prediction, target, "l1", border=5)
    with pytest.raises(ValueError, match="loss_border must be >= 0"):
        TrainConfig(loss_border=-1)


def test_the_estimate_warns_of_days_on_a_cpu_and_names_quicker_options(caplog):
    with caplog.at_level(logging.INFO, logger="vdsr.train"):
        announce_estimate(25.0, 80 * 1447, 64, MODES["fp32"])  # the paper's schedule at fp32 CPU speed
    assert "the remaining 115760 steps need about 3.4 days" in caplog.text
    assert "WARNING" in caplog.text and "make release-cpu" in caplog.text and "make smoke" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vdsr.train"):
        announce_estimate(60.0, 300, 32, MODES["fp32"])
    assert "need about 3 min" in caplog.text and "WARNING" not in caplog.text


_FAULTS_CHILD = """
import resource, sys, torch
from vdsr.models import ModelConfig, build_model
from vdsr.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
model, image = build_model(ModelConfig(depth=5)).eval(), torch.rand(1, 1, 480, 320)
with torch.inference_mode():
    for _ in range(2):  # warm-up: the heap grows to the pass's footprint
        model(image)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        model(image)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 2)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_freed_memory_is_reused_without_page_faults():
    """A whole-image pass (feature maps of 480x320x64 fp32, 39 MB, above glibc's largest mmap
    threshold): each layer's maps are new pages to fault in (9,600 of 4 KiB per map), unless
    keep_freed_memory() is on, when the warmed-up heap's pages are reused."""
    runs = {}
    for mode in ("plain", "keep"):
        done = subprocess.run([sys.executable, "-c", _FAULTS_CHILD, mode], capture_output=True, text=True,
                              timeout=120, check=True)
        applied, faults = done.stdout.split()
        runs[mode] = (applied, int(faults))
    assert runs["plain"][0] == "False" and runs["plain"][1] > 4 * 9600, runs
    assert runs["keep"][0] == "True" and runs["keep"][1] < runs["plain"][1] / 20, runs


def test_keep_freed_memory_is_off_with_its_environment_variable():
    assert keep_freed_memory({KEEP_FREED_MEMORY_ENV: "0"}) is False
