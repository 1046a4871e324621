"""The PCRLv2 backbone: a 3D U-Net without skip connections plus per-decoder-stage SimSiam heads
(docs/method.md §2).

Data flow for one input ``x`` of shape (B, C_in, X, Y, Z)::

    encoder stage 0 .. depth-1  (MaxPool3d(2) between stages)     -> bottleneck (B, 16·base, X/8, Y/8, Z/8)
    decoder stage 0 .. depth-2  (coarsest first, ConvTranspose ×2)  -> (B, C_l, ...) per stage l
      heads on stage l: target z_l = BN1d(GAP), prediction p_l = MLP(z_l), 1-channel restoration m_l
    out head Conv3d(2·base -> 1, k1) + sigmoid                      -> reconstruction (B, 1, X, Y, Z)

Only ``encoder.*`` parameters are transferred downstream; the decoder and heads exist for pre-training.
Activation checkpointing is a switch the engine flips, so that all parallelism lives in the engine: the model
knows no ranks or devices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pcrl.config import ModelConfig, Norm

__all__ = [
    "NORMS",
    "LUConv",
    "PCRLv2Encoder",
    "PCRLv2Output",
    "PCRLv2UNet",
    "ScaleFeatures",
    "ScaleHeads",
    "build_model",
    "encoder_stages",
    "frozen_buffers",
    "private_model",
]

NORMS: tuple[str, ...] = get_args(Norm)
"""The valid ``norm`` arguments: those of :data:`pcrl.config.Norm` (the ``model.norm`` key)."""
_GROUPS = 8  # GroupNorm groups, as the reference's 'gn' option


def _norm3d(norm: str, channels: int) -> nn.Module:
    if norm in ("batch", "sync_batch"):
        # sync_batch builds a plain BatchNorm3d: the engine converts it with SyncBatchNorm.convert_sync_batchnorm,
        # so the model stays free of process groups and runs in a single process.
        return nn.BatchNorm3d(channels)
    if norm == "group":
        return nn.GroupNorm(_GROUPS, channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ScaleFeatures(NamedTuple):
    """SimSiam features of one decoder stage.

    Attributes:
        target: ``z = BatchNorm1d(GAP(stage))``, shape (B, C). The objective stops its gradient.
        prediction: ``p = predictor(z)``, shape (B, C).
    """

    target: Tensor
    prediction: Tensor


class PCRLv2Output(NamedTuple):
    """Everything the PCRLv2 objective needs from one forward.

    Attributes:
        reconstruction: sigmoid restoration (B, 1, X, Y, Z) of the input, or ``None`` for ``local=True``.
        scale_features: one :class:`ScaleFeatures` per decoder stage, coarsest first.
        scale_reconstructions: one sigmoid map (B, 1, X_l, Y_l, Z_l) per decoder stage at that stage's own
            resolution (coarsest first, not upsampled), or ``None`` for ``local=True``.
    """

    reconstruction: Tensor | None
    scale_features: list[ScaleFeatures]
    scale_reconstructions: list[Tensor] | None


class LUConv(nn.Module):
    """Conv3d(k3, p1, bias) → norm → ReLU, the U-Net's building block.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: ``batch``, ``sync_batch``, ``group`` (8 groups) or ``instance`` (affine).

    Shapes:
        (B, in_channels, X, Y, Z) -> (B, out_channels, X, Y, Z).
    """

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1, bias=True)
        self.norm = _norm3d(norm, out_channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class _DecoderStage(nn.Module):
    """ConvTranspose3d(C, C, 2, s2) → LUConv(C, C/2) → LUConv(C/2, C/2): doubles the size, halves the width."""

    def __init__(self, in_channels: int, norm: Norm) -> None:
        super().__init__()
        out_channels = in_channels // 2
        self.up = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.convs = nn.Sequential(
            LUConv(in_channels, out_channels, norm), LUConv(out_channels, out_channels, norm)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(self.up(x))


class ScaleHeads(nn.Module):
    """The heads on one decoder stage of width C: SimSiam target/predictor and the 1-channel restoration head.

    * target ``z = BatchNorm1d(C)(GAP(x))`` — no projector MLP (the reference's choice);
    * predictor ``p = Linear(C, 2C) → BatchNorm1d(2C) → ReLU → Linear(2C, C)`` applied to ``z``;
    * restoration ``m = sigmoid(norm(Conv3d(C, 1, k3, p1)(x)))``.

    The restoration head has no ReLU before the sigmoid (docs/method.md §2.3: conv → BN → sigmoid): a ReLU
    would confine the output to [0.5, 1) and make targets below 0.5 unreachable. Its norm is BatchNorm3d(1)
    for ``batch`` and ``sync_batch``; GroupNorm(8, 1) cannot exist, so ``group`` and ``instance`` both use
    InstanceNorm3d(1, affine=True) — per-sample statistics like GroupNorm, and the same two affine parameters
    as BatchNorm3d(1).
    The SimSiam BatchNorm1d layers are part of the method, so they stay BatchNorm1d for every ``norm``.

    Args:
        channels: width C of the decoder stage.
        norm: the U-Net's normalisation (selects the restoration head's norm as above).
    """

    def __init__(self, channels: int, norm: Norm = "batch") -> None:
        super().__init__()
        self.target_norm = nn.BatchNorm1d(channels)
        self.predictor = nn.Sequential(
            nn.Linear(channels, 2 * channels),
            nn.BatchNorm1d(2 * channels),
            nn.ReLU(inplace=True),
            nn.Linear(2 * channels, channels),
        )
        self.restore_conv = nn.Conv3d(channels, 1, kernel_size=3, padding=1, bias=True)
        self.restore_norm = (
            nn.BatchNorm3d(1) if norm in ("batch", "sync_batch") else nn.InstanceNorm3d(1, affine=True)
        )

    def features(self, x: Tensor) -> ScaleFeatures:
        """(B, C, X, Y, Z) -> ScaleFeatures(target (B, C), prediction (B, C))."""
        z = self.target_norm(x.mean(dim=(2, 3, 4)))  # GAP: (B, C)
        return ScaleFeatures(target=z, prediction=self.predictor(z))

    def restoration(self, x: Tensor) -> Tensor:
        """(B, C, X, Y, Z) -> sigmoid map (B, 1, X, Y, Z) at the stage resolution."""
        return torch.sigmoid(self.restore_norm(self.restore_conv(x)))


def encoder_stages(in_channels: int, base_channels: int, depth: int, norm: Norm) -> nn.ModuleList:
    """The U-Net's encoder: stage d is ``LUConv(c_in, base·2^d) → LUConv(base·2^d, 2·base·2^d)``.

    One builder for :class:`PCRLv2UNet` (pretraining) and :class:`PCRLv2Encoder` (downstream), so their
    ``encoder.*`` state-dict keys and shapes are the same by construction.
    """
    stages = []
    cin = in_channels
    for d in range(depth):
        width = base_channels * 2**d
        stages.append(nn.Sequential(LUConv(cin, width, norm), LUConv(width, 2 * width, norm)))
        cin = 2 * width
    return nn.ModuleList(stages)


def run_encoder(stages: nn.ModuleList, pool: nn.Module, x: Tensor) -> list[Tensor]:
    """Run :func:`encoder_stages` on ``x`` (B, C, X, Y, Z): stage d sees the input (d = 0) or the pooled
    output of stage d-1. Returns the per-stage features, finest first: (B, 2·base·2^d, X/2^d, Y/2^d, Z/2^d)."""
    features = []
    for d, stage in enumerate(stages):
        x = stage(x if d == 0 else pool(x))
        features.append(x)
    return features


def _check_volume(x: Tensor, in_channels: int, depth: int) -> None:
    factor = 2 ** (depth - 1)
    if x.ndim != 5 or x.shape[1] != in_channels or any(s % factor for s in x.shape[2:]):
        raise ValueError(
            f"expected input (B, {in_channels}, X, Y, Z) with X, Y, Z divisible by {factor} "
            f"(2^(depth-1)), got shape {tuple(x.shape)}"
        )


@contextlib.contextmanager
def frozen_buffers(module: nn.Module) -> Iterator[None]:
    """Run the block with ``module``'s buffers (BatchNorm running statistics) left as they were before it.

    Used where a training-mode forward must not count in the running statistics: a decoder stage recomputed by
    activation checkpointing (else its update would apply twice per step), and the local views' forward (the
    statistics then describe global-size inputs, what the exported encoder is given). The block updates
    copies, swapped in for it and dropped after: copying the old values back instead would modify tensors that
    autograd saved for backward.
    """
    owners = [(m, name, b) for m in module.modules() for name, b in m.named_buffers(recurse=False)]
    for m, name, b in owners:
        setattr(m, name, b.clone())
    try:
        yield
    finally:
        for m, name, b in owners:
            setattr(m, name, b)


class PCRLv2UNet(nn.Module):
    """Non-skip 3D U-Net with PCRLv2 heads (docs/method.md §2), generalised to any width and depth.

    Encoder stage d (d = 0..depth-1): ``LUConv(c_in, base·2^d) → LUConv(base·2^d, 2·base·2^d)``, with
    MaxPool3d(2) between stages. Decoder stage l (l = 0..depth-2, coarsest first) with input width
    ``C_in = 2·base·2^(depth-1-l)``: ``ConvTranspose3d(C_in, C_in, 2, s2) → LUConv(C_in, C_in/2) →
    LUConv(C_in/2, C_in/2)``; its :class:`ScaleHeads` work on ``C_l = C_in/2`` channels. Out head
    ``Conv3d(2·base, 1, k1)`` + sigmoid. No skip connections. With the defaults (base 32, depth 4, batch) the
    model has exactly the reference's 17,111,434 parameters, 7,027,776 of them in ``encoder``.

    Args:
        in_channels: input channels (1 for CT).
        base_channels: width of the first convolution (32 = the paper).
        depth: encoder stages; the input is pooled ``depth - 1`` times and there are ``depth - 1`` decoder
            stages (4 = the paper).
        norm: ``batch``, ``sync_batch`` (built as BatchNorm3d; the engine converts it), ``group`` (8 groups,
            needs ``base_channels % 8 == 0``) or ``instance``.

    Raises:
        ValueError: an argument is out of range; the message names it.
    """

    def __init__(
        self, in_channels: int = 1, base_channels: int = 32, depth: int = 4, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if base_channels < 1:
            raise ValueError(f"base_channels must be >= 1, got {base_channels}")
        if depth < 2:
            raise ValueError(f"depth must be >= 2 (at least one decoder stage), got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if norm == "group" and base_channels % _GROUPS != 0:
            raise ValueError(
                f"base_channels must be a multiple of {_GROUPS} with norm='group', got {base_channels}"
            )
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.depth = depth
        self.norm = norm
        self.activation_checkpointing = False

        self.encoder = encoder_stages(in_channels, base_channels, depth, norm)
        self.pool = nn.MaxPool3d(2)

        stage_inputs = [2 * base_channels * 2**d for d in reversed(range(1, depth))]  # coarsest first
        self.scale_channels: tuple[int, ...] = tuple(c // 2 for c in stage_inputs)
        self.decoder = nn.ModuleList([_DecoderStage(c, norm) for c in stage_inputs])
        self.heads = nn.ModuleList([ScaleHeads(c, norm) for c in self.scale_channels])
        self.out_head = nn.Conv3d(2 * base_channels, 1, kernel_size=1)

    @property
    def num_scales(self) -> int:
        """Number of decoder stages S = depth - 1 (the range of the objective's random scale)."""
        return len(self.decoder)

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder stage in backward (training only): ~83 % of the FLOPs and most of the
        activation memory are in the decoder (docs/method.md §4.3). BatchNorm running statistics are updated
        once.
        """
        self.activation_checkpointing = enabled

    def _check_input(self, x: Tensor) -> None:
        _check_volume(x, self.in_channels, self.depth)

    def encoder_features(self, x: Tensor) -> list[Tensor]:
        """Per-stage encoder outputs (before pooling), for downstream skip-connected decoders.

        Args:
            x: (B, in_channels, X, Y, Z), sizes divisible by 2^(depth-1).

        Returns:
            ``depth`` tensors; stage d is (B, 2·base·2^d, X/2^d, Y/2^d, Z/2^d).
        """
        self._check_input(x)
        return self._encode(x)

    def _encode(self, x: Tensor) -> list[Tensor]:
        return run_encoder(self.encoder, self.pool, x)

    def forward_features(self, x: Tensor) -> Tensor:
        """Encoder only: the bottleneck.

        Args:
            x: (B, in_channels, X, Y, Z), sizes divisible by 2^(depth-1).

        Returns:
            (B, 2·base·2^(depth-1), X/2^(depth-1), ...) — (B, 16·base, X/8, Y/8, Z/8) for depth 4.
        """
        return self.encoder_features(x)[-1]

    def _decode_stage(self, stage: nn.Module, x: Tensor) -> Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(
                stage,
                x,
                use_reentrant=False,
                context_fn=lambda: (contextlib.nullcontext(), frozen_buffers(stage)),
                preserve_rng_state=False,  # a stage has no random ops
            )
        return stage(x)

    def forward(self, x: Tensor, local: bool = False) -> PCRLv2Output:
        """Encode, decode, and apply the heads of every decoder stage.

        Args:
            x: (B, in_channels, X, Y, Z), sizes divisible by 2^(depth-1); B >= 2 in training.
            local: features only — skip the out head and the scale-restoration heads (unused for local views,
                and for a global view that is not restored).

        Returns:
            :class:`PCRLv2Output`: ``reconstruction`` (B, 1, X, Y, Z) or None; ``scale_features`` with
            (B, C_l) tensors, C_l = 8·base, 4·base, 2·base for depth 4; ``scale_reconstructions`` with
            (B, 1, X/2^(S-1-l), ...) per stage l or None.

        Raises:
            ValueError: wrong input shape or a single sample in training.
        """
        self._check_input(x)
        if self.training and x.shape[0] < 2:
            # BatchNorm1d in the heads cannot normalise one sample; PyTorch's own error does not say why.
            raise ValueError(
                f"training needs at least 2 samples per forward (BatchNorm1d heads), got shape {tuple(x.shape)}"
            )
        h = self._encode(x)[-1]
        scale_features: list[ScaleFeatures] = []
        scale_reconstructions: list[Tensor] = []
        for stage, heads in zip(self.decoder, self.heads, strict=True):
            h = self._decode_stage(stage, h)
            scale_features.append(heads.features(h))
            if not local:
                scale_reconstructions.append(heads.restoration(h))
        if local:
            return PCRLv2Output(
                reconstruction=None, scale_features=scale_features, scale_reconstructions=None
            )
        reconstruction = torch.sigmoid(self.out_head(h))
        return PCRLv2Output(reconstruction, scale_features, scale_reconstructions)


class PCRLv2Encoder(nn.Module):
    """The transferable part of :class:`PCRLv2UNet`: its encoder stages alone, with the same state-dict keys
    (``encoder.<d>.<i>.conv.weight`` ...), so a pretrained U-Net's ``encoder.*`` tensors load unchanged.

    Args:
        in_channels: input channels (1 for CT/MRI).
        base_channels: width of the first convolution.
        depth: encoder stages (``depth - 1`` poolings).
        norm: ``batch``, ``sync_batch`` (built as BatchNorm3d), ``group`` or ``instance``.

    Shapes:
        (B, in_channels, X, Y, Z), sizes divisible by 2^(depth-1) -> ``depth`` feature maps; stage d is
        (B, 2·base·2^d, X/2^d, Y/2^d, Z/2^d) (see :attr:`stage_channels`).
    """

    def __init__(
        self, in_channels: int = 1, base_channels: int = 32, depth: int = 4, norm: Norm = "batch"
    ) -> None:
        super().__init__()
        if in_channels < 1 or base_channels < 1 or depth < 1:
            raise ValueError(
                f"in_channels, base_channels and depth must be >= 1, got {in_channels}, {base_channels}, {depth}"
            )
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.depth = depth
        self.norm = norm
        self.encoder = encoder_stages(in_channels, base_channels, depth, norm)
        self.pool = nn.MaxPool3d(2)

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels of each stage's output, finest first: (2·base, 4·base, ..., 2·base·2^(depth-1))."""
        return tuple(2 * self.base_channels * 2**d for d in range(self.depth))

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, in_channels, X, Y, Z) -> per-stage features, finest first (shapes in the class docstring)."""
        _check_volume(x, self.in_channels, self.depth)
        return run_encoder(self.encoder, self.pool, x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The bottleneck only: (B, 2·base·2^(depth-1), X/2^(depth-1), Y/2^(depth-1), Z/2^(depth-1))."""
        return self(x)[-1]


def build_model(cfg: ModelConfig) -> PCRLv2UNet:
    """The U-Net a run's ``model`` section describes (one input channel). With ``norm=sync_batch`` it holds
    plain BatchNorm3d: the engine converts its own copy for a multi-process run, and every other copy (an
    evaluator's, the reconstruction panel's) must never synchronise."""
    return PCRLv2UNet(in_channels=1, base_channels=cfg.base_channels, depth=cfg.depth, norm=cfg.norm)


def private_model(cfg: ModelConfig, device: torch.device | str) -> PCRLv2UNet:
    """A training-mode copy of the run's architecture on ``device`` for an evaluator or the reconstruction
    panel, which loads the training weights into it before every use. Its random initialisation must not
    advance the caller's torch RNG (that would change the training run), so it draws from a forked one."""
    with torch.random.fork_rng(devices=[]):
        return build_model(cfg).to(device).train()
