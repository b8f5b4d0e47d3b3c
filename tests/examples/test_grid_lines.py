"""The grid-lines demo: its data and physics are right, and with the gate on each injected
fault is named by the diagnosis from real telemetry (collector subprocess, real ZeroMQ),
while the healthy run's loss falls and gets no high-severity finding.

"Flat" is judged here, independently of the diagnosis code, on the last half of the run
(the first steps may absorb a gain): the median of its last third is within 5% of the
median of its first third, or late values lie below early ones in fewer than 3 of 4 pairs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from collector.diagnosis import diagnose, load_run
from examples.grid_lines.data import DataConfig, make_probe, make_samples
from examples.grid_lines.models import INJECTS, PhysicsLayer, amplitude_loss

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the first test that takes the `demo` fixture waits for its seven trainings: ~240-300 s on
# this 2-core VM, more when it is busy (a run beside other work hit the default 300 s and
# failed all 13 tests that share the fixture). The fixture's own 900 s guard is the one meant.
pytestmark = pytest.mark.timeout(900)
SMALL = DataConfig(N=32, n_objects=2, object_size=64, step=16, n_lines=10)


# -- data and physics ------------------------------------------------------------------------
@pytest.mark.parametrize("g", [1, 2])
def test_batches_carry_every_field_with_the_documented_shapes(g):
    cfg = DataConfig(**{**SMALL.__dict__, "gridsize": g, "object_size": 80})
    s = make_samples(cfg)[0]
    C, N = g * g, cfg.N
    assert s["images"].shape == (C, N, N) and s["images"].dtype == torch.float32
    assert s["amp"].shape == s["phase"].shape == (C, N, N)
    assert s["coords_relative"].shape == (C, 2)
    assert torch.allclose(s["coords_relative"].sum(0), torch.zeros(2))
    assert s["rms_scaling_constant"].shape == s["physics_scaling_constant"].shape == (1, 1, 1)
    assert s["probe"].shape == (N, N) and s["probe"].is_complex()


def test_diffraction_is_the_scaled_fft_amplitude_of_probe_times_patch():
    s = make_samples(SMALL)[3]
    obj = (s["amp"] * np.exp(1j * s["phase"].numpy())).numpy()
    probe = s["probe"].numpy()
    ps = float(s["physics_scaling_constant"])
    expect = ps * np.sqrt(np.abs(np.fft.fft2(probe * obj)) ** 2 / SMALL.N ** 2)
    np.testing.assert_allclose(s["images"].numpy(), expect, rtol=1e-4, atol=1e-3 * expect.max())
    # Parseval: the counts add up to photons * mean |P O|^2 / mean |P|^2 over the disk
    counts = (s["images"].double() ** 2).sum().item()
    assert counts == pytest.approx(ps ** 2 * (np.abs(probe * obj) ** 2).sum(), rel=1e-4)
    # the rms constant makes the model input unit-RMS
    x = s["images"] * s["rms_scaling_constant"]
    assert x.pow(2).mean().sqrt().item() == pytest.approx(1.0, rel=1e-5)


def test_the_object_and_probe_are_physical():
    samples = make_samples(SMALL)
    amp = torch.stack([s["amp"] for s in samples])
    assert amp.min() >= SMALL.amp_floor - 1e-5 and amp.max() <= 1 + 1e-5 and amp.std() > 0.05
    probe = make_probe(32)
    yy, xx = np.mgrid[:32, :32] - 15.5
    disk = np.hypot(xx, yy) <= 8
    assert (probe.abs() ** 2).numpy()[disk].mean() == pytest.approx(1.0, rel=0.05)
    assert probe.abs()[0, 0] < 1e-3  # apodised: nothing at the corners
    assert probe.angle().std() > 0.5  # the defocus phase is there


def test_the_physics_layer_reproduces_the_data_and_the_amp_gain_bug_multiplies_by_the_batch():
    samples = make_samples(SMALL)
    ps0 = float(samples[0]["physics_scaling_constant"])
    exposures = {round(float(s["physics_scaling_constant"]) ** 2 / ps0 ** 2, 3) for s in samples}
    assert len(exposures) == 3 and {e / min(exposures) for e in exposures} == {1.0, 10.0, 100.0}
    batch = torch.utils.data.default_collate(samples[:4])
    obj = torch.polar(batch["amp"], batch["phase"])
    args = (obj, batch["probe"], batch["physics_scaling_constant"])
    pred = PhysicsLayer()(*args)
    torch.testing.assert_close(pred, batch["images"], rtol=1e-4, atol=1e-3)
    rms = batch["rms_scaling_constant"]
    assert amplitude_loss(pred, batch["images"], rms, "mae").item() < 1e-4
    # the bug: each sample gets the sum of the batch's 4 scaling constants instead of its own
    ps = batch["physics_scaling_constant"]
    torch.testing.assert_close(PhysicsLayer(amp_gain_bug=True)(*args), ps.sum() / ps * pred)
    assert amplitude_loss(pred, batch["images"], rms, "mae", units_bug=True).item() > 1.0
    pois = amplitude_loss(pred, batch["images"], rms, "poisson")
    assert pois < amplitude_loss(1.1 * pred, batch["images"], rms, "poisson")


def test_bad_command_line_values_give_one_line_errors(capsys):
    from examples.grid_lines.compare import main

    for argv in (["--architectures", "cnn"], ["--inject", "nope"], ["--N", "30"], ["--lr", "0"],
                 ["--optimizer", "sgd"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("compare: error:") and err.count("\n") == 1, err



def test_tensortap_demo_offers_exactly_the_demos_faults(capsys):
    """`tensortap demo --inject` lists the faults without importing torch into the CLI."""
    from collector.cli import DEMO_INJECTS, main

    assert DEMO_INJECTS == INJECTS
    with pytest.raises(SystemExit) as e:
        main(["demo", "--inject", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("tensortap demo: error: argument --inject") and all(f in err for f in INJECTS), err


# -- the demo with real telemetry ------------------------------------------------------------
CONFIGS = ["none", *INJECTS]
DEMO = ["--N", "64", "--gridsize", "1", "--architectures", "fno", "--torch-epochs", "1",
        "--max-steps", "240", "--every-n-steps", "4"]
DRIVER = """
import os, sys
from examples.grid_lines.compare import main
out, configs = sys.argv[1], sys.argv[2:]
for c in configs:
    os.environ["TENSORTAP_RUN"] = c
    if c == "gate-off":
        os.environ.pop("DEBUG_FNO_LOSS")
    extra = [] if c in ("none", "gate-off") else ["--inject", c]
    short = ["--max-steps", "16"] if c == "gate-off" else []  # only checks that nothing is sent
    assert main(%r + ["--output-dir", os.path.join(out, c)] + extra + short) == 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """All configurations trained with the gate on into one collector, then the collector
    stopped; yields (artifact root, output root)."""
    tmp = tmp_path_factory.mktemp("grid")
    art, out = tmp / "art", tmp / "out"
    port = free_port()
    coll = subprocess.Popen([sys.executable, "-m", "collector", "collect", "--zmq",
                             f"tcp://127.0.0.1:{port}", "--http", "off", "--out", str(art)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)
        env = {**os.environ, "DEBUG_FNO_LOSS": "1", "TENSORTAP_ENDPOINT": f"tcp://127.0.0.1:{port}",
               "TENSORTAP_OUT": str(art), "PYTHONWARNINGS": "ignore"}
        # a guard against a hang, not a timing: the seven trainings took ~300 s on a slow day
        # of the 2-core VM (~50 s each), against under 240 s before
        p = subprocess.run([sys.executable, "-c", DRIVER % (DEMO,), str(out), *CONFIGS, "gate-off"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
    finally:
        coll.send_signal(signal.SIGTERM)
        coll.wait(15)
    yield art, out


def losses(out, config):
    res = json.loads((out / config / "metrics.json").read_text())["results"]["fno"]
    return res["losses"]


def last_half(values):
    """(median decrease, fraction of (early, late) pairs with late < early) between the first
    and the last third of the last half of the run."""
    w = np.asarray(values[len(values) // 2:])
    j = len(w) // 3
    early, late = w[:j], w[-j:]
    med = (np.median(early) - np.median(late)) / np.median(early)
    below = (late[None, :] < early[:, None]).mean() + 0.5 * (late[None, :] == early[:, None]).mean()
    return med, below


def is_flat(values):
    med, below = last_half(values)
    return med < 0.05 or below < 0.75


def findings(art, config):
    return diagnose(load_run(str(art / f"{config}-fno")))


def by_rule(found):
    return {f["rule"]: f for f in found}


def test_the_gate_on_demo_writes_the_telemetry_bundle_and_gate_off_writes_none(demo):
    art, out = demo
    run = art / "none-fno"
    for f in ("loader_stats.jsonl", "activations.jsonl", "gradients.jsonl", "metrics.jsonl",
              "events.jsonl", "patch_metrics.json", "manifest.json"):
        assert (run / f).is_file(), f
    recs = load_run(str(run))
    names = {r["name"] for r in recs["activations"]}
    assert {"model_input", "generator_output", "x_combined"} <= names
    assert {"images", "coords_relative", "rms_scaling_constant", "physics_scaling_constant",
            "probe"} <= {r["name"] for r in recs["loader_stats"]}
    pm = recs["patch_metrics"][0]["data"]
    assert pm["scale_applied"] is False and "optimal_scale" in pm
    assert not (art / "gate-off-fno").exists()  # the gate off run reached no collector
    assert json.loads((out / "gate-off" / "metrics.json").read_text())["results"]["fno"]["run"] is None


def test_the_healthy_run_decreases_and_has_no_high_severity_finding(demo):
    art, out = demo
    ok = losses(out, "none")
    med, below = last_half(ok)
    assert not is_flat(ok) and below > 0.8, (med, below)  # still falling late (seed 0: 0.92)
    assert np.median(ok[-40:]) < 0.8 * np.median(ok[:40])  # and over the whole run
    assert [f for f in findings(art, "none") if f["severity"] == "high"] == []


@pytest.mark.parametrize("config", INJECTS)
def test_the_fault_gives_a_flat_loss_above_the_healthy_one_named_loss_plateau(demo, config):
    art, out = demo
    bad, ok = losses(out, config), losses(out, "none")
    assert is_flat(bad), last_half(bad)
    # a weak spectral path still lets the 1x1 convs fit some of the data (1.26x at seed 0);
    # the other faults end 2.5-4.8x above the healthy run
    above = 1.15 if config == "spectral-init" else 1.5
    assert np.median(bad[-60:]) > above * np.median(ok[-60:])
    plateau = by_rule(findings(art, config))["loss_plateau"]
    ev = plateau["evidence"]
    assert plateau["severity"] == "high" and ev["points"] == len(bad) == 240
    assert ev["relative_decrease"] < 0.05 or ev["late_below_early"] < 0.75


def test_frozen_generator_is_named_frozen_parameters_for_every_generator_layer(demo):
    art, _ = demo
    f = by_rule(findings(art, "frozen-generator"))["frozen_parameters"]
    assert f["severity"] == "high"
    assert {"lift.0", "project.2", "blocks.0.spectral"} <= set(f["evidence"]["layers"])
    assert all(v["grad_norm_median"] > 0 for v in f["evidence"]["layers"].values())


def test_raw_input_is_named_input_range_and_saturated_output(demo):
    art, _ = demo
    rules = by_rule(findings(art, "raw-input"))
    assert rules["input_range"]["severity"] == "high" and rules["input_range"]["evidence"]["rms"] > 100
    assert any(k.startswith("x_combined") for k in rules["saturated_activation"]["evidence"]["tensors"])


def test_spectral_init_is_named_weak_layer_on_every_spectral_layer_and_the_healthy_run_is_not(demo):
    art, _ = demo
    f = by_rule(findings(art, "spectral-init"))["weak_layer"]
    assert f["severity"] == "high"
    assert set(f["evidence"]["layers"]) == {f"blocks.{i}.spectral" for i in range(4)}
    assert all(v["gain_median"] < 0.05 and v["captures"] >= 3 for v in f["evidence"]["layers"].values())
    assert "weak_layer" not in by_rule(findings(art, "none"))


@pytest.mark.parametrize("config", ["amp-gain", "loss-units"])
def test_gain_and_unit_errors_are_named_scale_mismatch(demo, config):
    art, _ = demo
    f = by_rule(findings(art, config))["scale_mismatch"]
    ev = f["evidence"]
    # the predicted amplitude is ~25x too large; a unit error is not a pure gain (intensity
    # vs amplitude), so rescaling removes much, not all, of the error
    assert f["severity"] == "high" and (ev["optimal_scale"] > 4 or ev["optimal_scale"] < 0.25)
    assert ev["mae_after_optimal_scale"] < 0.7 * ev["mae"]


def test_the_demo_artifacts_validate_against_the_protocol_and_report_works_offline(demo):
    """Every stored line is a wire Record (docs/PROTOCOL.md) of its file's kind; the manifest
    accounts for all of them; `tensortap report` runs with the collector stopped."""
    from collector.wire import STREAM_FILES, Record

    import msgspec

    art, _ = demo
    run = art / "none-fno"
    total = 0
    for kind, fname in STREAM_FILES.items():
        raw = (run / fname).read_bytes()
        if fname.endswith(".jsonl"):
            assert raw.endswith(b"\n")
            recs = [msgspec.json.decode(line, type=Record) for line in raw.splitlines()]
        else:
            recs = [msgspec.convert(r, Record) for r in json.loads(raw).values()]
        assert recs and {r.kind for r in recs} == {kind} and {r.run for r in recs} == {"none-fno"}
        total += len(recs)
    m = json.loads((run / "manifest.json").read_text())["ranks"]["0"]
    # patch_metrics.json keeps the latest record per name, so earlier ones were written and replaced
    assert m["written"] >= total and m["written"] == m["received"] == m["next_seq"]
    assert m["gaps"] == 0 and m["duplicates"] == 0
    r = subprocess.run([sys.executable, "-m", "collector", "report", str(run), "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert isinstance(json.loads(r.stdout), list)
