"""The x8 self-ensemble: the mean of the 8 transformed passes computed independently (numpy's own
rotations), the plain output for an exactly equivariant network, tiled equal to untiled."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vdsr.inference import SYMMETRIES, dihedral, self_ensemble, undo_dihedral
from vdsr.models import ModelConfig, build_model
from vdsr.inference import model_upscaler


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig("vdsr", depth=4, width=6)).eval()
    with torch.no_grad():  # a visible non-symmetric response: weights far from the identity
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def independent_passes(luma, y: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries as numpy's rot90 / fliplr, each output mapped back with the inverse rotation."""
    outs = []
    for mirror in (False, True):
        for turns in range(4):
            x = np.fliplr(y) if mirror else y
            out = np.rot90(luma(np.ascontiguousarray(np.rot90(x, turns)), 2), -turns)
            outs.append(np.fliplr(out) if mirror else out)
    return outs


def test_dihedral_is_the_group_and_undo_inverts_it():
    a = np.arange(12.0).reshape(3, 4)
    images = [dihedral(a, k) for k in range(SYMMETRIES)]
    assert len({im.tobytes() + bytes(im.shape) for im in map(np.ascontiguousarray, images)}) == 8  # all distinct
    for k in range(SYMMETRIES):
        assert np.array_equal(undo_dihedral(dihedral(a, k), k), a)
    with pytest.raises(ValueError, match=r"symmetry index must be in \[0, 8\), got 8"):
        dihedral(a, 8)


def test_self_ensemble_is_the_mean_of_the_eight_passes():
    model = tiny_model()
    luma = model_upscaler(model, torch.device("cpu"), tile=0)
    y = np.random.default_rng(1).uniform(0.1, 0.9, (23, 31))  # not square: transposes change the shape
    expected = np.mean(independent_passes(luma, y), axis=0)
    got = self_ensemble(luma)(y, 2)
    assert got.shape == y.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    plain = luma(y, 2)
    assert np.abs(got - plain).max() > 1e-4  # this network is not equivariant: the ensemble differs


def test_an_equivariant_network_gives_the_plain_output():
    model = tiny_model()
    with torch.no_grad():  # every kernel made symmetric under the 8 symmetries: the network commutes with them
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                w = module.weight
                module.weight.copy_(sum(torch.rot90(v, t, (2, 3)) for v in (w, w.flip(3)) for t in range(4)) / 8)
    luma = model_upscaler(model, torch.device("cpu"), tile=0)
    y = np.random.default_rng(2).uniform(0.1, 0.9, (19, 26))
    np.testing.assert_allclose(self_ensemble(luma)(y, 3), luma(y, 3), rtol=0, atol=1e-6)


def test_tiled_equals_untiled():
    model = tiny_model(3)
    y = np.random.default_rng(3).uniform(0.1, 0.9, (40, 37))
    whole = self_ensemble(model_upscaler(model, torch.device("cpu"), tile=0))(y, 2)
    tiled = self_ensemble(model_upscaler(model, torch.device("cpu"), tile=16))(y, 2)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-6)


def test_tiles_of_the_network_pass_average_the_eight_symmetries():
    """predict_y(self_ensemble=True), per tile with its overlap, is the ensemble of the whole image."""
    from vdsr.inference import predict_y

    model = tiny_model(4)
    y = np.random.default_rng(4).uniform(0.1, 0.9, (37, 29))
    reference = self_ensemble(model_upscaler(model, torch.device("cpu"), tile=0))(y, 2)
    for tile in (0, 8, 13):
        np.testing.assert_allclose(predict_y(model, y, "cpu", tile=tile, self_ensemble=True), reference,
                                   rtol=0, atol=1e-6)


# --- upscaling variants (vdsr upscale, serving; evaluation stays exact) ---------------------------


def test_a_variant_is_checked_by_name():
    from vdsr.backends import Variant, VariantError

    with pytest.raises(VariantError, match="backend must be one of torch, torch-nchw, .*got 'tensorrt'"):
        Variant("tensorrt", "fp32")
    with pytest.raises(VariantError, match="precision must be one of fp32, bf16, got 'fp16'"):
        Variant("torch", "fp16")
    with pytest.raises(VariantError, match="onnxruntime runs fp32 only"):
        Variant("onnxruntime", "bf16")


def test_evaluation_stays_exact_fp32_nchw_and_variants_copy_the_model():
    """model_upscaler (evaluation) is the plain NCHW exact pass; building a variant leaves the model as it was."""
    from vdsr.backends import Variant, upscale_model, variant_upscaler
    from vdsr.inference import predict_y

    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y = np.random.default_rng(2).uniform(0.1, 0.9, (29, 21))
    exact = model_upscaler(model, torch.device("cpu"), tile=0)(y, 2)
    nhwc = upscale_model(model, Variant("torch", "fp32"))
    assert nhwc is not model and nhwc.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    for key, value in model.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, before[key]), key
    np.testing.assert_array_equal(model_upscaler(model, torch.device("cpu"), tile=0)(y, 2), exact)
    np.testing.assert_array_equal(exact, predict_y(model, y, "cpu", 0, precision="fp32"))
    fast = variant_upscaler(model, torch.device("cpu"), Variant("torch", "fp32"), tile=8)(y, 2)
    np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-5)
    assert np.abs(variant_upscaler(model, torch.device("cpu"), Variant("torch", "bf16"), tile=0)(y, 2) - exact).max() < 0.05


@pytest.mark.parametrize("backend, precision, module", [("onnxruntime", "fp32", "onnxruntime"),
                                                        ("openvino", "fp32", "openvino"), ("openvino", "bf16", "openvino")])
def test_exported_backends_compute_the_network(backend: str, precision: str, module: str):
    """ONNX Runtime and OpenVINO on the exported model, tiled: the exact pass's values (bf16: near them)."""
    pytest.importorskip("onnxscript")
    pytest.importorskip(module)
    from vdsr.backends import Variant, upscale_model, variant_upscaler
    from vdsr.inference import receptive_radius

    model = tiny_model()
    y = np.random.default_rng(3).uniform(0.1, 0.9, (26, 19))
    exact = model_upscaler(model, torch.device("cpu"), tile=0)(y, 2)
    variant = Variant(backend, precision)
    assert receptive_radius(upscale_model(model, variant)) == receptive_radius(model) == 4
    got = variant_upscaler(model, torch.device("cpu"), variant, tile=9)(y, 2)
    assert got.shape == y.shape
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-5 if precision == "fp32" else 0.05)


def test_the_default_variant_is_openvino_where_installed_else_torch_in_bf16_where_native():
    import importlib.util

    from vdsr.backends import Variant, resolve_variant
    from vdsr.runtime import cpu_has_native_bf16

    expected = "openvino" if importlib.util.find_spec("openvino") else "torch"
    native = "bf16" if cpu_has_native_bf16() else "fp32"  # /proc/cpuinfo's avx512_bf16 or amx_bf16
    assert resolve_variant() == resolve_variant("auto", "auto") == Variant(expected, native)
    assert resolve_variant("torch") == Variant("torch", native)
    assert resolve_variant("torch-compile") == Variant("torch-compile", native)
    assert resolve_variant("auto", "fp32", "cuda") == Variant("torch", "fp32")  # exported backends: CPU only
    assert resolve_variant("auto", None, "cuda") == Variant("torch", "fp32")  # bf16's quality: measured on the CPU
    assert resolve_variant("torch-nchw") == Variant("torch-nchw", "fp32")  # the exact pass stays exact
    assert resolve_variant("onnxruntime") == Variant("onnxruntime", "fp32")
    assert resolve_variant("torch-nchw", "fp32") == Variant("torch-nchw", "fp32")
