"""Every statistic equals an independent NumPy computation on the same tensor."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from client_hooks import stats

SPECIAL = st.sampled_from([math.nan, math.inf, -math.inf])


def _values(width=32, lim=1e4):
    return st.one_of(st.floats(-lim, lim, width=width), SPECIAL)


def computed(t: torch.Tensor, pair=None) -> dict:
    is_c = t.is_complex() or pair is not None
    x = stats.as_complex(t, pair, 1) if pair else t
    vals = stats.tensor_stats_vector(x).tolist()
    return stats.tensor_stats_dict(vals, list(x.shape), stats.dtype_name(t.dtype), is_c)


def ref_part(a: np.ndarray, fin: np.ndarray) -> dict:
    x = a[fin]
    if x.size == 0:
        return dict.fromkeys(("min", "max", "mean", "std"))
    return {"min": x.min(), "max": x.max(), "mean": x.mean(), "std": x.std()}


def close(got, ref, scale):
    if ref is None:
        return got is None
    return got is not None and abs(got - ref) <= 1e-5 * scale + 1e-5 * abs(ref) + 1e-30


def check_real(t: torch.Tensor):
    a = t.to(torch.float64).numpy().reshape(-1)
    d = computed(t)
    fin = np.isfinite(a)
    assert d["count"] == a.size and d["shape"] == list(t.shape)
    assert d["dtype"] == str(t.dtype).removeprefix("torch.")
    assert d["nan"] == np.isnan(a).sum() and d["inf"] == np.isinf(a).sum()
    scale = np.abs(a[fin]).max() if fin.any() else 1.0
    for k, ref in ref_part(a, fin).items():
        assert close(d[k], ref, scale), (k, d[k], ref)


def check_complex(z: np.ndarray, d: dict):
    z = z.reshape(-1)
    fin = np.isfinite(z)
    assert d["count"] == z.size
    assert d["nan"] == np.isnan(z).sum() and d["inf"] == np.isinf(z).sum()
    scale = np.abs(z[fin]).max() if fin.any() else 1.0
    for key, part in (("real", z.real), ("imag", z.imag), ("abs", np.abs(z)), ("angle", np.angle(z))):
        for k, ref in ref_part(part, fin).items():
            assert close(d[key][k], ref, max(scale, math.pi)), (key, k, d[key][k], ref)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7),
                  elements=_values()))
def test_real_float32_stats_match_numpy(a):
    check_real(torch.from_numpy(a))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(max_dims=2, max_side=9), elements=_values(64, 1e12)))
def test_real_float64_stats_match_numpy(a):
    check_real(torch.from_numpy(a))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float16, hnp.array_shapes(max_dims=2, max_side=9), elements=_values(16, 6e4)))
def test_float16_stats_match_numpy(a):
    check_real(torch.from_numpy(a))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=9), elements=_values()))
def test_bfloat16_stats_match_numpy_on_the_same_values(a):
    check_real(torch.from_numpy(a).to(torch.bfloat16))


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(0, 3), st.integers(1, 6)), elements=_values()),
       st.data())
def test_complex_stats_match_numpy_for_real_imag_abs_angle(re, data):
    im = data.draw(hnp.arrays(np.float32, re.shape, elements=_values()))
    z = np.empty(re.shape, np.complex64)
    z.real, z.imag = re, im
    check_complex(z, computed(torch.from_numpy(z)))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float16, st.tuples(st.integers(0, 3), st.integers(1, 6)), elements=_values(16, 6e4)),
       st.data())
def test_complex32_stats_match_numpy_on_the_same_values(re, data):
    """ComplexHalf (an FFT of float16 values under CUDA autocast gives one): the statistics of
    its values, as the record and as the engine's complex path compute them."""
    im = data.draw(hnp.arrays(np.float16, re.shape, elements=_values(16, 6e4)))
    z = np.empty(re.shape, np.complex64)
    z.real, z.imag = re, im
    with warnings.catch_warnings():  # "ComplexHalf support is experimental"
        warnings.simplefilter("ignore", UserWarning)
        t = torch.complex(torch.from_numpy(re), torch.from_numpy(im))
        assert t.dtype == torch.complex32
        d = computed(t)
        check_complex(z, d)
        assert d["dtype"] == "complex32"
        if re.size:
            vals = stats.complex_vector(t, None, host_ok=True)  # host floats, or a tensor (masked path)
            vals = vals.tolist() if isinstance(vals, torch.Tensor) else vals
            check_complex(z, stats.tensor_stats_dict(vals, list(re.shape), "complex32", True))


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=_values()),
       st.data())
def test_the_engine_complex_path_matches_numpy_as_value_and_as_real_imag_pair(re, data):
    """complex_vector: the CPU fast path (parts stacked in float64) when every element is
    finite, else the masked path; a real/imag pair gives the same as its complex value."""
    im = data.draw(hnp.arrays(np.float32, re.shape, elements=_values()))
    z = np.empty(re.shape, np.complex64)
    z.real, z.imag = re, im
    for t, pair in ((torch.from_numpy(z), None), (torch.from_numpy(np.stack([re, im], 1)), "real_imag")):
        vals = stats.complex_vector(t, pair, host_ok=True)  # host floats, or a tensor (masked path)
        vals = vals.tolist() if isinstance(vals, torch.Tensor) else vals
        check_complex(z, stats.tensor_stats_dict(vals, list(re.shape), "complex64", True))


def test_declared_real_imag_and_amp_phase_pairs_are_stats_of_the_complex_value():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 2, 5, 4, generator=g)
    z = t[:, 0].double().numpy() + 1j * t[:, 1].double().numpy()
    check_complex(z, computed(t, "real_imag"))
    amp, ph = t[:, 0].abs(), t[:, 1]
    t2 = torch.stack([amp, ph], 1)
    z2 = amp.double().numpy() * np.exp(1j * ph.double().numpy())
    check_complex(z2, computed(t2, "amp_phase"))
    for pair, want in (("real_imag", z), ("amp_phase", z2)):  # the engine's path
        got = stats.complex_vector(t if pair == "real_imag" else t2, pair, host_ok=True)
        assert isinstance(got, list)  # all finite: the CPU fast path
        check_complex(want, stats.tensor_stats_dict(got, [3, 5, 4], "float32", True))


def test_a_pair_without_two_channels_is_refused_with_the_shape():
    with pytest.raises(ValueError, match="size 2 along dim 1"):
        stats.as_complex(torch.zeros(2, 3, 4), "real_imag", 1)


@pytest.mark.parametrize("t", [torch.zeros(0), torch.zeros(3, 0, dtype=torch.cfloat),
                               torch.tensor([math.nan, math.inf])])
def test_no_finite_element_gives_none_statistics(t):
    d = computed(t)
    parts = [d[k] for k in ("real", "imag", "abs", "angle")] if t.is_complex() else [d]
    for p in parts:
        assert all(p[k] is None for k in ("min", "max", "mean", "std"))
    assert d["count"] == t.numel()


def test_single_element_has_zero_std_and_equal_min_max_mean():
    d = computed(torch.tensor([3.5], dtype=torch.float16))
    assert (d["min"], d["max"], d["mean"], d["std"]) == (3.5, 3.5, 3.5, 0.0)


def test_integer_tensors_are_measured_exactly():
    t = torch.tensor([[1, 2], [3, 2**40]])
    check_real(t)


def test_gradient_stats_match_numpy_including_nan_and_zeros():
    g1 = torch.tensor([[0.0, 1.0], [-3.0, math.nan]])
    g2 = torch.tensor([0.0, 2.0, math.inf])
    w = [torch.ones(2, 2), torch.full((3,), 2.0)]
    vals = stats.grad_stats_vector([g1, g2], w).tolist()
    d = stats.grad_stats_dict(vals, 7, 0.25)
    a = np.concatenate([g1.numpy().ravel(), g2.numpy().ravel()]).astype(np.float64)
    x = a[np.isfinite(a)]
    assert d["count"] == 7 and d["nan"] == 1 and d["inf"] == 1
    assert d["mean"] == pytest.approx(x.mean()) and d["std"] == pytest.approx(x.std())
    assert d["norm"] == pytest.approx(np.linalg.norm(x)) and d["max_abs"] == pytest.approx(3.0)
    assert d["zero_frac"] == pytest.approx(2 / 7)
    assert d["weight_norm"] == pytest.approx(math.sqrt(4 + 12)) and d["update_ratio"] == 0.25


@pytest.mark.parametrize("where", [None, 10, 400_000, 599_999])
def test_tensors_of_several_cpu_chunks_match_numpy_with_nan_anywhere(where):
    """The CPU path reads 2^18-element chunks: a NaN in any chunk must reach the counts."""
    x = torch.randn(600_000, generator=torch.Generator().manual_seed(0)) * 3 + 0.5
    if where is not None:
        x[where] = math.nan
        x[(where + 7) % x.numel()] = -math.inf
    check_real(x)


@pytest.mark.skipif(stats._FUSED_CPU, reason="the CPU path's host floats; this pass runs the fused kernels")
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.sampled_from([0.0, -0.0, 1.5, -2.0, 1e-30])))
@settings(max_examples=60, deadline=None)
def test_finite_gradients_count_signed_zeros_and_give_host_floats_equal_to_the_tensor(a):
    """The CPU fast path: +0.0 and -0.0 are both zeros; the host list equals the tensor."""
    host = stats.grad_moments_vector([torch.from_numpy(a)], host_ok=True)
    assert isinstance(host, list) and host == stats.grad_moments_vector([torch.from_numpy(a)]).tolist()
    x = a.astype(np.float64)
    assert host[7] == (x == 0).sum() and host[8] == pytest.approx(np.linalg.norm(x), rel=1e-6)


def test_patch_metrics_match_numpy_and_expose_a_pure_scale_mismatch():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(4, 8, 8, generator=g)
    pred = 2.0 * target
    d = stats.patch_dict(stats.patch_vector(pred, target, None).tolist(), pred.numel(), False, None)
    p, t = pred.double().numpy(), target.double().numpy()
    assert d["mae"] == pytest.approx(np.abs(p - t).mean()) and d["mse"] == pytest.approx(((p - t) ** 2).mean())
    assert d["optimal_scale"] == pytest.approx(0.5) and d["mae_after_optimal_scale"] == pytest.approx(0, abs=1e-6)
    assert d["scale_applied"] is False and "no scaling applied" in d["scaling"]
    d2 = stats.patch_dict(stats.patch_vector(pred, target, 0.5).tolist(), pred.numel(), True, "rms")
    assert d2["mae"] == pytest.approx(0, abs=1e-6) and d2["scale_applied"] is True
    assert "multiplied by 0.5" in d2["scaling"] and "rms" in d2["scaling"]


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter pass's kernels
@pytest.mark.parametrize("special", [None, math.nan, -math.inf])
def test_finite_values_whose_float32_sum_overflows_match_numpy(special):
    """Values near float32's largest: their float32 sum overflows, their statistics do not
    (all finite, and with a NaN or an infinity among them); over several blocks of the
    fused kernels and a partial one."""
    g = torch.Generator().manual_seed(7)
    t = torch.randn(4096 * 2 + 3, generator=g) * 1e35 + 2e36
    assert math.isinf(t.sum().item())
    if special is not None:
        t[4100] = special
    check_real(t)
    check_real(-t[: 4096 * 2].reshape(2, 4096))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=9), elements=_values()), st.data())
def test_the_masked_path_used_on_accelerators_matches_numpy_too(a, data):
    from unittest import mock

    im = data.draw(hnp.arrays(np.float32, a.shape, elements=_values()))
    with mock.patch.object(stats, "_fast_moments", lambda parts, zeros=None: None):
        check_real(torch.from_numpy(a))
        z = np.empty(a.shape, np.complex64)
        z.real, z.imag = a, im
        check_complex(z, computed(torch.from_numpy(z)))


@pytest.mark.parametrize("values", [
    [1.0, 2.0, 3.0],
    [0.0, 0.0],
    [5.0],
    "huge",  # float32 squares of the deviations overflow
    "tiny",  # float32 squares of the deviations underflow
    "huge_nan",
])
def test_the_accelerator_std_without_triton_matches_numpy(values):
    """The masked path with the std that accelerators use where Triton is missing (one
    var_mean of the scaled values), run here on CPU tensors."""
    from unittest import mock

    g = torch.Generator().manual_seed(3)
    if values in ("huge", "huge_nan"):
        t = torch.randn(1000, generator=g) * 1e30
        if values == "huge_nan":
            t[10] = math.nan
    elif values == "tiny":
        t = torch.randn(1000, generator=g) * 1e-25 + 3e-25
    else:
        t = torch.tensor(values)
    with mock.patch.object(stats, "_fast_moments", lambda parts, zeros=None: None), \
            mock.patch.object(stats, "_std", lambda x, mean, mn, mx: stats._std_scaled(x, mn, mx)):
        check_real(t)
