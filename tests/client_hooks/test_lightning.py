"""TapCallback: gate off leaves no trace; gate on, single process and 2-rank DDP on CPU."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

APP = os.path.join(os.path.dirname(__file__), "lightning_app.py")


def run_app(env_extra: dict, *args: str, timeout: float = 240) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORTAP")}
    env.update(env_extra)
    proc = subprocess.run([sys.executable, APP, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("gate_value", [None, "0", "true"])
def test_gate_off_a_full_fit_leaves_no_hook_no_zmq_no_thread_no_socket(gate_value):
    env = {} if gate_value is None else {"TENSORTAP": gate_value}
    res = run_app(env, "--plain-tap")
    assert res == {"hooks": 0, "zmq": False, "threads": [], "sockets": 0, "rank": 0}


@pytest.mark.parametrize("model", ["cnn", "transformer"])
def test_gate_on_a_fit_sends_every_stream_and_removes_its_hooks(pull, model):
    res = run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint,
                   "TENSORTAP_RUN": os.environ["TENSORTAP_RUN"]}, "--model", model)
    assert res["hooks"] == 0
    assert pull.wait_for(lambda r: any(x["name"] == "bye" for x in r))
    kinds = {r["kind"] for r in pull.records}
    assert {"loader_stats", "activations", "gradients", "metrics", "events", "patch_metrics"} <= kinds
    names = {(r["kind"], r["name"]) for r in pull.records}
    assert {("loader_stats", "images"), ("loader_stats", "probe"), ("loader_stats", "meta.scale"),
            ("loader_stats", "train_loader"), ("loader_stats", "val_loader"),
            ("activations", "x_combined"), ("gradients", "_total"), ("metrics", "loss"),
            ("metrics", "val_loss"), ("events", "fit_start"), ("events", "fit_end")} <= names
    # 2 epochs x 4 batches, once each: a logged "loss" is not sent again at epoch end
    assert [r["step"] for r in pull.find("metrics", "loss")] == list(range(8))
    assert {r["step"] for r in pull.find("metrics", "train_mse_epoch")} == {4, 8}
    # validation's metrics once an epoch (the train epoch's end does not send them again)
    assert sorted((r["step"], r["epoch"]) for r in pull.find("metrics", "val_loss")) == [(4, 0), (8, 1)]
    assert [r["epoch"] for r in pull.find("loader_stats", "images")] == [0, 1]
    assert pull.find("loader_stats", "val_loader")[0]["data"] == {"present": True, "length": 2}
    probe = pull.find("loader_stats", "probe")[0]["data"]
    assert set(probe) >= {"real", "imag", "abs", "angle"} and probe["split"] == "train"


def test_a_compiled_net_in_a_fit_keeps_whole_graphs_and_records_every_leaf(pull):
    """A LightningModule whose net is torch.compile'd, every leaf watched: the leaves' values
    come from the compiled forward (hooks.Traced) at each epoch's first step, with no graph
    break; the hooks are gone after the fit."""
    res = run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint,
                   "TENSORTAP_RUN": os.environ["TENSORTAP_RUN"]}, "--compile")
    assert res["hooks"] == 0 and res["breaks"] == 0 and 1 <= res["graphs"] <= 4, res
    assert pull.wait_for(lambda r: any(x["name"] == "bye" for x in r))
    for leaf in ("net.0:output", "net.1:output", "net.2:output"):
        assert [r["step"] for r in pull.find("activations", leaf)] == [0, 4], leaf
    assert {r["step"] for r in pull.find("gradients", "net.0")} == {0, 4}


def test_a_record_always_in_a_compiled_validation_step_is_sent_for_each_batch(pull):
    """record(always=True) inside a compiled validation function: the compiled code leaves
    each call's value in one place per name (hooks.Traced), taken at each validation batch's
    end: every batch gets its record (2 epochs x 2 batches) in its own epoch (before, they
    waited for the next training step, the first epoch's then labelled with the second)."""
    res = run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint,
                   "TENSORTAP_RUN": os.environ["TENSORTAP_RUN"]}, "--compile", "--val-record")
    assert res["breaks"] == 0 and res["graphs"] <= 6, res
    assert pull.wait_for(lambda r: any(x["name"] == "bye" for x in r))
    got = pull.find("activations", "val_out")
    # (the step: the global step, as the validation metrics have)
    assert sorted((r["step"], r["epoch"]) for r in got) == [(4, 0), (4, 0), (8, 1), (8, 1)]
    assert all(r["data"]["count"] == 8 * 64 and r["data"]["nan"] == 0 for r in got)
    assert [r["data"].get("split") for r in got] == ["val"] * 4  # (each validation batch's start says so)


def test_validation_records_say_val_at_the_global_step_and_end_with_the_validation(pull):
    """record(always=True) in validation_step: "val" records at the global step (where the
    validation metrics are drawn), the sanity check's at step 0 (they had no step, and the
    collector drew them at made-up ones); a record in the module's own on_validation_end,
    which runs after the callback's, is the validation's too (it was a training value, with
    a warning); a record after the validation (the module's on_train_epoch_end) is a
    training value again (it was labelled "val")."""
    res = run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint,
                   "TENSORTAP_RUN": os.environ["TENSORTAP_RUN"]}, "--eval-records")
    assert res["hooks"] == 0
    assert pull.wait_for(lambda r: len(pull.find("activations", "epoch_out")) == 2)
    assert pull.wait_for(lambda r: len(pull.find("activations", "val_x")) == 6)
    val = sorted(pull.find("activations", "val_x"), key=lambda r: r["seq"])
    assert [(r["step"], r["epoch"], r["data"].get("split")) for r in val] == \
        [(0, 0, "val")] * 2 + [(4, 0, "val")] * 2 + [(8, 1, "val")] * 2
    val_loss = sorted((r["step"], r["epoch"]) for r in pull.find("metrics", "val_loss"))
    assert val_loss == [(4, 0), (8, 1)]  # the same steps as the validation's records
    after = sorted(pull.find("activations", "epoch_out"), key=lambda r: r["seq"])
    assert [(r["epoch"], r["data"].get("split")) for r in after] == [(0, None), (1, None)]
    assert pull.wait_for(lambda r: len(pull.find("activations", "val_end")) == 3)
    end = sorted(pull.find("activations", "val_end"), key=lambda r: r["seq"])
    assert [(r["step"], r["epoch"], r["data"].get("split")) for r in end] == \
        [(0, 0, "val"), (4, 0, "val"), (8, 1, "val")]
    assert [r["data"].get("split") for r in pull.find("activations", "train_start")] == [None]
    # trainer.test after the fit: its batches and the module's own on_test_end say "test"
    assert pull.wait_for(lambda r: len(pull.find("activations", "test_end")) == 1)
    assert [r["data"].get("split") for r in pull.find("activations", "test_x")] == ["test"] * 2
    assert [r["data"].get("split") for r in pull.find("activations", "test_end")] == ["test"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning scales the loss (16-mixed) only on a GPU")
def test_under_16_mixed_precision_on_a_gpu_the_gradients_are_the_unscaled_ones(pull):
    """precision="16-mixed" on CUDA: autocast, and a GradScaler (init scale 1024) that scales
    the loss before backward and unscales the gradients before on_before_optimizer_step. The
    records equal what the optimizer is handed, not 1024 times it."""
    res = run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint,
                   "TENSORTAP_RUN": os.environ["TENSORTAP_RUN"]}, "--gpu", "--precision", "16-mixed")
    assert pull.wait_for(lambda r: any(x["name"] == "bye" for x in r))
    assert res["loss_scale"] is not None and res["loss_scale"] >= 256  # the scaler was at work
    recs = sorted(pull.find("gradients", "net.0"), key=lambda r: r["epoch"])
    assert [r["epoch"] for r in recs] == [0, 1]
    for r in recs:
        want = res["first_norms"][str(r["epoch"])]
        assert math.isfinite(want) and want > 0
        assert r["data"]["norm"] == pytest.approx(want, rel=1e-4)
        assert "loss_scale" not in r["data"]


def test_each_new_trainer_with_a_new_callback_writes_its_own_run_and_validate_stays_in_its_fits(pull):
    """No run id given: fit, then validate with the same Trainer (one run), then a new Trainer
    with a new TapCallback (a notebook cell run again): a second run, its steps from 0."""
    res = run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint}, "--fits", "2", "--epochs", "1")
    first, second = res["runs"]
    assert first != second
    assert pull.wait_for(lambda r: any(x["name"] == "bye" for x in r))
    by_run = {run: [r for r in pull.records if r["run"] == run] for run in (first, second)}
    assert {r["run"] for r in pull.records} == {first, second}
    for run in (first, second):
        assert sorted(r["step"] for r in by_run[run] if r["kind"] == "metrics" and r["name"] == "loss") == [0, 1, 2, 3]
    # trainer.validate after the fit (its epoch counter then past the fit's one epoch): the fit's run
    val_epochs = {r["epoch"] for r in by_run[first] if r["kind"] == "metrics" and r["name"] == "val_loss"}
    assert val_epochs == {0, 1}
    assert not [r for r in by_run[second] if r["name"] == "val_loss"]


def test_under_gradient_accumulation_a_capture_without_an_optimizer_step_has_no_update_ratio(pull):
    """accumulate_grad_batches=2: the first batch of each epoch (the default capture) ends
    before the optimizer steps, so there is no update to measure: update_ratio None, not 0
    (which the diagnosis would read as frozen parameters)."""
    from collector.diagnosis.gradients import dead_parameters

    run_app({"TENSORTAP": "1", "TENSORTAP_ENDPOINT": pull.endpoint,
             "TENSORTAP_RUN": os.environ["TENSORTAP_RUN"]}, "--accumulate", "2")
    assert pull.wait_for(lambda r: any(x["name"] == "bye" for x in r))
    layers = [r for r in pull.find("gradients") if r["name"] != "_total"]
    assert layers and {r["epoch"] for r in layers} == {0, 1}
    assert all(r["data"]["update_ratio"] is None and r["data"]["norm"] > 0 for r in layers)
    assert dead_parameters(pull.records) == []



def fit_every_step(module_class, samples: int):
    """A seeded module_class() fitted one epoch on CPU on `samples` random 4-vectors (batches
    of 8), a TapCallback capturing every step and every layer's gradients; the module."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from client_hooks import TapCallback

    torch.manual_seed(0)
    model = module_class()
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu",
              callbacks=[TapCallback(every_n_steps=1, gradients="all")]).fit(
        model, DataLoader(TensorDataset(torch.randn(samples, 4)), batch_size=8))
    return model


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*(num_workers|many workers|GPU available).*")
def test_with_an_optimizer_each_for_two_nets_every_layer_gets_its_real_update_ratio(pull):
    """Manual optimization, a generator and a critic stepped by an optimizer each (Lightning's
    GAN pattern): each optimizer step reads the gradients again, and the update ratio spans
    the whole training step, for both nets. (The second read took a new weight snapshot,
    after the first optimizer had stepped: its layers read 0, 'frozen parameters'.)"""
    import lightning as L
    from torch import nn

    from collector.diagnosis.gradients import dead_parameters

    class Gan(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.g, self.d, self.want, self.d_norm = nn.Linear(4, 4), nn.Linear(4, 1), {}, {}

        def training_step(self, batch, i):
            og, od = self.optimizers()
            step = self.global_step  # (each optimizer step counts: 0, 2, 4)
            flat = {n: torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()
                    for n, m in (("g", self.g), ("d", self.d))}
            x = batch[0]
            og.zero_grad()
            self.manual_backward(-self.d(self.g(x)).mean())
            og.step()
            od.zero_grad()
            self.manual_backward(self.d(self.g(x).detach()).mean() - self.d(x).mean())
            self.d_norm[step] = float(torch.cat([p.grad.reshape(-1) for p in self.d.parameters()]).norm())
            self.clip_gradients(od, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
            od.step()
            self.want[step] = {
                n: float((torch.cat([p.detach().reshape(-1) for p in m.parameters()]) - flat[n]).norm()
                         / flat[n].norm())
                for n, m in (("g", self.g), ("d", self.d))}

        def configure_optimizers(self):
            return [torch.optim.SGD(self.g.parameters(), lr=0.1), torch.optim.SGD(self.d.parameters(), lr=0.1)]

    model = fit_every_step(Gan, 24)
    assert pull.wait_for(lambda r: len([x for x in pull.find("gradients") if x["name"] in ("g", "d")]) == 6)
    layers = [r for r in pull.find("gradients") if r["name"] in ("g", "d")]
    for r in layers:
        assert r["data"]["update_ratio"] == pytest.approx(model.want[r["step"]][r["name"]], rel=1e-4), r
    # the critic's gradients as its own clip_gradients found them (they were read after it)
    assert [r["data"]["norm"] for r in sorted(layers, key=lambda r: r["step"]) if r["name"] == "d"] == \
        pytest.approx([model.d_norm[s] for s in sorted(model.d_norm)], rel=1e-5)
    assert dead_parameters(pull.records) == []


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*(num_workers|many workers|GPU available).*")
def test_with_two_backwards_a_step_a_layer_zeroed_before_the_second_keeps_its_own_gradients(pull):
    """Manual optimization, each optimizer stepping and zeroing its gradients (set to None)
    right after its backward, before the other net's: the gradients are read after each
    backward, and a layer that has none at the second read keeps what the first read found
    (its optimizer stepped with that). The generator's layer was dropped from those steps."""
    import lightning as L
    from torch import nn


    def norm(m):
        return float(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).norm())

    class Gan(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.g, self.d, self.norms = nn.Linear(4, 4), nn.Linear(4, 1), {}

        def training_step(self, batch, i):
            og, od = self.optimizers()
            x, step = batch[0], self.global_step
            self.manual_backward(-self.d(self.g(x)).mean())
            self.norms[step] = {"g": norm(self.g)}
            og.step()
            og.zero_grad()
            od.zero_grad()  # (the generator's loss reached the critic too)
            self.manual_backward(self.d(self.g(x).detach()).mean() - self.d(x).mean())
            self.norms[step]["d"] = norm(self.d)
            od.step()
            od.zero_grad()

        def configure_optimizers(self):
            return [torch.optim.SGD(self.g.parameters(), lr=0.1), torch.optim.SGD(self.d.parameters(), lr=0.1)]

    model = fit_every_step(Gan, 24)
    assert pull.wait_for(lambda r: len(pull.find("gradients", "d")) == 3)
    for name in ("g", "d"):
        got = sorted(pull.find("gradients", name), key=lambda r: r["step"])
        assert [r["step"] for r in got] == sorted(model.norms), name
        assert [r["data"]["norm"] for r in got] == pytest.approx(
            [model.norms[s][name] for s in sorted(model.norms)], rel=1e-5), name
        assert all(r["data"]["update_ratio"] > 0 for r in got), name


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:.*(num_workers|many workers|GPU available).*")
def test_manual_optimization_with_one_optimizer_accumulating_gives_its_layers_no_update_ratio(pull):
    """The critic steps every batch, the generator every other one: in a captured batch
    without the generator's step, its layer has no update ratio (it read 0.0: 'frozen')."""
    import lightning as L
    from torch import nn

    from collector.diagnosis.gradients import dead_parameters

    class Gan(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.g, self.d, self.g_stepped = nn.Linear(4, 4), nn.Linear(4, 1), {}

        def training_step(self, batch, i):
            og, od = self.optimizers()
            self.g_stepped[self.global_step] = i % 2 == 1
            self.manual_backward(-self.d(self.g(batch[0])).mean())
            if i % 2 == 1:
                og.step()
                og.zero_grad()
            od.step()
            od.zero_grad()

        def configure_optimizers(self):
            return [torch.optim.SGD(self.g.parameters(), lr=0.1), torch.optim.SGD(self.d.parameters(), lr=0.1)]

    model = fit_every_step(Gan, 32)
    assert pull.wait_for(lambda r: len(pull.find("gradients", "d")) == 4)
    assert len(pull.find("gradients", "g")) == 4  # (read at od.step, after og.zero_grad: it had none)
    for r in pull.find("gradients", "g"):
        assert (r["data"]["update_ratio"] is not None) == model.g_stepped[r["step"]], r
    assert all(r["data"]["update_ratio"] > 0 for r in pull.find("gradients", "d"))
    assert dead_parameters(pull.records) == []
