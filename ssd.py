"""State space models and the SSD layer of Mamba-2, in plain PyTorch.

What is here, in reading order (ML-Mamba paper, arXiv 2407.19832, section 3.1; Mamba-2 paper, arXiv 2405.21060):

1. The continuous SSM (eq. 1)     h'(t) = A h(t) + B x(t),  y(t) = C h(t)
   and its zero-order-hold discretization (eq. 2)
        A_bar = exp(dA),  B_bar = (dA)^-1 (exp(dA) - I) dB          (d = the step size delta)
   giving the recurrence (eq. 3)  h_t = A_bar h_{t-1} + B_bar x_t,  y_t = C h_t.
2. For a time-invariant SSM the recurrence is a causal convolution (eq. 4)
        K = (C B_bar, C A_bar B_bar, ..., C A_bar^(L-1) B_bar),  y = x * K.
3. The selective SSM of Mamba-2 (SSD): A is a scalar per head, dt, B, C depend on the input,
        h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T,   y_t = C_t h_t + D x_t          (state h: (p, n) per head)
   computed three ways that must agree:
   - `ssd_recurrent`: the loop above (the reference; one `ssd_step` per token),
   - `ssd_quadratic`: the dual, attention-like form y = (L o C B^T) (dt x), L the 1-semiseparable decay mask,
   - `ssd_chunked`:   the chunked SSD algorithm (Mamba-2 paper, listing 1, "ssd_minimal"): quadratic inside each
                      chunk, a recurrence over chunk states between chunks. Linear in the length.
4. `ssd_step`: one decoding step, O(1) in the length; `ssd`: what the model calls, `ssd_chunked` (fast_ssd.py holds
   ssd_chunked arranged for a GPU, and mamba-ssm's Triton kernel where it is installed).

Shapes follow mamba-ssm: x (b, l, h, p), dt (b, l, h) already positive, A (h,) negative, B and C (b, l, g, n) with
h % g == 0 (head i reads group i // (h // g)), D (h,), state (b, h, p, n).
Numerics: dt, A, the segment sums, the exponentials and the state are computed in fp32 (fp64 inputs stay fp64).
"""

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------
# 1. Zero-order-hold discretization (eq. 2)
# ----------------------------------------------------------------------------------------------------------------

def zoh_discretize(A, B, delta):
    """Paper eq. 2: A_bar = exp(delta A),  B_bar = (delta A)^-1 (exp(delta A) - I) delta B.

    The exact solution of the continuous SSM of eq. 1 (h' = A h + B x) over one step of length delta, with the input
    held constant over the step (zero-order hold): h(t + delta) = A_bar h(t) + B_bar x(t).

    A: a full (N, N) matrix, a diagonal given as its (N,) entries, or a scalar (0-d tensor or float).
    B: (N,) or (N, M).  delta: a positive scalar.
    Returns (A_bar, B_bar) with A_bar shaped like A and B_bar shaped like B.

    Stable as delta A -> 0: the factor phi(z) = (exp(z) - 1) / z tends to 1 (diagonal case: expm1(z) / z, with the
    limit used where |z| is tiny; full case: its Taylor series when ||delta A|| is small, a linear solve otherwise).

    Mamba-2 keeps A_bar = exp(dt A) exactly but replaces B_bar by the first-order approximation dt B
    (phi(dt A) ~ 1), which is what `ssd_step` and the SSD functions below use.
    """
    A = torch.as_tensor(A)
    B = torch.as_tensor(B, dtype=A.dtype if A.is_floating_point() else None)
    dtype = torch.promote_types(A.dtype, B.dtype)
    A, B = A.to(dtype), B.to(dtype)
    dA, dB = delta * A, delta * B

    if A.dim() == 2:  # full matrix: phi(dA) = (dA)^-1 (exp(dA) - I)
        N = A.shape[0]
        eye = torch.eye(N, dtype=dtype)
        A_bar = torch.linalg.matrix_exp(dA)
        if torch.linalg.matrix_norm(dA, ord=1) < 1e-2:
            # Taylor series phi(z) = sum_k z^k / (k+1)!  (avoids solving with a nearly singular dA)
            phi, term = eye.clone(), eye.clone()
            for k in range(1, 12):
                term = term @ dA / (k + 1)
                phi = phi + term
        else:
            phi = torch.linalg.solve(dA, A_bar - eye)
        return A_bar, phi @ dB

    # diagonal (N,) or scalar (): everything is elementwise
    A_bar = torch.exp(dA)
    tiny = dA.abs() < 1e-8
    phi = torch.where(tiny, 1.0 + dA / 2, torch.expm1(dA) / torch.where(tiny, torch.ones_like(dA), dA))
    if B.dim() == 2 and phi.dim() == 1:
        phi = phi[:, None]  # (N, 1) scales each row of the (N, M) input matrix
    return A_bar, phi * dB


# ----------------------------------------------------------------------------------------------------------------
# 2. The SSM convolution kernel (eq. 4) of a time-invariant, single-input single-output SSM
# ----------------------------------------------------------------------------------------------------------------

def ssm_conv_kernel(A_bar, B_bar, C, length):
    """Eq. 4: K = (C B_bar, C A_bar B_bar, ..., C A_bar^(length-1) B_bar), shape (length,); then y = x * K (`ssm_conv`).

    A_bar: (N, N) or its diagonal (N,); B_bar, C: (N,).
    """
    K = []
    v = B_bar  # A_bar^k B_bar, (N,)
    for _ in range(length):
        K.append(C @ v)
        v = A_bar @ v if A_bar.dim() == 2 else A_bar * v
    return torch.stack(K)


def ssm_conv(x, K):
    """Causal convolution y_t = sum_{k=0..t} K_k x_{t-k}, along the last axis of x (..., L); K (L,).

    Computed with the FFT (zero-padded to 2L so the circular convolution is the linear one), as S4 does.
    """
    L = x.shape[-1]
    n = 2 * L
    y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(K, n=n), n=n)
    return y[..., :L]


# ----------------------------------------------------------------------------------------------------------------
# 3. Selective SSD
# ----------------------------------------------------------------------------------------------------------------

def _compute_dtype(x):
    """fp32 inside, or fp64 when the inputs are fp64 (the float64 reference in the tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def _heads_from_groups(B, nheads):
    """(..., g, n) -> (..., h, n): head i reads group i // (h // g), as in mamba-ssm."""
    g = B.shape[-2]
    if nheads % g:
        raise ValueError(f"the number of heads ({nheads}) must be a multiple of the number of groups ({g})")
    return B.repeat_interleave(nheads // g, dim=-2)


def segsum(x):
    """Segment sums: x (..., T) -> (..., T, T) with out[..., i, j] = x_{j+1} + ... + x_i for i >= j, -inf above.

    exp(segsum(dt A)) is the 1-semiseparable mask L of the dual form: L[i, j] = prod_{k=j+1..i} exp(dt_k A).
    Built by a masked cumulative sum rather than cumsum[i] - cumsum[j], which would lose precision to cancellation.
    """
    T = x.shape[-1]
    x = x[..., None].expand(*x.shape, T)  # (..., T, T): x[..., i, j] = x_i
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0)
    out = torch.cumsum(x, dim=-2)  # out[i, j] = sum_{j < k <= i} x_k
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~lower, float("-inf"))


def ssd_step(state, x, dt, A, B, C, D=None):
    """One step of the selective SSM (the recurrence, eq. 3 with Mamba-2's A_bar = exp(dt A), B_bar = dt B).

    state (b, h, p, n); x (b, h, p); dt (b, h) positive; A (h,); B, C (b, g, n); D (h,) or None.
    Returns (y (b, h, p) in x's dtype, new_state (b, h, p, n) in state's dtype).
    """
    f = torch.promote_types(_compute_dtype(x), state.dtype)
    h = x.shape[1]
    xf, dtf = x.to(f), dt.to(f)
    Bh, Ch = _heads_from_groups(B, h).to(f), _heads_from_groups(C, h).to(f)  # (b, h, n)
    dA = torch.exp(dtf * A.to(f))  # (b, h)  A_bar = exp(dt A)
    new_state = state.to(f) * dA[:, :, None, None] + (dtf[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)  # y_t = C_t h_t
    if D is not None:
        y = y + D.to(f)[:, None] * xf
    return y.to(x.dtype), new_state.to(state.dtype)


def ssd_recurrent(x, dt, A, B, C, D=None, initial_state=None):
    """The sequential recurrence, one `ssd_step` per position: the reference the other forms must equal.

    Returns (y (b, l, h, p), final_state (b, h, p, n) in fp32, or fp64 for fp64 inputs).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    f = _compute_dtype(x)
    state = torch.zeros(b, h, p, n, dtype=f, device=x.device) if initial_state is None else initial_state.to(f)
    ys = []
    for t in range(l):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        ys.append(y_t)
    return torch.stack(ys, dim=1), state


def ssd_quadratic(x, dt, A, B, C, D=None):
    """Eq. 3 unrolled, the dual (attention-like) form: y = (L o C B^T) (dt x) + D x, with zero initial state.

    L[t, s] = exp(dt_{s+1} A + ... + dt_t A) for s <= t, 0 above the diagonal (1-semiseparable).
    Quadratic in the length: (b, h, l, l) scores. Returns y (b, l, h, p).
    """
    h = x.shape[2]
    f = _compute_dtype(x)
    xf, dtf = x.to(f), dt.to(f)
    Bh, Ch = _heads_from_groups(B, h).to(f), _heads_from_groups(C, h).to(f)  # (b, l, h, n)
    L = torch.exp(segsum((dtf * A.to(f)).transpose(1, 2)))  # (b, h, l, l)
    scores = torch.einsum("bthn,bshn->bhts", Ch, Bh)  # C_t . B_s  (b, h, l, l)
    y = torch.einsum("bhts,bshp->bthp", L * scores, xf * dtf[..., None])
    if D is not None:
        y = y + D.to(f)[:, None] * xf
    return y.to(x.dtype)


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """Eq. 3 over a whole sequence by the chunked SSD algorithm (Mamba-2 paper, listing 1), for any length l.

    The sequence is cut into chunks of Q = chunk_size positions (the last one zero-padded: dt = 0 there, so the
    padding neither decays nor feeds the state). Then, with c chunks:
      1. diagonal blocks: inside each chunk, the quadratic form (L o C B^T) (dt x);
      2. chunk states: the state each chunk would leave behind starting from zero;
      3. inter-chunk recurrence: a scan over the c chunk states (itself a tiny SSD of length c + 1);
      4. state -> output: each chunk's incoming state read out by C, decayed to every position.
    B and C belong to groups of r = h / g heads, so C B^T is computed once per group and shared by its heads (as
    mamba-ssm does), and the products with B and C run over all of a group's heads at once; only the decays
    (L, and the decays to and from the chunk edges) differ per head.
    Returns (y (b, l, h, p) in x's dtype, final_state (b, h, p, n) in fp32, or fp64 for fp64 inputs).
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"the number of heads ({h}) must be a multiple of the number of groups ({g})")
    r = h // g  # heads per group; head i reads group i // r, as in mamba-ssm
    f = _compute_dtype(x)
    Q = chunk_size
    pad = (-l) % Q
    c = (l + pad) // Q

    xf, dtf, Bf, Cf = x.to(f), dt.to(f), B.to(f), C.to(f)
    if pad:
        xf, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xf, Bf, Cf))
        dtf = F.pad(dtf, (0, 0, 0, pad))
    X = (xf * dtf[..., None]).reshape(b, c, Q, g, r, p)  # dt_s x_s, chunked, heads split into groups
    Bc, Cc = Bf.reshape(b, c, Q, g, n), Cf.reshape(b, c, Q, g, n)  # views of the model's split tensors, no copy
    logA = (dtf * A.to(f)).reshape(b, c, Q, g, r).permute(0, 1, 3, 4, 2)  # log A_bar_t = dt_t A  (b, c, g, r, Q)
    logA_cs = torch.cumsum(logA, dim=-1)  # (b, c, g, r, Q)

    # 1. diagonal blocks (intra-chunk outputs): (L o C B^T) X inside each chunk
    L = torch.exp(segsum(logA))  # (b, c, g, r, Q, Q), per head
    CB = torch.einsum("bcqgn,bcsgn->bcgqs", Cc, Bc)  # C_t . B_s  (b, c, g, Q, Q), per group
    Y_diag = torch.einsum("bcgrqs,bcsgrp->bcqgrp", L * CB[:, :, :, None], X)  # (b, c, Q, g, r, p)

    # 2. chunk states: sum_s exp(A over (s, end of chunk]) (dt_s x_s) B_s^T
    decay_to_end = torch.exp(logA_cs[..., -1:] - logA_cs).permute(0, 1, 4, 2, 3)  # (b, c, Q, g, r)
    states = torch.einsum("bcsgrp,bcsgn->bcgrpn", X * decay_to_end[..., None], Bc)  # (b, c, g, r, p, n)

    # 3. inter-chunk recurrence over chunk boundaries (state in fp32)
    if initial_state is None:
        initial_state = torch.zeros(b, h, p, n, dtype=f, device=x.device)
    states = torch.cat([initial_state.to(f).reshape(b, 1, g, r, p, n), states], dim=1)  # (b, c+1, g, r, p, n)
    chunk_decay = torch.exp(segsum(F.pad(logA_cs[..., -1].permute(0, 2, 3, 1), (1, 0))))  # (b, g, r, c+1, c+1)
    states = torch.einsum("bgrzc,bcgrpn->bzgrpn", chunk_decay, states)  # state entering each chunk, and the last
    states, final_state = states[:, :-1], states[:, -1]

    # 4. state -> output: C_t exp(A over (chunk start, t]) h_chunk_start
    decay_from_start = torch.exp(logA_cs).permute(0, 1, 4, 2, 3)  # (b, c, Q, g, r)
    Y_off = torch.einsum("bcqgn,bcgrpn->bcqgrp", Cc, states) * decay_from_start[..., None]  # (b, c, Q, g, r, p)

    y = (Y_diag + Y_off).reshape(b, c * Q, h, p)[:, :l]  # (b, l, h, p)
    if D is not None:
        y = y + D.to(f)[:, None] * xf[:, :l]
    return y.to(x.dtype), final_state.reshape(b, h, p, n)


# ----------------------------------------------------------------------------------------------------------------
# 4. The entry point the model calls
# ----------------------------------------------------------------------------------------------------------------

def ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """The selective SSD over a whole sequence, what the Mamba-2 mixer calls: `ssd_chunked`. Faster forms of it
    (ssd_chunked arranged for a GPU, mamba-ssm's Triton kernel) are given to a model's mixers from outside, by
    fast_ssd.use_ssd. Returns (y (b, l, h, p), final_state (b, h, p, n) fp32)."""
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
