"""A small Lightning fit used by the tests, run as a subprocess (DDP re-runs this file).

python tests/client_hooks/lightning_app.py [--model cnn|transformer] [--ddp] [--epochs N]
Prints one JSON line "RESULT {...}" on rank 0: hook counts left on the model, whether zmq
was imported, tensortap threads and open sockets of this process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from client_hooks import Tap, TapCallback  # noqa: E402
from tests.client_hooks.hookcount import hook_counts, open_sockets  # noqa: E402


class Fields(Dataset):
    def __init__(self, n, model):
        g = torch.Generator().manual_seed(0)
        self.model = model
        self.x = torch.randn(n, 1, 8, 8, generator=g) if model == "cnn" else torch.randn(n, 5, 16, generator=g)
        self.probe = torch.randn(n, 4, 4, dtype=torch.cfloat, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"images": self.x[i], "probe": self.probe[i], "meta": {"scale": 1.5, "idx": i}}


class Module(L.LightningModule):
    def __init__(self, model):
        super().__init__()
        if model == "cnn":
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))
        else:
            self.net = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
        self.first_norms, self.loss_scale = {}, None

    def training_step(self, batch, batch_idx):
        out = self.net(batch["images"])
        for cb in self.trainer.callbacks:
            if isinstance(cb, TapCallback):
                cb.record("x_combined", torch.complex(out.float(), out.flip(-1).float()))
                cb.patch_metrics(out.abs(), batch["images"].abs())
        loss = out.pow(2).mean()
        self.log("train_mse", loss, on_step=True, on_epoch=True)
        self.log("loss", loss, on_step=True)  # also the per-step stream's name
        return loss

    def validation_step(self, batch, batch_idx):
        val = getattr(self, "compiled_val", None)
        out = self.net(batch["images"]) if val is None else None
        if getattr(self, "eval_records", False):
            self.tap().record("val_x", out, always=True)
        self.log("val_loss", val(batch["images"]) if val is not None else out.pow(2).mean())

    def test_step(self, batch, batch_idx):
        out = self.net(batch["images"])
        if getattr(self, "eval_records", False):
            self.tap().record("test_x", out, always=True)

    def on_test_end(self):
        """--eval-records: the module's own hook, after the callbacks' (the stage's teardown ends it)."""
        if getattr(self, "eval_records", False):
            self.tap().record("test_end", self.net[0].weight, always=True)

    def on_train_start(self):
        """--eval-records: after the sanity check's validation, a training value."""
        if getattr(self, "eval_records", False):
            self.tap().record("train_start", self.net[0].weight, always=True)

    def on_validation_end(self):
        """--eval-records: the module's own hook, which Lightning calls after the callbacks'."""
        if getattr(self, "eval_records", False):
            self.tap().record("val_end", self.net[0].weight, always=True)

    def on_train_epoch_end(self):
        """--eval-records: a training value recorded after the epoch's validation."""
        if getattr(self, "eval_records", False):
            self.tap().record("epoch_out", self.net[0].weight, always=True)

    def tap(self):
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, TapCallback))

    def val_recorded(self, x):
        """--val-record: validation's loss, compiled with a record(always=True) in it."""
        out = self.net(x)
        for cb in self.trainer.callbacks:
            if isinstance(cb, TapCallback):
                cb.record("val_out", out, always=True)
        return out.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def on_before_optimizer_step(self, optimizer):
        """After the callbacks' hook (so after TapCallback read the gradients), as Lightning
        hands them to the optimizer: the first layer's gradient norm at the first optimizer
        step of each epoch (the default capture), and the loss scale of mixed precision."""
        if self.current_epoch in self.first_norms:
            return
        first = next(m for m in self.net.modules() if list(m.parameters(recurse=False)))
        g = torch.cat([p.grad.detach().double().reshape(-1) for p in first.parameters(recurse=False)])
        self.first_norms[self.current_epoch] = g.norm().item()
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        self.loss_scale = scaler.get_scale() if scaler is not None else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--ddp", action="store_true")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--plain-tap", action="store_true", help="also build (and close) a Tap")
    ap.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    ap.add_argument("--gpu", action="store_true", help="one CUDA device")
    ap.add_argument("--precision", default="32-true", help="e.g. 16-mixed (on a GPU: a GradScaler, init scale 1024)")
    ap.add_argument("--fits", type=int, default=1, help="then validate, and fit that many more new "
                    "Trainers with a new TapCallback each, one after the other (a notebook's cells)")
    ap.add_argument("--compile", action="store_true", help="the module's net torch.compile'd (aot_eager), "
                    "every leaf watched; RESULT also has dynamo's graph and break counts")
    ap.add_argument("--val-record", action="store_true", help="with --compile: validation's loss "
                    "compiled too, with a record(always=True) of the net's output in it")
    ap.add_argument("--eval-records", action="store_true", help="validation (2 sanity batches too) records "
                    "val_x with always=True, and the module's on_train_epoch_end records epoch_out")
    a = ap.parse_args()
    torch.manual_seed(0)
    module = Module(a.model)
    module.eval_records = a.eval_records
    if a.val_record:
        module.compiled_val = torch.compile(module.val_recorded, backend="aot_eager")
    if a.compile:
        module.net = torch.compile(module.net, backend="aot_eager")
    cb = TapCallback(gradients="all", all_leaves=a.compile)
    tap = Tap() if a.plain_tap else None  # the other front door, also inert when gated off
    if tap is not None:
        tap.watch(module)
    precision = {"precision": a.precision}
    if a.gpu and a.precision == "16-mixed":  # a known scale: the test checks it was not 1
        from lightning.pytorch.plugins import MixedPrecision

        precision = {"plugins": [MixedPrecision("16-mixed", "cuda", torch.amp.GradScaler("cuda", init_scale=1024.0))]}
    options = dict(max_epochs=a.epochs, accelerator="gpu" if a.gpu else "cpu", devices=2 if a.ddp else 1,
                   strategy="ddp" if a.ddp else "auto", logger=False,
                   enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=2 if a.eval_records else 0,
                   accumulate_grad_batches=a.accumulate, **precision)
    trainer = L.Trainer(callbacks=[cb], **options)
    data = Fields(16, a.model)
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    runs = [cb._run]
    if a.eval_records:  # then a test stage: its records say "test", the module's on_test_end's too
        trainer.test(module, DataLoader(data, batch_size=8), verbose=False)
    if a.fits > 1:
        trainer.validate(module, DataLoader(data, batch_size=8), verbose=False)
    for _ in range(a.fits - 1):
        cb2 = TapCallback(gradients="all")
        L.Trainer(callbacks=[cb2], **options).fit(Module(a.model), DataLoader(data, batch_size=4))
        runs.append(cb2._run)
    if tap is not None:
        tap.close()
    if trainer.global_rank == 0:
        res = {"hooks": hook_counts(module), "zmq": "zmq" in sys.modules,
               "threads": [t.name for t in threading.enumerate() if "tensortap" in t.name],
               "sockets": open_sockets() if not a.ddp else None, "rank": trainer.global_rank}
        if a.gpu:  # what the optimizer was handed (the gate-off test compares the dict whole)
            res.update(first_norms=module.first_norms, loss_scale=module.loss_scale)
        if a.fits > 1:
            res["runs"] = runs
        if a.compile:
            from torch._dynamo.utils import counters

            res.update(graphs=counters["stats"]["unique_graphs"], breaks=sum(counters["graph_break"].values()))
        print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
