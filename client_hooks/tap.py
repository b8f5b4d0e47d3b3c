"""Tap: the plain-PyTorch front door. Inert (no hook, socket, thread or zmq) unless gated on."""
from __future__ import annotations

import os
from typing import Any, Optional

from client_hooks import session


class Tap:
    """Gated, sync-free telemetry for a plain PyTorch loop.

    With the gate variable (`gate`, default "TENSORTAP") unset or not "1", every method
    returns at once and nothing is registered, opened or imported.

        tap = Tap(gate="DEBUG_FNO_LOSS")
        tap.watch(model, optimizer=opt)          # nothing is hooked yet
        tap.log_loaders(train=train_loader, val=val_loader)
        for epoch in range(E):
            tap.epoch_start(epoch)
            for i, batch in enumerate(train_loader):
                tap.log_batch(batch, epoch=epoch, batch_idx=i)  # a step begins here
                x = scale(batch["images"]); tap.record("model_input", x)
                loss = loss_fn(model(x), batch["target"])
                loss.backward(); opt.step(); opt.zero_grad()
                tap.log_loss(loss)
            tap.epoch_end(epoch)
        tap.close()                               # or `with Tap(...) as tap:`

Run: `run=`, else TENSORTAP_RUN, else a new id. An id this process made up is shared by the
Taps and TapCallbacks open together; once the last of them has closed, its run is complete
(the bye is sent) and the next Tap starts a new run (client_hooks.session).

Streams (kind: name -> data; every record carries step and epoch):
- loader_stats: field path ("images", "meta.coords_relative") -> tensor stats (see
  client_hooks.stats) + {"split", "batch"}; scalars -> {"value", "split", "batch"};
  "train_loader"/"val_loader" -> {"present": bool, "length": int or None}.
- activations: f"{module path}:output" (":input" with inputs=True) and record() names ->
  tensor stats; complex (or a declared pair) -> real/imag/abs/angle stats.
- gradients: module path -> {"count", "mean", "std", "norm", "max_abs", "nan", "inf",
  "zero_frac", "weight_norm", "update_ratio"}; "_total" -> {"norm"} (all parameters, before
  any clipping: read when the last parameter's gradient has been accumulated).
  update_ratio = ||w_after - w_before|| / ||w_before||, measured across the optimizer step:
  w_before is read when backward ends, w_after at the end of the capture step (the
  optimizer's step post-hook when `watch(..., optimizer=)` is given: with a list, once each
  of them has stepped; otherwise the next log_batch, step_end() or close()). With an
  optimizer given, a capture step in which it did not step (gradient accumulation) has
  update_ratio None: no update to measure.
  Complex gradients count as (re, im) pairs of reals.
  With `watch(..., scaler=)` (AMP) mean, std, norm, max_abs and the total norm are those of
  the unscaled gradients, and each record carries the "loss_scale" it was divided by.
- metrics: "loss" (or the name given) -> {"value"}, every step.
- patch_metrics: see patch_metrics().
- events: "epoch_start"/"epoch_end" -> {"epoch"}.

Cadence: a step is a capture step for the first `first_n` train batches of every epoch and
every `every_n_steps`-th step; only then are hooks attached (from log_batch to the step's
end) and activations, gradients and loader stats measured. `record()` outside a capture
step does nothing unless `always=True`. Such a record made after `log_batch(batch,
split="val")` (an evaluation loop) carries {"split": "val"} in its data until the next train
batch or epoch_start/epoch_end, and the collector keeps it in a series of its own
("model_input · val"); one under no_grad with no evaluation told warns once.

Arguments: activations: module paths whose outputs are measured (default: the model's direct
children); inputs: also their inputs; gradients: None (first and last parameter-owning
modules), a submodule path (first and last inside it), "all", or a list of module paths;
all_leaves: every leaf module's output and every layer's gradients; pairs: {record name:
"real_imag" | "amp_phase" | (kind, dim)} declares two-channel outputs as complex.
Costs on the training thread: small reductions on the tensor's device and one non-blocking
copy per capture step; values are read and sent by the sender thread. Telemetry errors are
turned into one RuntimeWarning per kind and never raised.
"""

    def __init__(self, gate: str = session.DEFAULT_GATE, *, run: Optional[str] = None,
                 rank: Optional[int] = None, world: Optional[int] = None, first_n: int = 1,
                 every_n_steps: Optional[int] = None, activations=None, inputs: bool = False,
                 gradients=None, all_leaves: bool = False, pairs: Optional[dict] = None):
        self.enabled = session.enabled(gate)
        self._eng = None
        self._optimizers: list = []
        self._opt_handles: list = []
        self._opt_stepped: set = set()  # ids of the watched optimizers that stepped in this capture step
        self._split_seen: dict[str, int] = {}
        self._closed = False
        if not self.enabled:
            return
        from client_hooks.engine import Engine, Options  # torch is imported only when on

        opts = Options(first_n=first_n, every_n_steps=every_n_steps, activations=activations,
                       inputs=inputs, gradients=gradients, all_leaves=all_leaves,
                       pairs=dict(pairs or {}))
        self._make = lambda: Engine(session.open_sender(run, *_rank_world(rank, world), fresh=True), opts)

    @property
    def _engine(self):
        """Created at first use (not in __init__) so that a Tap built before
        torch.distributed is initialised still learns its rank and world size."""
        if self._eng is None and self.enabled:
            try:
                self._eng = self._make()
                self.sender = self._eng.sender
                session.hold(self.sender.run)
            except Exception as e:  # no collector: training goes on without telemetry
                from client_hooks.engine import session_failed

                session_failed(e)
                self.enabled = False
        elif self._eng is not None and self._closed:
            from client_hooks.engine import say_once

            say_once("closed tap", CLOSED)
            return None
        return self._eng

    # -- set-up ---------------------------------------------------------------------------
    def watch(self, model, optimizer=None, scaler=None):
        """Choose the modules and layers to measure (no hook is registered now); returns model.
        A module path of `activations` or `gradients` that the model lacks is a ValueError.
        optimizer: one, or a list when each steps some of the parameters (a capture step ends
        once each of them has stepped, so every layer's update ratio is measured).
        scaler: AMP's GradScaler, when backward runs on a scaled loss: the gradients are read
        when backward ends, still scaled, and their statistics are divided by the scale.
        One model is watched at a time: another replaces it (with a warning). Two nets (a
        GAN's) are watched as one module holding both, nn.ModuleDict({"G": G, "D": D}), with
        both optimizers. A layer unfrozen later is watched from the next capture step on; one
        frozen later stays watched (a critic frozen between its own steps)."""
        if self._engine is not None:
            self._engine.watch(model, param_hooks=True)
            self._unhook_optimizers()  # watched before: the hooks on those optimizers go
            self._optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else \
                [] if optimizer is None else [optimizer]
            self._engine.optimizer_watched = bool(self._optimizers)
            self._engine.set_optimizers(self._optimizers)
            if scaler is not None:
                self._engine.loss_scale = _scale_reader(scaler)
        return model

    def log_loaders(self, train=None, val=None, **others) -> None:
        """loader_stats "train_loader"/"val_loader" (and f"{key}_loader"): present, length."""
        if self._engine is None:
            return
        for key, loader in {"train": train, "val": val, **others}.items():
            self._engine.send_now("loader_stats", f"{key}_loader", _presence(loader))

    # -- per step -------------------------------------------------------------------------
    def log_batch(self, batch: Any, split: str = "train", step: Optional[int] = None,
                  epoch: Optional[int] = None, batch_idx: Optional[int] = None) -> None:
        """A train batch begins a step (a capture step attaches the hooks and logs the batch's
        fields); other splits log their first `first_n` batches of each epoch and begin an
        evaluation: record(always=True) then says that split until the next train batch or
        epoch_start/epoch_end, at `step` and `epoch` when given (else the last training step
        and the current epoch). Any split but "train" is an evaluation: evaluating on
        training data, name it otherwise ("train_eval"), or each of its batches begins a
        training step."""
        e = self._engine
        if e is None:
            return
        if split == "train":
            if e.begin_step(step, epoch) and self._optimizers:
                self._opt_stepped.clear()
                if not self._opt_handles:  # a hook each, also when a captured step had no optimizer step
                    self._opt_handles = [o.register_step_post_hook(self._after_opt_step) for o in self._optimizers]
            else:
                self._unhook_optimizers()  # here, outside the optimizers' loops over their hooks
            if e.capturing:
                e.log_batch(batch, split, batch_idx)
            return
        e.evaluating(split, step, epoch)  # record(always=True) says this split until the next train batch
        n = self._split_seen.get(split, 0)
        self._split_seen[split] = n + 1
        if n < e.opts.first_n:
            e.log_batch(batch, split, batch_idx if batch_idx is not None else n)

    def record(self, name: str, tensor, pair=None, always: bool = False) -> None:
        """Activation stats of a value that is no module's output ("model_input", "x_combined").
        pair: "real_imag" | "amp_phase" | (kind, dim) for a two-channel real tensor."""
        if self._engine is not None:
            self._engine.record(name, tensor, pair, always)

    def log_metric(self, name: str, value, step: Optional[int] = None,
                   epoch: Optional[int] = None) -> None:
        """metrics: name -> {"value"}; a tensor is read on the sender thread."""
        e = self._engine
        if e is not None:
            if e.step is None:
                _no_step_yet(e)
            e.metrics({name: value}, e.step if step is None else step, e.epoch if epoch is None else epoch)

    def log_loss(self, loss, step: Optional[int] = None, epoch: Optional[int] = None) -> None:
        self.log_metric("loss", loss, step, epoch)

    def patch_metrics(self, pred_amp, target_amp, scale=None, scale_note: Optional[str] = None,
                      name: str = "patch_metrics", step: Optional[int] = None,
                      epoch: Optional[int] = None) -> None:
        """patch_metrics: {"mae", "mse", "count", "scaling" (a sentence), "scale_applied",
        "optimal_scale", "mae_after_optimal_scale", "mse_after_optimal_scale"} of predicted vs
        target amplitude (complex inputs: their abs). `scale` (float or 0-d tensor), when
        given, multiplies the prediction before comparing; `scale_note` says why/how. The
        optimal scale s minimises ||s * pred - target|| (least squares) for the compared pred."""
        e = self._engine
        if e is not None:
            e.patch(pred_amp, target_amp, scale, scale_note, name,
                    e.step if step is None else step, e.epoch if epoch is None else epoch)

    def step_end(self) -> None:
        """End the current capture step now (otherwise: optimizer step, next batch or close)."""
        if self._engine is not None:
            self._end()

    def epoch_start(self, epoch: int) -> None:
        if self._engine is not None:
            self._engine.epoch_event("epoch_start", epoch, begin=True)
            self._split_seen.clear()

    def epoch_end(self, epoch: int) -> None:
        if self._engine is not None:
            self._end()
            self._engine.epoch_event("epoch_end", epoch, begin=False)

    # -- end ------------------------------------------------------------------------------
    def _after_opt_step(self, optimizer, args, kwargs) -> None:
        """Ends the capture step. The hook stays registered: removing it here, while the
        optimizer iterates over its hooks, would break that loop when a hook follows ours;
        the next non-capture batch (or step_end, epoch_end, close) removes it."""
        self._engine.optimizer_stepping(optimizer)
        self._opt_stepped.add(id(optimizer))
        if len(self._opt_stepped) == len(self._optimizers):  # each watched one has stepped
            self._engine.end_step()

    def _end(self) -> None:
        self._unhook_optimizers()
        self._engine.end_step()

    def _unhook_optimizers(self) -> None:
        for h in self._opt_handles:
            h.remove()
        self._opt_handles = []

    def close(self, timeout: float = 2.0) -> None:
        """Finish the step, remove every hook, wait (bounded) until the records are sent. The
        Tap records nothing more. When it was the last open Tap of a run this process made
        up, the run is complete (its bye is sent) and the next Tap starts a new one."""
        if self._eng is None or self._closed:
            return
        if self._eng.step is None:
            _no_step_yet(self._eng)
        self._end()
        self._engine.close()
        self.sender.flush(timeout)
        self._closed = True
        if session.release(self.sender.run):
            session.close_run(self.sender.run)

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


CLOSED = ("tensortap: a Tap was used after its close(); the call is ignored (close it after its "
          "last record, or make a new Tap)")
NO_STEP = ("tensortap: a model is watched but no training step has begun, so only metrics are "
           "recorded (no gradient, activation or batch): call tap.log_batch(batch) at the start of "
           "every training step (tap.log_batch(None) when there is no batch to log)")


def _no_step_yet(engine) -> None:
    """Watched, yet no log_batch: say once why no gradient or activation comes."""
    if engine._model is not None:
        from client_hooks.engine import say_once

        say_once("no step", NO_STEP)


def _scale_reader(scaler):
    """() -> the GradScaler's current scale (a tensor on its device, not read to the host), or
    None while it is disabled or has not scaled a loss yet."""
    import torch

    def read():
        try:  # (a private attribute: a torch without it gives the scaled statistics, not none)
            s = getattr(scaler, "_scale", None)
            return s if scaler.is_enabled() and isinstance(s, torch.Tensor) else None
        except Exception:
            return None
    return read


def _presence(loader) -> dict:
    if loader is None:
        return {"present": False, "length": None}
    try:
        length = len(loader)
    except TypeError:
        length = None
    return {"present": True, "length": length}


def _rank_world(rank: Optional[int], world: Optional[int]) -> tuple[int, int]:
    if rank is None or world is None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        r = dist.get_rank() if on else int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))
        w = dist.get_world_size() if on else int(os.environ.get("WORLD_SIZE", 1))
        rank = r if rank is None else rank
        world = w if world is None else world
    return rank, world
