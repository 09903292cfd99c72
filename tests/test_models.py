"""VDSR / SRCNN architecture, init, and the model file (weights_only round trip, wrong files)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from vdsr.models import (
    SRCNN,
    VDSR,
    ModelConfig,
    ModelFileError,
    build_model,
    count_parameters,
    load_model,
    receptive_field,
    save_model,
)


def test_vdsr_keeps_size_and_learns_a_residual():
    torch.manual_seed(0)
    model = build_model(ModelConfig("vdsr", depth=4, width=8))
    x = torch.rand(2, 1, 17, 23)
    assert model(x).shape == (2, 1, 17, 23)
    nn.init.zeros_(model.reconstruction.weight)  # no residual: the output is the input, exactly
    nn.init.zeros_(model.reconstruction.bias)
    assert torch.equal(model(x), x)


def test_paper_sizes():
    # VDSR 20 x 64: 3x3x1x64 + 18 x 3x3x64x64 + 3x3x64x1 weights, plus biases (the paper's ~665k).
    vdsr = build_model(ModelConfig())
    assert count_parameters(vdsr) == (9 * 64 + 64) + 18 * (9 * 64 * 64 + 64) + (9 * 64 + 1) == 665_921
    assert len([m for m in vdsr.modules() if isinstance(m, nn.Conv2d)]) == 20
    # SRCNN 9-5-5 with 64/32 channels (Dong et al. 2016, Sec. 4.3).
    srcnn = build_model(ModelConfig("srcnn", depth=3, width=64))
    assert isinstance(srcnn, SRCNN)
    assert count_parameters(srcnn) == (81 * 64 + 64) + (25 * 64 * 32 + 32) + (25 * 32 + 1) == 57_281
    assert srcnn(torch.rand(1, 1, 20, 30)).shape == (1, 1, 20, 30)  # 'same' padding


@pytest.mark.parametrize("config", [ModelConfig("vdsr", 3, 4), ModelConfig("vdsr", 5, 4), ModelConfig("srcnn", 3, 4)])
def test_receptive_field_matches_the_gradient_footprint(config):
    torch.manual_seed(0)
    model = build_model(config).double()
    for module in model.modules():  # positive weights: no cancellation hides a dependency
        if isinstance(module, nn.Conv2d):
            module.weight.data.abs_()
    x = torch.rand(1, 1, 61, 61, dtype=torch.float64, requires_grad=True)
    model(x)[0, 0, 30, 30].backward()
    rows, cols = torch.nonzero(x.grad[0, 0], as_tuple=True)
    assert int(rows.max() - rows.min() + 1) == int(cols.max() - cols.min() + 1) == receptive_field(config)
    assert receptive_field(ModelConfig()) == 41  # the paper's 41x41 patches


def test_he_initialisation():
    torch.manual_seed(0)
    model = VDSR(depth=6, width=64)
    body = torch.cat([m.weight.flatten() for m in model.body if isinstance(m, nn.Conv2d)])
    assert body.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.02)
    assert model.input_layer.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)  # fan-out
    assert model.reconstruction.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.1)  # fan-in
    x = torch.rand(4, 1, 41, 41) * 0.8 + 0.1
    with torch.no_grad():
        assert (model(x) - x).square().mean().sqrt() < 0.3  # starts near the bicubic input
    assert all(torch.count_nonzero(m.bias) == 0 for m in model.modules() if isinstance(m, nn.Conv2d))


def test_config_is_checked():
    with pytest.raises(ValueError, match="depth >= 3"):
        ModelConfig("vdsr", depth=2)
    with pytest.raises(ValueError, match="one of vdsr, srcnn"):
        ModelConfig("edsr")
    with pytest.raises(ValueError, match="9-5-5"):
        ModelConfig("srcnn", depth=20)


class Wrapper(nn.Module):  # what DistributedDataParallel looks like to state_dict()
    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("wrap", ["none", "compile", "ddp"])
def test_save_and_load_round_trip(tmp_path, wrap):
    torch.manual_seed(0)
    config = ModelConfig("vdsr", depth=3, width=8)
    model = build_model(config)
    wrapped = {"none": model, "compile": torch.compile(model), "ddp": Wrapper(model)}[wrap]
    meta = {"seed": 0, "mlflow_run_id": None, "metrics": {"val_psnr_x2": 33.1}, "scales": [2, 3]}
    path = tmp_path / "model.pt"
    save_model(path, wrapped, config, meta)

    payload = torch.load(path, weights_only=True)  # plain types only
    assert all(not key.startswith(("_orig_mod.", "module.")) for key in payload["state_dict"])
    loaded, loaded_config, loaded_meta = load_model(path)
    assert loaded_config == config and loaded_meta == meta and not loaded.training
    x = torch.rand(1, 1, 12, 12)
    assert torch.equal(loaded(x), model.eval()(x))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


def test_save_rejects_metadata_that_weights_only_cannot_load(tmp_path):
    config = ModelConfig("vdsr", depth=3, width=4)
    with pytest.raises(TypeError, match=r"meta\.psnr: ndarray"):
        save_model(tmp_path / "m.pt", build_model(config), config, {"psnr": np.zeros(2)})
    assert not (tmp_path / "m.pt").exists()


def test_load_rejects_other_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model(tmp_path / "missing.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    with pytest.raises(ModelFileError, match="notes.pt: not a VDSR model file"):
        load_model(text)
    bare = tmp_path / "state_dict.pt"  # a bare state dict, as many projects save
    torch.save(build_model(ModelConfig("vdsr", 3, 4)).state_dict(), bare)
    with pytest.raises(ModelFileError, match="state_dict.pt: not a VDSR model file"):
        load_model(bare)
    pickled = tmp_path / "pickled.pt"  # a whole pickled module: weights_only refuses to run it
    torch.save(build_model(ModelConfig("vdsr", 3, 4)), pickled)
    with pytest.raises(ModelFileError, match="pickled.pt: not a VDSR model file"):
        load_model(pickled)
