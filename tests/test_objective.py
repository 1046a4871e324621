"""Unit tests of pcrl.objective: hand-computed loss values, stop-gradient, β, view/weight options, full task."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcrl.config import LossWeights, ObjectiveConfig
from pcrl.model import PCRLv2Output, PCRLv2UNet, ScaleFeatures
from pcrl.objective import PCRLv2Objective, PCRLv2Task, SiameseCosineLoss, beta_schedule

B, L = 2, 2
GLOBAL, LOCAL = (16, 16, 8), (8, 8, 8)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fake_output(
    rows: int,
    features: list[torch.Tensor],
    reconstruction: float | None = None,
    scale_values: list[float] | None = None,
    scale_sizes: list[tuple[int, int, int]] | None = None,
    size: tuple[int, int, int] = (4, 4, 2),
) -> PCRLv2Output:
    """A model output with constant maps; features[l] is (rows, C) used as both target and prediction."""
    feats = [ScaleFeatures(f.clone(), f.clone()) for f in features]
    if reconstruction is None:
        return PCRLv2Output(None, feats, None)
    assert scale_values is not None and scale_sizes is not None
    recon = torch.full((rows, 1, *size), reconstruction)
    maps = [torch.full((rows, 1, *s), v) for v, s in zip(scale_values, scale_sizes, strict=True)]
    return PCRLv2Output(recon, feats, maps)


def _task(base: int = 2, **objective_kwargs) -> PCRLv2Task:
    return PCRLv2Task(PCRLv2UNet(base_channels=base), PCRLv2Objective(**objective_kwargs))


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    global_views = torch.randn(B, 2, 1, *GLOBAL)
    global_targets = torch.rand(B, 2, 1, *GLOBAL)
    local_views = torch.randn(B, L, 1, *LOCAL)
    return global_views, global_targets, local_views


# --- SiameseCosineLoss ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pred", "target", "expected"),
    [
        ([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], -1.0),
        ([[1.0, 0.0, 0.0]], [[0.0, 5.0, 0.0]], 0.0),
        ([[1.0, 2.0, 3.0]], [[-2.0, -4.0, -6.0]], 1.0),
        ([[0.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]], 0.0),
    ],
    ids=["identical", "orthogonal", "opposite", "zero-vector"],
)
def test_siamese_cosine_hand_computed(pred: list, target: list, expected: float) -> None:
    """D = -½[cos(p_a, z_b) + cos(p_b, z_a)]: -1 aligned, 0 orthogonal, +1 opposite (scale-invariant), and
    a zero vector gives 0 rather than NaN thanks to eps (a sign or normalisation bug changes these values)."""
    p, z = torch.tensor(pred), torch.tensor(target)
    d = SiameseCosineLoss()(z, p, z, p)
    assert d.item() == pytest.approx(expected, abs=1e-6)


def test_siamese_cosine_is_symmetric_and_averages_the_batch() -> None:
    """Both directions and the batch mean count: row 0 aligned (-1) and row 1 orthogonal (0) give -0.5."""
    pa = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    zb = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    loss = SiameseCosineLoss()
    assert loss(zb, pa, zb, pa).item() == pytest.approx(-0.5)
    za, pb = torch.randn(2, 2), torch.randn(2, 2)
    assert loss(za, pa, zb, pb).item() == pytest.approx(loss(zb, pb, za, pa).item())


def test_siamese_cosine_stops_gradient_on_targets() -> None:
    """SimSiam collapses without the stop-gradient: targets z must get no gradient through D, predictions must."""
    z_a, p_a, z_b, p_b = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    SiameseCosineLoss()(z_a, p_a, z_b, p_b).backward()
    assert z_a.grad is None and z_b.grad is None
    assert p_a.grad is not None and p_a.grad.abs().sum() > 0
    assert p_b.grad is not None and p_b.grad.abs().sum() > 0


def test_siamese_cosine_shape_mismatch_raises() -> None:
    """Mismatched features fail with both shapes named instead of broadcasting silently."""
    with pytest.raises(ValueError, match=r"\(2, 8\).*\(2, 4\)"):
        SiameseCosineLoss()(torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 4), torch.randn(2, 4))


# --- beta_schedule -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "kind", "expected"),
    [
        (0, "cosine", 1.0),
        (50, "cosine", 0.5),
        (100, "cosine", 0.0),
        (25, "cosine", 0.5 * (1 + math.cos(math.pi / 4))),
        (150, "cosine", 0.0),
        (-5, "cosine", 1.0),
        (0, "constant", 1.0),
        (100, "constant", 1.0),
    ],
)
def test_beta_schedule_values(step: int, kind: str, expected: float) -> None:
    """β follows training progress (1 → ½ → 0 over total_steps, clamped outside), not the reference's
    hard-coded 240 epochs (docs/method.md R2, D4)."""
    assert beta_schedule(step, 100, kind) == pytest.approx(expected, abs=1e-12)


def test_beta_schedule_invalid_raises() -> None:
    """A zero horizon or a misspelled kind fails loudly instead of dividing by zero or defaulting."""
    with pytest.raises(ValueError, match="total_steps"):
        beta_schedule(0, 0)
    with pytest.raises(ValueError, match="kind"):
        beta_schedule(0, 10, "linear")


# --- PCRLv2Objective on hand-made outputs ----------------------------------------------------------------


def _hand_outputs(
    recon1: float = 0.5, recon2: float | None = None
) -> tuple[PCRLv2Output, PCRLv2Output, PCRLv2Output, torch.Tensor]:
    """Two scales; every feature is all-ones (so every D is -1); targets are zero."""
    ones = [torch.ones(B, 4), torch.ones(B, 2)]
    sizes = [(2, 2, 1), (4, 4, 2)]
    out1 = _fake_output(B, ones, recon1, [0.6, 0.2], sizes)
    out2 = _fake_output(B, ones, recon2, [0.3, 0.1], sizes)
    out_local = _fake_output(3 * B, [torch.ones(3 * B, 4), torch.ones(3 * B, 2)])
    return out1, out2, out_local, torch.zeros(B, 2, 1, 4, 4, 2)


def test_objective_hand_computed_terms() -> None:
    """Zero targets: restore = 0.5² = 0.25, multiscale = 0.6² (scale 0, a constant upsamples to itself) or
    0.2² (scale 1), both cosine terms -1, loss = 0.25 + β·ms - 2. Pins the term formulas and the β placement."""
    out1, out2, out_local, targets = _hand_outputs()
    for seed in range(6):
        terms = PCRLv2Objective()(out1, out2, out_local, targets, beta=0.5, generator=_gen(seed))
        ms = 0.36 if int(terms["scale"]) == 0 else 0.04
        assert terms["restore"].item() == pytest.approx(0.25)
        assert terms["multiscale"].item() == pytest.approx(ms)
        assert terms["global"].item() == pytest.approx(-1.0)
        assert terms["local"].item() == pytest.approx(-1.0)
        assert terms["loss"].item() == pytest.approx(0.25 + 0.5 * ms - 2.0)
        assert terms["scale"].dtype == torch.int64 and terms["scale"].ndim == 0


def test_objective_multiscale_upsamples_mask_not_target() -> None:
    """The coarse mask is upsampled to the full-resolution target (docs/method.md §3.2): a 1×1×1 mask c
    against a random target t gives mean((c - t)²), not (c - mean t)² as downsampling the target would."""
    target = torch.rand(B, 2, 1, 4, 4, 2)
    out1 = _fake_output(B, [torch.ones(B, 3)], 0.5, [0.7], [(1, 1, 1)])
    out2 = _fake_output(B, [torch.ones(B, 3)])
    out_local = _fake_output(B, [torch.ones(B, 3)])
    terms = PCRLv2Objective()(out1, out2, out_local, target, beta=1.0, generator=_gen(0))
    t = target[:, 0]
    assert terms["multiscale"].item() == pytest.approx(((0.7 - t) ** 2).mean().item(), rel=1e-6)
    assert terms["restore"].item() == pytest.approx(((0.5 - t) ** 2).mean().item(), rel=1e-6)
    assert abs(terms["multiscale"].item() - (0.7 - t.mean().item()) ** 2) > 1e-3


def test_objective_multiscale_matches_trilinear_upsampling() -> None:
    """A non-constant coarse mask is compared after trilinear (align_corners=False) upsampling."""
    target = torch.rand(B, 2, 1, 4, 4, 2)
    coarse = torch.rand(B, 1, 2, 2, 1)
    out1 = PCRLv2Output(
        torch.rand(B, 1, 4, 4, 2), [ScaleFeatures(torch.randn(B, 3), torch.randn(B, 3))], [coarse]
    )
    out2 = _fake_output(B, [torch.ones(B, 3)])
    out_local = _fake_output(B, [torch.ones(B, 3)])
    terms = PCRLv2Objective()(out1, out2, out_local, target, beta=1.0, generator=_gen(0))
    up = F.interpolate(coarse, size=(4, 4, 2), mode="trilinear", align_corners=False)
    assert terms["multiscale"].item() == pytest.approx(F.mse_loss(up, target[:, 0]).item(), rel=1e-6)


@pytest.mark.parametrize(("views", "expected"), [((1,), 0.25), ((2,), 0.01), ((1, 2), 0.13)])
def test_objective_restore_views_selects_views(views: tuple[int, ...], expected: float) -> None:
    """restore_views=[1] is the reference (view 2's output discarded, docs/method.md R1); [1, 2] averages both
    views' MSEs (0.5² and 0.1² against zero targets); [2] uses view 2 only."""
    out1, out2, out_local, targets = _hand_outputs(recon1=0.5, recon2=0.1)
    terms = PCRLv2Objective(restore_views=views)(out1, out2, out_local, targets, beta=1.0, generator=_gen(0))
    assert terms["restore"].item() == pytest.approx(expected)


def test_objective_weights_scale_terms() -> None:
    """loss = Σ weight·term with β on the multi-scale term; raw terms are reported unweighted."""
    out1, out2, out_local, targets = _hand_outputs()
    objective = PCRLv2Objective(restore=2.0, multiscale=3.0, global_=0.5, local=0.0)
    terms = objective(out1, out2, out_local, targets, beta=0.25, generator=_gen(1))
    expected = 2.0 * terms["restore"] + 3.0 * 0.25 * terms["multiscale"] + 0.5 * terms["global"]
    assert terms["loss"].item() == pytest.approx(expected.item())
    assert terms["local"].item() == pytest.approx(-1.0)


def test_objective_local_term_is_j_major() -> None:
    """Local rows [j·B, (j+1)·B) are local j of every sample. With view features (e1, e2) and local rows
    (e1, e1, e2, e2): j-major gives D = -0.5 for both locals; a sample-major reading would give -1."""
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    view = [torch.stack([e1, e2])]
    out1, out2 = _fake_output(B, view), _fake_output(B, view)
    out_local = _fake_output(2 * B, [torch.stack([e1, e1, e2, e2])])
    objective = PCRLv2Objective(restore_views=(1,))
    out1 = out1._replace(
        reconstruction=torch.zeros(B, 1, 2, 2, 2), scale_reconstructions=[torch.zeros(B, 1, 2, 2, 2)]
    )
    terms = objective(out1, out2, out_local, torch.zeros(B, 2, 1, 2, 2, 2), beta=1.0, generator=_gen(0))
    assert terms["local"].item() == pytest.approx(-0.5)
    assert terms["global"].item() == pytest.approx(-1.0)


def test_objective_same_generator_same_scales() -> None:
    """Scale draws come only from the passed generator: same seed, same draws (resumable, no global RNG)."""
    out1, out2, out_local, targets = _hand_outputs()
    draws = [int(PCRLv2Objective()(out1, out2, out_local, targets, 1.0, _gen(s))["scale"]) for s in range(20)]
    torch.manual_seed(123)  # global RNG state must not matter
    again = [int(PCRLv2Objective()(out1, out2, out_local, targets, 1.0, _gen(s))["scale"]) for s in range(20)]
    assert draws == again and set(draws) == {0, 1}


def test_objective_invalid_inputs_raise() -> None:
    """Wrong targets, a local batch that is not L·B rows, or a restored view without reconstructions fail
    with the shapes named."""
    out1, out2, out_local, targets = _hand_outputs()
    objective = PCRLv2Objective()
    with pytest.raises(ValueError, match="targets"):
        objective(out1, out2, out_local, targets[:, :1], 1.0, _gen(0))
    bad_local = _fake_output(3, [torch.ones(3, 4), torch.ones(3, 2)])
    with pytest.raises(ValueError, match="L·B rows"):
        objective(out1, out2, bad_local, targets, 1.0, _gen(0))
    with pytest.raises(ValueError, match="restore_views"):
        PCRLv2Objective(restore_views=(1, 2))(out1, out2, out_local, targets, 1.0, _gen(0))
    with pytest.raises(ValueError, match="restore_views"):
        PCRLv2Objective(restore_views=(3,))
    with pytest.raises(ValueError, match="local"):
        PCRLv2Objective(local=-1.0)


def test_objective_from_config() -> None:
    """from_config maps every weight (incl. YAML's ``global`` → ``global_``) and restore_views."""
    cfg = ObjectiveConfig(
        weights=LossWeights(restore=2.0, multiscale=3.0, global_=4.0, local=5.0), restore_views=[1, 2]
    )
    objective = PCRLv2Objective.from_config(cfg)
    assert (objective.restore_weight, objective.multiscale_weight) == (2.0, 3.0)
    assert (objective.global_weight, objective.local_weight) == (4.0, 5.0)
    assert objective.restore_views == (1, 2)


# --- PCRLv2Task ---------------------------------------------------------------------------------------


def _dead_by_construction(name: str) -> bool:
    # A bias right before a batch-statistics normalisation only shifts the batch mean, which the norm removes,
    # so its gradient is exactly zero in exact arithmetic: conv biases before BatchNorm3d, the predictor's
    # first Linear bias before BatchNorm1d, and the target BatchNorm1d bias (z is detached in the loss and its
    # shift is removed by the predictor's BatchNorm1d). They are kept for parity with the reference's count.
    return name.endswith(("conv.bias", "predictor.0.bias", "target_norm.bias"))


def test_task_every_parameter_gets_gradient() -> None:
    """Every parameter is reached by the full objective (timm's all-params-get-grad): a detached head, a
    dropped term or an unused module shows up as a None/zero gradient. Each step trains only the drawn
    scale's restoration head, so steps are accumulated until every scale was drawn. Float64 makes the
    structurally dead biases (see _dead_by_construction) separable from rounding noise."""
    task = _task(base=2).double()
    batch = _batch()
    drawn: set[int] = set()
    seed = 0
    while len(drawn) < task.model.num_scales:
        terms = task(*batch, beta=0.7, generator=_gen(seed))
        drawn.add(int(terms["scale"]))
        terms["loss"].backward()
        seed += 1
        assert seed < 50
    for name, p in task.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if _dead_by_construction(name):
            assert p.grad.abs().max() < 1e-9, name
        else:
            assert p.grad.abs().max() > 1e-9, name


def test_task_zero_weight_removes_term() -> None:
    """A weight of 0 removes the term's gradient: with restore=0 the full-resolution out head gets none."""
    task = _task(base=2, restore=0.0)
    task(*_batch(), beta=1.0, generator=_gen(0))["loss"].backward()
    assert task.model.out_head.weight.grad is not None
    assert task.model.out_head.weight.grad.abs().max() == 0


def test_task_random_init_loss_ranges() -> None:
    """At random init: restore and multiscale MSEs against U(0,1) targets are about 1/12 plus the offset of a
    ~0.5 sigmoid (docs/method.md §3.4: ≈ 0.1), and the cosine terms are near 0 — a collapsed or mis-signed
    term is not."""
    task = _task(base=4)
    with torch.no_grad():
        terms = task(*_batch(), beta=1.0, generator=_gen(0))
    assert 0.05 < terms["restore"].item() < 0.2
    assert 0.05 < terms["multiscale"].item() < 0.2
    assert abs(terms["global"].item()) < 0.3
    assert abs(terms["local"].item()) < 0.3
    expected = terms["restore"] + terms["multiscale"] + terms["global"] + terms["local"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_task_same_seed_same_losses() -> None:
    """Same generator seed and batch → identical loss dict (deterministic draws, nothing kept between calls)."""
    task = _task(base=2)
    batch = _batch()
    first = task(*batch, beta=0.3, generator=_gen(5))
    second = task(*batch, beta=0.3, generator=_gen(5))
    assert first.keys() == second.keys() == {"loss", "restore", "multiscale", "global", "local", "scale"}
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_task_locals_are_batched_j_major() -> None:
    """The third forward sees local view j of sample b at row j·B + b, as PCRLv2Objective expects."""
    task = _task(base=2)
    global_views, global_targets, _ = _batch()
    local_views = torch.stack([torch.full((1, *LOCAL), 10.0 * b + j) for b in range(B) for j in range(L)])
    local_views = local_views.reshape(B, L, 1, *LOCAL)
    seen: list[torch.Tensor] = []
    handle = task.model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    task(global_views, global_targets, local_views, beta=1.0, generator=_gen(0))
    handle.remove()
    assert len(seen) == 3
    firsts = seen[2][:, 0, 0, 0, 0].tolist()
    assert firsts == [10.0 * b + j for j in range(L) for b in range(B)]


@pytest.mark.parametrize("views", [(1,), (1, 2)])
def test_task_restores_view2_only_when_asked(views: tuple[int, ...]) -> None:
    """View 2's reconstruction (wasted work in the reference) is only computed when 2 ∈ restore_views."""
    task = _task(base=2, restore_views=views)
    heads_run: list[int] = []
    task.model.out_head.register_forward_hook(lambda *_: heads_run.append(1))
    task(*_batch(), beta=1.0, generator=_gen(0))
    assert len(heads_run) == len(views)


def test_task_casts_inputs_to_parameter_dtype() -> None:
    """A bf16 engine casts the parameters but not the batch: float32 inputs must still run, and the loss is
    reported in float32."""
    task = _task(base=2).to(torch.bfloat16)
    terms = task(*_batch(), beta=1.0, generator=_gen(0))
    assert terms["loss"].dtype == torch.float32
    assert torch.isfinite(terms["loss"])


def test_task_invalid_shapes_raise() -> None:
    """Wrongly stacked views fail with their shapes rather than inside a convolution."""
    global_views, global_targets, local_views = _batch()
    task = _task(base=2)
    with pytest.raises(ValueError, match="global_views"):
        task(global_views[:, 0], global_targets, local_views, 1.0, _gen(0))
    with pytest.raises(ValueError, match="global_targets"):
        task(global_views, global_targets[:, :1], local_views, 1.0, _gen(0))
    with pytest.raises(ValueError, match="local_views"):
        task(global_views, global_targets, local_views[:1], 1.0, _gen(0))


@pytest.mark.parametrize("bn_stats", ["global", "all"])
def test_task_bn_stats_selects_the_forwards_that_update_running_statistics(bn_stats: str) -> None:
    """``global``: the running statistics after a step are those of the two global views' forwards alone;
    ``all``: the local views' forward updates them last (the reference). The losses are the same either way."""
    torch.manual_seed(0)
    task = PCRLv2Task(PCRLv2UNet(base_channels=2), PCRLv2Objective(), bn_stats=bn_stats)
    replay = PCRLv2UNet(base_channels=2)
    replay.load_state_dict(task.model.state_dict())
    global_views, global_targets, local_views = _batch()
    terms = task(global_views, global_targets, local_views, 1.0, torch.Generator().manual_seed(0))
    terms["loss"].backward()  # the saved BatchNorm buffers must be left as autograd saw them
    replay(global_views[:, 0])
    replay(global_views[:, 1], local=True)
    if bn_stats == "all":
        replay(local_views.transpose(0, 1).reshape(-1, 1, *LOCAL), local=True)
    for (name, got), want in zip(task.model.state_dict().items(), replay.state_dict().values(), strict=True):
        assert torch.allclose(got.float(), want.float(), atol=1e-6), name
    torch.manual_seed(0)
    other = PCRLv2Task(
        PCRLv2UNet(base_channels=2), PCRLv2Objective(), bn_stats="all" if bn_stats == "global" else "global"
    )
    again = other(global_views, global_targets, local_views, 1.0, torch.Generator().manual_seed(0))
    assert all(torch.equal(terms[k], again[k]) for k in ("loss", "restore", "global", "local"))
    with pytest.raises(ValueError, match="bn_stats"):
        PCRLv2Task(PCRLv2UNet(base_channels=2), PCRLv2Objective(), bn_stats="locals")
