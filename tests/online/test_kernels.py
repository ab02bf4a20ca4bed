"""The compiled kernels against the rules' numpy references, on random event streams."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

from streamml.online import ResidualLearner, kernels
from streamml.online.rules import Catalog, DiagonalLaplace, IsotropicLaplace, PairwiseSGD, PointwiseSGD, WindowMAP

RULES = {
    "pointwise": PointwiseSGD(lr=3.0, l2=0.02, decay=0.01, max_norm=2.0),  # the cap binds on some steps
    "pairwise": PairwiseSGD(lr=3.0, l2=0.02, decay=0.01, max_norm=2.0, buffer_size=6),
    "laplace": DiagonalLaplace(prior_var=3.0),
    "laplace32": DiagonalLaplace(prior_var=0.5, dtype="float32"),
    "laplace_iso": IsotropicLaplace(prior_var=3.0),
    "window": WindowMAP(prior_var=3.0, window=6),  # ~300 events per key: the window is full most of the time
}
WINDOW_HEAD = WindowMAP(prior_var=3.0, window=5, newton_steps=2, head_var=1.0)  # event by event only: its solve is slow in numpy


def catalog(rng, n=60, d=24):
    X = (rng.standard_normal((n, d)) / np.sqrt(d)).astype(np.float32)
    return Catalog(X, rng.standard_normal(n).astype(np.float32))


def empty_state(rule, n_rows, d, dtype):
    fields = {"residual": np.zeros((n_rows, d), dtype)}
    for name, f in rule.fields(d).items():
        fields[name] = np.full((n_rows, *f.shape), f.fill, f.dtype)
    return fields


def run_reference(rule, cols, rows, items, labels, cat):
    """Event by event, each key's state rounded to its storage dtype after every event, as stored."""
    for row, item, label in zip(rows.tolist(), items.tolist(), labels.tolist()):
        state = {n: c[row].astype(np.float32) if c.dtype.kind == "f" else c[row].copy() for n, c in cols.items()}
        rule.reference(state, cat.embeddings[item], float(cat.head[item]), label, cat, item=item)
        for n, c in cols.items():
            c[row] = state[n]


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_reference_on_random_streams(name, dtype, threads):
    rng = np.random.default_rng([sorted(RULES).index(name), threads])
    rule, cat = RULES[name], catalog(rng)
    n_rows, n = 30, 2 * kernels.PARALLEL_MIN_EVENTS + 500  # two threads' worth: the split path too
    rows = rng.integers(0, n_rows, n)  # ~300 events per key, interleaved
    items, labels = rng.integers(0, 60, n), rng.random(n) < 0.3  # lopsided: mostly rejections
    want = empty_state(rule, n_rows, 24, dtype)
    got = {k: v.copy() for k, v in want.items()}
    run_reference(rule, want, rows, items, labels, cat)
    rule.apply(got, rows, items, labels, cat, threads=threads)
    assert np.abs(want["residual"].astype(np.float32)).max() > 0.1
    assert_states_agree(got, want, dtype)


def assert_states_agree(got, want, dtype):
    # float32: summation order only. float16: a rounding that differs once can change later steps
    tol = 1e-4 if dtype == "float32" else 2e-2
    for field in want:
        if want[field].dtype.kind == "f":
            np.testing.assert_allclose(got[field].astype(np.float32), want[field].astype(np.float32), rtol=tol, atol=tol)
        else:
            np.testing.assert_array_equal(got[field], want[field])


def test_kernel_equals_reference_event_by_event_in_float16():
    """Single events from the same float16 state: equal up to one float16 rounding."""
    rng = np.random.default_rng(9)
    cat = catalog(rng)
    for rule in (RULES["pointwise"], RULES["pairwise"], RULES["laplace"], RULES["laplace_iso"], WINDOW_HEAD):
        cols = empty_state(rule, 5, 24, "float16")
        for t in range(200):
            row, item, label = int(rng.integers(5)), int(rng.integers(60)), bool(rng.integers(2))
            ref = {k: v.copy() for k, v in cols.items()}
            run_reference(rule, ref, np.array([row]), np.array([item]), np.array([label]), cat)
            rule.apply(cols, np.array([row]), np.array([item]), np.array([label]), cat)
            np.testing.assert_allclose(cols["residual"][row].astype(np.float32), ref["residual"][row].astype(np.float32),
                                       rtol=2**-10, atol=2**-14)
            for k in set(cols) - {"residual"}:
                np.testing.assert_allclose(cols[k][row].astype(np.float32), ref[k][row].astype(np.float32), rtol=2**-10)
                cols[k][row] = ref[k][row]
            cols["residual"][row] = ref["residual"][row]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_window_with_a_head_weight_equals_the_reference_on_an_interleaved_stream(dtype):
    """Keys interleaved, windows filling up at different times, a new key as the last event."""
    rng = np.random.default_rng(11)
    cat = catalog(rng)
    rows = np.concatenate([rng.integers(0, 3, 60), rng.integers(0, 6, 200), np.zeros(5, np.int64), rng.integers(0, 3, 100),
                           np.zeros(6, np.int64), [6]])
    items, labels = rng.integers(0, 60, len(rows)), rng.random(len(rows)) < 0.4
    want = empty_state(WINDOW_HEAD, 7, 24, dtype)
    got = {k: v.copy() for k, v in want.items()}
    run_reference(WINDOW_HEAD, want, rows, items, labels, cat)
    WINDOW_HEAD.apply(got, rows, items, labels, cat)
    assert np.abs(want["head_weight"]).max() > 0.01
    assert_states_agree(got, want, dtype)


def test_a_rule_without_a_kernel_call_is_refused_by_the_learner():
    class Custom:  # a reference and fields, but no apply: nothing could run its events
        def fields(self, dim):
            return {}

        def reference(self, state, x, z, label, cat, item=-1):
            state["residual"] += x

    X = np.eye(3, dtype=np.float32)
    with pytest.raises(TypeError, match="rule Custom lacks apply"):
        ResidualLearner(X, np.zeros(3, np.int64), rule=Custom())


def test_a_subclass_with_its_own_reference_but_the_parents_kernel_is_refused():
    class Custom(PointwiseSGD):  # a new step, but PointwiseSGD.apply would run the old one
        def reference(self, state, x, z, label, cat, item=-1):
            state["residual"] += x

    class Tuned(PointwiseSGD):  # other defaults only: reference and kernel stay twins
        def __init__(self):
            super().__init__(lr=0.5)

    X = np.eye(3, dtype=np.float32)
    with pytest.raises(TypeError, match="rule Custom defines its own reference but runs PointwiseSGD's kernel"):
        ResidualLearner(X, np.zeros(3, np.int64), rule=Custom())
    assert ResidualLearner(X, np.zeros(3, np.int64), rule=Tuned()).rule.lr == 0.5


# ------------------------------------------------------------------ float16 in the kernels
@numba.njit
def _f16_round_trip(bits, x):
    out_f, out_h = np.empty(len(bits), np.float32), np.empty(len(x), np.uint16)
    for i in range(len(bits)):
        out_f[i] = kernels._to_f32(bits[i])
    for i in range(len(x)):
        out_h[i] = kernels._from_f32(x[i], out_h.dtype)
    return out_f, out_h


def float16_cases():
    """Every float16 bit pattern, and float32s around every float16: ties, overflow, subnormals."""
    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    f = bits.view(np.float16).astype(np.float32)
    f = f[np.isfinite(f)]
    with np.errstate(invalid="ignore"):
        mid = ((f[:-1].astype(np.float64) + f[1:]) / 2).astype(np.float32)  # exact ties (RNE decides)
    x = np.concatenate([f, mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, -np.float32(np.inf))])
    rng = np.random.default_rng(0)
    x = np.concatenate([x, (rng.standard_normal(10_000) * 10.0 ** rng.integers(-9, 6, 10_000)).astype(np.float32)])
    x = np.concatenate([x, np.float32([65519.0, 65520.0, 1e30, -1e30, 0.0, -0.0, np.inf, -np.inf])])
    return bits, x


def test_float16_conversions_match_numpy():
    bits, x = float16_cases()
    with np.errstate(over="ignore"):
        want_h = x.astype(np.float16).view(np.uint16)
    want_f = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(want_f)  # (the CPU quietens signalling NaNs; numpy keeps their payload)
    got_f, got_h = _f16_round_trip(bits, x)  # what the kernels use on this machine
    np.testing.assert_array_equal(got_f.view(np.uint32)[~nan], want_f.view(np.uint32)[~nan])  # -0 too
    assert np.isnan(got_f[nan]).all()
    np.testing.assert_array_equal(got_h, want_h)
    # the software fallback (CPUs without float16 instructions), element by element
    soft_f = np.array([kernels._h2f_soft(b) for b in bits.tolist()], np.float32)
    np.testing.assert_array_equal(soft_f.view(np.uint32)[~nan], want_f.view(np.uint32)[~nan])
    assert np.isnan(soft_f[nan]).all()
    soft_h = np.array([kernels._f2h_soft(v) for v in x[::7].tolist()], np.uint16)
    np.testing.assert_array_equal(soft_h, want_h[::7])


@pytest.mark.slow
def test_kernels_without_float16_instructions(tmp_path):
    """A CPU target without F16C takes the software conversions; kernels still equal the references."""
    code = """
import sys
sys.argv = ["pytest"]
from streamml.online import ResidualLearner, kernels
from streamml.online import kernel_support
assert not kernel_support.NATIVE_HALF
import pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", "{test}", "-k",
                      "float16_conversions or event_by_event or (random_streams and 1-float16)"]))
""".format(test=__file__)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(kernels.__file__)))  # this checkout
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=repo)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=900, cwd=repo)
