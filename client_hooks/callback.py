"""TapCallback: the Lightning front door; same options and streams as Tap, rank-aware."""
from __future__ import annotations

import os
from typing import Optional

from lightning.pytorch.callbacks import Callback

from client_hooks import session


class TapCallback(Callback):
    """Gated, sync-free telemetry for a Lightning fit; inert unless the gate variable is "1".

        trainer = L.Trainer(callbacks=[TapCallback(gate="DEBUG_FNO_LOSS")])

    Records the streams described in `client_hooks.Tap` (same keys), from every rank, each
    record carrying the rank and world size:
    - loader_stats: the fields of the first `first_n` train batches of each epoch (after
      transfer to the device), split "train"; "train_loader"/"val_loader" -> {"present",
      "length"} (length in batches, None when unknown).
    - activations: module outputs (module paths relative to `watch`, default the
      LightningModule) and whatever the module passes to `record()`.
    - gradients: per layer and "_total", read in `on_before_optimizer_step` (after backward
      and the DDP all-reduce, before gradient clipping); update_ratio measured across the
      optimizer step (weights again in `on_train_batch_end`).
    - metrics: "loss" from training_step's output every step; at the end of each train and
      validation epoch, every scalar in `trainer.callback_metrics` under its logged name
      (except "loss", which the per-step stream already has).
    - events: "fit_start", "fit_end", "epoch_start"/"epoch_end" {"epoch"}.

    Arguments: gate, run, first_n, every_n_steps, activations, inputs, gradients,
    all_leaves, pairs as for Tap; watch: submodule path of the LightningModule to measure;
    log_batches: whether capture steps log the batch's fields. Raises ValueError at once for
    invalid options. Rank 0 resolves the run and the collector in __init__ (starting the
    embedded collector when TENSORTAP_ENDPOINT is unset) so that DDP ranks started later
    inherit both through the environment. Under torchrun (ranks started together) the other
    ranks of node 0 take them from rank 0's announcement (client_hooks.session); across
    nodes, set TENSORTAP_ENDPOINT to a collector every node reaches.
    From inside the LightningModule: `callback.record(name, tensor, pair=None, always=False)`;
    with always=True, a record in a validation, test or predict loop (its batches, and the
    module's on_validation_epoch_end and on_validation_end) says its split ({"split": "val"})
    and is kept apart from training's.
    """

    def __init__(self, gate: str = session.DEFAULT_GATE, *, run: Optional[str] = None,
                 first_n: int = 1, every_n_steps: Optional[int] = None, activations=None,
                 inputs: bool = False, gradients=None, all_leaves: bool = False,
                 pairs: Optional[dict] = None, watch: Optional[str] = None,
                 log_batches: bool = True):
        self.enabled = session.enabled(gate)
        self._engine = None
        self._run, self._watch, self._log_batches = run, watch, log_batches
        self._val_logged = False
        self._val_sent: tuple = ()  # (step, epoch, names) of the metrics validation's end sent
        self._holding = False  # holds its run (session.hold): from __init__ (rank 0) or setup to teardown
        if not self.enabled:
            return
        from client_hooks.engine import Options

        self._opts = Options(first_n=first_n, every_n_steps=every_n_steps, activations=activations,
                             inputs=inputs, gradients=gradients, all_leaves=all_leaves,
                             pairs=dict(pairs or {}))
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("RANK", 0)) == 0:
            try:
                # writes run + endpoint into os.environ; a new run when this process's last
                # one was made up and every Tap and TapCallback on it has ended
                self._run = session.resolve(run, fresh=True).run
                self._hold(self._run)  # from now: a Tap made beside it joins its run
            except Exception as e:  # no collector: the fit goes on without telemetry
                self._give_up(e)

    def _give_up(self, err: Exception) -> None:
        from client_hooks.engine import session_failed

        session_failed(err)
        self.enabled = False
        self._release(self._run)

    def _hold(self, run: str) -> None:
        if not self._holding:
            session.hold(run)
            self._holding = True

    def _release(self, run: str) -> None:
        if self._holding:
            session.release(run)
            self._holding = False

    # -- set-up -----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled:
            return
        if self._engine is not None:  # a later stage (fit, then test): the same run
            self._hold(self._engine.sender.run)
            return
        from client_hooks import hooks as _hooks
        from client_hooks.engine import Engine

        # the model first (no hook registered yet): a module path that is not there is a
        # one-line ValueError before any socket or thread is opened
        model = _hooks.submodule(pl_module, self._watch, "watch") if self._watch else pl_module
        engine = Engine(None, self._opts)
        engine.watch(model, param_hooks=False)
        engine.optimizer_watched = True  # on_before_optimizer_step says when it steps
        run = self._run or os.environ.get("TENSORTAP_RUN")
        try:
            engine.sender = session.open_sender(run, rank=trainer.global_rank, world=trainer.world_size)
        except Exception as e:
            return self._give_up(e)
        self._engine = engine
        self._hold(engine.sender.run)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        """Each stage's end: hooks removed, records flushed. The sender stays open for a
        later stage of this callback (its bye goes at the process's exit); a new TapCallback
        after this one starts a new run unless one is given."""
        if self._engine is not None:
            self._end_evaluation()  # (validate, test, predict: the stage's end)
            self._engine.close()
            self._engine.sender.flush(2.0)
            self._release(self._engine.sender.run)

    # -- lifecycle --------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if self._engine is not None:
            self._engine.event("fit_start", {"world": trainer.world_size}, trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._engine is not None:
            self._end_evaluation()
            self._engine.event("fit_end", {}, trainer.global_step, trainer.current_epoch)

    def on_train_start(self, trainer, pl_module) -> None:
        e = self._engine
        if e is None:
            return
        self._end_evaluation()  # (the sanity check's)
        e.set_optimizers([getattr(o, "_optimizer", o) for o in trainer.optimizers])
        n = trainer.num_training_batches
        e.send_now("loader_stats", "train_loader", {"present": trainer.train_dataloader is not None,
                                                    "length": _int_or_none(n)})
        if trainer.val_dataloaders is not None:
            self._log_val(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._engine is not None and not self._val_logged:
            self._log_val(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        e = self._engine
        if e is not None:
            self._end_evaluation()
            e.new_epoch(trainer.current_epoch)
            e.event("epoch_start", {"epoch": trainer.current_epoch}, trainer.global_step, trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        e = self._engine
        if e is None:
            return
        self._end_evaluation()  # (the epoch's validation ran before this hook)
        if not self._val_logged:  # validation never ran in this epoch: there is none
            e.send_now("loader_stats", "val_loader", {"present": False, "length": None})
            self._val_logged = True
        at = (trainer.global_step, trainer.current_epoch)
        sent = self._val_sent[2] if self._val_sent[:2] == at else ()  # validation ran in this epoch
        e.metrics({k: v for k, v in _epoch_metrics(trainer).items() if k not in sent}, *at)
        e.event("epoch_end", {"epoch": trainer.current_epoch}, trainer.global_step, trainer.current_epoch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._engine is not None and not trainer.sanity_checking:
            values = _epoch_metrics(trainer)
            self._engine.metrics(values, trainer.global_step, trainer.current_epoch)
            self._val_sent = (trainer.global_step, trainer.current_epoch, set(values))

    # -- per step ---------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        e = self._engine
        if e is not None and e.begin_step(trainer.global_step, trainer.current_epoch):
            if self._log_batches:
                e.log_batch(batch, "train", batch_idx)

    def on_after_backward(self, trainer, pl_module) -> None:
        """Manual optimization: the gradients are read here, before the module's own clipping
        (self.clip_gradients runs before opt.step(), so before on_before_optimizer_step)."""
        if self._engine is not None and not pl_module.automatic_optimization:
            self._engine.grads_ready()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._engine is not None:
            self._engine.optimizer_stepping(getattr(optimizer, "_optimizer", optimizer))
            if pl_module.automatic_optimization:  # (Lightning clips after this hook)
                self._engine.grads_ready()

    # record(always=True) in an evaluation says its split ({"split": "val"}) and carries the
    # global step and epoch (the validation metrics'); a training value again once it ends
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._engine is not None:
            self._engine.evaluating("val", trainer.global_step, trainer.current_epoch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._engine is not None:
            self._engine.evaluating("test", trainer.global_step, trainer.current_epoch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._engine is not None:
            self._engine.evaluating("predict", trainer.global_step, trainer.current_epoch)

    # The evaluation ends at the next training hook, not in on_validation_end: Lightning calls
    # the module's own on_validation_end (test, predict) after the callbacks', and a record
    # there is the evaluation's too (it was taken as a training value, with a warning)
    def _end_evaluation(self) -> None:
        e = self._engine
        if e is not None and e.split != "train":
            e.evaluated()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if self._engine is not None:  # each batch's record(always=True) of a compiled forward
            self._engine.take_traced()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        e = self._engine
        if e is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            e.metrics({"loss": loss}, e.step, e.epoch)
        e.end_step()

    # -- called from the LightningModule ----------------------------------------------------
    def record(self, name: str, tensor, pair=None, always: bool = False) -> None:
        """Activation stats of a value that is no module's output: in capture steps; with
        always=True in every step, and in validation, test and predict batches, where its
        records say {"split": "val"} (or "test", "predict") and carry the global step."""
        if self._engine is not None:
            self._engine.record(name, tensor, pair, always)

    def patch_metrics(self, pred_amp, target_amp, scale=None, scale_note: Optional[str] = None,
                      name: str = "patch_metrics") -> None:
        """See Tap.patch_metrics."""
        e = self._engine
        if e is not None:
            e.patch(pred_amp, target_amp, scale, scale_note, name, e.step, e.epoch)

    def _log_val(self, trainer) -> None:
        loaders = trainer.val_dataloaders
        n = trainer.num_val_batches
        total = sum(n) if isinstance(n, (list, tuple)) else n
        self._engine.send_now("loader_stats", "val_loader",
                              {"present": loaders is not None, "length": _int_or_none(total)})
        self._val_logged = True


def _epoch_metrics(trainer) -> dict:
    """trainer.callback_metrics without "loss": the per-step stream already has every step's
    loss, and resending the last one at global_step would add a step that never ran."""
    return {k: v for k, v in trainer.callback_metrics.items() if k != "loss"}


def _int_or_none(n) -> Optional[int]:
    try:
        return int(n) if n is not None and n != float("inf") else None
    except (TypeError, ValueError, OverflowError):
        return None
