"""Train the grid-lines FNO / U-FNO (hybrid) generators and write their metrics.

    DEBUG_FNO_LOSS=1 python -m examples.grid_lines.compare --N 64 --gridsize 1 \\
        --output-dir outputs/debug_fno_loss --architectures fno,hybrid --nepochs 1 \\
        --torch-epochs 1 --torch-loss-mode mae [--inject spectral-init]

Writes <output-dir>/metrics.json: per architecture the validation amplitude MAE, phase MAE
(rad, after removing the global phase offset), amplitude PSNR (dB), the first/last training
loss and the wall time. With the gate variable DEBUG_FNO_LOSS=1, each architecture is one
tensortap run (run id f"{TENSORTAP_RUN or a new id}-{arch}") with loader stats, the model input
after scaling, generator output, x_combined, the input and output of every generator leaf
module, every generator layer's gradients and patch metrics of |x_combined| against the
ground-truth amplitude. Gate off: tensortap does nothing.

The optimiser is Adafactor by default (`--optimizer adam` for Adam): its step is relative
to each weight's scale, so an initialisation far below unit gain (`--inject spectral-init`)
stays small and the loss stays flat. Adam moves every weight by about lr per step whatever
its scale, so under Adam the same init grows within tens of steps and the run trains like
the healthy one (measured in docs/DIAGNOSIS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
import warnings

GATE = "DEBUG_FNO_LOSS"
ARCHS = ("fno", "hybrid")


class UsageError(ValueError):
    """A bad command-line value; the message is the one line printed."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def parse_args(argv=None) -> argparse.Namespace:
    from examples.grid_lines.models import INJECTS, OPTIMIZERS

    p = _Parser(prog="python -m examples.grid_lines.compare", description=__doc__.split("\n")[0])
    p.add_argument("--N", type=int, default=64, help="patch size (pixels, multiple of 4, >= 16)")
    p.add_argument("--gridsize", type=int, default=1, choices=(1, 2))
    p.add_argument("--output-dir", default="outputs/debug_fno_loss")
    p.add_argument("--architectures", default="fno", help="comma list of fno, hybrid")
    p.add_argument("--nepochs", type=int, default=1, help="seed-workflow compatibility; used "
                   "when --torch-epochs is not given")
    p.add_argument("--torch-epochs", type=int, default=None)
    p.add_argument("--torch-loss-mode", default="mae", choices=("mae", "poisson"))
    p.add_argument("--inject", default=None, choices=INJECTS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--optimizer", default="adafactor", choices=tuple(OPTIMIZERS))
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: "
                   + ", ".join(f"{k} {v:g}" for k, v in OPTIMIZERS.items()) + ")")
    p.add_argument("--n-objects", type=int, default=3, help="synthetic objects (last = val)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps")
    p.add_argument("--every-n-steps", type=int, default=4, help="telemetry capture cadence")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.archs = [s.strip() for s in a.architectures.split(",") if s.strip()]
    bad = [s for s in a.archs if s not in ARCHS]
    if not a.archs or bad:
        raise UsageError(f"--architectures takes a comma list of {', '.join(ARCHS)}, got {a.architectures!r}")
    if a.N < 16 or a.N % 4:
        raise UsageError(f"--N must be a multiple of 4 and at least 16, got {a.N}")
    a.epochs = a.torch_epochs if a.torch_epochs is not None else a.nepochs
    for name in ("epochs", "batch_size", "n_objects", "every_n_steps"):
        if getattr(a, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if a.lr is not None and a.lr <= 0:
        raise UsageError("--lr must be > 0")
    return a


class Telemetry:
    """Explicit captures from inside training_step, through a TapCallback.

    Every call is guarded: a client_hooks without a method (or one that fails) costs a
    single warning and the demo trains on."""

    def __init__(self, callback, every_n_steps: int):
        self.cb, self.every = callback, every_n_steps
        self._warned: set[str] = set()

    def _call(self, method: str, *args, **kw) -> None:
        fn = getattr(self.cb, method, None)
        try:
            if fn is None:
                raise AttributeError(f"client_hooks has no {method}()")
            fn(*args, **kw)
        except Exception as e:  # telemetry never stops the demo
            if method not in self._warned:
                self._warned.add(method)
                print(f"compare: telemetry {method} unavailable ({e}); continuing", file=sys.stderr)

    def on_train_step(self, step: int, batch: dict, loss, x, out, obj) -> None:
        self._call("record", "model_input", x)         # only measured on capture steps
        self._call("record", "generator_output", out)
        self._call("record", "x_combined", obj)        # complex: real/imag/abs/angle stats
        if step % self.every == 0:                     # small reductions, on the same cadence
            self._call("patch_metrics", obj.detach().abs(), batch["amp"], None,
                       "no scaling: |x_combined| compared directly with the ground-truth amplitude")


def make_callback(run: str, every_n_steps: int):
    """TapCallback for one run, or None when the gate is off (then nothing is imported)."""
    if os.environ.get(GATE) != "1":
        return None
    from client_hooks import TapCallback

    return TapCallback(gate=GATE, run=run, watch="generator", gradients="all", all_leaves=True,
                       inputs=True, every_n_steps=every_n_steps)


def evaluate(module, loader) -> dict:
    """Validation amplitude MAE, phase MAE (rad, global offset removed), amplitude PSNR (dB)."""
    import torch

    amp_err = phase_err = sq = n = 0.0
    peak = 0.0
    module.eval()
    with torch.no_grad():
        for batch in loader:
            _, _, obj = module(batch)
            amp, phase = batch["amp"], batch["phase"]
            d = obj.abs() - amp
            amp_err += d.abs().sum().item()
            sq += d.pow(2).sum().item()
            # phase retrieval fixes the phase only up to a constant: remove the mean offset
            rel = torch.angle(obj * torch.polar(torch.ones_like(phase), -phase))
            off = torch.angle(torch.exp(1j * rel).mean(dim=(-2, -1), keepdim=True))
            phase_err += torch.angle(torch.exp(1j * (rel - off))).abs().sum().item()
            n += amp.numel()
            peak = max(peak, amp.max().item())
    mse = sq / max(n, 1)
    return {"amp_mae": amp_err / max(n, 1), "phase_mae": phase_err / max(n, 1),
            "amp_psnr": 10 * math.log10(peak ** 2 / mse) if mse > 0 else float("inf")}


def train_one(a, arch: str, run: str, loaders) -> dict:
    import lightning as L
    import torch

    from examples.grid_lines.models import GridLinesModule

    torch.manual_seed(a.seed)
    module = GridLinesModule(arch, a.gridsize ** 2, a.torch_loss_mode, a.inject, a.lr,
                             a.optimizer)
    cb = make_callback(run, a.every_n_steps)
    if cb is not None and getattr(cb, "enabled", False):
        module.telemetry = Telemetry(cb, a.every_n_steps)
    trainer = L.Trainer(max_epochs=a.epochs, max_steps=a.max_steps, accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=4,
                        callbacks=[cb] if cb is not None else [], log_every_n_steps=1)
    t0 = time.perf_counter()
    trainer.fit(module, *loaders)
    wall = time.perf_counter() - t0
    res = {"run": run if cb is not None else None, "wall_s": round(wall, 2),
           "steps": len(module.losses), "loss_first": module.losses[0] if module.losses else None,
           "loss_last": module.losses[-1] if module.losses else None, "losses": module.losses}
    return {**res, **evaluate(module, loaders[1])}


def main(argv=None) -> int:
    try:
        a = parse_args(argv)
    except UsageError as e:
        # `tensortap demo` runs this module: its errors carry the command the user typed
        print(f"{os.environ.get('TENSORTAP_DEMO_PROG', 'compare')}: error: {e}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*(LitLogger|litlogger|tensorboardX).*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's own use of torch's pytree
    from examples.grid_lines.data import DataConfig, make_loaders

    cfg = DataConfig(N=a.N, gridsize=a.gridsize, n_objects=a.n_objects, seed=a.seed,
                     object_size=max(128, 2 * a.N + (a.gridsize - 1) * a.N // 2))
    loaders = make_loaders(cfg, a.batch_size)
    base = os.environ.get("TENSORTAP_RUN") or time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid() % 4096:03x}"
    results = {}
    for arch in a.archs:
        results[arch] = train_one(a, arch, f"{base}-{arch}", loaders)
        r = results[arch]
        print(f"{arch}: loss {r['loss_first']:.4g} -> {r['loss_last']:.4g} in {r['steps']} steps; "
              f"amp MAE {r['amp_mae']:.4f}, phase MAE {r['phase_mae']:.4f} rad, "
              f"PSNR {r['amp_psnr']:.2f} dB ({r['wall_s']:.1f} s)", flush=True)
    os.makedirs(a.output_dir, exist_ok=True)
    out = {"config": {k: v for k, v in vars(a).items() if k != "archs"}, "results": results}
    tmp = os.path.join(a.output_dir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, os.path.join(a.output_dir, "metrics.json"))
    print(f"metrics: {os.path.join(a.output_dir, 'metrics.json')}", flush=True)
    telemetry_note([r["run"] for r in results.values() if r["run"]])
    return 0


def telemetry_note(runs: list[str]) -> None:
    """Where the telemetry went and how to look at it once training (and the embedded
    collector with its live view) has ended."""
    if not runs:
        return
    root = os.environ.get("TENSORTAP_OUT", ".artifacts/debug_fno_loss")
    for run in runs:
        print(f"telemetry: {os.path.join(root, run)}   (diagnosis: tensortap report "
              f"{shlex.quote(os.path.join(root, run))})")
    print(f"view the stored runs in the browser: tensortap serve {shlex.quote(root)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
