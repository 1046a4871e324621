"""Unit tests of pcrl.model: the reference's parameter counts, docs/method.md §2
shapes, validation, norms, checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pcrl.model import LUConv, PCRLv2Output, PCRLv2UNet


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_pcrlv2unet_parameter_count_matches_reference() -> None:
    """Pins the architecture to the reference (docs/method.md §2.4): 17,111,434 parameters, 7,027,776 in the
    encoder, and the per-part split, so a wrong width, a missing bias or an extra projector MLP is caught."""
    model = PCRLv2UNet()
    assert _count(model) == 17_111_434
    assert _count(model.encoder) == 7_027_776
    assert [_count(s) for s in model.encoder] == [56_448, 332_352, 1_328_256, 5_310_720]
    assert [_count(s) for s in model.decoder] == [7_407_616, 1_852_416, 463_360]
    assert [_count(h.predictor) for h in model.heads] == [263_936, 66_432, 16_832]
    assert sum(_count(h.target_norm) for h in model.heads) == 896
    assert sum(_count(h.restore_conv) + _count(h.restore_norm) for h in model.heads) == 12_105
    assert _count(model.out_head) == 65
    assert sum(b.numel() for b in model.buffers()) == 7_389


def test_pcrlv2unet_encoder_keys_are_the_transferable_encoder() -> None:
    """The encoder export selects ``encoder.*`` keys; a module placed elsewhere would silently drop out of it."""
    model = PCRLv2UNet(base_channels=4)
    keys = [k for k, _ in model.named_parameters() if k.startswith("encoder.")]
    assert sum(model.get_parameter(k).numel() for k in keys) == _count(model.encoder)
    assert all(k.split(".")[0] in {"encoder", "decoder", "heads", "out_head"} for k in model.state_dict())


def test_pcrlv2unet_shapes_scale_with_base_channels() -> None:
    """The docs/method.md §2.2 table at width base=4 (channels 8·base, 4·base, 2·base; masks at the stage
    resolution): catches a decoder that halves channels at the wrong place or upsamples the scale masks inside
    the model."""
    base = 4
    model = PCRLv2UNet(base_channels=base)
    out = model(torch.randn(2, 1, 64, 64, 32))
    assert isinstance(out, PCRLv2Output)
    assert out.reconstruction is not None and out.scale_reconstructions is not None
    assert out.reconstruction.shape == (2, 1, 64, 64, 32)
    assert out.reconstruction.min() > 0.0 and out.reconstruction.max() < 1.0
    assert [tuple(f.target.shape) for f in out.scale_features] == [
        (2, 8 * base),
        (2, 4 * base),
        (2, 2 * base),
    ]
    assert [tuple(f.prediction.shape) for f in out.scale_features] == [
        (2, 8 * base),
        (2, 4 * base),
        (2, 2 * base),
    ]
    assert [tuple(m.shape) for m in out.scale_reconstructions] == [
        (2, 1, 16, 16, 8),
        (2, 1, 32, 32, 16),
        (2, 1, 64, 64, 32),
    ]
    assert model.scale_channels == (8 * base, 4 * base, 2 * base) and model.num_scales == 3

    local = model(torch.randn(12, 1, 16, 16, 16), local=True)
    assert local.reconstruction is None and local.scale_reconstructions is None
    assert [tuple(f.target.shape) for f in local.scale_features] == [
        (12, 8 * base),
        (12, 4 * base),
        (12, 2 * base),
    ]

    assert model.forward_features(torch.randn(2, 1, 64, 64, 32)).shape == (2, 16 * base, 8, 8, 4)
    feats = model.encoder_features(torch.randn(2, 1, 16, 16, 16))
    assert [tuple(f.shape) for f in feats] == [
        (2, 2 * base, 16, 16, 16),
        (2, 4 * base, 8, 8, 8),
        (2, 8 * base, 4, 4, 4),
        (2, 16 * base, 2, 2, 2),
    ]


def test_pcrlv2unet_default_widths_match_spec_table() -> None:
    """The exact docs/method.md §2.2 shapes at the paper's widths for a 64×64×32 global and 6·2 local 16³
    views (about 10 s on 2 CPU cores): pins the full-size model, not just a scaled-down one."""
    model = PCRLv2UNet()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 64, 64, 32))
        local = model(torch.randn(12, 1, 16, 16, 16), local=True)
    assert out.reconstruction is not None and out.scale_reconstructions is not None
    assert out.reconstruction.shape == (2, 1, 64, 64, 32)
    assert [tuple(f.target.shape) for f in out.scale_features] == [(2, 256), (2, 128), (2, 64)]
    assert [tuple(f.prediction.shape) for f in out.scale_features] == [(2, 256), (2, 128), (2, 64)]
    assert [tuple(m.shape) for m in out.scale_reconstructions] == [
        (2, 1, 16, 16, 8),
        (2, 1, 32, 32, 16),
        (2, 1, 64, 64, 32),
    ]
    assert [tuple(f.prediction.shape) for f in local.scale_features] == [(12, 256), (12, 128), (12, 64)]


def test_pcrlv2unet_depth_generalises() -> None:
    """depth=2 has one decoder stage at full resolution; depth=5 pools four times (a hard-coded 3 stages breaks)."""
    shallow = PCRLv2UNet(base_channels=2, depth=2)
    out = shallow(torch.randn(2, 1, 4, 4, 2))
    assert out.scale_reconstructions is not None
    assert [tuple(m.shape) for m in out.scale_reconstructions] == [(2, 1, 4, 4, 2)]
    deep = PCRLv2UNet(base_channels=2, depth=5)
    out = deep(torch.randn(2, 1, 16, 16, 16))
    assert [f.target.shape[1] for f in out.scale_features] == [32, 16, 8, 4]
    assert deep.forward_features(torch.randn(2, 1, 16, 16, 16)).shape == (2, 64, 1, 1, 1)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"in_channels": 0}, "in_channels"),
        ({"base_channels": 0}, "base_channels"),
        ({"depth": 1}, "depth"),
        ({"norm": "layer"}, "norm"),
        ({"norm": "group", "base_channels": 4}, "base_channels"),
    ],
)
def test_pcrlv2unet_invalid_args_raise(kwargs: dict, name: str) -> None:
    """Bad constructor arguments fail at construction with the argument named, not deep inside a forward."""
    with pytest.raises(ValueError, match=name):
        PCRLv2UNet(**kwargs)


@pytest.mark.parametrize(
    "shape",
    [(2, 16, 16, 16), (2, 2, 16, 16, 16), (2, 1, 16, 16, 12), (1, 1, 16, 16, 16)],
    ids=["4d", "channels", "not-divisible", "single-sample"],
)
def test_pcrlv2unet_invalid_input_raises(shape: tuple[int, ...]) -> None:
    """A wrong input fails with its shape in the message (a non-divisible size would otherwise fail obscurely
    in the decoder; B=1 in training would fail in BatchNorm1d, docs/method.md R4)."""
    model = PCRLv2UNet(base_channels=2)
    with pytest.raises(ValueError, match=r"shape \("):
        model(torch.randn(*shape))


def test_pcrlv2unet_single_sample_allowed_in_eval() -> None:
    """B=1 is fine in eval mode (running statistics), so inference is not blocked by the training-time check."""
    model = PCRLv2UNet(base_channels=2).eval()
    assert model(torch.randn(1, 1, 8, 8, 8)).reconstruction.shape == (1, 1, 8, 8, 8)


@pytest.mark.parametrize(
    ("norm", "norm_type"),
    [
        ("batch", nn.BatchNorm3d),
        ("sync_batch", nn.BatchNorm3d),
        ("group", nn.GroupNorm),
        ("instance", nn.InstanceNorm3d),
    ],
)
def test_pcrlv2unet_norms_build_and_run(norm: str, norm_type: type) -> None:
    """Every ``model.norm`` option builds the right layers and runs forward/backward; sync_batch must build
    BatchNorm3d so that SyncBatchNorm.convert_sync_batchnorm can convert it."""
    model = PCRLv2UNet(base_channels=8, depth=3, norm=norm)  # type: ignore[arg-type]
    assert all(isinstance(m.norm, norm_type) for m in model.modules() if isinstance(m, LUConv))
    out = model(torch.randn(2, 1, 8, 8, 8))
    assert out.reconstruction is not None and out.scale_reconstructions is not None
    loss = out.reconstruction.mean() + sum(m.mean() for m in out.scale_reconstructions)
    loss = loss + sum(f.prediction.sum() for f in out.scale_features)
    loss.backward()
    assert torch.isfinite(loss)
    if norm == "sync_batch":
        converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
        assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())


def test_pcrlv2unet_local_flag_only_skips_restoration_heads() -> None:
    """local=True must give the same features as a full forward (it only skips unused heads); a flag that
    changed the feature path would make view 2's features differ from the reference's."""
    model = PCRLv2UNet(base_channels=2).eval()
    x = torch.randn(2, 1, 8, 8, 8)
    full, local = model(x), model(x, local=True)
    for a, b in zip(full.scale_features, local.scale_features, strict=True):
        torch.testing.assert_close(a.target, b.target)
        torch.testing.assert_close(a.prediction, b.prediction)


def test_pcrlv2unet_forward_stores_nothing_on_self() -> None:
    """The reference keeps the last activations as attributes (docs/method.md R12), holding memory after the
    step."""
    model = PCRLv2UNet(base_channels=2)
    before = set(vars(model)) | set(model._modules)
    model(torch.randn(2, 1, 8, 8, 8))
    assert set(vars(model)) | set(model._modules) == before


def test_pcrlv2unet_activation_checkpointing_matches_plain() -> None:
    """Checkpointed decoder stages give the same outputs, gradients and BatchNorm running statistics (the
    recompute must not apply the running-stat update a second time)."""
    plain = PCRLv2UNet(base_channels=2)
    ckpt = copy.deepcopy(plain)
    ckpt.enable_activation_checkpointing()
    x = torch.randn(2, 1, 16, 16, 8)

    def run(model: PCRLv2UNet) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = model(x)
        assert out.reconstruction is not None and out.scale_reconstructions is not None
        loss = out.reconstruction.square().mean() + sum(m.mean() for m in out.scale_reconstructions)
        loss = loss + sum(f.prediction.square().mean() for f in out.scale_features)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    loss_plain, grads_plain = run(plain)
    loss_ckpt, grads_ckpt = run(ckpt)
    torch.testing.assert_close(loss_ckpt, loss_plain)
    for g_ckpt, g_plain in zip(grads_ckpt, grads_plain, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain)
    for b_ckpt, b_plain in zip(ckpt.buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(b_ckpt, b_plain)
