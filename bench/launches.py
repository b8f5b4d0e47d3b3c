"""Triton launches per every-step capture on the demo FNO (the configuration of
bench/overhead.py's `every_step`): how many tensors are launched in their hook and how many
grouped launches there are, step by step. On a CUDA GPU with Triton, or on CPU in Triton's
interpreter:

    TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 python bench/launches.py
    python bench/launches.py --device cuda --width 64 --modes 16 --batch 64 --size 64

The records go to an endpoint nobody listens on (they are dropped): only the launches count.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import torch  # noqa: E402

from client_hooks import Tap, stats  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--modes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=16)
    a = ap.parse_args()
    fused = stats.fused_module(torch.ones(1, device=a.device))
    if fused is None:
        sys.exit("launches: no fused kernels here (a CUDA GPU with Triton, or "
                 "TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 with Triton installed)")
    from examples.grid_lines.models import FNOGenerator

    counts = {"hook": 0, "groups": []}
    add, add_group = fused.Batch.add, fused.Batch.add_group

    def count_add(b, x):
        counts["hook"] += 1
        return add(b, x)

    def count_group(b, layers, *args):
        counts["groups"].append(sum(len(ts) for ts in layers))
        return add_group(b, layers, *args)
    fused.Batch.add, fused.Batch.add_group = count_add, count_group

    os.environ.update(TENSORTAP_LAUNCHES="1", TENSORTAP_ENDPOINT="tcp://127.0.0.1:9", TENSORTAP_RUN="launches")
    torch.manual_seed(0)
    model = FNOGenerator(channels=1, width=a.width, modes=a.modes, depth=4).to(a.device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tap = Tap(gate="TENSORTAP_LAUNCHES", every_n_steps=1, all_leaves=True, gradients="all",
              pairs={"x_combined": "real_imag"})
    tap.watch(model, optimizer=opt)
    for step in range(a.steps):  # the step of bench/overhead.py's run_step
        x = torch.randn(a.batch, 1, a.size, a.size, device=a.device)
        y = torch.randn(a.batch, 2, a.size, a.size, device=a.device)
        tap.log_batch({"images": x, "target": y}, epoch=0)
        tap.record("model_input", x)
        out = model(x)
        tap.record("x_combined", out)
        loss = (out - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tap.log_loss(loss)
        print(f"capture {step}: {counts['hook']} tensors launched in their hook; grouped launches "
              f"(tensors each): {counts['groups']}; + one merge")
        counts["hook"], counts["groups"] = 0, []
    changed = [k[1] for k, v in tap._engine._changed.items() if v]
    print(f"values changed in place after their hook: {changed or 'none'}")
    tap.close(0.2)


if __name__ == "__main__":
    main()
