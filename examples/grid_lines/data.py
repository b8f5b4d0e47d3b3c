"""Synthetic grid-lines ptychography data: a lines object, a complex probe, diffraction.

Physics (all tensors float32 / complex64):
- object O (H, W) complex: amplitude = blurred random line segments in [amp_floor, 1],
  phase = phase_gain * (amplitude - amp_floor) (radians);
- probe P (N, N) complex: an apodised disk (radius N/4) with a defocus phase; scaled so that
  mean |P|^2 over the disk is 1;
- patches O_k (N, N) on a regular grid (stride `step` pixels); with gridsize g, g*g
  neighbouring patches form one sample (C = g*g channels);
- diffraction amplitude A = sqrt(|FFT(P * O_k)|^2 / N^2) (unshifted FFT, so the DC peak is at
  [0, 0]); observed images = physics_scaling_constant * A, in sqrt(photon counts), with
  optional Poisson noise on the intensity;
- a multi-exposure scan: each pattern is recorded with one of `exposures` (x1, x10, x100 by
  default, drawn at random), so physics_scaling_constant differs per pattern by up to 10x
  and the rms-normalised model input does not show it.

A batch is a dict of the fields the training and telemetry read:
  images                   (B, C, N, N) float, observed diffraction amplitude (sqrt counts)
  coords_relative          (B, C, 2)    float, patch offsets from the group centre (pixels)
  rms_scaling_constant     (B, 1, 1, 1) float, 1 / rms(images) per sample: model input scale
  physics_scaling_constant (B, 1, 1, 1) float, sqrt(photons * exposure per unit |P O|^2)
  probe                    (B, N, N)    complex, the probe (the same for every sample)
  amp, phase               (B, C, N, N) float, ground-truth object amplitude / phase (rad)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass
class DataConfig:
    """Effective dataset settings (captured once, as data)."""

    N: int = 64               # patch / diffraction size (pixels)
    gridsize: int = 1         # g: g*g patches per sample
    object_size: int = 128    # side of each synthetic object (pixels)
    n_objects: int = 3        # objects; patches are split train/val by object
    step: int = 2             # patch grid stride (pixels)
    n_lines: int = 40         # line segments per object
    blur_sigma: float = 1.0   # Gaussian blur of the lines (pixels)
    amp_floor: float = 0.3    # amplitude of the empty background
    phase_gain: float = 0.5   # phase (rad) per unit of amplitude above the floor
    photons: float = 1e9      # expected photons per pattern for a unit-amplitude object
    poisson: bool = False     # add Poisson noise to the intensity
    exposures: tuple = (1.0, 10.0, 100.0)  # multi-exposure scan: each pattern takes one at random
    seed: int = 0


def lines_object(size: int, n_lines: int, sigma: float, amp_floor: float, phase_gain: float,
                 gen: torch.Generator) -> torch.Tensor:
    """One complex object (size, size): blurred random segments on a flat background."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32),
                            torch.arange(size, dtype=torch.float32), indexing="ij")
    lines = torch.zeros(size, size)
    for _ in range(n_lines):
        p0 = torch.rand(2, generator=gen) * size
        p1 = torch.rand(2, generator=gen) * size
        d = p1 - p0
        t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / d.pow(2).sum().clamp_min(1e-6)
        t = t.clamp(0, 1)
        dist2 = (yy - p0[0] - t * d[0]) ** 2 + (xx - p0[1] - t * d[1]) ** 2
        lines = torch.maximum(lines, (dist2 <= 1.0).float())  # ~2 px wide
    lines = gaussian_blur(lines, sigma)
    amp = amp_floor + (1 - amp_floor) * lines / lines.max().clamp_min(1e-6)
    return torch.polar(amp, phase_gain * (amp - amp_floor))


def gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (H, W) image, reflect padding."""
    if sigma <= 0:
        return img
    r = max(1, int(3 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = img[None, None]
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (r, r, 0, 0), mode="reflect"), k)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, r, r), mode="reflect"),
                                   k.transpose(-1, -2))
    return x[0, 0]


def make_probe(N: int, defocus: float = 6.0) -> torch.Tensor:
    """Apodised disk of radius N/4 with a quadratic (defocus) phase of `defocus` rad at the
    edge; mean |P|^2 over the disk is 1. Returns (N, N) complex64."""
    c = (N - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(N) - c, torch.arange(N) - c, indexing="ij")
    rho = torch.sqrt(xx.float() ** 2 + yy.float() ** 2) / (N / 4)
    mag = 0.5 * (1 - torch.tanh((rho - 1) / 0.08))  # smooth edge, ~1 px wide
    probe = torch.polar(mag, defocus * rho ** 2)
    disk = (rho <= 1).float().sum()
    return probe / torch.sqrt(probe.abs().pow(2).sum() / disk)


def diffraction_amplitude(obj: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """A = sqrt(|FFT(P * O)|^2 / N^2) over the last two dims (unshifted). Real, same shape."""
    n = obj.shape[-1]
    return torch.fft.fft2(probe * obj).abs() / n


def _patch_grid(cfg: DataConfig) -> list[tuple[int, int]]:
    g, N = cfg.gridsize, cfg.N
    span = N + (g - 1) * (N // 2)  # a g x g group of patches offset by N/2 each
    last = cfg.object_size - span
    if last < 0:
        raise ValueError(f"object_size {cfg.object_size} is too small for N={N}, gridsize={g}")
    return [(y, x) for y in range(0, last + 1, cfg.step) for x in range(0, last + 1, cfg.step)]


def make_samples(cfg: DataConfig) -> list[dict]:
    """All samples (dicts of per-sample tensors, no batch dim) with an 'object' index."""
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = make_probe(cfg.N)
    g, N = cfg.gridsize, cfg.N
    offsets = [(i * (N // 2), j * (N // 2)) for i in range(g) for j in range(g)]
    centre = torch.tensor(offsets, dtype=torch.float32).mean(0)
    coords = torch.tensor(offsets, dtype=torch.float32) - centre  # (C, 2)
    # sqrt(photons per unit |P O|^2): a unit object gives `photons` counts per pattern
    ps0 = math.sqrt(cfg.photons / probe.abs().pow(2).sum().item())
    samples = []
    for k in range(cfg.n_objects):
        obj = lines_object(cfg.object_size, cfg.n_lines, cfg.blur_sigma, cfg.amp_floor,
                           cfg.phase_gain, gen)
        for (y, x) in _patch_grid(cfg):
            # the exposure scales the counts: ps = sqrt(photons * exposure / sum |P|^2)
            e = cfg.exposures[int(torch.randint(len(cfg.exposures), (), generator=gen))]
            ps = ps0 * math.sqrt(e)
            patch = torch.stack([obj[y + dy:y + dy + N, x + dx:x + dx + N] for dy, dx in offsets])
            images = ps * diffraction_amplitude(patch, probe)  # (C, N, N)
            if cfg.poisson:
                images = torch.sqrt(torch.poisson(images ** 2, generator=gen))
            rms = images.pow(2).mean().sqrt().clamp_min(1e-12)
            samples.append({
                "images": images.float(),
                "coords_relative": coords.clone(),
                "rms_scaling_constant": (1.0 / rms).view(1, 1, 1).float(),
                "physics_scaling_constant": torch.tensor(ps, dtype=torch.float32).view(1, 1, 1),
                "probe": probe,
                "amp": patch.abs().float(),
                "phase": patch.angle().float(),
                "object": k,
            })
    return samples


class GridLinesDataset(Dataset):
    """Map-style dataset over precomputed samples (see module docstring for the fields)."""

    def __init__(self, samples: list[dict]):
        self.samples = [{k: v for k, v in s.items() if k != "object"} for s in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def make_loaders(cfg: DataConfig, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    """Train loader (objects 0..n-2, shuffled) and val loader (the last object)."""
    samples = make_samples(cfg)
    last = cfg.n_objects - 1
    train = [s for s in samples if s["object"] != last or cfg.n_objects == 1]
    val = [s for s in samples if s["object"] == last]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return (DataLoader(GridLinesDataset(train), batch_size=batch_size, shuffle=True,
                       generator=gen, drop_last=True),
            DataLoader(GridLinesDataset(val), batch_size=batch_size))
