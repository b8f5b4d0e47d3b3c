"""FNO and U-FNO (hybrid) generators, the ptychography physics layer, the LightningModule.

Shapes: B batch, C = gridsize**2 patches per sample, N patch size, W width (channels).
The generator maps the scaled diffraction amplitude (B, C, N, N) to (B, 2C, N, N): the real
and imaginary parts of the object; `x_combined` = re + i*im (B, C, N, N) complex. The physics
layer predicts the diffraction amplitude from it (see data.py for the forward model).

`inject` names a deliberate fault (for the flat-loss demo); None trains the healthy model:
  spectral-init     spectral weights uniform in [0, 1/(in*out)) (the classic FNO default):
                    ~1/80 of unit gain here; Adafactor's relative steps keep them that small
  loss-units        the MAE compares predicted intensity with observed amplitude
  amp-gain          a broadcast multiplies the predicted amplitude by the sum of the batch's
                    scaling constants instead of the sample's own: ~ the batch size, and
                    (with a multi-exposure scan) a different factor per pattern
  raw-input         the model sees the raw counts (no rms scaling): the DC peak dominates
  frozen-generator  the generator's parameters are left out of the optimiser
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

import lightning as L

INJECTS = ("spectral-init", "loss-units", "amp-gain", "raw-input", "frozen-generator")
OPTIMIZERS = {"adafactor": 2e-2, "adam": 1e-2}  # name -> default learning rate


class SpectralConv2d(nn.Module):
    """Fourier layer: rfft2 -> multiply the lowest `modes` x `modes` frequencies (both signs of
    the first axis) by complex weights (in, out, m, m) -> irfft2. (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, cin: int, cout: int, modes: int, classic_init: bool = False):
        super().__init__()
        self.modes = modes
        shape = (2, cin, cout, modes, modes)
        if classic_init:  # scale 1/(in*out), uniform positive: ~1e-3 of a unit-gain layer
            w = torch.rand(shape, dtype=torch.cfloat) / (cin * cout)
        else:  # unit gain per retained mode: variance 1/in for the complex product
            w = torch.randn(shape, dtype=torch.cfloat) / math.sqrt(cin)
        self.weight = nn.Parameter(torch.view_as_real(w))  # real view: optimisers, hooks, stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        m = min(self.modes, H // 2, W // 2 + 1)
        w = torch.view_as_complex(self.weight)
        xf = torch.fft.rfft2(x, norm="ortho")  # (B, in, H, W//2+1)
        out = torch.zeros(B, w.shape[2], H, W // 2 + 1, dtype=xf.dtype, device=x.device)
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", xf[:, :, :m, :m], w[0, :, :, :m, :m])
        out[:, :, -m:, :m] = torch.einsum("bixy,ioxy->boxy", xf[:, :, -m:, :m], w[1, :, :, :m, :m])
        return torch.fft.irfft2(out, s=(H, W), norm="ortho")


class SpectralBlock(nn.Module):
    """y = x + GELU(spectral(x) + conv1x1(x)); (B, W, H, W) -> same."""

    def __init__(self, width: int, modes: int, classic_init: bool = False):
        super().__init__()
        self.spectral = SpectralConv2d(width, width, modes, classic_init)
        self.conv = nn.Conv2d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.spectral(x) + self.conv(x))


class FNOGenerator(nn.Module):
    """Lifting 1x1 convs -> `depth` spectral blocks -> projection to (re, im) per channel."""

    def __init__(self, channels: int = 1, width: int = 16, modes: int = 8, depth: int = 4,
                 classic_init: bool = False):
        super().__init__()
        self.lift = nn.Sequential(nn.Conv2d(channels, width, 1), nn.GELU(), nn.Conv2d(width, width, 1))
        self.blocks = nn.Sequential(*[SpectralBlock(width, modes, classic_init) for _ in range(depth)])
        self.project = nn.Sequential(nn.Conv2d(width, 2 * width, 1), nn.GELU(),
                                     nn.Conv2d(2 * width, 2 * channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, N, N) -> (B, 2C, N, N)
        return self.project(self.blocks(self.lift(x)))


class HybridGenerator(nn.Module):
    """U-FNO: spectral blocks in a U-Net (two 2x downsamplings, skips by concatenation)."""

    def __init__(self, channels: int = 1, width: int = 8, modes: int = 8,
                 classic_init: bool = False):
        super().__init__()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.lift = nn.Conv2d(channels, w1, 1)
        self.enc1 = SpectralBlock(w1, modes, classic_init)
        self.down1 = nn.Conv2d(w1, w2, 3, stride=2, padding=1)
        self.enc2 = SpectralBlock(w2, max(2, modes // 2), classic_init)
        self.down2 = nn.Conv2d(w2, w3, 3, stride=2, padding=1)
        self.mid = SpectralBlock(w3, max(2, modes // 4), classic_init)
        self.up2 = nn.ConvTranspose2d(w3, w2, 2, stride=2)
        self.dec2 = nn.Sequential(nn.Conv2d(2 * w2, w2, 1), SpectralBlock(w2, max(2, modes // 2), classic_init))
        self.up1 = nn.ConvTranspose2d(w2, w1, 2, stride=2)
        self.dec1 = nn.Sequential(nn.Conv2d(2 * w1, w1, 1), SpectralBlock(w1, modes, classic_init))
        self.project = nn.Conv2d(w1, 2 * channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, N, N) -> (B, 2C, N, N); N % 4 == 0
        e1 = self.enc1(self.lift(x))
        e2 = self.enc2(F.gelu(self.down1(e1)))
        m = self.mid(F.gelu(self.down2(e2)))
        d2 = self.dec2(torch.cat([F.gelu(self.up2(m)), e2], 1))
        d1 = self.dec1(torch.cat([F.gelu(self.up1(d2)), e1], 1))
        return self.project(d1)


def build_generator(arch: str, channels: int, classic_init: bool = False) -> nn.Module:
    if arch == "fno":
        return FNOGenerator(channels, classic_init=classic_init)
    if arch == "hybrid":
        return HybridGenerator(channels, classic_init=classic_init)
    raise ValueError(f"unknown architecture {arch!r}; expected 'fno' or 'hybrid'")


def combine(out: torch.Tensor) -> torch.Tensor:
    """(B, 2C, N, N) real -> (B, C, N, N) complex object tanh(re) + i*tanh(im)."""
    re, im = torch.tanh(out).chunk(2, dim=1)  # |re|, |im| < 1: a transmission object
    return torch.complex(re, im)


class PhysicsLayer(nn.Module):
    """Object x probe -> FFT -> amplitude in sqrt-count units:
    ps * |FFT(P O)| / N, with x_combined (B, C, N, N) complex, probe (B, N, N),
    physics_scaling_constant ps (B, 1, 1, 1). Returns (B, C, N, N) float."""

    def __init__(self, amp_gain_bug: bool = False):
        super().__init__()
        self.amp_gain_bug = amp_gain_bug

    def forward(self, obj: torch.Tensor, probe: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
        amp = torch.fft.fft2(probe[:, None] * obj).abs() / obj.shape[-1]
        if self.amp_gain_bug:
            # the bug: ps indexed as (B, 1, 1, 1, 1) against amp[None] broadcasts to
            # (B, B, C, N, N); the sum over the wrong axis gives sample i sum_j ps_j, ~B ps_i
            return (amp[None] * ps.view(-1, 1, 1, 1, 1)).sum(0)
        return ps * amp


def amplitude_loss(pred: torch.Tensor, images: torch.Tensor, rms: torch.Tensor, mode: str,
                   units_bug: bool = False) -> torch.Tensor:
    """Loss in rms-normalised units. mae: mean |pred - obs| of amplitudes; poisson: intensity
    NLL mean(I_pred - I_obs log I_pred). units_bug: the MAE takes pred**2 (an intensity)."""
    p, y = pred * rms, images * rms
    if mode == "mae":
        return (p * pred if units_bug else p).sub(y).abs().mean()
    if mode == "poisson":
        ip, iy = p.pow(2), y.pow(2)
        return (ip - iy * torch.log(ip + 1e-6)).mean()
    raise ValueError(f"unknown loss mode {mode!r}; expected 'mae' or 'poisson'")


class GridLinesModule(L.LightningModule):
    """Trains a generator through the physics layer. Logs "loss" every step.

    `telemetry` (set by compare.py, optional) receives the explicit captures: model input
    after scaling, generator output, x_combined, and patch metrics of |x_combined| against
    the ground-truth amplitude. It is None when the gate is off: nothing extra runs then."""

    def __init__(self, arch: str = "fno", channels: int = 1, loss_mode: str = "mae",
                 inject: Optional[str] = None, lr: Optional[float] = None,
                 optimizer: str = "adafactor"):
        super().__init__()
        if inject is not None and inject not in INJECTS:
            raise ValueError(f"unknown inject {inject!r}; expected one of {', '.join(INJECTS)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        self.inject, self.loss_mode, self.optimizer = inject, loss_mode, optimizer
        self.lr = OPTIMIZERS[optimizer] if lr is None else lr
        self.generator = build_generator(arch, channels, classic_init=inject == "spectral-init")
        self.physics = PhysicsLayer(amp_gain_bug=inject == "amp-gain")
        self.telemetry = None
        self.losses: list[float] = []  # per training step, for the CLI summary

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (model_input, generator_output, x_combined)."""
        images = batch["images"]
        x = images if self.inject == "raw-input" else images * batch["rms_scaling_constant"]
        out = self.generator(x)
        return x, out, combine(out)

    def _step(self, batch: dict) -> tuple[torch.Tensor, tuple]:
        x, out, obj = self(batch)
        pred = self.physics(obj, batch["probe"], batch["physics_scaling_constant"])
        loss = amplitude_loss(pred, batch["images"], batch["rms_scaling_constant"],
                              self.loss_mode, units_bug=self.inject == "loss-units")
        return loss, (x, out, obj)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, captured = self._step(batch)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.losses.append(float(loss.detach()))  # host sync, once per step (CPU demo)
        if self.telemetry is not None:
            self.telemetry.on_train_step(self.global_step, batch, loss, *captured)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, _ = self._step(batch)
        self.log("val_loss", loss, prog_bar=True)

    def configure_optimizers(self):
        params = self.physics.parameters() if self.inject == "frozen-generator" else self.parameters()
        params = list(params) or [self._anchor()]
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr)
        # Adafactor's step is relative to each parameter's RMS (floor 1e-3) and lr caps it:
        # a layer starts learning at the scale it was initialised at
        return torch.optim.Adafactor(params, lr=self.lr)

    def _anchor(self) -> nn.Parameter:
        # frozen-generator leaves no trainable tensor in the optimiser; torch refuses an empty
        # list, so it gets one unused scalar (it receives no gradient and never changes)
        self.register_parameter("unused", nn.Parameter(torch.zeros(())))
        return self.unused
