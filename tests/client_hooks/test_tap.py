"""Tap (plain PyTorch) with the gate on, against a real ZeroMQ PULL socket."""
from __future__ import annotations

import enum
import math
import os
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from client_hooks import Tap
from tests.client_hooks.hookcount import hook_counts

# CPU, and a GPU where there is one (the fused kernels' gradient path; bench/device_run.sh)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.Flatten(), nn.Linear(4 * 8 * 8, 3))


def train(tap, model, epochs=2, batches=3, make_batch=None, every_hook=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tap.watch(model, optimizer=opt)
    make_batch = make_batch or (lambda: {"images": torch.randn(2, 1, 8, 8), "target": torch.randn(2, 3)})
    seen = []
    for ep in range(epochs):
        tap.epoch_start(ep)
        for i in range(batches):
            b = make_batch()
            tap.log_batch(b, epoch=ep, batch_idx=i)
            seen.append(hook_counts(model))
            out = model(b["images"])
            loss = (out - b["target"]).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            tap.log_loss(loss)
        tap.epoch_end(ep)
    return seen


def test_hooks_exist_only_during_the_first_batch_of_each_epoch(pull):
    model = small_cnn()
    with Tap() as tap:
        seen = train(tap, model)
    assert [c > 0 for c in seen] == [True, False, False, True, False, False]
    assert hook_counts(model) == 0


@pytest.mark.parametrize("every,pattern", [(1, [True] * 6), (2, [True, False] * 3)])
def test_hooks_stay_between_consecutive_capture_steps_only(pull, every, pattern):
    model = small_cnn()
    with Tap(first_n=0, every_n_steps=every) as tap:
        seen = train(tap, model)
    assert [c > 0 for c in seen] == pattern
    assert hook_counts(model) == 0


def test_the_four_streams_and_patch_metrics_arrive_with_step_and_epoch(pull):
    model = small_cnn()
    with Tap() as tap:
        tap.log_loaders(train=[0] * 3, val=None)
        train(tap, model)
        tap.patch_metrics(torch.rand(4, 4), torch.rand(4, 4))
    assert pull.wait_for(lambda r: any(x["kind"] == "patch_metrics" for x in r))
    names = {(r["kind"], r["name"]) for r in pull.records}
    for key in [("loader_stats", "images"), ("loader_stats", "train_loader"), ("loader_stats", "val_loader"),
                ("activations", "0:output"), ("activations", "4:output"), ("gradients", "0"),
                ("gradients", "4"), ("gradients", "_total"), ("metrics", "loss"),
                ("events", "epoch_start"), ("events", "epoch_end")]:
        assert key in names, key
    assert len(pull.find("metrics", "loss")) == 6
    assert [r["epoch"] for r in pull.find("loader_stats", "images")] == [0, 1]
    assert [r["step"] for r in pull.find("gradients", "_total")] == [0, 3]
    assert pull.find("loader_stats", "val_loader")[0]["data"] == {"present": False, "length": None}


def test_gradient_records_equal_numpy_and_update_ratio_spans_the_optimizer_step(pull):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    with Tap() as tap:
        tap.watch(model, optimizer=opt)
        tap.log_batch({"x": x}, epoch=0)
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
        first = model[0]
        g = np.concatenate([first.weight.grad.numpy().ravel(), first.bias.grad.numpy().ravel()]).astype(np.float64)
        w0 = np.concatenate([first.weight.detach().numpy().ravel(), first.bias.detach().numpy().ravel()]).astype(np.float64)
        opt.step()
        w1 = np.concatenate([first.weight.detach().numpy().ravel(), first.bias.detach().numpy().ravel()]).astype(np.float64)
    assert pull.wait_for(lambda r: len([x for x in r if x["kind"] == "gradients"]) == 3)
    d = pull.find("gradients", "0")[0]["data"]
    assert d["count"] == g.size and d["nan"] == 0 and d["inf"] == 0
    assert d["mean"] == pytest.approx(g.mean(), rel=1e-5, abs=1e-8)
    assert d["std"] == pytest.approx(g.std(), rel=1e-5)
    assert d["norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
    assert d["max_abs"] == pytest.approx(np.abs(g).max(), rel=1e-6)
    assert d["weight_norm"] == pytest.approx(np.linalg.norm(w0), rel=1e-5)
    assert d["update_ratio"] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-4)
    assert pull.find("gradients", "_total")[0]["data"]["norm"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("split", [False, True])
def test_a_capture_split_over_several_packed_records_and_entries_arrives_whole(pull, monkeypatch, split):
    """split: at most 3 entries a packed record and 2 layers a gradient entry (the total norm in
    an entry of its own), as a model with thousands of leaves would have: the same records,
    values and sequence numbers as in one packed record."""
    from client_hooks import capture, engine

    if split:
        monkeypatch.setattr(capture, "PACK_MAX_ENTRIES", 3)
        monkeypatch.setattr(engine, "GRAD_LAYERS_PER_ENTRY", 2)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3), nn.Linear(3, 2))
    x = torch.randn(8, 5)
    with Tap(all_leaves=True, gradients="all") as tap:
        tap.watch(model)
        tap.log_batch({"x": x, "y": torch.randn(8, 2)}, epoch=0)
        model(x).pow(2).mean().backward()
        grads = {n: torch.cat([p.grad.reshape(-1) for p in m.parameters()]).numpy().astype(np.float64)
                 for n, m in model.named_children() if any(True for _ in m.parameters())}
        total = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()
    assert pull.wait_for(lambda r: len(pull.find("gradients")) == 5 and len(pull.find("activations")) == 6)
    assert tap.sender.dropped == 0
    seqs = sorted(r["seq"] for r in pull.records)
    assert seqs == list(range(len(seqs)))  # hello, then every record: no gap, no repeat
    assert sorted(r["name"] for r in pull.find("loader_stats")) == ["x", "y"]
    for name, g in grads.items():
        d = pull.find("gradients", name)[0]["data"]
        assert d["count"] == g.size and d["norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5), name
    assert pull.find("gradients", "_total")[0]["data"]["norm"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("every", [1, 10])  # kept snapshot buffers (every step) or fresh ones
def test_update_ratio_of_every_captured_step_spans_that_step(pull, every):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    want = []
    with Tap(first_n=0, every_n_steps=every) as tap:
        tap.watch(model, optimizer=opt)
        for step in range(3 * every):
            x = torch.randn(8, 5)
            tap.log_batch({"x": x}, epoch=0)
            model(x).pow(2).mean().backward()
            w0 = [p.detach().clone() for p in model[2].parameters()]
            opt.step()
            opt.zero_grad()
            if step % every == 0:
                d = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model[2].parameters(), w0)])
                want.append((step, (d.norm() / torch.cat([b.reshape(-1) for b in w0]).norm()).item()))
    assert pull.wait_for(lambda r: len([x for x in r if x["name"] == "2"]) == 3)
    got = [(r["step"], r["data"]["update_ratio"]) for r in pull.find("gradients", "2")]
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4)


class _WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(5, 2)
        self.spare = nn.Linear(5, 2)  # trainable, never in the loss: it gets no gradient

    def forward(self, x):
        return self.used(x)


def test_a_parameter_without_gradient_does_not_hide_the_end_of_backward(pull):
    """The gradients are summarised (and the weights snapshot) when backward ends, before the
    optimizer step, also when some trainable parameter receives no gradient at all."""
    torch.manual_seed(0)
    model = _WithUnused()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 5)
    with Tap(gradients=["used"]) as tap:
        tap.watch(model, optimizer=opt)
        tap.log_batch({"x": x}, epoch=0)
        model(x).pow(2).mean().backward()
        w0 = torch.cat([p.detach().reshape(-1).clone() for p in model.used.parameters()])
        opt.step()
        w1 = torch.cat([p.detach().reshape(-1) for p in model.used.parameters()])
    assert pull.wait_for(lambda r: len(pull.find("gradients", "used")) == 1)
    d = pull.find("gradients", "used")[0]["data"]
    assert d["update_ratio"] == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-4)
    assert d["weight_norm"] == pytest.approx(w0.norm().item(), rel=1e-5)


class _Spectral(nn.Module):
    """A real layer and a complex one (an FNO's spectral weights), and a spare layer that the
    loss uses only when asked: a step in which it gets no gradient."""

    def __init__(self):
        super().__init__()
        self.lift = nn.Linear(6, 6)
        self.spec = nn.Parameter(torch.randn(6, 6, dtype=torch.complex64) * 0.3)
        self.spare = nn.Linear(6, 6)

    def forward(self, x, spare=True):
        z = torch.fft.fft(self.lift(x).to(torch.complex64)) @ self.spec
        y = torch.fft.ifft(z).real
        return y + self.spare(x) if spare else y


def _flat_vec(tensors) -> np.ndarray:
    """Values as the records count them: a complex tensor as its real pairs."""
    return np.concatenate([(torch.view_as_real(t) if t.is_complex() else t).detach().cpu().double().numpy().ravel()
                           for t in tensors])


@pytest.mark.parametrize("dev", DEVICES)
def test_every_layers_gradient_record_equals_numpy_also_in_a_step_without_some_gradient(pull, dev):
    """Every watched layer, every step: on the fused path the gradients and weights go through
    one flat buffer (client_hooks.flat), and in a step where a layer gets no gradient the
    layers are read where they lie; either way each record equals NumPy's on the same values."""
    from client_hooks import flat, stats

    torch.manual_seed(0)
    model = _Spectral().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    layers = {"lift": list(model.lift.parameters()), "model": [model.spec], "spare": list(model.spare.parameters())}
    want, xs = [], []
    with Tap(first_n=0, every_n_steps=1, gradients="all") as tap:
        tap.watch(model, optimizer=opt)
        for step in range(4):
            x = torch.randn(5, 6, device=dev)
            tap.log_batch({"x": x}, epoch=0)
            xs.append(x.cpu().double().numpy())
            model(x, spare=step != 2).pow(2).mean().backward()
            w0 = {n: _flat_vec(ps) for n, ps in layers.items()}
            g = {n: _flat_vec([p.grad for p in ps]) for n, ps in layers.items() if ps[0].grad is not None}
            opt.step()
            w1 = {n: _flat_vec(ps) for n, ps in layers.items()}
            opt.zero_grad()
            want.append((w0, g, w1))
        fused = isinstance(tap._engine._flat, flat.FlatGrads)
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 4)
    for name in layers:
        got = {r["step"]: r["data"] for r in pull.find("gradients", name)}
        assert sorted(got) == ([0, 1, 3] if name == "spare" else [0, 1, 2, 3])
        for step, d in got.items():
            w0, g, w1 = want[step]
            g, w0, w1 = g[name], w0[name], w1[name]
            assert d["count"] == g.size and d["nan"] == 0 and d["inf"] == 0
            assert d["mean"] == pytest.approx(g.mean(), rel=1e-4, abs=1e-7)
            assert d["std"] == pytest.approx(g.std(), rel=1e-4)
            assert d["norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
            assert d["max_abs"] == pytest.approx(np.abs(g).max(), rel=1e-6)
            assert d["zero_frac"] == pytest.approx((g == 0).mean())
            assert d["weight_norm"] == pytest.approx(np.linalg.norm(w0), rel=1e-5)
            assert d["update_ratio"] == pytest.approx(np.linalg.norm(w1 - w0) / np.linalg.norm(w0), rel=1e-3)
    assert fused == (stats.fused_for(torch.device(dev)) is not None)  # the flat buffer where it applies
    # the batch field, each step's own (its extra fields too, also where it comes by its plan)
    got = sorted(pull.find("loader_stats", "x"), key=lambda r: r["step"])
    assert [(r["step"], r["data"]["batch"], r["data"]["split"]) for r in got] == [(s, s, "train") for s in range(4)]
    for r in got:
        assert r["data"]["mean"] == pytest.approx(xs[r["step"]].mean(), rel=1e-5, abs=1e-7)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.aux, self.main = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.kept = torch.tanh(self.body(x))
        return self.aux(h), self.main(h)


@pytest.mark.parametrize("used", ["first", "second", "kept"])
def test_the_end_of_backward_comes_from_one_hook_on_the_output_else_from_the_parameters(pull, used):
    """A capture step finds the end of backward by a hook on each of the model's outputs that
    require grad: no parameter carries a hook. Where the loss uses none of them (a tensor the
    model kept aside), the first capture reads the gradients at its end (the optimizer has
    stepped: its record has no update ratio, where a 0 would read as frozen parameters), and
    from the next one on every parameter's hook finds the end; their update ratios span the
    optimizer step. (A loss on the second output took that way too, when only the first
    output was hooked.)"""
    torch.manual_seed(0)
    model = _TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    param_hooks, want = [], []
    with Tap(first_n=0, every_n_steps=1, gradients=["body"]) as tap:
        tap.watch(model, optimizer=opt)
        for step in range(3):
            x = torch.randn(8, 5)
            tap.log_batch({"x": x}, epoch=0)
            outs = model(x)
            out = model.kept if used == "kept" else outs[0 if used == "first" else 1]
            param_hooks.append(sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()))
            out.pow(2).mean().backward()
            w0 = torch.cat([p.detach().reshape(-1).clone() for p in model.body.parameters()])
            opt.step()
            w1 = torch.cat([p.detach().reshape(-1) for p in model.body.parameters()])
            want.append(((w1 - w0).norm() / w0.norm()).item())
            opt.zero_grad()
    assert pull.wait_for(lambda r: len(pull.find("gradients", "body")) == 3)
    got = {r["step"]: r["data"]["update_ratio"] for r in pull.find("gradients", "body")}
    if used != "kept":
        assert param_hooks == [0, 0, 0]
        assert [got[s] for s in range(3)] == pytest.approx(want, rel=1e-4)
    else:
        assert param_hooks == [0, 6, 6]  # body, aux and main: a weight and a bias each
        assert got[0] is None  # read after the optimizer step: no update ratio (0 would mean frozen)
        assert [got[1], got[2]] == pytest.approx(want[1:], rel=1e-4)


def test_a_first_capture_read_late_is_not_diagnosed_as_frozen_parameters(pull):
    """The default cadence's one gradient capture of a one-epoch run, on a model whose loss
    uses none of its outputs (so that capture reads its gradients after the optimizer step):
    the collector's diagnosis of its records finds no frozen layer."""
    from collector.diagnosis import diagnose

    torch.manual_seed(0)
    model = _TwoHeads()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tap() as tap:  # default cadence: the first batch of every epoch
        tap.watch(model, optimizer=opt)
        for step in range(4):
            x = torch.randn(8, 5)
            tap.log_batch({"x": x}, epoch=0)
            model(x)
            model.main(model.kept).pow(2).mean().backward()  # no output of the forward's
            opt.step()
            opt.zero_grad()
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 1)
    grads = pull.find("gradients")
    assert {r["name"] for r in grads} >= {"body", "main"}
    assert all(r["data"]["update_ratio"] is None for r in grads if r["name"] != "_total")
    assert all(r["data"]["norm"] > 0 for r in grads)  # the gradients themselves were read
    rules = [f["rule"] for f in diagnose({"gradients": grads})]
    assert "frozen_parameters" not in rules, rules


def test_an_optimizer_hook_of_the_user_after_ours_and_a_skipped_step_break_nothing(pull):
    """The optimizer iterates over its step hooks; ours must not remove itself inside that
    loop (a user's hook registered after it would break the loop), and a captured step whose
    optimizer step was skipped (as GradScaler does on inf) must not leave a second hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    with Tap(first_n=0, every_n_steps=1) as tap:
        tap.watch(model, optimizer=opt)
        for step in range(4):
            tap.log_batch({"x": torch.randn(8, 5)}, epoch=0)
            if step == 0:
                opt.register_step_post_hook(lambda o, a, k: calls.append(1))  # after ours
            model(torch.randn(8, 5)).pow(2).mean().backward()
            if step != 1:  # step 1: the optimizer step is skipped
                opt.step()
            opt.zero_grad()
    assert calls == [1, 1, 1]
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 4)


def test_a_backward_that_raised_does_not_hide_the_end_of_the_next_one(pull):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fail = [True]

    def user_hook(p):  # the user's own hook; lands after the last layer's gradients
        if fail[0]:
            raise RuntimeError("user hook failed")
    model[0].weight.register_post_accumulate_grad_hook(user_hook)
    with Tap(first_n=0, every_n_steps=1, gradients=["2"]) as tap:
        tap.watch(model, optimizer=opt)
        for step in range(2):
            x = torch.randn(8, 5)
            tap.log_batch({"x": x}, epoch=0)
            if step == 0:
                with pytest.raises(RuntimeError, match="user hook failed"):
                    model(x).pow(2).mean().backward()
                fail[0] = False
                opt.zero_grad()
                continue
            model(x).pow(2).mean().backward()
            w0 = torch.cat([p.detach().reshape(-1).clone() for p in model[2].parameters()])
            opt.step()
            w1 = torch.cat([p.detach().reshape(-1) for p in model[2].parameters()])
    assert pull.wait_for(lambda r: any(x["step"] == 1 for x in pull.find("gradients", "2")))
    d = [r for r in pull.find("gradients", "2") if r["step"] == 1][0]["data"]
    assert d["update_ratio"] == pytest.approx(((w1 - w0).norm() / w0.norm()).item(), rel=1e-4)


@pytest.mark.parametrize("gradients", [None, "all", ["0"]])  # the first two hold every parameter
def test_the_total_norm_equals_clip_grad_norm_also_with_nonfinite_gradients(pull, gradients):
    """From the layers' norms when they hold every parameter, else one norm of all grads."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    totals = []
    with Tap(every_n_steps=1, gradients=gradients) as tap:
        tap.watch(model)
        for bad in (None, math.inf, math.nan):
            x = torch.randn(8, 5)
            if bad is not None:
                x[0, 0] = bad
            tap.log_batch({"x": x}, epoch=0)
            model(x).pow(2).mean().backward()
            totals.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e30).item())
            model.zero_grad()
    assert pull.wait_for(lambda r: len([x for x in r if x["name"] == "_total"]) == 3)
    got = [r["data"]["norm"] for r in pull.find("gradients", "_total")]
    assert got[0] == pytest.approx(totals[0], rel=1e-5) and math.isfinite(got[0])
    for g, t in zip(got[1:], totals[1:]):  # NaN/inf travel as null or as the value itself
        assert (g is None and not math.isfinite(t)) or g == t or (math.isnan(t) and g != g), (g, t)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("gradients", ["all", ["0"]])  # the total from the rows, or of its own
def test_gradients_under_a_grad_scaler_are_the_unscaled_ones(pull, gradients, dev):
    """AMP: autocast and backward on a scaled loss; the records equal the gradients after
    unscale_, over two steps whose scale differs (the scaler's update changes its scale in
    place after the step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(dev, init_scale=2.0 ** 12, growth_factor=4.0, growth_interval=1)
    half = torch.float16 if dev == "cuda" else torch.bfloat16
    want = []
    with Tap(every_n_steps=1, gradients=gradients) as tap:
        tap.watch(model, optimizer=opt, scaler=scaler)
        for step in range(2):
            x, y = torch.randn(8, 5, device=dev), torch.randn(8, 2, device=dev)
            tap.log_batch({"x": x}, epoch=0)
            with torch.autocast(dev, dtype=half):
                loss = (model(x) - y).float().pow(2).mean()
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            scaler.unscale_(opt)
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item()
            first = model[0]
            g = np.concatenate([first.weight.grad.cpu().numpy().ravel(), first.bias.grad.cpu().numpy().ravel()])
            want.append((scale, g.astype(np.float64), total))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert want[1][0] == 4 * want[0][0]  # the second step's gradients carry another scale
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 2)
    for (scale, g, total), rec, tot in zip(want, pull.find("gradients", "0"), pull.find("gradients", "_total")):
        d = rec["data"]
        assert d["loss_scale"] == scale
        assert d["mean"] == pytest.approx(g.mean(), rel=1e-5, abs=1e-8)
        assert d["std"] == pytest.approx(g.std(), rel=1e-5)
        assert d["norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
        assert d["max_abs"] == pytest.approx(np.abs(g).max(), rel=1e-6)
        assert d["zero_frac"] == pytest.approx(np.mean(g == 0))
        assert tot["data"]["norm"] == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_under_gradient_accumulation_only_captures_with_an_optimizer_step_have_update_ratios(pull, dev):
    """Two micro-batches per optimizer step, every step captured: the first of each pair ends
    with no optimizer step (update_ratio None, no frozen-parameter finding); the second's
    ratio spans the real update."""
    from collector.diagnosis.gradients import dead_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    with Tap(every_n_steps=1) as tap:
        tap.watch(model, optimizer=opt)
        for i in range(4):
            x = torch.randn(8, 5, device=dev)
            tap.log_batch({"x": x}, epoch=0)
            (model(x).pow(2).mean() / 2).backward()
            if i % 2 == 1:
                w0 = torch.cat([model[0].weight.detach().ravel(), model[0].bias.detach().ravel()]).double()
                opt.step()
                w1 = torch.cat([model[0].weight.detach().ravel(), model[0].bias.detach().ravel()]).double()
                want.append(((w1 - w0).norm() / w0.norm()).item())
                opt.zero_grad()
    assert pull.wait_for(lambda r: len(pull.find("gradients", "0")) == 4)
    ratios = [r["data"]["update_ratio"] for r in sorted(pull.find("gradients", "0"), key=lambda r: r["step"])]
    assert ratios[0] is None and ratios[2] is None
    assert ratios[1] == pytest.approx(want[0], rel=1e-4) and ratios[3] == pytest.approx(want[1], rel=1e-4)
    assert dead_parameters(pull.records) == []


def test_record_names_and_pairs_and_cadence_every_n_steps(pull):
    model = nn.Linear(4, 4)
    with Tap(first_n=0, every_n_steps=2, pairs={"obj": "real_imag"}) as tap:
        tap.watch(model)
        for step in range(5):
            tap.log_batch({"x": torch.randn(2, 4)})
            out = model(torch.randn(2, 4))
            tap.record("obj", torch.randn(2, 2, 3))
            tap.record("model_input", torch.randn(3), always=True)
            out.sum().backward()
    assert pull.wait_for(lambda r: len([x for x in r if x["name"] == "model_input"]) == 5)
    assert [r["step"] for r in pull.find("activations", "obj")] == [0, 2, 4]
    assert set(pull.find("activations", "obj")[0]["data"]) >= {"real", "imag", "abs", "angle"}


def test_a_record_always_in_an_evaluation_loop_says_its_split_until_the_next_train_batch(pull):
    """record(always=True) after log_batch(batch, split="val") (an evaluation loop between
    training steps) carries {"split": "val"}; from the next train batch on, none again (the
    collector keeps the evaluation's values apart, and the diagnosis leaves them out). With
    no optimizer watched, the last training batch's capture step is still open when the
    evaluation begins: it ends there (the evaluation's records went into it, as training's)."""
    model = nn.Linear(4, 4)
    with Tap(first_n=3) as tap:
        tap.watch(model)
        for epoch in range(2):
            tap.epoch_start(epoch)
            for i in range(3):
                tap.log_batch({"x": torch.randn(2, 4)}, epoch=epoch, batch_idx=i)
                out = model(torch.randn(2, 4))
                tap.record("probe", out, always=True)
                out.sum().backward()
            model.eval()
            with torch.no_grad():
                for i in range(2):
                    tap.log_batch({"x": torch.randn(3, 4)}, split="val", batch_idx=i)
                    tap.record("probe", model(torch.full((3, 4), 7.0)), always=True)
            model.train()
            tap.epoch_end(epoch)
    assert pull.wait_for(lambda r: len(pull.find("activations", "probe")) == 10)
    got = sorted(pull.find("activations", "probe"), key=lambda r: r["seq"])
    assert [(r["step"], r["data"].get("split"), r["data"]["count"]) for r in got] == \
        [(0, None, 8), (1, None, 8), (2, None, 8), (2, "val", 12), (2, "val", 12),
         (3, None, 8), (4, None, 8), (5, None, 8), (5, "val", 12), (5, "val", 12)]


def test_an_evaluation_ends_with_its_epoch_and_one_not_told_warns_once(pull, monkeypatch):
    """After epoch_end, record(always=True) is a training value again; an evaluation before
    any training step is at step 0 (at its step when log_batch says one). A record under
    no_grad outside a capture step with no evaluation told warns once (it is kept as a
    training value: the user may have forgotten log_batch(split="val"))."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    model = nn.Linear(4, 4)
    with Tap(first_n=1) as tap:
        tap.watch(model)
        tap.epoch_start(0)
        with torch.no_grad():
            tap.log_batch(None, split="val")
            tap.record("probe", model(torch.ones(1, 4)), always=True)  # before training: step 0
        tap.log_batch(None, epoch=0)
        model(torch.randn(2, 4)).sum().backward()
        with torch.no_grad():
            tap.log_batch(None, split="test", step=10)
            tap.record("probe", model(torch.ones(1, 4)), always=True)
        tap.epoch_end(0)
        tap.record("probe", model(torch.ones(2, 4)), always=True)  # after the epoch: training's
        assert not [w for w in engine._warned if w == "eval as train"]
        with pytest.warns(RuntimeWarning, match=r"split=\"val\""):
            with torch.no_grad():
                tap.record("probe", model(torch.ones(3, 4)), always=True)  # an evaluation not told
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                tap.record("probe", model(torch.ones(3, 4)), always=True)  # (once)
    assert pull.wait_for(lambda r: len(pull.find("activations", "probe")) == 5)
    got = sorted(pull.find("activations", "probe"), key=lambda r: r["seq"])
    assert [(r["step"], r["epoch"], r["data"].get("split"), r["data"]["count"]) for r in got] == \
        [(0, 0, "val", 4), (10, 0, "test", 4), (0, 0, None, 8), (0, 0, None, 12), (0, 0, None, 12)]


@pytest.mark.parametrize("setting, says", [
    ({"TENSORTAP_RUN": "../x"}, "run id '../x' (run= or TENSORTAP_RUN) is not a valid one"),
    ({"TENSORTAP_CURVE_SERVER_KEY": "/nonexistent/srv.pub"}, "TENSORTAP_CURVE_SERVER_KEY='/nonexistent/srv.pub': "
                                                            "no such file"),
    ({"TENSORTAP_CURVE_SERVER_KEY": "short"}, "TENSORTAP_CURVE_SERVER_KEY: 5 characters where a public key"),
    ({"TENSORTAP_ENDPOINT": None, "TENSORTAP_OUT": __file__}, "test_tap.py' is a file; the artifact root is a folder"),
    # (a folder it cannot make or write: the warning named TENSORTAP_ENDPOINT)
    ({"TENSORTAP_ENDPOINT": None, "TENSORTAP_OUT": __file__ + "/runs"}, "test_tap.py/runs': cannot write there "
                                                                       "(Not a directory)"),
])
def test_a_wrong_setting_is_told_in_one_line_and_training_goes_on_without_telemetry(pull, monkeypatch,
                                                                                      setting, says):
    """A run id the collector would refuse (every frame rejected, the training told nothing),
    a CURVE server key that is none (a ZMQError "Invalid argument"), or an artifact root that
    is a file (the embedded collector's error named its own --out): one warning that names
    the setting; the training runs on, nothing is sent."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    for k, v in setting.items():
        if v is None:
            monkeypatch.delenv(k)
        else:
            monkeypatch.setenv(k, v)
    model = nn.Linear(4, 4)
    with pytest.warns(RuntimeWarning) as seen:
        with Tap() as tap:
            tap.watch(model)
            for _ in range(2):
                tap.log_batch(None)
                model(torch.randn(2, 4)).sum().backward()
                tap.log_loss(torch.tensor(1.0))
    (msg,) = [str(w.message) for w in seen]
    assert msg.startswith("tensortap: ") and says in msg and msg.endswith("training goes on without telemetry")
    time.sleep(0.3)
    assert pull.records == [] and not tap.enabled


def test_telemetry_errors_warn_once_and_never_reach_the_training_loop(pull, monkeypatch):
    from client_hooks import engine, stats

    monkeypatch.setattr(engine, "_warned", set())

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(stats, "tensor_stats_vector", boom)  # the torch path
    monkeypatch.setattr(stats, "fused_module", boom)  # the fused kernels' (CUDA, or the interpreter)
    model = small_cnn()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap() as tap:
            train(tap, model, epochs=2)
    messages = [str(x.message) for x in w]
    assert sum("activations telemetry failed" in m for m in messages) == 1
    assert sum("loader_stats telemetry failed" in m for m in messages) == 1
    assert pull.wait_for(lambda r: len([x for x in r if x["name"] == "loss"]) == 6)
    assert hook_counts(model) == 0


@pytest.mark.parametrize("steps_begun", [False, True])
def test_a_loop_that_never_begins_a_step_is_told_why_no_gradient_comes(pull, monkeypatch, steps_begun):
    """watch + log_loss without log_batch: only the loss can be recorded; one warning says
    what to call. With log_batch(None) the steps begin and the gradients come."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap() as tap:
            tap.watch(model, optimizer=opt)
            for _ in range(3):
                if steps_begun:
                    tap.log_batch(None)
                loss = model(torch.randn(2, 4)).pow(2).mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
                tap.log_loss(loss)
    said = [str(x.message) for x in w if "no training step has begun" in str(x.message)]
    assert pull.wait_for(lambda r: len([x for x in r if x["name"] == "loss"]) == 3)
    if steps_begun:
        assert said == []
        assert pull.wait_for(lambda r: {x["name"] for x in r if x["kind"] == "gradients"} >= {"0", "2"})
    else:
        assert len(said) == 1 and "tap.log_batch(batch)" in said[0]
        assert pull.find("gradients") == [] and pull.find("activations") == []


def test_a_transformer_block_from_torch_nn_works_unchanged(pull):
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    with Tap(all_leaves=True, inputs=True) as tap:
        tap.watch(layer, optimizer=opt)
        for i in range(2):
            x = torch.randn(3, 5, 16)
            tap.log_batch(x, epoch=0, batch_idx=i)
            layer(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert pull.wait_for(lambda r: any(x["name"] == "_total" for x in r))
    grads = {r["name"] for r in pull.find("gradients")}
    assert {"self_attn", "linear1", "linear2", "norm1", "norm2", "_total"} <= grads
    acts = {r["name"] for r in pull.find("activations")}
    assert {"linear1:output", "linear1:input", "norm2:output"} <= acts
    assert pull.find("loader_stats", "batch")[0]["data"]["shape"] == [3, 5, 16]
    assert hook_counts(layer) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_logged_loss_is_the_value_at_the_call_even_if_changed_in_place_after(pull, dtype):
    """A metric is read on the sender thread: what it reads is a copy made at the call."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    values = [0.1, -2.5, 3e5]
    with Tap() as tap:
        for step, v in enumerate(values):
            loss = torch.tensor(v, dtype=dtype, device=dev)
            tap.log_loss(loss, step=step)
            tap.log_metric("acc", torch.tensor([[v]], dtype=dtype, device=dev), step=step)
            tap.log_metric("lr", v / 10, step=step)
            tap.log_metric("not_a_scalar", torch.ones(2, device=dev), step=step)  # skipped
            loss.add_(1000.0)
    assert pull.wait_for(lambda r: len([x for x in r if x["kind"] == "metrics"]) == 9)
    want = [float(torch.tensor(v, dtype=dtype)) for v in values]
    for name in ("loss", "acc"):
        recs = sorted(pull.find("metrics", name), key=lambda r: r["step"])
        assert [r["data"]["value"] for r in recs] == want
    assert [r["data"]["value"] for r in sorted(pull.find("metrics", "lr"), key=lambda r: r["step"])] == \
        [v / 10 for v in values]
    assert not pull.find("metrics", "not_a_scalar")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_loss_logged_in_a_capture_step_goes_with_its_capture_and_keeps_its_value(pull, dtype):
    """Logged before the step ends, the loss is one more value of the capture's copy (one
    packed record: its seq follows the step's other records, its time is theirs), read as it
    was at the call."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    values = [0.1, -2.5, 3e5]
    with Tap(first_n=0, every_n_steps=1) as tap:
        tap.watch(model, optimizer=opt)
        for step, v in enumerate(values):
            tap.log_batch(torch.randn(4, 3), step=step)
            model(torch.randn(4, 3)).sum().backward()
            loss = torch.tensor(v, dtype=dtype)
            tap.log_loss(loss)
            loss.add_(1000.0)
            opt.step()
            opt.zero_grad()
    assert pull.wait_for(lambda r: len(pull.find("metrics", "loss")) == 3)
    recs = sorted(pull.find("metrics", "loss"), key=lambda r: r["step"])
    assert [r["data"] for r in recs] == [{"value": float(torch.tensor(v, dtype=dtype))} for v in values]
    assert [r["step"] for r in recs] == [0, 1, 2]
    for r in recs:
        same_step = [x for x in pull.records if x["step"] == r["step"] and x["kind"] != "events"]
        assert {x["kind"] for x in same_step} == {"loader_stats", "activations", "gradients", "metrics"}
        assert {x["t"] for x in same_step} == {r["t"]}  # one packed record
        seqs = sorted(x["seq"] for x in same_step)
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def named_model():
    from collections import OrderedDict

    return nn.Sequential(OrderedDict(encoder=nn.Linear(4, 4), act=nn.ReLU(), decoder=nn.Linear(4, 2)))


@pytest.mark.parametrize("kw,says", [
    ({"gradients": ["decodr"]}, "tensortap: gradients: Sequential has no submodule 'decodr'; did you mean 'decoder'?"),
    ({"gradients": "encoderr"},
     "tensortap: gradients: Sequential has no submodule 'encoderr'; did you mean 'encoder'?"),
    ({"activations": ["zzz"]}, "tensortap: activations: Sequential has no submodule 'zzz'; its modules start with "
                               "'encoder', 'act', 'decoder'"),
])
def test_a_module_path_that_is_not_there_is_one_clear_error_at_watch(pull, kw, says):
    with pytest.raises(ValueError) as e:
        Tap(**kw).watch(named_model())
    assert str(e.value) == says


def test_the_callback_finds_a_bad_module_path_before_it_opens_anything(pull):
    from types import SimpleNamespace

    from client_hooks import TapCallback, session

    cb = TapCallback(watch="decodr")
    says = "tensortap: watch: Sequential has no submodule 'decodr'; did you mean 'decoder'"
    with pytest.raises(ValueError, match=says):
        cb.setup(SimpleNamespace(global_rank=0, world_size=1), named_model(), "fit")
    cb2 = TapCallback(watch="decoder", gradients=["bias_typo"])
    says = "tensortap: gradients: Linear has no submodule 'bias_typo'; it has no submodules"
    with pytest.raises(ValueError, match=says):
        cb2.setup(SimpleNamespace(global_rank=0, world_size=1), named_model(), "fit")
    assert session._senders == {}  # no socket, no thread


def test_a_new_tap_after_the_last_one_closed_starts_its_own_run(tmp_path, monkeypatch):
    """A notebook cell run again, a second model trained after the first: with no run id
    given, each Tap after the previous ones have closed writes a new run (steps from 0 again
    in their own series), and the closed run gets its bye at once. Taps open together share
    one run; a given run id (run=, or TENSORTAP_RUN set beforehand) is always kept. A closed
    Tap ignores further calls, with one warning."""
    import os

    from client_hooks import engine, session
    from tests.procs import CollectorProc, manifest, read_jsonl, wait_for

    col = CollectorProc(str(tmp_path / "runs"))
    monkeypatch.setenv("TENSORTAP", "1")
    monkeypatch.setenv("TENSORTAP_ENDPOINT", col.endpoint)
    monkeypatch.setenv("TENSORTAP_RUN", "-")  # so that monkeypatch removes what session writes
    monkeypatch.delenv("TENSORTAP_RUN")
    monkeypatch.setattr(session, "_own_run", None, raising=False)
    monkeypatch.setattr(session, "_holders", 0, raising=False)
    monkeypatch.setattr(engine, "_warned", set())

    def fit(tap, steps=2):
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tap.watch(model, optimizer=opt)
        for i in range(steps):
            tap.log_batch({"x": torch.randn(4, 5)}, epoch=0, batch_idx=i)
            loss = model(torch.randn(4, 5)).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            tap.log_loss(loss)
        return tap.sender.run

    try:
        with Tap() as tap:
            first = fit(tap)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            tap.log_loss(torch.tensor(1.0))  # after close: ignored
            tap.log_loss(torch.tensor(2.0))
        assert sum("used after its close()" in str(x.message) for x in w) == 1
        # the first run is complete now, while this process still runs
        assert wait_for(lambda: os.path.exists(tmp_path / "runs" / first / "manifest.json")
                        and manifest(str(tmp_path / "runs" / first))["ranks"]["0"]["closed"])
        b, c = Tap(), Tap()  # open together: one run
        shared = fit(b)
        assert fit(c) == shared != first
        c.close()
        b.close()
        with Tap(run="named") as tap:
            assert fit(tap) == "named"
        with Tap() as tap:
            last = fit(tap)
        assert last not in (first, shared, "named")
        monkeypatch.setenv("TENSORTAP_RUN", "given")  # the user's: every Tap keeps it
        with Tap() as tap:
            assert fit(tap) == "given"
        with Tap() as tap:
            assert fit(tap) == "given"
    finally:
        for s in list(session._senders.values()):
            s.close()
        session._senders.clear()
        col.stop()
    runs = tmp_path / "runs"
    for run, taps in ((first, 1), (shared, 2), ("named", 1), (last, 1), ("given", 2)):
        m = manifest(str(runs / run))
        assert m["ranks"]["0"]["closed"] and m["totals"]["gaps"] == 0, run
        losses = read_jsonl(str(runs / run / "metrics.jsonl"))
        assert sorted(r["step"] for r in losses) == sorted([0, 1] * taps), run


def fresh_mlp(dev: str = "cpu") -> nn.Module:
    """The compile tests' model, seeded; torch.compile's caches emptied first, so no compiled
    code of an earlier test's model is reused."""
    torch.compiler.reset()
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(dev)


def in_disabled_call() -> bool:
    """Whether the caller runs inside torch.compiler.disable's wrapper (its frames are
    eval_frame.py's)."""
    import inspect

    return any(f.filename.endswith("eval_frame.py") for f in inspect.stack())


def train_steps(tap, model, opt, steps: int) -> None:
    """`steps` training steps of a model of 8 inputs, each begun by log_batch."""
    for _ in range(steps):
        tap.log_batch({"x": torch.randn(5, 8)}, epoch=0)
        model(torch.randn(5, 8)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


# torch's own, where a compiled graph resumes after a break on a non-leaf tensor
COMPILE_RESUME = "ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning"


@pytest.mark.filterwarnings(COMPILE_RESUME)
@pytest.mark.parametrize("dev", DEVICES)
def test_a_torch_compiled_model_gives_the_eager_models_statistics(pull, dev):
    """torch.compile (dynamo and AOT autograd; the aot_eager backend needs no C compiler):
    every other step captured, so the hooks come and go between compiled calls. tensortap's
    hooks are kept out of the compiled graph (a break, then an ordinary call). Each leaf's
    output and each layer's gradient equal the eager model's at the same step."""
    model = fresh_mlp(dev)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want_act, want_grad = {}, {}
    with Tap(first_n=0, every_n_steps=2, all_leaves=True, gradients="all") as tap:
        tap.watch(model, optimizer=opt)
        for step in range(6):
            x = torch.randn(5, 8, device=dev)
            with torch.no_grad():
                h = model[1](model[0](x)).double()
            want_act[step] = (h.mean().item(), h.std(unbiased=False).item(), h.min().item(), h.max().item())
            tap.log_batch({"x": x}, epoch=0)
            compiled(x).pow(2).mean().backward()
            g = torch.cat([model[2].weight.grad.ravel(), model[2].bias.grad.ravel()]).double()
            want_grad[step] = (g.norm().item(), g.abs().max().item())
            opt.step()
            opt.zero_grad()
        assert tap._engine._untraced and tap._engine._hooks.untraced  # torch.compile was in use
    assert hook_counts(model) == 0
    assert pull.wait_for(lambda r: len(pull.find("gradients", "2")) == 3)
    acts = {r["step"]: r["data"] for r in pull.find("activations", "1:output")}
    grads = {r["step"]: r["data"] for r in pull.find("gradients", "2")}
    assert sorted(acts) == sorted(grads) == [0, 2, 4]
    for step in (0, 2, 4):
        d = acts[step]
        assert [d["mean"], d["std"], d["min"], d["max"]] == pytest.approx(want_act[step], rel=1e-5, abs=1e-7)
        assert [grads[step]["norm"], grads[step]["max_abs"]] == pytest.approx(want_grad[step], rel=1e-5)


def test_an_untraced_call_goes_through_the_compilers_disable_only_inside_a_compiled_function():
    """hooks.untraced (record, log_batch, ... once the compiler is imported): in eager code the
    function is called as it is (torch.compiler.disable's wrapper costs ~1 us a call);
    reached while dynamo traces, it runs through that wrapper, outside the compiled graph."""
    from client_hooks.hooks import untraced

    call = untraced(in_disabled_call)
    assert call() is False and in_disabled_call() is False
    torch.compiler.reset()
    compiled = torch.compile(lambda x: (x + 1, call()), backend="eager")
    y, inside = compiled(torch.ones(2))
    assert inside is True and y.tolist() == [2.0, 2.0]
    assert call() is False


def test_a_hook_traced_into_a_compiled_forward_hands_its_value_over_and_breaks_no_graph():
    """Hooks.untrace: each hook checks compiling() itself (no wrapper around it). Called by an
    eager forward, a hook runs as it is (what the engine raises stays in the hook). Traced
    into a compiled forward it computes nothing and breaks no graph: the model is one graph,
    and at each call its code hands the hooks' values to Traced while `live` (the values the
    eager model gives), and nothing otherwise."""
    from client_hooks.hooks import Hooks, Traced

    seen = []

    def on_output(name, value):
        seen.append(name)
        if name == "1:output":
            raise RuntimeError("injected")
    model = fresh_mlp()
    errors, graphs = [], []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    hooks = Hooks([("0", model[0]), ("1", model[1])], True, on_output, root=model,
                  on_forward_done=lambda: seen.append("done"), on_error=errors.append)
    hooks.untrace()
    hooks.attach()
    model(torch.randn(2, 8))
    assert seen == ["0:input", "0:output", "1:input", "1:output", "done"] and len(errors) == 1
    seen.clear()
    compiled = torch.compile(model, backend=keep)
    for live in (True, False, True):
        hooks.traced.live = live
        x = torch.randn(2, 8)
        compiled(x)
        got = hooks.traced.take()
        assert seen == [] and len(errors) == 1 and not hooks.traced.full and hooks.traced.take() == []
        if not live:
            assert got == []
            continue
        with torch.no_grad():
            h0 = model[0].forward(x)
            want = [("0:input", x), ("0:output", h0), ("1:input", h0), ("1:output", model[1].forward(h0))]
        assert sorted((n, p, how, grad) for n, _, p, how, grad in got) == sorted(
            (n, None, Traced.HOOK, True) for n, _ in want)
        values = {n: v for n, v, _, _, _ in got}
        assert all(torch.equal(values[n], w) for n, w in want)
    ops = [sorted(str(n.target) for n in g.graph.nodes if n.op.startswith("call")) for g in graphs]
    assert len(graphs) == 2 and all(o == sorted(map(str, [nn.functional.linear] * 2 + [nn.functional.gelu]))
                                    for o in ops), ops
    hooks.detach()
    assert hook_counts(model) == 0


@pytest.mark.filterwarnings(COMPILE_RESUME)
def test_the_compiled_graphs_hold_only_the_models_own_operations(pull):
    """What dynamo compiles, seen by a backend that keeps each graph: with capture steps
    among the compiled calls, no statistic of tensortap's is traced into them (its hooks
    break the graph and run as they are), so they hold the model's operations alone."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = fresh_mlp()
    compiled = torch.compile(model, backend=keep)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tap(first_n=0, every_n_steps=2, all_leaves=True, gradients="all") as tap:
        tap.watch(model, optimizer=opt)
        train_steps(tap, compiled, opt, 6)
    # each graph the whole forward: one for capture steps, one for the others (hooks.Traced)
    ops = [sorted(str(n.target) for n in g.graph.nodes if n.op.startswith("call")) for g in graphs]
    whole = sorted(map(str, [nn.functional.linear, nn.functional.gelu, nn.functional.linear]))
    assert len(graphs) == 2 and all(o == whole for o in ops), ops
    assert pull.wait_for(lambda r: len(pull.find("activations", "1:output")) == 3)


def test_a_fullgraph_compiled_model_is_captured_without_a_compiler_error(pull):
    """torch.compile(fullgraph=True) raises at any graph break: the hooks and record() break
    none, so a capture step neither raises into training nor loses the values (the earlier
    graph-breaking hooks raised `Unsupported` here at the first capture step)."""
    ref = []
    torch.compiler.reset()
    torch.manual_seed(0)
    model = Recording(ref)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tap(first_n=0, every_n_steps=2, all_leaves=True, gradients="all") as tap:
        ref.append(tap)
        tap.watch(model, optimizer=opt)
        train_steps(tap, compiled, opt, 4)
    assert pull.wait_for(lambda r: len(pull.find("activations", "mid_always")) == 4)
    for name in ("a:output", "b:output", "mid"):
        assert [r["step"] for r in pull.find("activations", name)] == [0, 2], name


class Recording(nn.Module):
    """A model whose forward records a value of its own (tap.record) and one always."""

    def __init__(self, tap_ref: list):
        super().__init__()
        self.a, self.b, self.tap_ref = nn.Linear(8, 16), nn.Linear(16, 4), tap_ref

    def forward(self, x):
        h = nn.functional.gelu(self.a(x))
        self.tap_ref[0].record("mid", h * 2)
        self.tap_ref[0].record("mid_always", h - 1, always=True)
        return self.b(h)


def compiled_recording() -> tuple:
    """(graphs, tap_ref, model, compiled, opt): a Recording model compiled by a backend that
    keeps each graph it is given in `graphs`; tap_ref takes the Tap (seeded, caches emptied)."""
    graphs, ref = [], []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch.compiler.reset()
    torch.manual_seed(0)
    model = Recording(ref)
    return graphs, ref, model, torch.compile(model, backend=keep), torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.filterwarnings(COMPILE_RESUME)
def test_a_record_inside_a_compiled_forward_is_the_eager_value_and_breaks_no_graph(pull):
    """tap.record() inside a compiled forward: no graph break (hooks.Traced), the values equal
    the eager model's at the same step: in capture steps, and every step with always=True."""
    graphs, ref, model, compiled, opt = compiled_recording()
    want = {}
    with Tap(first_n=0, every_n_steps=2, gradients="all") as tap:
        ref.append(tap)
        tap.watch(model, optimizer=opt)
        for step in range(6):
            x = torch.randn(5, 8)
            with torch.no_grad():
                h = nn.functional.gelu(model.a(x)).double()
            want[step] = {"mid": h * 2, "mid_always": h - 1}
            tap.log_batch({"x": x}, epoch=0)
            compiled(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    ops = [sorted(str(n.target) for n in g.graph.nodes if n.op.startswith("call")) for g in graphs]
    assert graphs and all(o.count(str(nn.functional.linear)) == 2 for o in ops), ops
    assert pull.wait_for(lambda r: len(pull.find("activations", "mid_always")) == 6)
    for name, steps in (("mid", [0, 2, 4]), ("mid_always", [0, 1, 2, 3, 4, 5])):
        got = {r["step"]: r["data"] for r in pull.find("activations", name)}
        assert sorted(got) == steps, (name, sorted(got))
        for step in steps:
            w = want[step][name]
            assert [got[step][k] for k in ("mean", "min", "max")] == pytest.approx(
                [w.mean().item(), w.min().item(), w.max().item()], rel=1e-5, abs=1e-7)


@pytest.mark.filterwarnings(COMPILE_RESUME)
def test_a_compiled_model_called_many_times_a_step_compiles_once_and_keeps_the_eager_rules(pull):
    """A compiled model called again and again before tensortap takes the values (a rollout or
    micro-batches in one capture step; an evaluation loop with record(always=True) between
    steps): no recompilation at each call (the values were a list that grew, and dynamo
    guards on a list's length: 8 graphs, then the recompile limit). In a capture step each
    name keeps the last call's value, as an eager model's capture does, and an evaluation
    forward under no_grad after the training forward does not replace its values; outside,
    each evaluation batch begun by log_batch gets its own always=True record."""
    graphs, ref, model, compiled, opt = compiled_recording()
    evals, probe = [torch.randn(3, 8) for _ in range(10)], torch.full((2, 8), 100.0)
    want = {}
    with Tap(first_n=2, gradients="all", all_leaves=True) as tap:
        ref.append(tap)
        tap.watch(model, optimizer=opt)
        for step in range(2):  # (from the second, the values are taken inside backward)
            xs = [torch.randn(5, 8) for _ in range(12)]
            tap.log_batch({"x": xs[0]}, epoch=0)
            loss = sum(compiled(x).pow(2).mean() for x in xs)  # 12 calls in the capture step
            with torch.no_grad():
                compiled(probe)  # an evaluation forward, after training's
            loss.backward()
            with torch.no_grad():
                # a hook's value: the training forward's; a record: the last call's (as in eager code)
                want[step] = {"a:output": model.a(xs[-1]), "mid": nn.functional.gelu(model.a(probe)) * 2}
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            want_eval = [nn.functional.gelu(model.a(x)) - 1 for x in evals]
        compiled_in_steps = len(graphs)
        with torch.no_grad():
            for i, x in enumerate(evals):  # outside capture steps
                tap.log_batch({"x": x}, split="val", batch_idx=i)
                compiled(x)
        tap.log_batch({"x": xs[0]}, epoch=0)  # a next step (not captured): takes the last batch's
    # a capture step's variants: under grad (compiled again once: the first call made the
    # record names' slots) and under no_grad; then the plain steps' (the old code: 8, the limit)
    assert compiled_in_steps <= 3 and len(graphs) <= 4, (compiled_in_steps, len(graphs))
    assert pull.wait_for(lambda r: len(pull.find("activations", "mid_always")) == 12)
    for step in range(2):
        for name, w in want[step].items():
            (got,) = [r for r in pull.find("activations", name) if r["step"] == step]
            assert got["data"]["count"] == w.numel() and [got["data"][k] for k in ("mean", "max")] == \
                pytest.approx([w.double().mean().item(), w.max().item()], rel=1e-5), (step, name)
    evals_got = sorted((r for r in pull.find("activations", "mid_always") if r["step"] == 1 and
                        r["data"]["count"] == 3 * 16), key=lambda r: r["seq"])
    assert [r["data"]["mean"] for r in evals_got] == pytest.approx(
        [w.double().mean().item() for w in want_eval], rel=1e-5)
    # the evaluation's records say so (the first one's too, taken at the second batch's log_batch);
    # the training forwards' do not
    assert [r["data"].get("split") for r in evals_got] == ["val"] * 10
    assert all("split" not in r["data"] for r in pull.find("activations", "mid_always") if r not in evals_got)


@pytest.mark.filterwarnings(COMPILE_RESUME)
def test_a_compiled_evaluations_last_batch_keeps_its_split_and_epoch(pull):
    """record(always=True) in a compiled forward is taken at the next tensortap call: the last
    evaluation batch of an epoch at epoch_end (or the next epoch_start), in its own split and
    epoch (it was taken at the next log_batch, after epoch_start had moved the epoch on)."""
    graphs, ref, model, compiled, opt = compiled_recording()
    with Tap(first_n=1) as tap:
        ref.append(tap)
        tap.watch(model, optimizer=opt)
        for epoch in range(2):
            tap.epoch_start(epoch)
            tap.log_batch({"x": torch.randn(5, 8)}, epoch=epoch)
            compiled(torch.randn(5, 8)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for i in range(2):
                    tap.log_batch(None, split="val", batch_idx=i)
                    compiled(torch.randn(3, 8))
            if epoch == 0:
                tap.epoch_end(epoch)  # (the second epoch has none: its last batch is taken at close)
    assert pull.wait_for(lambda r: len([x for x in pull.find("activations", "mid_always")
                                        if x["data"]["count"] == 3 * 16]) == 4)
    evals = sorted((r for r in pull.find("activations", "mid_always") if r["data"]["count"] == 3 * 16),
                   key=lambda r: r["seq"])
    assert [(r["epoch"], r["step"], r["data"].get("split")) for r in evals] == [(0, 0, "val")] * 2 + [(1, 1, "val")] * 2


@pytest.mark.filterwarnings(COMPILE_RESUME)
def test_the_records_of_a_compiled_model_carry_its_own_module_paths(pull):
    """torch.compile wraps the model (OptimizedModule), which puts an `_orig_mod` step into
    the paths of its modules. The records name the modules as the model's code does, the
    default targets are the wrapped model's children, and paths given in the model's own
    terms are found."""
    inner = fresh_mlp()
    whole = torch.compile(inner, backend="aot_eager")  # watched as it is
    part = nn.ModuleDict({"net": torch.compile(nn.Sequential(nn.Linear(8, 4), nn.Tanh()), backend="aot_eager")})
    with Tap(every_n_steps=1, gradients="all") as tap:
        tap.watch(whole)
        tap.log_batch(None)
        whole(torch.randn(5, 8)).sum().backward()
    with Tap(every_n_steps=1, all_leaves=True, gradients=["net.0"]) as tap:
        tap.watch(part)
        tap.log_batch(None)
        part["net"](torch.randn(5, 8)).sum().backward()
    want_acts = {"0:output", "1:output", "2:output", "net.0:output", "net.1:output"}
    want_grads = {"0", "2", "_total", "net.0"}

    def names(kind):
        return {r["name"] for r in pull.find(kind)}
    assert pull.wait_for(lambda r: names("activations") >= want_acts and names("gradients") >= want_grads)
    assert names("activations") == want_acts and names("gradients") == want_grads


@pytest.mark.filterwarnings(COMPILE_RESUME)
def test_a_model_compiled_before_the_hooks_existed_is_told_and_keeps_its_gradients(pull, monkeypatch):
    """Compiled code keeps the module hooks it was compiled with: a model compiled (called)
    before the first capture step never runs tensortap's forward hooks. One warning says why
    no activation comes; the gradients, read from the parameters, are still recorded."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    model = fresh_mlp()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(torch.randn(5, 8)).sum().backward()  # compiled with no hook
    model.zero_grad()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    norms = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap(every_n_steps=1, all_leaves=True, gradients="all") as tap:
            tap.watch(model, optimizer=opt)
            for _ in range(3):
                tap.log_batch({"x": torch.randn(5, 8)}, epoch=0)
                compiled(torch.randn(5, 8)).pow(2).mean().backward()
                norms.append(model[0].weight.grad.double().norm().item())
                opt.step()
                opt.zero_grad()
    said = [str(x.message) for x in w if "none of its forward hooks ran" in str(x.message)]
    assert len(said) == 1 and "torch.compile" in said[0] and "model.forward(x)" in said[0]
    assert pull.wait_for(lambda r: len(pull.find("gradients", "0")) == 3)
    assert not pull.find("activations")
    got = sorted(pull.find("gradients", "0"), key=lambda r: r["step"])
    # the layer's gradients are its weight's and bias's: at least the weight's norm
    assert all(r["data"]["norm"] >= n * (1 - 1e-6) > 0 for r, n in zip(got, norms))


def test_a_model_watched_compiled_is_captured_after_compiled_calls_outside_any_step(pull):
    """tap.watch() of a torch.compile'd model: its hooks go on at once and stay, so compiled
    calls before the first step (a warm-up) compile them in, and the capture steps after get
    every leaf's output. (Watching the uncompiled model instead: the test above.)"""
    model = fresh_mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Tap(every_n_steps=1, all_leaves=True, gradients="all") as tap:
        tap.watch(compiled, optimizer=opt)
        for _ in range(2):  # a warm-up: compiled with tensortap's hooks on, outside any step
            compiled(torch.randn(5, 8)).sum().backward()
            model.zero_grad()
        train_steps(tap, compiled, opt, 2)
    assert hook_counts(model) == 0
    assert pull.wait_for(lambda r: len(pull.find("activations", "2:output")) == 2)
    for name in ("0:output", "1:output", "2:output"):
        assert [r["step"] for r in pull.find("activations", name)] == [0, 1], name


def test_a_step_begun_after_the_forward_is_told_why_no_activation_comes(pull, monkeypatch):
    """log_batch after the model's forward: the hooks come too late for the activations; the
    gradients still come, and one warning names the likely causes."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap(every_n_steps=1, all_leaves=True) as tap:
            tap.watch(model, optimizer=opt)
            for _ in range(3):
                out = model(torch.randn(2, 4))
                tap.log_batch(None)  # too late for this step's forward
                out.pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
    said = [str(x.message) for x in w if "none of its forward hooks ran" in str(x.message)]
    assert len(said) == 1 and "log_batch" in said[0]
    assert pull.wait_for(lambda r: len(pull.find("gradients", "0")) == 3)
    assert not pull.find("activations")


def test_a_process_that_never_compiles_does_not_import_the_compiler(pull):
    """Keeping tensortap out of torch.compile's tracing needs its compiler (~1 s to import):
    a gated-on process that neither compiles nor makes a torch.optim optimizer (which
    imports it) captures without importing it."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch\nfrom torch import nn\nfrom client_hooks import Tap\n"
            "m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))\n"
            "with Tap(every_n_steps=1, all_leaves=True) as tap:\n"
            "    tap.watch(m)\n"
            "    for _ in range(2):\n"
            "        tap.log_batch(None)\n"
            "        tap.record('x', torch.ones(3))\n"
            "        m(torch.randn(2, 4)).sum().backward()\n"
            "print('compiler imported:', 'torch._dynamo' in sys.modules)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # (the caller's path kept: where pyzmq and msgspec lie outside site-packages, e.g. a GPU host)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiler imported: False" in out.stdout
    assert pull.wait_for(lambda r: len(pull.find("activations", "x")) == 2)


def test_odd_values_from_user_code_are_recorded_or_refused_in_one_line(pull):
    """NumPy and 0-d tensor steps and epochs, NumPy and complex scalars, a dict of tensors
    are recorded; a value that cannot be (an object, a vector or None as a metric, a
    fractional epoch) is refused with one line each, and nothing else is lost: the sender
    lives on and the run's records are numbered without a gap."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tap(first_n=0, every_n_steps=1) as tap:
            tap.watch(model, optimizer=opt)
            tap.epoch_start(np.int64(0))
            for step in range(3):
                tap.log_batch(torch.randn(4, 3), step=np.int64(step))
                model(torch.randn(4, 3)).sum().backward()
                tap.record("np_scalar", np.float32(1.5))
                tap.record("py_complex", 1 + 2j)
                tap.record("parts", {"a": torch.ones(2), "b": torch.zeros(3)})
                tap.record("thing", object())
                tap.log_metric("lr", np.float32(0.25))
                tap.log_metric("acc", np.int64(3), step=torch.tensor(step))
                tap.log_metric("vec", torch.ones(3))
                tap.log_metric("nothing", None)
                tap.log_metric("complex", torch.tensor(3 + 4j))
                tap.log_metric("frac", 1.0, epoch=step / 10 + 0.05)
                tap.log_loss(torch.tensor(0.5))
                opt.step()
                opt.zero_grad()
            tap.epoch_end(torch.tensor(0))
            sender = tap.sender
    assert pull.wait_for(lambda r: len(pull.find("events", "epoch_end")) == 1)
    assert [r["data"]["value"] for r in pull.find("metrics", "lr")] == [0.25] * 3
    assert sorted((r["step"], r["data"]["value"]) for r in pull.find("metrics", "acc")) == \
        [(0, 3.0), (1, 3.0), (2, 3.0)]
    assert len(pull.find("metrics", "loss")) == 3
    assert not [r for r in pull.find("metrics") if r["name"] in ("vec", "nothing", "frac", "complex")]
    assert [r["data"] for r in pull.find("activations", "np_scalar")] == [{"value": 1.5}] * 3
    assert {r["data"]["imag"]["mean"] for r in pull.find("activations", "py_complex")} == {2.0}
    assert [r["data"]["count"] for r in pull.find("activations", "parts.b")] == [3] * 3
    assert len(pull.find("activations", "parts.a")) == 3 and not pull.find("activations", "thing")
    assert [r["data"] for r in pull.find("events", "epoch_start") + pull.find("events", "epoch_end")] == \
        [{"epoch": 0}, {"epoch": 0}]
    assert sorted(r["step"] for r in pull.find("loader_stats")) == [0, 1, 2]
    seqs = sorted(r["seq"] for r in pull.records)
    assert seqs == list(range(len(seqs))) and sender.dropped == 0
    said = [str(w.message) for w in caught if "tensortap" in str(w.message)]
    must = "a value must be a real number or a one-element real tensor, got"
    for text in ("record('thing'): a value must be a tensor, a NumPy array or a number, got object",
                 f"log_metric('vec'): {must} a tensor of 3 elements", f"log_metric('nothing'): {must} NoneType",
                 f"log_metric('complex'): {must} a complex tensor", "epoch must be a whole number, got 0.05"):
        assert sum(text in m for m in said) == 1, (text, said)


def test_a_wrong_pair_is_refused_for_that_call_only(pull):
    """A pair that does not fit the value is refused in one line and not kept: the same
    name with a right pair is then recorded as that pair."""
    model = nn.Linear(3, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tap(first_n=0, every_n_steps=1) as tap:
            tap.watch(model)
            for step, dim in enumerate([2, 1, 1]):
                tap.log_batch(None, step=step)
                tap.record("field", torch.randn(4, 2, 5), pair=("real_imag", dim))
                tap.step_end()
    assert pull.wait_for(lambda r: len(pull.find("activations", "field")) == 2)
    assert sorted(r["step"] for r in pull.find("activations", "field")) == [1, 2]
    assert all(r["data"]["shape"] == [4, 5] and "real" in r["data"] for r in pull.find("activations", "field"))
    said = [str(w.message) for w in caught if "real_imag pair" in str(w.message)]
    assert said == ["tensortap: record('field'): a real_imag pair needs size 2 along dim 2, got shape (4, 2, 5); "
                    "the call is ignored"]


def test_watching_again_moves_every_hook_to_the_new_model(pull):
    """watch() a second time (a notebook cell run again, another model) while hooks are on:
    the step under way ends with the first model's records, and the first model and its
    optimizer keep no hook, during the run or after close."""
    m1, m2 = nn.Linear(3, 2), nn.Linear(3, 2)
    o1, o2 = torch.optim.SGD(m1.parameters(), lr=0.1), torch.optim.SGD(m2.parameters(), lr=0.1)
    x = torch.randn(4, 3)
    with Tap(first_n=0, every_n_steps=1) as tap:
        tap.watch(m1, optimizer=o1)
        tap.log_batch(x, step=0)
        m1(x).sum().backward()
        assert hook_counts(m1) > 0 and len(o1._optimizer_step_post_hooks) == 1
        tap.watch(m2, optimizer=o2)
        assert hook_counts(m1) == 0 and not o1._optimizer_step_post_hooks
        for step in (1, 2):
            tap.log_batch(x, step=step)
            m2(x).sum().backward()
            o2.step()
            o2.zero_grad()
            m1(x)  # no longer watched: not recorded
    assert hook_counts(m1) == 0 and hook_counts(m2) == 0
    assert pull.wait_for(lambda r: len(pull.find("gradients")) >= 4)
    assert sorted(r["step"] for r in pull.find("activations")) == [0, 1, 2]


def test_patch_metrics_refuses_shapes_that_do_not_line_up_in_one_line(pull):
    """(4, 3) against (3, 4) has the same count but compares other elements: refused. A
    size-1 channel on one side only lines up, and is compared."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Tap() as tap:
            tap.patch_metrics(torch.rand(4, 3), torch.rand(3, 4), name="transposed")
            pred = torch.rand(2, 1, 4, 4)
            tap.patch_metrics(pred, pred[:, 0] * 2, name="channel")
            # NumPy arrays are taken (an AttributeError muted every later patch_metrics error)
            tap.patch_metrics(pred.numpy(), pred.numpy() * 3, name="numpy")
            tap.patch_metrics([1.0], pred, name="list")
    assert pull.wait_for(lambda r: len(pull.find("patch_metrics", "numpy")) == 1)
    assert pull.find("patch_metrics", "numpy")[0]["data"]["optimal_scale"] == pytest.approx(3.0)
    assert any("patch_metrics('list'): pred and target must be tensors or NumPy arrays" in str(w.message)
               for w in caught)
    assert pull.wait_for(lambda r: len(pull.find("patch_metrics", "channel")) == 1)
    assert pull.find("patch_metrics", "channel")[0]["data"]["optimal_scale"] == pytest.approx(2.0)
    assert not pull.find("patch_metrics", "transposed")
    said = [str(w.message) for w in caught if "patch_metrics needs" in str(w.message)]
    assert said == ["tensortap: patch_metrics needs pred and target of one shape (size-1 dims aside), got "
                    "(4, 3) and (3, 4); the call is ignored"]


class _TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied: one parameter, two modules own it

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))))


@pytest.mark.parametrize("gradients", ["all", None])  # "all" lists the tied weight under emb and head
def test_a_tied_parameter_counts_once_in_the_total_norm(pull, gradients):
    torch.manual_seed(0)
    model = _TiedLM()
    totals = []
    with Tap(every_n_steps=1, gradients=gradients) as tap:
        tap.watch(model)
        for step in range(2):
            ids = torch.randint(0, 10, (6,))
            tap.log_batch(ids, step=step)
            model(ids).pow(2).mean().backward()
            totals.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9).item())
            model.zero_grad()
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 2)
    got = [r["data"]["norm"] for r in sorted(pull.find("gradients", "_total"), key=lambda r: r["step"])]
    assert got == pytest.approx(totals, rel=1e-5)
    assert {r["name"] for r in pull.find("gradients")} >= {"emb", "head"}


def test_an_evaluation_forward_under_no_grad_in_the_step_does_not_replace_trainings(pull):
    """No optimizer watched, so the step lasts until the next batch; a no_grad forward on
    other data within it (a quick check of the model) leaves the training forward's values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want = []
    with Tap(first_n=0, every_n_steps=1, all_leaves=True) as tap:
        tap.watch(model)
        for step in range(2):
            tap.log_batch(None, step=step)
            out = model(torch.randn(8, 3))
            want.append(float(out.detach().mean()))
            out.sum().backward()
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                model(torch.full((2, 3), 5.0))
    assert pull.wait_for(lambda r: len(pull.find("activations", "2:output")) == 2)
    recs = sorted(pull.find("activations", "2:output"), key=lambda r: r["step"])
    assert [r["data"]["count"] for r in recs] == [16, 16]
    assert [r["data"]["mean"] for r in recs] == pytest.approx(want, rel=1e-5)
    assert {r["data"]["count"] for r in pull.find("activations", "0:output")} == {32}


def test_with_a_list_of_optimizers_each_layer_gets_its_real_update_ratio(pull):
    """An optimizer for the first layer and one for the last, both watched: the step ends
    once both have stepped (it ended at the first: the other's layer read update_ratio 0,
    'frozen parameters')."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    last = torch.optim.Adam(model[2].parameters(), lr=0.01)
    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()]).clone()  # noqa: E731
    want = []
    with Tap(first_n=0, every_n_steps=1) as tap:
        tap.watch(model, optimizer=[first, last])
        for step in range(2):
            tap.log_batch(None, step=step)
            before = {"0": flat(model[0]), "2": flat(model[2])}
            model(torch.randn(8, 3)).pow(2).mean().backward()
            first.step()
            last.step()
            first.zero_grad()
            last.zero_grad()
            want.append({k: float((flat(model[int(k)]) - w).norm() / w.norm()) for k, w in before.items()})
    assert pull.wait_for(lambda r: len([x for x in pull.find("gradients") if x["name"] != "_total"]) == 4)
    for r in pull.find("gradients"):
        if r["name"] != "_total":
            assert r["data"]["update_ratio"] == pytest.approx(want[r["step"]][r["name"]], rel=1e-4), r


def test_a_watched_optimizer_that_did_not_step_leaves_its_layers_without_an_update_ratio(pull):
    """An optimizer each, the second accumulating (it steps every other batch): in a capture
    step without its step, its layer has no update ratio (it read 0.0, and the diagnosis said
    'frozen parameters'), the other layer its real one."""
    from collector.diagnosis.gradients import dead_parameters

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    last = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with Tap(first_n=0, every_n_steps=1) as tap:
        tap.watch(model, optimizer=[first, last])
        for step in range(4):
            tap.log_batch(None, step=step)
            model(torch.randn(8, 4)).pow(2).mean().backward()
            first.step()
            first.zero_grad()
            if step % 2 == 1:
                last.step()
                last.zero_grad()
    assert pull.wait_for(lambda r: len([x for x in pull.find("gradients") if x["name"] != "_total"]) == 8)
    ratio = {(r["step"], r["name"]): r["data"]["update_ratio"]
             for r in pull.find("gradients") if r["name"] != "_total"}
    assert [ratio[(s, "2")] is None for s in range(4)] == [True, False, True, False]
    assert all(ratio[(s, "0")] > 0 for s in range(4)) and ratio[(1, "2")] > 0
    assert dead_parameters(pull.records) == []


class Names(enum.StrEnum):
    ACC = "acc"


def test_a_name_the_collector_refuses_is_dropped_alone_with_one_warning(tmp_path, monkeypatch):
    """A record's name must be text of 1 to 256 characters (collector.wire.Name). Before, the
    client sent such a record in a frame with many others, and the collector refused the
    frame whole: one log_metric("", x) at step 5 of 30 lost 137 of 242 records, every stream
    of steps 0-16, with no warning. Now the client drops that record alone, and says so once."""
    from client_hooks import engine
    from tests.procs import CollectorProc, manifest, read_jsonl, wait_for

    col = CollectorProc(str(tmp_path / "runs"))
    monkeypatch.setenv("TENSORTAP", "1")
    monkeypatch.setenv("TENSORTAP_ENDPOINT", col.endpoint)
    monkeypatch.setattr(engine, "_warned", set())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    long = "k" * 257
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            with Tap(run="names", every_n_steps=1) as tap:
                tap.watch(model, optimizer=opt)
                for i in range(12):
                    tap.log_batch({"x": x, long: x}, epoch=0, batch_idx=i)
                    out = model(x)
                    if i == 5:
                        tap.log_metric("", 0.5)
                        tap.log_metric(3, 0.5)
                        tap.log_metric("lr", 0.1)
                        tap.log_metric(Names.ACC, 0.9)  # a StrEnum member is text (a first version refused it)
                        tap.record(long, out)
                        tap.record(None, out)
                        tap.record("fine", {"a": out, long: out})
                        tap.patch_metrics(out.abs(), out.abs(), name="")
                    loss = out.pow(2).mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                    tap.log_loss(loss)
        said = [str(m.message) for m in w if "a name must be text of 1 to 256 characters" in str(m.message)]
        assert len(said) == 7, said  # one a call and name (log_batch's field once, not each step)
        assert any(s.startswith("tensortap: log_metric(''):") for s in said), said
        # each names the user's line, not tensortap's wrappers (hooks.py:233 before)
        assert {m.filename for m in w if "a name must be" in str(m.message)} == {__file__}
        run = tmp_path / "runs" / "names"
        assert wait_for(lambda: os.path.exists(run / "manifest.json") and manifest(str(run))["ranks"]["0"]["closed"])
    finally:
        col.stop()
    m = manifest(str(run))
    assert m["totals"]["gaps"] == 0 and m["totals"].get("rejected", 0) == 0, m["totals"]
    assert not (tmp_path / "runs" / "_rejected.jsonl").exists()
    metrics = read_jsonl(run / "metrics.jsonl")
    assert sorted(r["step"] for r in metrics if r["name"] == "loss") == list(range(12))
    assert [r["step"] for r in metrics if r["name"] == "lr"] == [5]
    assert [r["data"]["value"] for r in metrics if r["name"] == "acc"] == [0.9]
    acts = {r["name"] for r in read_jsonl(run / "activations.jsonl")}
    assert "fine.a" in acts and not any(len(n) > 256 for n in acts)
    assert {r["name"] for r in read_jsonl(run / "loader_stats.jsonl")} == {"x"}


def test_a_batch_field_torch_cannot_take_as_it_is_is_copied_or_skipped_alone(pull, monkeypatch):
    """A flipped NumPy array (np.fliplr: negative strides), another byte order or long double
    is measured on a copy; a NumPy float64 is a number (it is a float subclass, which the wire
    refused); a sparse tensor is this field's one warning; a meta tensor holds no values. Before,
    one such field lost every field of every batch for the run ("loader_stats telemetry
    failed", telling the user to copy their array), and np.float64 values were dropped."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    a = np.arange(12, dtype=np.float32).reshape(3, 4) ** 1.5
    batch = {"x": torch.ones(2, 3), "flip": np.fliplr(a), "be": a.astype(">f4"), "ld": a.astype(np.longdouble),
             "w": np.float64(0.5), "sp": torch.eye(3).to_sparse(), "meta": torch.empty(2, device="meta")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch says quantized tensors are deprecated)
        batch["q"] = torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8)
    model = nn.Linear(3, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap() as tap:
            tap.watch(model)
            for i in range(2):
                tap.epoch_start(i)
                tap.log_batch(batch, epoch=i, batch_idx=0)
                tap.record("lr_scale", np.float64(2.0))
                model(torch.ones(2, 3)).sum().backward()
                tap.epoch_end(i)
    said = [str(m.message) for m in w if "tensortap" in str(m.message)]
    assert said == ["tensortap: batch field 'sp' cannot be measured (a sparse_coo tensor); it is not recorded",
                    "tensortap: batch field 'q' cannot be measured (a quantized tensor); it is not recorded"], said
    assert pull.wait_for(lambda r: len(pull.find("loader_stats", "flip")) == 2)
    assert tap.sender.dropped == 0
    names = {r["name"] for r in pull.find("loader_stats")}
    assert names >= {"x", "flip", "be", "ld", "w"} and not names & {"sp", "meta", "q"}, names
    want = a.astype(np.float64)
    for name in ("flip", "be", "ld"):
        d = pull.find("loader_stats", name)[0]["data"]
        assert d["count"] == 12 and d["max"] == pytest.approx(want.max()), name
        assert d["mean"] == pytest.approx(want.mean()) and d["std"] == pytest.approx(want.std(), rel=1e-5), name
    assert pull.find("loader_stats", "w")[0]["data"]["value"] == 0.5
    # a batch past the field or depth limits: the first ones recorded, and one line says so
    deep = torch.ones(2)
    for _ in range(10):
        deep = {"k": deep}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap() as tap:
            tap.log_batch({f"f{i}": torch.ones(2) for i in range(300)}, epoch=0, batch_idx=0)
            tap.log_batch(deep, epoch=0, batch_idx=1)
    said = [str(m.message) for m in w if "tensortap" in str(m.message)]
    assert said == ["tensortap: log_batch records at most 256 fields, at most 8 levels down; this batch has "
                    "more (from 'f256' on, not recorded)"], said
    from client_hooks.fields import walk

    deep, cut = "a note", []  # what would not be recorded anyway is no cut
    for _ in range(10):
        deep = {"k": deep}
    assert walk(deep, cut=cut) == [] and cut == []
    assert walk({f"f{i}": "x" for i in range(300)}, cut=cut) == [] and cut == []
    assert pull.wait_for(lambda r: len(pull.find("activations", "lr_scale")) == 2)
    assert pull.find("activations", "lr_scale")[0]["data"]["value"] == 2.0
    # record() of a sparse tensor: its own warning, and the other values of the step still go
    # (it was "activations telemetry failed", which muted every later activations error)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap(every_n_steps=1) as tap:
            tap.watch(model)
            for i in range(2):
                tap.log_batch(None, epoch=5, batch_idx=i)
                tap.record("adj", torch.eye(3).to_sparse())
                tap.record("dense_after", torch.ones(3))
                model(torch.ones(2, 3)).sum().backward()
    said = [str(m.message) for m in w if "tensortap" in str(m.message)]
    assert said == ["tensortap: record('adj') cannot be measured (a sparse_coo tensor); it is not recorded"], said
    assert pull.wait_for(lambda r: len(pull.find("activations", "dense_after")) == 2)
    assert not pull.find("activations", "adj")


@pytest.mark.parametrize("gradients", ["all", "ends"])
def test_a_sparse_gradient_is_measured_as_its_dense_values_and_the_other_layers_too(pull, gradients):
    """nn.Embedding(sparse=True) gives a sparse gradient. Before, reading it raised, and every
    layer's gradient records were lost for the run (the report then said no_gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1))
    opts = [torch.optim.SparseAdam(model[0].parameters(), lr=0.01), torch.optim.SGD(model[1].parameters(), lr=0.1)]
    idx = torch.randint(0, 50, (16,))
    want = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap(every_n_steps=1, gradients="all" if gradients == "all" else None) as tap:
            tap.watch(model, optimizer=opts)
            for i in range(3):
                tap.log_batch({"idx": idx}, epoch=0, batch_idx=i)
                model(idx).pow(2).mean().backward()
                dense = [p.grad.to_dense() for p in model.parameters()]
                lin = torch.cat([dense[1].reshape(-1), dense[2]])
                want.append(({"0": dense[0].norm().item(), "1": lin.norm().item()},
                             torch.cat([d.reshape(-1) for d in dense]).norm().item()))
                for o in opts:
                    o.step()
                for o in opts:
                    o.zero_grad()
                tap.log_loss(torch.tensor(1.0))
    assert not [m for m in w if "tensortap" in str(m.message)], [str(m.message) for m in w]
    assert pull.wait_for(lambda r: len(pull.find("gradients", "1")) == 3)
    for layer in ("0", "1"):
        got = sorted(pull.find("gradients", layer), key=lambda r: r["step"])
        assert [r["data"]["norm"] for r in got] == pytest.approx([x[0][layer] for x in want], rel=1e-5), layer
    assert pull.find("gradients", "0")[0]["data"]["count"] == 50 * 8
    total = sorted(pull.find("gradients", "_total"), key=lambda r: r["step"])
    assert [r["data"]["norm"] for r in total] == pytest.approx([x[1] for x in want], rel=1e-5)


def test_gradients_are_read_when_the_loss_uses_not_the_first_output_and_no_optimizer_is_watched(pull):
    """A model returning {"aux": side head, "logits": ...}, the loss on "logits", no optimizer
    given to watch, and zero_grad() after step(): every capture step had no gradients (the end
    of backward was looked for on "aux" alone, and read late they were zeroed), and the report
    said no_gradient. Now each output the forward made is hooked. A parameter the model
    returns as it is gets no hook: one on a leaf stays for good (one more each capture)."""
    torch.manual_seed(0)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.head, self.aux = nn.Linear(4, 8), nn.Linear(8, 2), nn.Linear(4, 1)
            self.log_var = nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return {"aux": self.aux(x), "logits": self.head(self.enc(x).relu()), "log_var": self.log_var}

    model = M()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    with Tap(every_n_steps=2, gradients="all") as tap:
        tap.watch(model)
        for step in range(8):
            tap.log_batch({"x": x}, epoch=0, batch_idx=step)
            out = model(x)
            loss = out["logits"].pow(2).mean() + out["log_var"].sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            tap.log_loss(loss)
    assert not model.log_var._backward_hooks
    assert pull.wait_for(lambda r: {x["step"] for x in pull.find("gradients", "enc")} >= {0, 2, 4, 6})
    assert sorted({x["step"] for x in pull.find("gradients", "enc")}) == [0, 2, 4, 6]


@pytest.mark.parametrize("gradients", ["all", None])
def test_a_layer_unfrozen_after_watch_is_watched_and_counted_in_the_total_norm(pull, gradients):
    """Fine-tuning unfreezes a layer during training. The layers were chosen, and the total
    norm's parameters fixed, when the model was watched: the unfrozen layer was never
    recorded, and `_total` left it out (0.136 recorded against a true 0.166)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    true = []
    with Tap(every_n_steps=1, gradients=gradients) as tap:
        tap.watch(model, optimizer=opt)
        for i in range(4):
            if i == 2:
                model[0].requires_grad_(True)
            tap.log_batch({"x": x}, epoch=0, batch_idx=i)
            model(x).pow(2).mean().backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            true.append(torch.nn.utils.get_total_norm(grads).item())
            opt.step()
            opt.zero_grad()
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 4)
    total = sorted(pull.find("gradients", "_total"), key=lambda r: r["step"])
    assert [r["data"]["norm"] for r in total] == pytest.approx(true, rel=1e-5)
    assert sorted(r["step"] for r in pull.find("gradients", "0")) == [2, 3]
    assert sorted(r["step"] for r in pull.find("gradients", "2")) == [0, 1, 2, 3]


def test_watching_a_second_model_says_it_replaces_the_first_and_a_module_of_both_works(pull, monkeypatch):
    """A GAN's G and D watched one after the other: only D was recorded, with no word. Now
    the second watch says so, and the way it names (a module holding both) records both."""
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    d = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    og, od = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap(every_n_steps=1, gradients="all") as tap:
            tap.watch(g, optimizer=og)
            tap.watch(g, optimizer=og)  # the same model again: nothing to say
            tap.watch(nn.ModuleDict({"G": g, "D": d}), optimizer=[og, od])
            for i in range(2):
                tap.log_batch(None, epoch=0, batch_idx=i)
                fake = g(torch.randn(16, 2))
                ld = d(torch.randn(16, 2) + 3).mean() - d(fake.detach()).mean()
                od.zero_grad()
                ld.backward()
                od.step()
                lg = -d(fake).mean()
                og.zero_grad()
                lg.backward()
                og.step()
    said = [str(m.message) for m in w if "tensortap" in str(m.message)]
    assert len(said) == 1 and said[0].startswith("tensortap: watch(ModuleDict) replaces the model watched "
                                                 "before (Sequential)"), said
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 2)
    assert {r["name"] for r in pull.find("gradients")} == {"G.0", "G.2", "D.0", "D.2", "_total"}


def test_a_net_frozen_between_its_own_steps_stays_watched(pull):
    """A GAN's critic frozen for the generator's update (WGAN style) and unfrozen for its own:
    a freeze is no reason to choose the layers again. A first version re-chose them at each
    change, with the critic frozen at that moment: it was never recorded again."""
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    d = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    og, od = torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)
    with Tap(every_n_steps=1, gradients="all") as tap:
        tap.watch(nn.ModuleDict({"G": g, "D": d}), optimizer=[og, od])
        for i in range(4):
            tap.log_batch(None, epoch=0, batch_idx=i)
            d.requires_grad_(True)
            fake = g(torch.randn(16, 2))
            ld = d(torch.randn(16, 2) + 3).mean() - d(fake.detach()).mean()
            od.zero_grad()
            ld.backward()
            od.step()
            d.requires_grad_(False)  # (left frozen when the next step begins)
            lg = -d(fake).mean()
            og.zero_grad()
            lg.backward()
            og.step()
    assert pull.wait_for(lambda r: len(pull.find("gradients", "_total")) == 4)
    for layer in ("G.0", "G.2", "D.0", "D.2"):
        assert sorted(r["step"] for r in pull.find("gradients", layer)) == [0, 1, 2, 3], layer



def test_a_capture_step_without_a_backward_keeps_the_output_hook(pull):
    """A capture step whose batch is skipped before backward (a NaN loss, say): the end of
    backward is still looked for on the output from the next capture on. A first version
    took such a step for a loss on no output and put a hook on every parameter for good."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hooks = []
    with Tap(every_n_steps=1) as tap:
        tap.watch(model)
        for step in range(5):
            tap.log_batch(None, epoch=0, batch_idx=step)
            loss = model(torch.randn(8, 4)).pow(2).mean()
            hooks.append(sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters()))
            if step == 1:
                continue  # skipped: no backward
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert hooks == [0] * 5
    assert pull.wait_for(lambda r: {x["step"] for x in pull.find("gradients", "0")} >= {0, 2, 3, 4})


def test_a_sparse_gradient_too_big_to_make_dense_is_left_out_with_one_warning(pull, monkeypatch):
    from client_hooks import engine

    monkeypatch.setattr(engine, "_warned", set())
    monkeypatch.setattr(engine, "SPARSE_DENSE_MAX", 50 * 8 * 4 - 1)  # the table's dense bytes, less one
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1))
    idx = torch.randint(0, 50, (16,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with Tap(every_n_steps=1, gradients="all") as tap:
            tap.watch(model)
            for i in range(2):
                tap.log_batch(None, epoch=0, batch_idx=i)
                model(idx).pow(2).mean().backward()
                model.zero_grad()
    said = [str(m.message) for m in w if "tensortap" in str(m.message)]
    assert said == ["tensortap: a sparse gradient of 400 elements (0 MiB dense) is not measured, nor counted "
                    "in the total norm; the other layers are"], said
    assert pull.wait_for(lambda r: len(pull.find("gradients", "1")) == 2)
    assert not pull.find("gradients", "0")
