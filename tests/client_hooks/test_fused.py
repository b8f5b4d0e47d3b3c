"""The fused statistics kernels (client_hooks.fused) and the capture path that uses them,
against NumPy.

They run on a CUDA GPU, or on CPU tensors in Triton's interpreter when the environment says
`TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1` (a checkout with Triton installed, no GPU).
Elsewhere (CI: no GPU, no Triton) the module is skipped.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from client_hooks import Tap, stats

DEV = "cuda" if torch.cuda.is_available() else "cpu"
fused = stats.fused_module(torch.ones(1, device=DEV))
pytestmark = pytest.mark.skipif(fused is None, reason="fused kernels need a CUDA GPU with Triton, "
                                "or TRITON_INTERPRET=1 TENSORTAP_FUSED_ON_CPU=1 with Triton installed")


def ref10(t: torch.Tensor) -> list:
    """[nan, inf, nfinite, min, max, mean, std, nzero, norm, max_abs] in NumPy float64."""
    a = t.detach().to("cpu", torch.float64).numpy().reshape(-1)
    fin = np.isfinite(a)
    x = a[fin]
    head = [np.isnan(a).sum(), np.isinf(a).sum(), fin.sum()]
    if not x.size:
        return head + [None] * 4 + [(a == 0).sum(), None, None]
    return head + [x.min(), x.max(), x.mean(), x.std(), (a == 0).sum(), np.sqrt((x * x).sum()), np.abs(x).max()]


def assert_row(got: list, want: list, what: str) -> None:
    for i in (0, 1, 2, 7):  # counts: exact
        assert int(got[i]) == int(want[i]), (what, i, got, want)
    if want[2] == 0:
        return  # nothing finite: the payload says None
    scale = want[9] or 1.0
    for i in (3, 4, 5, 6, 8, 9):
        tol = 1e-5 * (abs(want[i]) if i == 8 else scale) + 1e-6 * abs(want[i]) + 1e-30
        assert abs(got[i] - want[i]) <= tol, (what, i, got[i], want[i])


def tensors() -> dict:
    g = torch.Generator().manual_seed(0)
    special = torch.randn(3000, generator=g)
    special[::97], special[5::131], special[7::151], special[11::50] = math.nan, math.inf, -math.inf, 0.0
    out = {
        "float32": torch.randn(1000, generator=g),
        "float32 nan/inf/zeros": special,
        "float16 nan/inf/zeros": special.half(),
        "bfloat16 nan/inf/zeros": special.bfloat16(),
        "float64 x1e3": torch.randn(5000, generator=g).double() * 1e3,
        "one element": torch.tensor([2.5]),
        "all nan": torch.full((17,), math.nan),
        "3 blocks + 5": torch.randn(4096 * 3 + 5, generator=g),
        "non-contiguous": torch.randn(300, 200, generator=g).t(),
        "mean 100 std 0.01": torch.randn(50_000, generator=g) * 0.01 + 100.0,
        "signed zeros": torch.tensor([0.0, -0.0, 1.0, -0.0]),
        # float32 squares of these deviations would vanish (~1e-51) or overflow (~1e40)
        "tiny deviations": torch.tensor([1.9777587e-25, 0.0]),
        "x1e-30": torch.randn(5000, generator=g) * 1e-30,
        "x1e20": torch.randn(5000, generator=g) * 1e20,
        # finite, but a block's float32 sum overflows: the blocks take the general way
        "block sums overflow": torch.randn(4096 * 2 + 3, generator=g) * 1e35 + 2e36,
        "all zeros, full blocks": torch.zeros(4096 * 2),
        "full blocks, one inf": torch.randn(4096 * 2, generator=g).index_fill_(0, torch.tensor([5000]), math.inf),
    }
    return {k: v.to(DEV) for k, v in out.items()}


# numpy warns of the overflowing float32 sums when Triton's interpreter runs the kernels
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_rows_of_one_batch_equal_numpy_for_every_dtype_and_special_value():
    b = fused.Batch(torch.device(DEV))
    ts = tensors()
    rows = {k: b.add(t) for k, t in ts.items()}
    out = b.finish().tolist()
    assert len(out) == len(ts)
    for k, t in ts.items():
        assert_row(out[rows[k]], ref10(t), k)


def test_a_group_of_layers_gives_one_row_per_layer_over_all_its_tensors(monkeypatch):
    monkeypatch.setattr(fused, "FIRST_CAP", 4)  # a tiny first workspace: rows spread over several
    monkeypatch.setattr(fused, "_size_hint", {})  # (not sized by an earlier test's batch)
    g = torch.Generator().manual_seed(1)
    layers = [[torch.randn(5000, generator=g), torch.randn(7, generator=g)],
              [torch.randn(3, 4, generator=g)],
              [torch.randn(9000, generator=g) * 1e-3 + 5, torch.tensor([math.nan, 0.0, math.inf])]]
    layers = [[t.to(DEV) for t in ts] for ts in layers]
    b = fused.Batch(torch.device(DEV))
    before = b.add(torch.randn(20000, generator=g).to(DEV))
    rows = b.add_group(layers)
    after = b.add(torch.arange(10.0, device=DEV))
    assert rows == [before + 1, before + 2, before + 3] and after == before + 4
    out = b.finish().tolist()
    for ts, r in zip(layers, rows):
        assert_row(out[r], ref10(torch.cat([t.reshape(-1) for t in ts])), f"layer row {r}")
    assert_row(out[after], ref10(torch.arange(10.0)), "after the group")
    with pytest.raises(TypeError):
        b.add_group([[torch.ones(3, device=DEV)], [torch.ones(3, device=DEV, dtype=torch.float64)]])


def test_a_direct_launch_is_keyed_by_every_constexpr_and_specialisation():
    """A launch alike an earlier one calls the compiled kernel's launcher directly
    (fused._launch), keyed by `_spec`: two launches share a key only where Triton would give
    them the same compiled kernel. Constexprs by value (UNIT 4 and 8 differ, though both are
    ints of the same divisibility); ints by 1, divisibility by 16 and width; tensors by dtype
    and 16-byte alignment; the runtime sizes themselves do not split the key."""
    mask = fused._constexpr_mask(fused._partials_group)
    assert mask == (False,) * 8 + (True,) * 3  # x0 ... cap; BLOCK, ACC, UNIT
    buf = torch.zeros(64, device=DEV)
    tabs = [torch.zeros(4, dtype=torch.int64, device=DEV) for _ in range(4)]

    def key(x0=buf, g0=32, cap=4096, unit=4, acc=fused._acc(torch.float32)):
        return fused._spec((x0, *tabs, buf, g0, cap, fused.BLOCK, acc, unit), mask)
    assert key() == key(g0=48, cap=8192)  # other sizes, the same kernel
    assert key(unit=8) != key() and key(unit=1) != key()
    assert key(g0=1) != key() and key(g0=33) != key() and key(cap=2 ** 40) != key()
    assert key(x0=buf[1:]) != key()  # 4 bytes off: not 16-byte aligned
    assert key(x0=buf.double()) != key() and key(acc=fused._acc(torch.float64)) != key()
    assert fused._constexpr_mask(fused._merge)[-1] and not any(fused._constexpr_mask(fused._merge)[:-1])


def test_a_batch_like_the_last_one_fills_one_workspace(monkeypatch):
    """The first workspace takes as many blocks as the last finished batch used: a steady
    capture is merged in one launch."""
    monkeypatch.setattr(fused, "FIRST_CAP", 4)
    monkeypatch.setattr(fused, "_size_hint", {})
    xs = [torch.randn(n).to(DEV) for n in (5 * fused.BLOCK, 9 * fused.BLOCK + 1, 3)]
    spaces = []
    for _ in range(2):
        b = fused.Batch(torch.device(DEV))
        rows = [b.add(x) for x in xs]
        spaces.append(len(b._spaces))
        out = b.finish().tolist()
        for x, r in zip(xs, rows):
            assert_row(out[r], ref10(x), f"row {r}")
    assert spaces == [3, 1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_group_reads_full_and_partial_blocks_at_any_alignment_and_address_order(dtype):
    """The group kernel finds each tensor from its offset to the first one: in 16-byte units
    when every address is aligned (full blocks then load as vectors), else in elements; a
    tensor may lie below the first. Blocks are full, partial, or a tensor is one element."""
    g = torch.Generator().manual_seed(2)
    big = (torch.randn(3 * 4096 + 40, generator=g) * 3 + 1).to(DEV, dtype)
    big[4096 + 7], big[2 * 4096], big[-1] = math.nan, math.inf, 0.0
    low = torch.randn(4096 * 2, generator=g).to(DEV, dtype)  # exactly two full blocks
    aligned = [[big[4096:]], [low], [big[:5]], [torch.tensor([-7.0], device=DEV, dtype=dtype)]]
    unaligned = [[big[1:]], [big[3:4096 + 3]], [low[1:]]]  # views off the 16-byte grid
    for layers in (aligned, unaligned, aligned[::-1]):
        b = fused.Batch(torch.device(DEV))
        rows = b.add_group(layers)
        out = b.finish().tolist()
        for ts, r in zip(layers, rows):
            assert_row(out[r], ref10(torch.cat([t.reshape(-1) for t in ts])), f"{dtype} row {r}")
    b = fused.Batch(torch.device(DEV))  # one tensor: full blocks and a tail, aligned or not
    rows = [b.add(big), b.add(big[1:]), b.add(low)]
    out = b.finish().tolist()
    for t, r in zip((big, big[1:], low), rows):
        assert_row(out[r], ref10(t), f"{dtype} add {r}")


def test_stats_are_those_of_the_value_at_the_hook_even_if_changed_in_place_later(pull):
    """The partials are launched in the hook: an in-place ReLU after a Linear cannot alter the
    Linear output's statistics, which are read only at the end of the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(inplace=True), nn.Linear(32, 3)).to(DEV)
    seen = {}
    model[0].register_forward_hook(lambda m, a, out: seen.__setitem__("lin", out.detach().clone()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 6, device=DEV)
    with Tap(all_leaves=True, gradients="all") as tap:
        tap.watch(model, optimizer=opt)
        tap.log_batch({"x": x}, epoch=0)
        loss = model(x).square().mean()
        loss.backward()
        grads = {n: torch.cat([p.grad.reshape(-1) for p in m.parameters()]).clone()
                 for n, m in (("0", model[0]), ("2", model[2]))}
        opt.step()
    assert pull.wait_for(lambda r: len([x for x in r if x["kind"] == "gradients"]) == 3)
    lin = pull.find("activations", "0:output")[0]["data"]
    want = ref10(seen["lin"])
    assert lin["min"] < 0  # before the in-place ReLU
    for k, i in (("min", 3), ("max", 4), ("mean", 5), ("std", 6)):
        assert lin[k] == pytest.approx(want[i], rel=1e-5, abs=1e-7), k
    total = 0.0
    for name, g in grads.items():
        d, w = pull.find("gradients", name)[0]["data"], ref10(g)
        total += w[8] ** 2
        assert d["count"] == g.numel() and d["nan"] == 0
        for k, i in (("mean", 5), ("std", 6), ("norm", 8), ("max_abs", 9)):
            assert d[k] == pytest.approx(w[i], rel=1e-5, abs=1e-9), (name, k)
        assert d["zero_frac"] == pytest.approx(w[7] / g.numel())
    assert pull.find("gradients", "_total")[0]["data"]["norm"] == pytest.approx(math.sqrt(total), rel=1e-5)


def test_a_kernel_failure_falls_back_to_the_torch_path_and_loses_nothing(pull, monkeypatch):
    def boom(self, x):
        raise RuntimeError("injected launch failure")

    monkeypatch.setattr(fused.Batch, "add", boom)
    monkeypatch.setattr(stats, "_fused_state", {"mod": fused})  # its "off" ends with the test
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).to(DEV)
    x = torch.randn(3, 4, device=DEV)
    with pytest.warns(RuntimeWarning, match="fused CUDA statistics failed"):
        with Tap(all_leaves=True) as tap:
            tap.watch(model)
            tap.log_batch({"x": x}, epoch=0)
            model(x).sum().backward()
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 2)
    d = pull.find("activations", "1:output")[0]["data"]
    with torch.no_grad():
        want = float(torch.tanh(model[0](x)).max())
    assert d["max"] == pytest.approx(want, rel=1e-6)


def test_complex_values_and_declared_pairs_equal_numpy_through_the_tap(pull):
    """Complex statistics on the fused path (five rows in one launch, the element counts read
    off two of them), NaN and Inf parts included (one element has both), and both pair kinds."""
    from tests.client_hooks.test_stats import check_complex

    g = torch.Generator().manual_seed(2)
    re, im = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g)
    re[0, :3], im[1, :2], im[2, 5], re[2, 5], re[3, 7] = math.nan, math.inf, math.inf, math.nan, -math.inf
    z = torch.complex(re, im)
    t = torch.randn(3, 2, 5, 4, generator=g)
    amp, ph = t[:, 0].abs(), t[:, 1]
    t2 = torch.stack([amp, ph], 1)
    with warnings.catch_warnings():  # "ComplexHalf support is experimental"
        warnings.simplefilter("ignore", UserWarning)
        zh = torch.complex(re.half(), im.half())  # complex32: an FFT of float16 under autocast
    with Tap(all_leaves=True, pairs={"ri": "real_imag", "ap": "amp_phase"}) as tap:
        tap.watch(nn.Linear(2, 2).to(DEV))
        tap.log_batch({"x": torch.ones(1, device=DEV)}, epoch=0)
        tap.record("z", z.to(DEV))
        tap.record("zh", zh.to(DEV))
        tap.record("ri", t.to(DEV))
        tap.record("ap", t2.to(DEV))
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 4)
    d = {r["name"]: r["data"] for r in pull.find("activations")}
    check_complex(z.numpy(), d["z"])
    assert d["z"]["nan"] == 4 and d["z"]["inf"] == 4 and d["z"]["shape"] == [4, 50]
    want = np.empty(re.shape, np.complex64)
    want.real, want.imag = re.half().float().numpy(), im.half().float().numpy()
    check_complex(want, d["zh"])
    assert d["zh"]["nan"] == 4 and d["zh"]["inf"] == 4 and d["zh"]["dtype"] == "complex32"
    check_complex(t[:, 0].double().numpy() + 1j * t[:, 1].double().numpy(), d["ri"])
    assert d["ri"]["shape"] == [3, 5, 4]
    check_complex(amp.double().numpy() * np.exp(1j * ph.double().numpy()), d["ap"])


class _ComplexScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dtype=torch.cfloat))

    def forward(self, x):
        return (torch.fft.fft(x) * self.w).real


def test_complex_parameters_join_the_grouped_gradient_launch_as_real_pairs(pull):
    """A complex gradient counts as its (re, im) pairs, in the same one launch as the rest."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 6), _ComplexScale()).to(DEV)
    x = torch.randn(5, 6, device=DEV)
    with Tap(gradients="all") as tap:
        tap.watch(model)
        tap.log_batch({"x": x}, epoch=0)
        model(x).square().mean().backward()
        grads = {"0": torch.cat([model[0].weight.grad.reshape(-1), model[0].bias.grad]).clone(),
                 "1": torch.view_as_real(model[1].w.grad).reshape(-1).clone()}
    assert pull.wait_for(lambda r: len(pull.find("gradients")) == 3)
    for name, g in grads.items():
        d, w = pull.find("gradients", name)[0]["data"], ref10(g)
        assert d["count"] == g.numel()
        for k, i in (("mean", 5), ("std", 6), ("norm", 8), ("max_abs", 9)):
            assert d[k] == pytest.approx(w[i], rel=1e-5, abs=1e-9), (name, k)


def test_weight_norms_and_update_ratios_equal_numpy_with_complex_weights(pull, monkeypatch):
    """The weights' and updates' norms (rows of the flat buffer's launches): a complex
    weight counts as its real pairs, as NumPy's norm of its (re, im) values."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 6), _ComplexScale()).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    launches = _Launches(monkeypatch)
    layers = {"0": lambda: [model[0].weight, model[0].bias], "1": lambda: [torch.view_as_real(model[1].w)]}

    def flat(name):
        return np.concatenate([p.detach().cpu().double().numpy().ravel() for p in layers[name]()])
    with Tap(gradients="all") as tap:
        tap.watch(model, optimizer=opt)
        tap.log_batch({"x": torch.ones(1, device=DEV)}, epoch=0)
        model(torch.randn(5, 6, device=DEV)).square().mean().backward()
        w0 = {n: flat(n) for n in layers}
        opt.step()
        w1 = {n: flat(n) for n in layers}
    # the 3 gradients and the 3 weights in one launch over the flat buffer, the updates in one more
    assert launches.take()[1] == [("flat", 6), ("flat", 3)]
    assert pull.wait_for(lambda r: len(pull.find("gradients")) == 3)
    for name in layers:
        d = pull.find("gradients", name)[0]["data"]
        assert d["weight_norm"] == pytest.approx(np.linalg.norm(w0[name]), rel=1e-6), name
        assert d["update_ratio"] == pytest.approx(np.linalg.norm(w1[name] - w0[name]) / np.linalg.norm(w0[name]),
                                                  rel=1e-5), name


def test_a_nan_weight_gives_a_nan_weight_norm(pull):
    """As a plain norm would: NaN for the layer that holds it; the others' as NumPy's."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(DEV)
    with torch.no_grad():
        model[1].bias[0] = math.nan
    with Tap(gradients="all") as tap:
        tap.watch(model)
        tap.log_batch({"x": torch.ones(1, device=DEV)}, epoch=0)
        model(torch.randn(5, 4, device=DEV)).square().mean().backward()
    assert pull.wait_for(lambda r: len(pull.find("gradients")) == 3)
    assert math.isnan(pull.find("gradients", "1")[0]["data"]["weight_norm"])
    w = np.concatenate([model[0].weight.detach().cpu().double().numpy().ravel(),
                        model[0].bias.detach().cpu().double().numpy()])
    assert pull.find("gradients", "0")[0]["data"]["weight_norm"] == pytest.approx(np.linalg.norm(w), rel=1e-6)


class _Launches:
    """Counts the fused launches of a Tap: tensors launched in their hook (`Batch.add`),
    grouped launches (`Batch.add_group`, with how many tensors each) and launches over the
    flat buffer of gradients and weights (`Batch.add_flat`: ("flat", how many tensors))."""

    def __init__(self, monkeypatch):
        self.one, self.groups = 0, []
        add, add_group, add_flat = fused.Batch.add, fused.Batch.add_group, fused.Batch.add_flat

        def count_add(b, x):
            self.one += 1
            return add(b, x)

        def count_group(b, layers, *args):
            self.groups.append(sum(len(ts) for ts in layers))
            return add_group(b, layers, *args)

        def count_flat(b, x0, rel, lay, unit):
            self.groups.append(("flat", rel.numel()))
            return add_flat(b, x0, rel, lay, unit)
        monkeypatch.setattr(fused.Batch, "add", count_add)
        monkeypatch.setattr(fused.Batch, "add_group", count_group)
        monkeypatch.setattr(fused.Batch, "add_flat", count_flat)

    def take(self) -> tuple:
        out, self.one, self.groups = (self.one, self.groups), 0, []
        return out


def _reference_hooks(model: nn.Module, seen: dict) -> None:
    """Each leaf's output as it was in its hook (registered before the Tap's: runs first)."""
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            m.register_forward_hook(lambda m, a, out, n=name: seen.__setitem__(f"{n}:output", out.detach().clone()))


def _check_value(d: dict, ref: torch.Tensor, what: str) -> None:
    want = ref10(ref)
    assert d["count"] == ref.numel() and d["nan"] == want[0], what
    for k, i in (("min", 3), ("max", 4), ("mean", 5), ("std", 6)):
        assert d[k] == pytest.approx(want[i], rel=1e-5, abs=1e-7), (what, k)


def test_the_deferred_bytes_cap_is_1_gib_or_a_64th_of_a_smaller_gpu(monkeypatch):
    from client_hooks import engine

    assert engine.defer_cap(-1) == 1 << 30  # CPU (Triton's interpreter): no device memory
    monkeypatch.setattr(engine, "_memory", {0: 16 << 30, 1: 80 << 30})
    assert engine.defer_cap(0) == 256 << 20 and engine.defer_cap(1) == 1 << 30
    if torch.cuda.is_available():
        monkeypatch.setattr(engine, "_memory", {})
        total = torch.cuda.get_device_properties(0).total_memory
        assert engine.defer_cap(0) == min(1 << 30, total // 64)


@pytest.mark.parametrize("cap_bytes", [None, 1, "share"])
def test_values_unchanged_after_their_hook_join_one_grouped_launch_from_the_second_capture(pull, monkeypatch, cap_bytes):
    """Every-step capture of a model with an in-place ReLU. First capture: every value
    launched in its hook and watched. Later captures: the Linear output that the ReLU changes
    stays launched in its hook; every other value (the batch field too) joins one grouped
    launch at the end of the forward; the gradients stay one grouped launch. Every record of
    every step equals NumPy on the value as it was in its hook; none is lost.
    cap_bytes=1: DEFER_MAX_BYTES exceeded by each value, so each is launched at once, alone.
    "share": a device of 64 x 1500 bytes holds at most 1500 bytes of deferred values (its
    1/DEFER_MEMORY_SHARE): x (192 bytes), the ReLU's output (1024), then the second Linear's
    (512) pass it, and those three launch together; the last two at the end of the forward."""
    from client_hooks import engine

    if cap_bytes == "share":
        monkeypatch.setattr(engine, "device_memory", lambda index: engine.DEFER_MEMORY_SHARE * 1500)
    elif cap_bytes is not None:
        monkeypatch.setattr(engine, "DEFER_MAX_BYTES", cap_bytes)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(inplace=True), nn.Linear(32, 16), nn.Tanh(),
                          nn.Linear(16, 3)).to(DEV)
    seen: dict = {}
    _reference_hooks(model, seen)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    launches = _Launches(monkeypatch)
    refs, counts = [], []
    with Tap(every_n_steps=1, all_leaves=True, gradients="all") as tap:
        tap.watch(model, optimizer=opt)
        for step in range(3):
            x = torch.randn(8, 6, device=DEV)
            tap.log_batch({"x": x}, epoch=0)
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            refs.append({**seen, "x": x.clone()})
            counts.append(launches.take())
    assert tap.sender.dropped == 0
    # step 0: 6 values launched in their hooks; the 3 gradient layers' 6 tensors and their 6
    # weights in one launch over the flat buffer, the 6 updates in one more. With a cap that
    # the flat buffer (6.4 kB) passes, the gradients are one group where they lie.
    grads = [("flat", 12), ("flat", 6)] if cap_bytes is None else [6]
    assert counts[0] == (6, grads)
    if cap_bytes is None:  # then: the changed Linear output alone; 5 values in one group
        assert counts[1] == counts[2] == (1, [5] + grads)
    elif cap_bytes == "share":
        assert counts[1] == counts[2] == (1, [3, 2] + grads)
    else:
        assert counts[1] == counts[2] == (1, [1] * 5 + grads)
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 15 and len(pull.find("loader_stats")) == 3)
    for rec in pull.find("activations") + pull.find("loader_stats"):
        ref = refs[rec["step"]][rec["name"]]
        _check_value(rec["data"], ref, (rec["step"], rec["name"]))
    lin = [r for r in pull.find("activations", "0:output")]
    assert len(lin) == 3 and all(r["data"]["min"] < 0 for r in lin)  # before the in-place ReLU


def test_a_complex_value_recorded_after_the_forward_is_read_at_the_end_of_backward(pull, monkeypatch):
    """x_combined, a pair built after the model's forward (as the demo does), is deferred to
    the end of backward: one grouped launch for its five rows there, beside the gradients'.
    Outside a capture step (`always=True`) it is launched at once. Every record equals NumPy,
    with NaN and Inf parts in the value."""
    from tests.client_hooks.test_stats import check_complex

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    launches = _Launches(monkeypatch)
    refs, counts = [], []
    with Tap(every_n_steps=2, first_n=0, all_leaves=True, gradients="all",
             pairs={"x_combined": "real_imag"}) as tap:
        tap.watch(model, optimizer=opt)
        for step in range(4):  # captures at steps 0 and 2; step 3 records with always=True
            tap.log_batch({"x": torch.ones(1, device=DEV)}, epoch=0)
            out = model(torch.randn(5, 3, device=DEV))
            xc = out.detach().clone().reshape(5, 2, 1)
            xc[0, 0, 0], xc[1, 1, 0], xc[2, 0, 0], xc[2, 1, 0] = math.nan, math.inf, -math.inf, math.nan
            tap.record("x_combined", xc, always=step == 3)
            out.square().mean().backward()
            opt.step()
            opt.zero_grad()
            refs.append(xc.cpu().double().numpy())
            counts.append(launches.take())
    assert tap.sender.dropped == 0
    # the batch field and the 3 leaves' outputs; x_combined's 5 rows; the 2 layers' 4 tensors
    # and their 4 weights over the flat buffer, then the 4 updates
    assert counts[2] == (0, [4, 5, ("flat", 8), ("flat", 4)])
    assert counts[1] == (0, []) and counts[3][1] == [5]  # no capture; at once, in its own launch
    assert pull.wait_for(lambda r: len(pull.find("activations", "x_combined")) == 3)
    for rec in pull.find("activations", "x_combined"):
        ri = refs[rec["step"]]
        z = np.empty(ri.shape[:1] + ri.shape[2:], np.complex128)
        z.real, z.imag = ri[:, 0], ri[:, 1]  # (1j * inf is NaN in NumPy's arithmetic)
        check_complex(z, rec["data"])
        assert rec["data"]["nan"] == 2 and rec["data"]["inf"] == 2


def test_a_value_deferred_before_takes_the_short_way_while_it_comes_alike(pull, monkeypatch):
    """From the third capture a deferred value comes by `Engine._defer_known` (its spec kept
    from before); a value of another shape (a smaller batch) takes the long way, and so does
    the next one (its plan is now the smaller batch's), then the short way again. Every
    record equals NumPy on the value in its hook, with its own shape."""
    from client_hooks import engine

    short = []
    known = engine.Engine._defer_known

    def counting(self, kind, name, value):
        took = known(self, kind, name, value)
        short.append((kind, name, took))
        return took
    monkeypatch.setattr(engine.Engine, "_defer_known", counting)
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(DEV)
    seen: dict = {}
    _reference_hooks(model, seen)
    batches = [8, 8, 8, 5, 8, 8]
    refs, took = [], []
    with Tap(every_n_steps=1, all_leaves=True) as tap:
        tap.watch(model)
        for n in batches:
            x = torch.randn(n, 6, device=DEV)
            tap.log_batch({"x": x}, epoch=0)
            model(x).square().mean().backward()
            refs.append(dict(seen))
            took.append({name for kind, name, t in short if t})
            short.clear()
    leaves = {"0:output", "1:output", "2:output"}
    assert took == [set(), set(), leaves, set(), set(), leaves]
    assert tap.sender.dropped == 0
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 3 * len(batches))
    for rec in pull.find("activations"):
        ref = refs[rec["step"]][rec["name"]]
        assert rec["data"]["shape"] == list(ref.shape)
        _check_value(rec["data"], ref, (rec["step"], rec["name"]))


class _Doubles(nn.Module):
    """A Linear whose output this module doubles in place, once told to (behaviour that
    changes between captures)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.double_it = False

    def forward(self, x):
        y = self.lin(x)
        if self.double_it:
            y.mul_(2.0)
        return y


def test_a_deferred_value_changed_in_place_after_all_is_dropped_counted_then_read_in_its_hook(pull):
    torch.manual_seed(5)
    model = _Doubles().to(DEV)
    seen: dict = {}
    _reference_hooks(model, seen)
    refs = []
    with pytest.warns(RuntimeWarning) as caught:
        with Tap(every_n_steps=1, activations=["lin"]) as tap:
            tap.watch(model)
            for step in range(4):
                model.double_it = step == 2  # step 1 deferred it; step 2 changes it after its hook
                x = torch.randn(3, 4, device=DEV)
                tap.log_batch({"x": x}, epoch=0)
                model(x).sum().backward()
                refs.append(dict(seen))
            tap.step_end()
            assert tap.sender.flush(5)
            dropped = tap.sender.dropped
    assert dropped == 1
    tap.sender.close()  # its bye carries the count to the collector
    msgs = " ".join(str(w.message) for w in caught)
    assert "lin:output changed in place after its hook" in msgs
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 3 and pull.find("events", "bye"))
    got = {r["step"]: r["data"] for r in pull.find("activations", "lin:output")}
    assert sorted(got) == [0, 1, 3]  # step 2's could not be read
    for step, d in got.items():
        _check_value(d, refs[step]["lin:output"], step)
    assert pull.find("events", "bye")[0]["data"]["dropped"] == 1


def test_values_made_under_inference_mode_are_launched_in_their_hook(pull, monkeypatch):
    """Inference tensors have no version counter: always launched at once, never deferred."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).to(DEV)
    seen: dict = {}
    _reference_hooks(model, seen)
    launches = _Launches(monkeypatch)
    refs = []
    with Tap(every_n_steps=1, all_leaves=True) as tap:
        tap.watch(model)
        for _ in range(3):
            with torch.inference_mode():
                x = torch.randn(2, 4, device=DEV)
                tap.log_batch({"x": x}, epoch=0)
                model(x)
            refs.append({**seen, "x": x.clone()})
            assert launches.take() == (3, [])
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 6)
    for rec in pull.find("activations") + pull.find("loader_stats"):
        _check_value(rec["data"], refs[rec["step"]][rec["name"]], (rec["step"], rec["name"]))


def test_a_failed_grouped_launch_gives_the_deferred_values_by_the_torch_path(pull, monkeypatch):
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh()).to(DEV)
    seen: dict = {}
    _reference_hooks(model, seen)
    add_group = fused.Batch.add_group
    refs = []

    def fails_on_step_1(b, layers, *args):
        if len(refs) == 1:
            raise RuntimeError("injected group launch failure")
        return add_group(b, layers, *args)

    monkeypatch.setattr(fused.Batch, "add_group", fails_on_step_1)
    monkeypatch.setattr(stats, "_fused_state", {"mod": fused})  # its "off" ends with the test
    with pytest.warns(RuntimeWarning, match="fused CUDA statistics failed"):
        with Tap(every_n_steps=1, all_leaves=True) as tap:
            tap.watch(model)
            for _ in range(3):
                x = torch.randn(5, 4, device=DEV)
                tap.log_batch({"x": x}, epoch=0)
                model(x)
                refs.append({**seen, "x": x.clone()})
    assert tap.sender.dropped == 0
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 6 and len(pull.find("loader_stats")) == 3)
    for rec in pull.find("activations") + pull.find("loader_stats"):
        _check_value(rec["data"], refs[rec["step"]][rec["name"]], (rec["step"], rec["name"]))


class _Twice(nn.Module):
    """One Tanh called twice; the first call's output is changed in place afterwards."""

    def __init__(self):
        super().__init__()
        self.act = nn.Tanh()

    def forward(self, x):
        a = self.act(x)
        b = self.act(a + 1.0)
        a.mul_(-3.0)
        return a + b


def test_a_module_called_twice_stays_launched_in_its_hook_when_either_output_changes(pull, monkeypatch):
    model = _Twice().to(DEV)
    seen: dict = {}
    _reference_hooks(model, seen)
    launches = _Launches(monkeypatch)
    refs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no value may be found changed after being deferred
        with Tap(every_n_steps=1, all_leaves=True) as tap, torch.no_grad():
            tap.watch(model)
            for _ in range(3):
                x = torch.randn(3, 5, device=DEV)
                tap.log_batch({"x": x}, epoch=0)
                model(x)
                refs.append({**seen, "x": x.clone()})  # the second call's output: the record's
                assert launches.take()[0] >= 2  # both calls, every step
    assert tap.sender.dropped == 0
    assert pull.wait_for(lambda r: len(pull.find("activations")) == 3)
    for rec in pull.find("activations"):
        _check_value(rec["data"], refs[rec["step"]]["act:output"], rec["step"])
