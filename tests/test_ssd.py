"""Equation-level tests of ssd.py: each form checked against an independent computation."""

import math

import pytest
import torch
import torch.nn.functional as F

from fast_ssd import FAST_CHUNK, SSD_FORMS, ssd_chunked_fast
from ssd import (segsum, ssd, ssd_chunked, ssd_quadratic, ssd_recurrent, ssd_step, ssm_conv,
                 ssm_conv_kernel,
                 zoh_discretize)

f64 = torch.float64


# ---------------------------------------------------------------- eqs. 1-2: the continuous SSM and its zero-order hold

def test_eq1_eq2_zoh_step_equals_integrating_the_continuous_ssm():
    """Eq. 1 (h' = A h + B x) integrated by classical Runge-Kutta over one step with x held constant lands where
    eq. 2's ZOH step puts it: h(delta) = A_bar h(0) + B_bar x."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=g, dtype=f64) - 1.5 * torch.eye(4, dtype=f64)
    B, h0, x = (torch.randn(4, 2, generator=g, dtype=f64), torch.randn(4, generator=g, dtype=f64),
                torch.randn(2, generator=g, dtype=f64))
    delta, steps = 0.7, 2000
    f = lambda h: A @ h + B @ x  # noqa: E731  eq. 1 with the input held (zero-order hold)
    h, dt = h0.clone(), delta / steps
    for _ in range(steps):
        k1 = f(h)
        k2 = f(h + dt / 2 * k1)
        k3 = f(h + dt / 2 * k2)
        k4 = f(h + dt * k3)
        h = h + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    A_bar, B_bar = zoh_discretize(A, B, delta)
    torch.testing.assert_close(A_bar @ h0 + B_bar @ x, h, rtol=1e-10, atol=1e-12)


def zoh_by_block_exponential(A, B, delta):
    """Independent ZOH: exp(delta [[A, B], [0, 0]]) = [[A_bar, B_bar], [0, I]] (Van Loan's block matrix)."""
    N, M = B.shape
    block = torch.zeros(N + M, N + M, dtype=f64)
    block[:N, :N] = A
    block[:N, N:] = B
    E = torch.linalg.matrix_exp(delta * block)
    return E[:N, :N], E[:N, N:]


def test_zoh_full_matrix_matches_block_exponential():
    """Eq. 2 for a full A against Van Loan's block exponential, down to a tiny step."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(5, 5, generator=g, dtype=f64) - 2 * torch.eye(5, dtype=f64)
    B = torch.randn(5, 3, generator=g, dtype=f64)
    for delta in (0.5, 0.05, 1e-4):
        A_bar, B_bar = zoh_discretize(A, B, delta)
        A_ref, B_ref = zoh_by_block_exponential(A, B, delta)
        torch.testing.assert_close(A_bar, A_ref, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(B_bar, B_ref, rtol=1e-10, atol=1e-14)


def test_zoh_diagonal_and_scalar_match_block_exponential():
    """Eq. 2 for a diagonal A (as (N,)) and a scalar A against the block exponential."""
    a = -torch.tensor([0.5, 1.0, 3.0, 10.0], dtype=f64)
    B = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=f64)
    for delta in (0.3, 1e-3):
        A_bar, B_bar = zoh_discretize(a, B, delta)  # diagonal given as (N,), B as (N,)
        A_ref, B_ref = zoh_by_block_exponential(torch.diag(a), B[:, None], delta)
        torch.testing.assert_close(A_bar, torch.diagonal(A_ref), rtol=1e-13, atol=0)
        torch.testing.assert_close(B_bar, B_ref[:, 0], rtol=1e-10, atol=0)
        # the same diagonal with a (N, M) input matrix
        B2 = torch.stack([B, 2 * B], dim=1)
        _, B_bar2 = zoh_discretize(a, B2, delta)
        torch.testing.assert_close(B_bar2, zoh_by_block_exponential(torch.diag(a), B2, delta)[1], rtol=1e-10, atol=0)
    # scalar A
    A_bar, B_bar = zoh_discretize(torch.tensor(-2.0, dtype=f64), B, 0.1)
    A_ref, B_ref = zoh_by_block_exponential(-2.0 * torch.eye(4, dtype=f64), B[:, None], 0.1)
    torch.testing.assert_close(A_bar, A_ref[0, 0])
    torch.testing.assert_close(B_bar, B_ref[:, 0])


def test_eq2_zoh_dtypes_and_its_series_switch():
    """Eq. 2's dtypes: B takes a float A's dtype (a Python list B with a float64 A is read in float64, checked against
    Van Loan's block exponential to 1e-13), an integer A takes B's; and a full A whose ||delta A||_1 is just under 1,
    where the series would be cut too early, goes through the linear solve (checked to 1e-14)."""
    a = torch.tensor([-0.3, -1.7], dtype=f64)
    b = [0.1, 0.7]
    A_bar, B_bar = zoh_discretize(a, b, 0.1)
    ref_A, ref_B = zoh_by_block_exponential(torch.diag(a), torch.tensor(b, dtype=f64)[:, None], 0.1)
    assert A_bar.dtype == B_bar.dtype == f64
    torch.testing.assert_close(A_bar, torch.diagonal(ref_A), rtol=1e-14, atol=0)
    torch.testing.assert_close(B_bar, ref_B[:, 0], rtol=1e-13, atol=0)
    A_bar, B_bar = zoh_discretize(a.float(), torch.tensor(b, dtype=f64), 0.1)
    assert A_bar.dtype == B_bar.dtype == torch.float32
    torch.testing.assert_close(B_bar, ref_B[:, 0].float())
    _, B_bar = zoh_discretize(torch.tensor([-1, -2]), torch.tensor([0.5, 0.25]), 0.5)  # an integer A
    dA = torch.tensor([-0.5, -1.0])
    torch.testing.assert_close(B_bar, 0.5 * torch.tensor([0.5, 0.25]) * torch.expm1(dA) / dA)
    A = torch.tensor([[-0.6, 0.3], [0.2, -0.35]], dtype=f64)  # ||A||_1 = 0.95
    B = torch.tensor([[1.0], [0.5]], dtype=f64)
    for got, want in zip(zoh_discretize(A, B, 1.0), zoh_by_block_exponential(A, B, 1.0)):
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)


def test_zoh_small_delta_is_stable():
    """Eq. 2 as delta A -> 0: B_bar -> delta B (Mamba-2's approximation) without 0/0, also for a singular full A."""
    a = -torch.tensor([1.0, 2.0, 0.0], dtype=f64)  # includes A = 0 exactly
    B = torch.tensor([1.0, 1.0, 1.0], dtype=f64)
    for delta in (1e-6, 1e-10, 1e-14):
        _, B_bar = zoh_discretize(a, B, delta)
        # the series to second order: its error (delta a)^2 / 6 is far below the tolerance
        torch.testing.assert_close(B_bar, delta * B * (1 + delta * a / 2), rtol=1e-12, atol=0)
    A_sing = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=f64)  # singular: (delta A)^-1 does not exist
    _, B_bar = zoh_discretize(A_sing, torch.eye(2, dtype=f64), 1e-3)
    torch.testing.assert_close(B_bar, zoh_by_block_exponential(A_sing, torch.eye(2, dtype=f64), 1e-3)[1])
    # float32: still finite and close
    _, B32 = zoh_discretize(torch.tensor([-1.0, 0.0]), torch.ones(2), 1e-7)
    assert torch.isfinite(B32).all()
    torch.testing.assert_close(B32, torch.full((2,), 1e-7), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- eq. 4: convolution kernel

def lti_recurrence(A_bar, B_bar, C, x):
    h = torch.zeros(A_bar.shape[0], dtype=f64)
    ys = []
    for x_t in x:
        h = A_bar @ h + B_bar * x_t
        ys.append(C @ h)
    return torch.stack(ys)


def test_convolution_with_K_equals_the_recurrence():
    """Eq. 4: y = x * K with K = (C B_bar, C A_bar B_bar, ...) equals the recurrence of eq. 3 run step by step."""
    g = torch.Generator().manual_seed(1)
    N, L = 6, 37
    A = torch.randn(N, N, generator=g, dtype=f64) * 0.3 - torch.eye(N, dtype=f64)
    A_bar, B_bar = zoh_discretize(A, torch.randn(N, generator=g, dtype=f64), 0.2)
    C = torch.randn(N, generator=g, dtype=f64)
    x = torch.randn(L, generator=g, dtype=f64)
    K = ssm_conv_kernel(A_bar, B_bar, C, L)
    # K_k = C A_bar^k B_bar, spelled out with matrix powers
    torch.testing.assert_close(K[5], C @ torch.linalg.matrix_power(A_bar, 5) @ B_bar)
    torch.testing.assert_close(ssm_conv(x, K), lti_recurrence(A_bar, B_bar, C, x), rtol=1e-10, atol=1e-12)
    # diagonal A as (N,): same kernel as the dense diagonal matrix
    a = -torch.rand(N, generator=g, dtype=f64) - 0.1
    Ad, Bd = zoh_discretize(a, torch.randn(N, generator=g, dtype=f64), 0.5)
    torch.testing.assert_close(ssm_conv_kernel(Ad, Bd, C, L), ssm_conv_kernel(torch.diag(Ad), Bd, C, L))
    torch.testing.assert_close(ssm_conv(x, ssm_conv_kernel(Ad, Bd, C, L)), lti_recurrence(torch.diag(Ad), Bd, C, x),
                               rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- selective SSD: the three forms

def random_ssd_inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0, dtype=f64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen, dtype=dtype) - 1)
    A = -torch.rand(h, generator=gen, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, l, g, n, generator=gen, dtype=dtype)
    D = torch.randn(h, generator=gen, dtype=dtype)
    state0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D, state0


def brute_force_ssd(x, dt, A, B, C, D, state0):
    """Scalar loops over every index, float64: h[i, j] += ..., straight from the recurrence."""
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    y = torch.zeros(b, l, h, p, dtype=f64)
    st = state0.clone()
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for t in range(l):
                a = math.exp(float(dt[bi, t, hi] * A[hi]))
                for pi in range(p):
                    for ni in range(n):
                        st[bi, hi, pi, ni] = (a * st[bi, hi, pi, ni]
                                              + dt[bi, t, hi] * B[bi, t, gi, ni] * x[bi, t, hi, pi])
                    y[bi, t, hi, pi] = (st[bi, hi, pi] * C[bi, t, gi]).sum() + D[hi] * x[bi, t, hi, pi]
    return y, st


def test_segsum_is_the_sum_over_the_segment():
    x = torch.randn(7, dtype=f64)
    S = segsum(x)
    for i in range(7):
        for j in range(7):
            expected = x[j + 1:i + 1].sum() if i >= j else -math.inf
            assert S[i, j].item() == pytest.approx(float(expected), abs=1e-14)


def test_recurrent_matches_brute_force_loops():
    """Eq. 3 (selective, Mamba-2's A_bar = exp(dt A), B_bar = dt B): ssd_recurrent against scalar float64 loops over
    every batch, head, channel and state entry, from a non-zero initial state."""
    x, dt, A, B, C, D, s0 = random_ssd_inputs(b=1, l=9, h=4, p=2, g=2, n=3)
    y, st = ssd_recurrent(x, dt, A, B, C, D, initial_state=s0)
    y_ref, st_ref = brute_force_ssd(x, dt, A, B, C, D, s0)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, st_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("l", [1, 16, 37, 64])
@pytest.mark.parametrize("h,g", [(4, 1), (4, 2), (6, 6)])
@pytest.mark.parametrize("use_D", [False, True])
def test_quadratic_and_chunked_equal_the_recurrence(l, h, g, use_D):
    """Eq. 3 in its dual (quadratic) and chunked forms equals the recurrence: odd lengths, several heads and groups."""
    x, dt, A, B, C, D, _ = random_ssd_inputs(l=l, h=h, g=g)
    D = D if use_D else None
    y_rec, st_rec = ssd_recurrent(x, dt, A, B, C, D)
    torch.testing.assert_close(ssd_quadratic(x, dt, A, B, C, D), y_rec, rtol=1e-10, atol=1e-10)
    for chunk in (1, 8, 16, 64):  # l is a multiple of some of these, not of others
        y, st = ssd_chunked(x, dt, A, B, C, chunk, D)
        torch.testing.assert_close(y, y_rec, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(st, st_rec, rtol=1e-10, atol=1e-10)


def test_heads_must_be_a_multiple_of_groups():
    x, dt, A, B, C, D, _ = random_ssd_inputs(h=6, g=4, l=5)
    message = r"^the number of heads \(6\) must be a multiple of the number of groups \(4\)$"
    for form in (ssd_recurrent, ssd_quadratic, lambda *a: ssd_chunked(*a[:5], 4, *a[5:]),
                 lambda *a: ssd_chunked_fast(*a[:5], 4, *a[5:])):
        with pytest.raises(ValueError, match=message):
            form(x, dt, A, B, C, D)


@pytest.mark.parametrize("l,chunk", [(37, 8), (40, 8), (5, 16)])
def test_chunked_with_initial_state(l, chunk):
    """Eq. 3 chunked from a non-zero initial state: the output and the final state equal the recurrence's."""
    x, dt, A, B, C, D, s0 = random_ssd_inputs(l=l)
    y_rec, st_rec = ssd_recurrent(x, dt, A, B, C, D, initial_state=s0)
    y, st = ssd_chunked(x, dt, A, B, C, chunk, D, initial_state=s0)
    torch.testing.assert_close(y, y_rec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(st, st_rec, rtol=1e-10, atol=1e-10)
    # splitting the sequence and carrying the state is the same as one pass
    k = l // 3
    y1, s1 = ssd_chunked(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], chunk, D, initial_state=s0)
    y2, s2 = ssd_chunked(x[:, k:], dt[:, k:], A, B[:, k:], C[:, k:], chunk, D, initial_state=s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_rec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, st_rec, rtol=1e-10, atol=1e-10)


def test_chunked_float32_keeps_fp32_state_and_is_accurate():
    x, dt, A, B, C, D, s0 = random_ssd_inputs(l=300, h=4, g=1, n=16, p=8)
    y64, st64 = ssd_recurrent(x, dt, A, B, C, D, initial_state=s0)
    y, st = ssd_chunked(*(t.float() for t in (x, dt, A, B, C)), 64, D.float(), initial_state=s0.float())
    assert y.dtype == torch.float32 and st.dtype == torch.float32
    torch.testing.assert_close(y.double(), y64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(st.double(), st64, rtol=1e-4, atol=1e-4)


def fp32_errors_at_strong_decay(scan):
    """scan(x, dt, A, B, C, D, initial_state) in fp32 against the float64 recurrence, on inputs whose first 256
    positions sum dt A to 215: the errors of y, the final state and the gradient of every input, each relative to
    its largest value."""
    inputs = random_ssd_inputs(l=300, h=4, g=2, n=16, p=8)
    dt, A = inputs[1:3]
    assert torch.cumsum(dt[:, :256] * A, 1).abs().max() > 200
    weights = torch.randn(2, 300, 4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for dtype, fn in ((torch.float64, lambda *a: ssd_recurrent(*a[:6], initial_state=a[6])), (torch.float32, scan)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        y, st = fn(*leaves)
        ((y * weights.to(dtype)).sum() + (st * 0.5).sum()).backward()
        results.append([y.detach().double(), st.detach().double()] + [t.grad.double() for t in leaves])
    names = ("y", "state", "x", "dt", "A", "B", "C", "D", "initial state")
    return {name: float((got - want).abs().max() / want.abs().max()) for name, got, want in zip(names, *results)}


def test_eq3_chunked_in_fp32_at_mamba2s_chunk_of_256_with_strong_decay():
    """Eq. 3 in fp32 with chunks of 256, as Mamba-2's configs have them, and decays strong enough that a chunk's sum
    of dt A reaches 215: y, the final state and every input's gradient within 1e-5 of the float64 recurrence's,
    relative to their largest values. `segsum` builds each segment sum from its own terms; as the difference
    cs_t - cs_s of two cumulative sums, the gradients of dt and A would subtract sums of the size of |cs| and miss
    this bound (2.7e-5 for A on these inputs)."""
    errors = fp32_errors_at_strong_decay(lambda *a: ssd_chunked(*a[:5], 256, a[5], initial_state=a[6]))
    assert max(errors.values()) < 1e-5, errors


def test_eq3_chunked_fast_in_fp32_at_its_chunk_with_strong_decay():
    """ssd_chunked_fast in fp32 at its chunk (fast_ssd.FAST_CHUNK), a chunk's sum of dt A up to 215: y, the final
    state and the gradients of x, B, C, D and the initial state within 1e-5 of the float64 recurrence; the gradients
    of dt and A, which pass through its segment sums cs_t - cs_s, within 1e-4."""
    errors = fp32_errors_at_strong_decay(lambda *a: ssd_chunked_fast(*a[:5], FAST_CHUNK, a[5], initial_state=a[6]))
    assert max(e for name, e in errors.items() if name not in ("dt", "A")) < 1e-5, errors
    assert errors["dt"] < 1e-4 and errors["A"] < 1e-4, errors


def mixed_precision_run(form, x, dt, A, B, C, D, state):
    """(y, final state) of one SSD form; "step" runs ssd_step token by token; "quadratic" starts from zero."""
    if form == "step":
        ys = []
        for t in range(x.shape[1]):
            y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
            ys.append(y)
        return torch.stack(ys, 1), state
    if form == "quadratic":
        return ssd_quadratic(x, dt, A, B, C, D), None
    scan = ssd_recurrent if form == "recurrent" else lambda *a, **k: ssd_chunked(*a[:5], 8, *a[5:], **k)
    return scan(x, dt, A, B, C, D, initial_state=state)


@pytest.mark.parametrize("form", ["step", "recurrent", "quadratic", "chunked"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_eq3_16_bit_inputs_are_computed_in_fp32_and_keep_their_dtypes(form, state_dtype):
    """The model's mixed precision: x, B, C in bf16; dt, A, D in fp32. Every form computes in fp32, so its output is
    within one bf16 rounding of the float64 scan of the same values; y comes back in bf16, the scans' final state in
    fp32, and a step's new state in the dtype of the state it was given."""
    x, dt, A, B, C, D, s0 = random_ssd_inputs(b=2, l=19, h=4, p=3, g=2, n=5)
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    dt, A, D, s0 = dt.float(), A.float(), D.float(), s0.to(state_dtype)
    if form == "recurrent" and state_dtype == torch.float32:
        s0 = None  # the scan's own zero state: fp32
    if form == "step" and state_dtype == torch.bfloat16:  # rounded to bf16 after each step: one step, exactly known
        x, dt, B, C = x[:, :1], dt[:, :1], B[:, :1], C[:, :1]
    y, state = mixed_precision_run(form, x, dt, A, B, C, D, s0)
    start = None if form == "quadratic" or s0 is None else s0.double()
    y_ref, state_ref = ssd_recurrent(*(t.double() for t in (x, dt, A, B, C, D)), initial_state=start)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, rtol=2 ** -8, atol=1e-6)  # one bf16 rounding of the fp32 result
    if state is not None:
        expected_dtype = torch.float32 if form in ("recurrent", "chunked") else state_dtype
        assert state.dtype == expected_dtype
        tol = 1e-5 if state.dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(state.double(), state_ref, rtol=tol, atol=tol)


def test_chunked_gradients_equal_recurrent_gradients():
    inputs = random_ssd_inputs(b=1, l=13, h=2, p=2, g=1, n=3)
    grads = []
    for fn in (lambda *a: ssd_recurrent(*a[:6], initial_state=a[6]),
               lambda *a: ssd_chunked(*a[:5], 4, a[5], initial_state=a[6])):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, st = fn(*leaves)
        ((y ** 2).sum() + (st * 0.5).sum()).backward()
        grads.append([t.grad for t in leaves])
    for g_rec, g_chunk in zip(*grads):
        torch.testing.assert_close(g_chunk, g_rec, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("l,chunk", [(1, 8), (37, 8), (64, 16), (50, 64)])
@pytest.mark.parametrize("h,g", [(4, 1), (6, 2)])
def test_eq3_chunked_fast_equals_the_recurrence_values_state_and_gradients(l, chunk, h, g):
    """Eq. 3 by ssd_chunked_fast (segment sums as cumsum differences, products in the inputs' dtype) equals the
    float64 recurrence from a non-zero state: outputs, final state and the gradients of every input."""
    inputs = random_ssd_inputs(l=l, h=h, g=g)
    grads = []
    for fn in (lambda *a: ssd_recurrent(*a[:6], initial_state=a[6]),
               lambda *a: ssd_chunked_fast(*a[:5], chunk, a[5], initial_state=a[6])):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, st = fn(*leaves)
        ((y ** 2).sum() + (st * 0.5).sum()).backward()
        grads.append([y.detach(), st.detach()] + [t.grad for t in leaves])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_eq3_chunked_fast_carries_the_state_between_chunks_in_fp32_under_autocast():
    """ssd_chunked_fast's recurrence between chunks (eq. 3 across chunk boundaries) stays fp32 under bf16 autocast:
    the only input is the last step of chunk 0 (decay 1 to its end, small integers, exact in bf16), so the final state
    is that step's outer product decayed over the next chunks; with the decays rounded to bf16 it would be off by
    ~1e-3, the loop's fp32 keeps it within 1e-6 of the float64 recurrence."""
    b, h, p, g, n, Q = 1, 4, 2, 2, 3, 4
    l = 3 * Q
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(b, l, h, p)
    x[:, Q - 1] = torch.randint(-3, 4, (b, h, p), generator=gen).float()
    B = torch.randint(-3, 4, (b, l, g, n), generator=gen).float()
    C = torch.randn(b, l, g, n, generator=gen)
    dt = torch.rand(b, l, h, generator=gen) + 0.1
    dt[:, Q - 1] = 1.0
    A = -torch.rand(h, generator=gen) - 0.1
    _, want = ssd_recurrent(*(t.double() for t in (x, dt, A, B, C)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got = ssd_chunked_fast(x, dt, A, B, C, Q)
    assert got.dtype == torch.float32 and want.abs().max() > 0.1
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def triton_device():
    """Where the Triton kernels' tests run: CUDA, else the CPU through Triton's interpreter (from Triton 3.7); skips
    without Triton."""
    triton = pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip("Triton's interpreter before 3.7 cannot run these kernels with numpy 2.4")
    return device


@pytest.mark.parametrize("l,chunk,h,g,p,n,heads,rows,state_tile", [
    (37, 16, 4, 2, 16, 24, 16, (64, 64, 64), (16, 16, 16)), (300, 128, 8, 1, 32, 32, 3, (64, 32, 16), (16, 16, 32)),
    (45, 32, 6, 3, 16, 64, 16, (16, 32, 32), None)])
def test_eq3_triton_chunk_outputs_equal_the_recurrence_values_state_and_gradients(l, chunk, h, g, p, n, heads, rows,
                                                                                   state_tile, monkeypatch):
    """Eq. 3 by ssd_triton (each chunk's output from ssd_kernel.py's Triton kernels, forward and backward; on the CPU
    in Triton's interpreter) in fp32 equals the float64 recurrence from a non-zero state:
    outputs, final state and every input's gradient within 2e-5 of each one's largest value. The shapes take one to
    eight blocks of rows a chunk, each kernel its own (the forward's, dX's and dS's rows a program), one, two and
    eight heads a group (in parts of 3, the last one short, in the backward's sums over a group), a d_state that is
    not a power of two, and the states' kernels on tiles smaller than the state and the chunk (several p- and n-tiles
    and steps)."""
    device = triton_device()
    import ssd_kernel
    for name, bt in zip(("FWD_TILE", "BWD_X_TILE", "BWD_S_TILE"), rows):
        monkeypatch.setattr(ssd_kernel, name, {**getattr(ssd_kernel, name), "BT": bt})
    monkeypatch.setattr(ssd_kernel, "BWD_S_TILE", {**ssd_kernel.BWD_S_TILE, "HEADS": heads})
    monkeypatch.setattr(ssd_kernel, "GROUP_TILE", {**ssd_kernel.GROUP_TILE, "BT": rows[2], "HEADS": heads})
    for name in ("STATES_TILE", "STATES_BWD_TILE") if state_tile else ():
        tile = dict(zip(("BP", "BN", "BQ"), state_tile))
        monkeypatch.setattr(ssd_kernel, name, {**getattr(ssd_kernel, name), **tile})
    inputs = random_ssd_inputs(l=l, h=h, g=g, p=p, n=n)
    weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=f64)
    results = []
    for fn, dtype in ((lambda *a: ssd_recurrent(*a[:6], initial_state=a[6]), f64),
                      (lambda *a: SSD_FORMS["triton"](*a[:5], chunk, a[5], initial_state=a[6]), torch.float32)):
        leaves = [t.to(device, dtype, copy=True).requires_grad_() for t in inputs]
        y, st = fn(*leaves)
        ((y * weights.to(device, dtype)).sum() + st.sum()).backward()
        results.append([y.detach(), st.detach()] + [t.grad for t in leaves])
    names = ["y", "state", "dx", "ddt", "dA", "dB", "dC", "dD", "dstate"]
    for name, want, got in zip(names, *results):
        assert got is not None and got.dtype == torch.float32, name
        error = (got.double().cpu() - want.cpu()).abs().max() / want.abs().max()
        assert error < 2e-5, f"{name}: {float(error):.2e} of its largest value"


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 3e-3),
                                              pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.gpu)])
def test_triton_chunk_outputs_in_16_bits_round_like_chunked_fast(dtype, tolerance):
    """16-bit x, B and C (bf16 under autocast; the CPU's interpreter multiplies fp16 only): ssd_triton's output,
    state and gradients are within the dtype's rounding of ssd_chunked_fast's, and come back in the same dtypes."""
    device = triton_device()
    x, dt, A, B, C, D, s0 = (t.float().to(device) for t in random_ssd_inputs(b=2, l=300, h=8, p=16, g=2, n=32))
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for fn in (ssd_chunked_fast, SSD_FORMS["triton"]):
        leaves = [t.clone().requires_grad_() for t in (x.to(dtype), dt, A, B.to(dtype), C.to(dtype), D, s0)]
        y, st = fn(*leaves[:5], 64, leaves[5], initial_state=leaves[6])
        ((y.float() * weights).sum() + st.sum()).backward()
        results.append([y, st] + [t.grad for t in leaves])
    for i, (want, got) in enumerate(zip(*results)):
        assert got.dtype == want.dtype, i
        assert (got.float() - want.float()).abs().max() <= tolerance * want.float().abs().max(), i


def test_triton_form_is_chunked_fast_where_its_tiles_do_not_fit():
    """ssd_triton at a headdim its kernels' tiles do not take (3) computes ssd_chunked_fast's values to the bit; the
    kernels called directly refuse those shapes with an error that names the fix."""
    pytest.importorskip("triton")
    import fast_ssd
    import ssd_kernel
    x, dt, A, B, C, D, s0 = (t.float() for t in random_ssd_inputs(l=37, h=4, p=3, g=2, n=16))
    want = ssd_chunked_fast(x, dt, A, B, C, 16, D=D, initial_state=s0)
    got = fast_ssd.ssd_triton(x, dt, A, B, C, 16, D=D, initial_state=s0)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    x, dt, cs = torch.zeros(1, 16, 1, 3), torch.zeros(1, 16, 1), torch.zeros(1, 1, 1, 1, 16)
    BC = torch.zeros(1, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="powers of two of at least 16 \\(here 16, 3\\): use ssd_chunked_fast"):
        ssd_kernel.chunk_scan(x, dt, BC, BC, cs, torch.zeros(1))
    with pytest.raises(ValueError, match="powers of two of at least 16 \\(here 16, 3\\): use ssd_chunked_fast"):
        ssd_kernel.chunk_states(x, dt, BC, cs)


def test_triton_kernels_read_x_and_dy_where_they_lie():
    """ssd_kernel's chunk scan takes x as the mixer hands it over (a (b, l, h, p) view into a wider
    tensor, its positions h p + 2 g n values apart) and dy as a view too, without a copy; they write y (b, l, h, p)
    without the padding, and give the bits they give on a contiguous x; an x they cannot address (p not contiguous)
    is copied first and gives them too."""
    device = triton_device()
    import ssd_kernel
    b, l, Q, g, r, p, n = 2, 40, 16, 2, 3, 16, 8
    c, h = -(-l // Q), g * r
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(b, l, h * p + 2 * g * n, generator=gen).to(device)  # x, B, C side by side, as in the mixer
    dt = F.pad(torch.rand(b, l, h, generator=gen), (0, 0, 0, c * Q - l)).to(device)
    Bc, Cc = (torch.randn(b, c, g, Q, n, generator=gen).to(device) for _ in range(2))
    cs = torch.cumsum(-torch.rand(b, c, g, r, Q, generator=gen), -1).to(device)
    h0 = torch.randn(b, h, p, n, generator=gen).to(device)
    D = torch.randn(h, generator=gen).to(device)
    dy = torch.randn(b, l, h * p + 8, generator=gen).to(device)[..., :h * p].view(b, l, h, p)  # a view, not contiguous
    x = wide[..., :h * p].view(b, l, h, p)
    assert ssd_kernel._addressable(x) is x and ssd_kernel._addressable(dy) is dy
    runs = []
    for layout in (lambda t: t, torch.Tensor.contiguous, lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)):
        source = wide.clone().requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (dt, Bc, Cc, cs, h0, D)]
        y, last = ssd_kernel.chunk_scan(layout(source[..., :h * p].view(b, l, h, p)), *leaves[:4], leaves[5], leaves[4])
        torch.autograd.backward([y, last], [dy, torch.ones_like(last)])
        runs.append((y.detach(), last.detach(), source.grad, *[t.grad for t in leaves]))
    assert runs[0][0].shape == (b, l, h, p) and runs[0][0].is_contiguous() and runs[0][0].abs().max() > 0
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_eq3_triton_chunk_states_equal_the_recurrence_position_by_position(monkeypatch):
    """ssd_kernel.chunk_states (the state entering each chunk and the final state, from a non-zero state) in fp32
    equals eq. 3's recurrence run position by position in float64, h_t = exp(cs_t - cs_{t-1}) h_{t-1} + dt_t x_t B_t^T,
    within 1e-6 of its largest value. Tiles smaller than the state and the chunk (two p-tiles, two n-tiles, the last
    one short, two steps a chunk), two groups of three heads, a length that pads the last chunk. (Its gradients come
    from ChunkScan's backward: the ssd_triton tests check them.)"""
    device = triton_device()
    import ssd_kernel
    monkeypatch.setattr(ssd_kernel, "STATES_TILE", {**ssd_kernel.STATES_TILE, "BP": 16, "BN": 16, "BQ": 16})
    b, c, Q, g, r, p, n = 2, 3, 32, 2, 3, 32, 24
    l = c * Q - 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, l, g * r, p, generator=gen, dtype=f64)
    dt = F.pad(torch.rand(b, l, g * r, generator=gen, dtype=f64), (0, 0, 0, c * Q - l))  # zero on the padding
    Bc = torch.randn(b, c, g, Q, n, generator=gen, dtype=f64)
    cs = torch.cumsum(-0.1 * torch.rand(b, c, g, r, Q, generator=gen, dtype=f64), -1)
    h0 = torch.randn(b, g * r, p, n, generator=gen, dtype=f64)

    X = (F.pad(x, (0, 0, 0, 0, 0, c * Q - l)) * dt[..., None]).reshape(b, c, Q, g, r, p)
    h, want = h0.reshape(b, g, r, p, n), []
    for k in range(c):
        want.append(h)
        before = torch.zeros_like(cs[:, k, ..., 0])  # (b, g, r)
        for t in range(Q):
            decay = torch.exp(cs[:, k, ..., t] - before)[..., None, None]
            h = decay * h + X[:, k, t, :, :, :, None] * Bc[:, k, :, None, t, None, :]  # (b, g, r, p, n)
            before = cs[:, k, ..., t]
    want = [torch.stack(want, 1), h.reshape(b, g * r, p, n)]
    got = ssd_kernel.chunk_states(*(t.to(device, torch.float32) for t in (x, dt, Bc, cs, h0)))
    for name, w, o in zip(["entering", "final"], want, got):
        assert o.dtype == torch.float32 and w.abs().max() > 0.1, name
        error = (o.double().cpu() - w).abs().max() / w.abs().max()
        assert error < 1e-6, f"{name}: {float(error):.2e} of its largest value"


@pytest.mark.gpu
def test_triton_chunk_scan_gives_the_same_gradients_every_run():
    """No program of ssd_kernel's backward adds to another's output: two backward passes give equal bits (bf16, two
    64-row blocks a chunk, eight heads a group)."""
    import fast_ssd
    inputs = [t.float().cuda() for t in random_ssd_inputs(b=2, l=300, h=8, p=32, g=1, n=32)]
    grads = []
    for _ in range(2):
        leaves = [t.to(torch.bfloat16 if i in (0, 3, 4) else torch.float32, copy=True).requires_grad_()
                  for i, t in enumerate(inputs)]
        y, st = fast_ssd.ssd_triton(*leaves[:5], 128, leaves[5], initial_state=leaves[6])
        (y.float().square().sum() + st.sum()).backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
def test_triton_chunk_scan_inside_torch_compile_equals_eager():
    """ssd_triton through torch.compile (as in compiled blocks, the rest of ssd_chunked_fast fused around the kernels)
    gives eager ssd_triton's output, state and gradients, fp32, chunk 64."""
    import fast_ssd
    pytest.importorskip("triton")
    inputs = [t.float().cuda() for t in random_ssd_inputs(b=2, l=300, h=8, p=32, g=2, n=32)]
    weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1)).cuda()
    results = []
    for fn in (fast_ssd.ssd_triton, torch.compile(fast_ssd.ssd_triton)):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y, st = fn(*leaves[:5], 64, leaves[5], initial_state=leaves[6])
        ((y * weights).sum() + st.sum()).backward()
        results.append([y.detach(), st.detach()] + [t.grad for t in leaves])
    for i, (want, got) in enumerate(zip(*results)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=str(i))


def test_chunked_fast_in_bf16_is_within_bf16_of_the_fp32_scan():
    """bf16 inputs (what autocast gives the mixer): the products run in bf16, the decays and the state in fp32; the
    output is within bf16 rounding of the fp32 scan, and the state stays fp32."""
    x, dt, A, B, C, D, s0 = (t.float() for t in random_ssd_inputs(b=2, l=300, h=8, p=16, g=2, n=32))
    y32, st32 = ssd_chunked(x, dt, A, B, C, 64, D, initial_state=s0)
    y, st = ssd_chunked_fast(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 64, D, initial_state=s0)
    assert y.dtype == torch.bfloat16 and st.dtype == torch.float32
    scale_y, scale_st = y32.abs().max(), st32.abs().max()
    assert (y.float() - y32).abs().max() / scale_y < 2e-2 and (st - st32).abs().max() / scale_st < 2e-2
    assert (y.float() - y32).abs().mean() / y32.abs().mean() < 1e-2


def test_prefill_then_steps_equals_the_full_scan():
    """Eq. 3 split in time: a chunked prefill, then one ssd_step per token, equals one scan over the whole sequence."""
    x, dt, A, B, C, D, _ = random_ssd_inputs(l=29)
    y_full, st_full = ssd_chunked(x, dt, A, B, C, 8, D)
    k = 11
    y_pre, state = ssd_chunked(x[:, :k], dt[:, :k], A, B[:, :k], C[:, :k], 8, D)
    ys = [y_pre]
    for t in range(k, 29):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, st_full, rtol=1e-10, atol=1e-10)


def test_ssd_entry_point_on_cpu_uses_the_chunked_scan(monkeypatch):
    """ssd.ssd on the CPU is ssd_chunked; fast_ssd's forms give the same values, from a given state and from zero,
    or say why they cannot run; a model's mixers take a form by name (fast_ssd.use_ssd, "auto" by default, which
    looks mamba-ssm's kernel up before any call; the other torch forms do not)."""
    import fast_ssd
    from fast_ssd import use_ssd
    from mamba2 import Mamba2Config, Mamba2LMHeadModel
    x, dt, A, B, C, D, s0 = random_ssd_inputs(l=20)  # two sequences
    y, st = ssd(x, dt, A, B, C, 8, D, initial_state=s0)
    y_ref, st_ref = ssd_chunked(x, dt, A, B, C, 8, D, initial_state=s0)
    assert torch.equal(y, y_ref) and torch.equal(st, st_ref)
    y_zero, st_zero = ssd_chunked(x, dt, A, B, C, 8, D)
    for form in ("auto", "torch-fast"):
        for state, want in ((s0, (y_ref, st_ref)), (None, (y_zero, st_zero))):
            got = SSD_FORMS[form](x, dt, A, B, C, 8, D, initial_state=state)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    with pytest.raises(RuntimeError, match="mamba-ssm"):
        SSD_FORMS["mamba_ssm"](x, dt, A, B, C, 8, D)
    model = Mamba2LMHeadModel(Mamba2Config(d_model=16, n_layer=2, vocab_size=10, d_state=4, headdim=4))
    assert all(layer.mixer.ssd is ssd for layer in model.layers)
    monkeypatch.setattr(fast_ssd, "_looked_up", False)
    use_ssd(model, "torch-fast")
    assert all(layer.mixer.ssd is ssd_chunked_fast for layer in model.layers) and not fast_ssd._looked_up
    use_ssd(model)
    assert all(layer.mixer.ssd is fast_ssd.ssd_fast for layer in model.layers) and fast_ssd._looked_up
    monkeypatch.setattr(fast_ssd, "_looked_up", False)
    use_ssd(model, "mamba_ssm")
    assert fast_ssd._looked_up

    def own_form(*args, **kwargs):  # called as ssd.ssd is
        return ssd_chunked(*args, **kwargs)
    use_ssd(model, own_form)
    assert all(layer.mixer.ssd is own_form for layer in model.layers)
    with pytest.raises(ValueError, match="unknown SSD form 'cuda': use one of plain, torch, torch-fast,"):
        use_ssd(model, "cuda")


def test_the_kernel_call_passes_its_arguments_and_runs_outside_compiled_graphs(fake_mamba_ssm):
    """fast_ssd.find_kernel's wrapper hands mamba-ssm's kernel the inputs, D and the initial state by its names and
    returns the final state in fp32; a compiled caller runs it as it is (no warning); it is looked up once."""
    import warnings
    import fast_ssd
    seen = []

    def kernel(x, dt, A, B, C, chunk_size, D=None, initial_states=None, return_final_states=False):
        seen.append((chunk_size, D, initial_states, return_final_states, torch.compiler.is_compiling()))
        return x * 2, initial_states.to(torch.bfloat16) + 1
    call = fake_mamba_ssm(kernel)
    assert call is not None and fast_ssd.find_kernel() is call
    x, dt, A, B, C, D, s0 = random_ssd_inputs(b=1, l=5, h=2, p=3, g=1, n=4)
    caller = torch.compile(lambda *args: call(*args), backend="eager", fullgraph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for run in (call, caller):
            y, final = run(x, dt, A, B, C, 8, D, s0)
            torch.testing.assert_close(y, x * 2)
            assert final.dtype == torch.float32 and torch.equal(final, (s0.to(torch.bfloat16) + 1).float())
    assert [s[:2] + s[3:] for s in seen] == [(8, D, True, False)] * 2 and all(s[2] is s0 for s in seen)


@pytest.mark.gpu
def test_ssd_mamba_ssm_kernel_matches_chunked_on_cuda():
    """Both GPU paths against the float64 recurrence, errors relative to max |y|. mamba-ssm's Triton kernel
    multiplies fp32 in TF32 (10-bit mantissa) inside tl.dot, so it is held to 5e-3; ssd_chunked and ssd_chunked_fast
    (fp32, compiled or not) to 1e-5."""
    from fast_ssd import find_kernel
    if find_kernel() is None:
        pytest.skip("mamba-ssm is not installed")
    inputs = random_ssd_inputs(b=2, l=300, h=8, p=16, g=2, n=32)
    x, dt, A, B, C, D, s0 = inputs
    y_ref, st_ref = ssd_recurrent(x, dt, A, B, C, D, initial_state=s0)
    x, dt, A, B, C, D, s0 = (t.float().cuda() for t in inputs)
    errors = {}
    for backend in ("mamba_ssm", "torch", "torch-fast", "torch-compiled"):
        y, st = SSD_FORMS[backend](x, dt, A, B, C, 64, D, initial_state=s0)
        errors[backend] = (float((y.double().cpu() - y_ref).abs().max() / y_ref.abs().max()),
                           float((st.double().cpu() - st_ref).abs().max() / st_ref.abs().max()))
    print("relative max error (y, final state) vs float64 recurrence:", errors)
    assert max(errors["torch"]) < 1e-5 and max(errors["torch-fast"]) < 1e-5 and max(errors["torch-compiled"]) < 1e-5
    assert max(errors["mamba_ssm"]) < 5e-3


@pytest.mark.gpu
@pytest.mark.parametrize("up_to", [None, 2048])
def test_plain_ssd_chunked_compiles_at_mamba2s_chunk_of_256_and_equals_eager(monkeypatch, up_to):
    """The teaching ssd_chunked through torch.compile (inductor, with fast_decode.whole_scans as compile_blocks sets
    it: no sum split, or only those over more than 2048 values), chunks of 256 as in Mamba-2's configs: forward and
    backward equal the eager scan's, fp32 (TF32 off)."""
    import fast_decode
    from torch._inductor.virtualized import V
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs = [t.float().cuda().requires_grad_() for t in random_ssd_inputs(b=2, l=300, h=8, p=16, g=2, n=32)]
    dy = torch.randn(2, 300, 8, 16, device="cuda")

    def run(fn):
        y, state = fn(*inputs[:5], 256, inputs[5], initial_state=inputs[6])
        return [y, state, *torch.autograd.grad((y * dy).sum() + state.sum(), inputs)]
    eager = run(ssd_chunked)
    default = V.choices
    V.set_choices_handler(fast_decode.whole_scans(up_to))
    try:
        torch._dynamo.reset()
        compiled = run(torch.compile(ssd_chunked, dynamic=False))
    finally:
        V.set_choices_handler(default)
    for got, want in zip(compiled, eager):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
