"""Eq. 3 by chunks as Triton kernels that keep the (Q, Q) tiles on chip, forward and backward: what
`fast_ssd.ssd_chunked_fast` computes with (Q, Q) tensors in memory, for `fast_ssd.ssd_triton` (`chunk_scan`).

    h_{k+1} = exp(cs_end) h_k + sum_s exp(cs_end - cs_s) X_s B_s^T     (the states between chunks: `_states_fwd`)
    y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) X_s  +  exp(cs_t) C_t . h_k  +  D u_t    (`_chunk_fwd`)
          (the diagonal block)                              (the state entering chunk k, read out by C)

per (batch, chunk, group, head), u = x, X = dt u, cs the cumulative sum of dt A within the chunk; fp32 until the one
store of y, and the states in fp32. S = C B^T is the same for every head of a group: it is one product per (batch,
chunk, group), in fp32, before the kernels, which multiply it by each head's decays L. The backward, with M = S * L
and dh_k the gradient of the state leaving chunk k:
    dX_s = sum_t M[t, s] dy_t + exp(cs_end - cs_s) B_s . dh_k^T;  dM = dy X^T;
    dS = sum over the group's heads of dM * L, then dC = dS B and dB = dS^T C;
    dcs_t = sum_s dM M and dcs_s = -sum_t dM M      (`_diag_bwd_x`, `_diag_bwd_s`).
The recurrence between chunks runs backward in a kernel too (`_states_bwd`), which adds the read-out's gradient for
each entering state, and one more sums C's gradient through the read-out and B's through the states over a group's
heads (`_group_bwd`). The products with X and dy run in the inputs' dtype with fp32 accumulation; S, dS
and the decays are fp32. No program adds to another's output, so every gradient is the same from run to run.

x, dy, y and dx are read and written where they lie, as (b, l, h, p) tensors whose p are contiguous (x may be a view
into the in_proj's output): the kernels form X = dt u as they read x, take the rows past l as zeros and store none of
them, so no padded copy is made. dt comes padded to whole chunks with zeros (b, c Q, h), fp32.
"""

import torch
import triton
import triton.language as tl

# Each kernel's launch settings: BT a chunk's rows per program (fewer in a shorter chunk), warps, pipeline stages;
# HEADS a group's heads per program of the backward's dS and group sums (their parts are summed after it). The
# fastest of `python benchmark.py ssd-tiles` at Mamba-2 2.7B's training shape (docs/speed.md).
FWD_TILE = dict(BT=64, num_warps=4, num_stages=2)  # _chunk_fwd
BWD_X_TILE = dict(BT=128, num_warps=8, num_stages=1)  # _diag_bwd_x
BWD_S_TILE = dict(BT=64, HEADS=32, num_warps=4, num_stages=3)  # _diag_bwd_s
# _states_fwd: a program's (BP, BN) tile of a head's state, the BQ positions of a chunk it takes at a time
STATES_TILE = dict(BP=32, BN=128, BQ=64, num_warps=4, num_stages=3)
STATES_BWD_TILE = dict(BP=32, BN=128, BQ=64, num_warps=4, num_stages=3)  # _states_bwd
GROUP_TILE = dict(BT=64, HEADS=16, num_warps=4, num_stages=2)  # _group_bwd


@triton.jit
def _tile(cs_ptr, t, s):
    """L[t, s] = exp(cs_t - cs_s) where t >= s, else 0: (BT, BT) fp32."""
    cs_t = tl.load(cs_ptr + t)
    cs_s = tl.load(cs_ptr + s)
    causal = t[:, None] >= s[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, cs_t[:, None] - cs_s[None, :], 0.0)), 0.0)


@triton.jit
def _rows(bh, t, H, C, Q, batch_stride, row_stride, head_stride):
    """Where rows t of block bh begin in a (b, l, h, p) tensor, the blocks numbered over (batch, chunk, the H = g r
    heads), and which of them lie before the padding: (BT,) offsets, (BT,) mask."""
    batch, k, head = bh // (C * H), (bh // H) % C, bh % H
    return batch * batch_stride + (k * Q + t) * row_stride + head * head_stride, k * Q + t


@triton.jit
def _real_rows(bh, H, C, Q, L):
    """How many of the Q rows of block bh's chunk lie before the padding (the last chunk's may not all)."""
    return tl.minimum(L - ((bh // H) % C) * Q, Q)


@triton.jit
def _X(x_ptr, dt_ptr, bh, t, p, L, H, C, Q, sb, sl, sh):
    """Rows t of block bh of u = x and of X = dt u, in x's dtype (zeros on the padding): (BT, P), (BT, P)."""
    at, position = _rows(bh, t, H, C, Q, sb, sl, sh)
    u = tl.load(x_ptr + at[:, None] + p[None, :], mask=position[:, None] < L, other=0.0)
    dt = tl.load(dt_ptr + ((bh // H) * Q + t) * H + bh % H)  # fp32, zero on the padding
    return (u.to(tl.float32) * dt[:, None]).to(u.dtype), u


@triton.jit
def _matrix(s_ptr, cs_ptr, t, s, Q: tl.constexpr):
    """The SSD matrix's (t, s) block M = S[t, s] * L[t, s]: (BT, BT) fp32."""
    return tl.load(s_ptr + t[:, None] * Q + s[None, :]) * _tile(cs_ptr, t, s)


@triton.jit
def _chunk_fwd(x_ptr, dt_ptr, s_ptr, cs_ptr, c_ptr, h_ptr, d_ptr, y_ptr, L, C, R, H, N, sb, sl, sh, yb, yl, yh,
               c_chunk_stride, c_group_stride, c_row_stride, Q: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
               NP: tl.constexpr, PRECISION: tl.constexpr):
    """Eq. 3 per (batch, chunk, group, head) and t-block: y_t = sum_{s <= t} M[t, s] X_s + exp(cs_t) C_t . h + D u_t,
    with h (P, N) fp32 the state entering the chunk; fp32 until the store of the rows before the padding. A block of
    rows wholly in the padding has nothing to store and computes nothing."""
    bh = tl.program_id(0)  # over (batch, chunk, group, head)
    tb = tl.program_id(1)
    if tb * BT < _real_rows(bh, H, C, Q, L):
        t, p, n = tb * BT + tl.arange(0, BT), tl.arange(0, P), tl.arange(0, NP)
        acc = tl.zeros((BT, P), dtype=tl.float32)
        for sb_ in range(0, tb + 1):
            s = sb_ * BT + tl.arange(0, BT)
            X_s, _ = _X(x_ptr, dt_ptr, bh, s, p, L, H, C, Q, sb, sl, sh)  # (BT, P)
            M = _matrix(s_ptr + (bh // R) * Q * Q, cs_ptr + bh * Q, t, s, Q)  # (BT, BT) fp32
            acc += tl.dot(M.to(X_s.dtype), X_s, input_precision=PRECISION)
        C_t = tl.load(c_ptr + (bh // H) * c_chunk_stride + ((bh % H) // R) * c_group_stride
                      + t[:, None] * c_row_stride + n[None, :], mask=n[None, :] < N, other=0.0)  # (BT, NP)
        h_T = tl.load(h_ptr + bh * P * N + p[None, :] * N + n[:, None], mask=n[:, None] < N, other=0.0)  # (NP, P)
        acc += tl.exp(tl.load(cs_ptr + bh * Q + t))[:, None] * tl.dot(C_t, h_T.to(C_t.dtype),
                                                                      input_precision=PRECISION)
        _, u_t = _X(x_ptr, dt_ptr, bh, t, p, L, H, C, Q, sb, sl, sh)
        acc += tl.load(d_ptr + bh % H) * u_t.to(tl.float32)
        at, position = _rows(bh, t, H, C, Q, yb, yl, yh)
        tl.store(y_ptr + at[:, None] + p[None, :], acc.to(y_ptr.dtype.element_ty), mask=position[:, None] < L)


@triton.jit
def _diag_bwd_x(x_ptr, dt_ptr, s_ptr, cs_ptr, d_ptr, b_ptr, c_ptr, h_ptr, dst_ptr, dy_ptr, dx_ptr, ddt_ptr, dw_ptr,
                dro_ptr, dd_ptr, L, C, R, H, N, sb, sl, sh, gb, gl, gh, xb, xl, xh, b_chunk_stride, b_group_stride,
                b_row_stride, c_chunk_stride, c_group_stride, c_row_stride, Q: tl.constexpr, P: tl.constexpr,
                BT: tl.constexpr, NP: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, head) and s-block: X's gradient from the diagonal block, sum_{t >= s} M[t, s]^T dy_t,
    plus from the state leaving the chunk, w_s B_s . dh^T with w_s = exp(cs_end - cs_s) and dh that state's gradient
    (P, N); then through X = dt u: du_s = dt_s dX_s + D dy_s and ddt_s = sum_p dX_s u_s; dw_s = w_s sum_p (B_s . dh^T)
    X_s and the read-out's dro_s = exp(cs_s) sum_p dy_s (C_s . h^T), h the state entering the chunk (cs's gradient);
    the block's part of dD, sum dy_s u_s; fp32 until the stores. Blocks of t wholly in the padding (dy = 0) are not
    read."""
    bh = tl.program_id(0)
    sb_ = tl.program_id(1)
    s, p, n = sb_ * BT + tl.arange(0, BT), tl.arange(0, P), tl.arange(0, NP)
    dX = tl.zeros((BT, P), dtype=tl.float32)
    for tb in range(sb_, tl.cdiv(_real_rows(bh, H, C, Q, L), BT)):
        t = tb * BT + tl.arange(0, BT)
        at, position = _rows(bh, t, H, C, Q, gb, gl, gh)
        dY_t = tl.load(dy_ptr + at[:, None] + p[None, :], mask=position[:, None] < L, other=0.0)  # (BT, P)
        M = _matrix(s_ptr + (bh // R) * Q * Q, cs_ptr + bh * Q, t, s, Q)
        dX += tl.dot(tl.trans(M).to(dY_t.dtype), dY_t, input_precision=PRECISION)
    B_s = tl.load(b_ptr + (bh // H) * b_chunk_stride + ((bh % H) // R) * b_group_stride + s[:, None] * b_row_stride
                  + n[None, :], mask=n[None, :] < N, other=0.0)  # (BT, NP), zeros past N
    dh_T = tl.load(dst_ptr + bh * P * N + p[None, :] * N + n[:, None], mask=n[:, None] < N, other=0.0)  # (NP, P)
    from_state = tl.dot(B_s, dh_T.to(B_s.dtype), input_precision=PRECISION)  # B_s . dh^T (BT, P) fp32
    w = tl.exp(tl.load(cs_ptr + bh * Q + Q - 1) - tl.load(cs_ptr + bh * Q + s))  # (BT,)
    X_s, u_s = _X(x_ptr, dt_ptr, bh, s, p, L, H, C, Q, sb, sl, sh)
    tl.store(dw_ptr + bh * Q + s, w * tl.sum(from_state * X_s.to(tl.float32), axis=1))
    dX += w[:, None] * from_state
    at, position = _rows(bh, s, H, C, Q, gb, gl, gh)
    dY_s = tl.load(dy_ptr + at[:, None] + p[None, :], mask=position[:, None] < L, other=0.0)
    C_s = tl.load(c_ptr + (bh // H) * c_chunk_stride + ((bh % H) // R) * c_group_stride + s[:, None] * c_row_stride
                  + n[None, :], mask=n[None, :] < N, other=0.0)  # (BT, NP)
    h_T = tl.load(h_ptr + bh * P * N + p[None, :] * N + n[:, None], mask=n[:, None] < N, other=0.0)  # (NP, P)
    read_out = tl.dot(C_s, h_T.to(C_s.dtype), input_precision=PRECISION)  # C_s . h^T (BT, P) fp32
    dro = tl.exp(tl.load(cs_ptr + bh * Q + s)) * tl.sum(dY_s.to(tl.float32) * read_out, axis=1)
    tl.store(dro_ptr + bh * Q + s, dro)
    dt_s = tl.load(dt_ptr + ((bh // H) * Q + s) * H + bh % H)
    du = dX * dt_s[:, None] + tl.load(d_ptr + bh % H) * dY_s.to(tl.float32)
    at, position = _rows(bh, s, H, C, Q, xb, xl, xh)
    tl.store(dx_ptr + at[:, None] + p[None, :], du.to(dx_ptr.dtype.element_ty), mask=position[:, None] < L)
    tl.store(ddt_ptr + ((bh // H) * Q + s) * H + bh % H, tl.sum(dX * u_s.to(tl.float32), axis=1))
    tl.store(dd_ptr + bh * (Q // BT) + sb_, tl.sum(dY_s.to(tl.float32) * u_s.to(tl.float32)))


@triton.jit
def _diag_bwd_s(x_ptr, dt_ptr, s_ptr, cs_ptr, dy_ptr, ds_ptr, rows_ptr, cols_ptr, L, C, R, HEADS, H, sb, sl, sh, gb,
                gl, gh, Q: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, HEADS of its R heads) and (t-block, s-block): the heads' sum of dM * L into their
    part of dS[t, s]; each head's sum_s dM M into rows[head, s-block, t] and sum_t dM M into cols[head, t-block, s].
    Zeros where s-block > t-block, and where the t-block lies wholly in the padding (dy = 0)."""
    parts = tl.cdiv(R, HEADS)
    group, first = tl.program_id(0) // parts, (tl.program_id(0) % parts) * HEADS  # over (batch, chunk, group, part)
    tb, sb_ = tl.program_id(1), tl.program_id(2)
    t, s, p = tb * BT + tl.arange(0, BT), sb_ * BT + tl.arange(0, BT), tl.arange(0, P)
    dS = tl.zeros((BT, BT), dtype=tl.float32)
    S_ts = tl.load(s_ptr + group * Q * Q + t[:, None] * Q + s[None, :])  # (BT, BT) fp32
    last = tl.where(tb * BT < _real_rows(group * R, H, C, Q, L), tb, -1)  # the last s-block to compute
    for bh in range(group * R + first, group * R + tl.minimum(first + HEADS, R)):
        row_sums, col_sums = tl.zeros((BT,), dtype=tl.float32), tl.zeros((BT,), dtype=tl.float32)
        if sb_ <= last:
            at, position = _rows(bh, t, H, C, Q, gb, gl, gh)
            dY_t = tl.load(dy_ptr + at[:, None] + p[None, :], mask=position[:, None] < L, other=0.0)
            X_s, _ = _X(x_ptr, dt_ptr, bh, s, p, L, H, C, Q, sb, sl, sh)
            dML = tl.dot(dY_t, tl.trans(X_s), input_precision=PRECISION) * _tile(cs_ptr + bh * Q, t, s)  # dM * L
            dS += dML
            dMM = dML * S_ts  # dM * M
            row_sums, col_sums = tl.sum(dMM, axis=1), tl.sum(dMM, axis=0)
        tl.store(rows_ptr + (bh * (Q // BT) + sb_) * Q + t, row_sums)
        tl.store(cols_ptr + (bh * (Q // BT) + tb) * Q + s, col_sums)
    tl.store(ds_ptr + tl.program_id(0) * Q * Q + t[:, None] * Q + s[None, :], dS)


@triton.jit
def _state_tile(H, N, BP: tl.constexpr, BN: tl.constexpr, BQ: tl.constexpr):
    """A states' program's place: its (batch, head) over the g r heads, batch, head, its p and n (a (BP, BN) tile of
    the state), BQ positions, the tile's offsets in a (P, N) state and which of them lie inside it (n < N)."""
    bh0, pb, nb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p, n = pb * BP + tl.arange(0, BP), nb * BN + tl.arange(0, BN)
    return bh0, bh0 // H, bh0 % H, p, n, tl.arange(0, BQ), p[:, None] * N + n[None, :], n[None, :] < N


@triton.jit
def _states_fwd(x_ptr, dt_ptr, b_ptr, cs_ptr, h0_ptr, h_ptr, last_ptr, L, C, H, R, N, sb, sl, sh, b_chunk_stride,
                b_group_stride, b_row_stride, Q: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                BQ: tl.constexpr, PRECISION: tl.constexpr):
    """Eq. 3 from chunk to chunk per (batch, head) and (BP, BN) tile of the state: h stores the state entering each
    chunk k, then h <- exp(cs_end) h + sum_s exp(cs_end - cs_s) X_s B_s^T over the chunk's positions before the
    padding; fp32."""
    bh0, batch, head, p, n, q, tile, inside = _state_tile(H, N, BP, BN, BQ)
    h = tl.load(h0_ptr + bh0 * P * N + tile, mask=inside, other=0.0)  # (BP, BN) fp32
    for k in range(C):
        bh = (batch * C + k) * H + head  # the (batch, chunk, head) block
        tl.store(h_ptr + bh * P * N + tile, h, mask=inside)
        cs = cs_ptr + bh * Q
        cs_end = tl.load(cs + Q - 1)
        chunk = tl.zeros((BP, BN), dtype=tl.float32)
        for q0 in range(0, _real_rows(bh, H, C, Q, L), BQ):
            X, _ = _X(x_ptr, dt_ptr, bh, q0 + q, p, L, H, C, Q, sb, sl, sh)  # (BQ, BP)
            Xd = (X.to(tl.float32) * tl.exp(cs_end - tl.load(cs + q0 + q))[:, None]).to(X.dtype)  # decayed to the end
            B = tl.load(b_ptr + (bh // H) * b_chunk_stride + (head // R) * b_group_stride
                        + (q0 + q)[:, None] * b_row_stride + n[None, :], mask=inside, other=0.0)  # (BQ, BN)
            chunk += tl.dot(tl.trans(Xd), B, input_precision=PRECISION)
        h = tl.exp(cs_end) * h + chunk
    tl.store(last_ptr + bh0 * P * N + tile, h, mask=inside)


@triton.jit
def _states_bwd(dy_ptr, c_ptr, cs_ptr, h_ptr, dlast_ptr, dst_ptr, dec_ptr, dh0_ptr, L, C, H, R, N, gb, gl, gh,
                c_chunk_stride, c_group_stride, c_row_stride, Q: tl.constexpr, P: tl.constexpr, BP: tl.constexpr,
                BN: tl.constexpr, BQ: tl.constexpr, PRECISION: tl.constexpr):
    """The recurrence between chunks backward per (batch, head) and (BP, BN) tile of the state, from the last chunk:
    dst stores the gradient g of the state leaving chunk k, dec its part of dcs at the chunk's end before the decay's
    factor (sum g h_k over the tile), then g <- exp(cs_end) g + dh_k with dh_k = sum_t exp(cs_t) dy_t^T C_t, the
    read-out's gradient for the state entering chunk k (BQ positions at a time, up to the padding); dh0 gets the
    last g. fp32."""
    bh0, batch, head, p, n, q, tile, inside = _state_tile(H, N, BP, BN, BQ)
    g = tl.load(dlast_ptr + bh0 * P * N + tile, mask=inside, other=0.0)  # (BP, BN) fp32
    for kk in range(C):
        k = C - 1 - kk
        bh = (batch * C + k) * H + head  # the (batch, chunk, head) block
        tl.store(dst_ptr + bh * P * N + tile, g, mask=inside)
        h = tl.load(h_ptr + bh * P * N + tile, mask=inside, other=0.0)
        part = (bh * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)  # this tile's
        tl.store(dec_ptr + part, tl.sum(g * h))
        dh = tl.zeros((BP, BN), dtype=tl.float32)
        for q0 in range(0, _real_rows(bh, H, C, Q, L), BQ):
            at, position = _rows(bh, q0 + q, H, C, Q, gb, gl, gh)
            dY = tl.load(dy_ptr + at[:, None] + p[None, :], mask=position[:, None] < L, other=0.0)  # (BQ, BP)
            dYe = (dY.to(tl.float32) * tl.exp(tl.load(cs_ptr + bh * Q + q0 + q))[:, None]).to(dY.dtype)
            C_q = tl.load(c_ptr + (bh // H) * c_chunk_stride + (head // R) * c_group_stride
                          + (q0 + q)[:, None] * c_row_stride + n[None, :], mask=inside, other=0.0)  # (BQ, BN)
            dh += tl.dot(tl.trans(dYe), C_q, input_precision=PRECISION)
        g = tl.exp(tl.load(cs_ptr + bh * Q + Q - 1)) * g + dh
    tl.store(dh0_ptr + bh0 * P * N + tile, g, mask=inside)


@triton.jit
def _group_bwd(x_ptr, dt_ptr, cs_ptr, h_ptr, dst_ptr, dy_ptr, db_ptr, dc_ptr, L, C, R, HEADS, H, N, sb, sl, sh, gb, gl,
               gh, Q: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, NP: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, HEADS of its R heads) and s-block, the heads' sums of B's gradient through the state
    leaving the chunk, exp(cs_end - cs_s) X_s . dh (dh its gradient), and of C's through the read-out,
    exp(cs_s) dy_s . h (h the state entering the chunk), into their parts (BT, N); products in the inputs' dtype.
    Zeros for an s-block wholly in the padding (X = dy = 0)."""
    parts = tl.cdiv(R, HEADS)
    group, first = tl.program_id(0) // parts, (tl.program_id(0) % parts) * HEADS  # over (batch, chunk, group, part)
    s, p, n = tl.program_id(1) * BT + tl.arange(0, BT), tl.arange(0, P), tl.arange(0, NP)
    state = p[:, None] * N + n[None, :]  # (P, NP) offsets in a (P, N) state
    dB = tl.zeros((BT, NP), dtype=tl.float32)
    dC = tl.zeros((BT, NP), dtype=tl.float32)
    heads = tl.where(tl.program_id(1) * BT < _real_rows(group * R, H, C, Q, L), tl.minimum(first + HEADS, R), first)
    for bh in range(group * R + first, group * R + heads):
        X_s, _ = _X(x_ptr, dt_ptr, bh, s, p, L, H, C, Q, sb, sl, sh)  # (BT, P)
        cs_s = tl.load(cs_ptr + bh * Q + s)
        Xd = (X_s.to(tl.float32) * tl.exp(tl.load(cs_ptr + bh * Q + Q - 1) - cs_s)[:, None]).to(X_s.dtype)
        dh = tl.load(dst_ptr + bh * P * N + state, mask=n[None, :] < N, other=0.0)  # (P, NP) fp32
        dB += tl.dot(Xd, dh.to(Xd.dtype), input_precision=PRECISION)
        at, position = _rows(bh, s, H, C, Q, gb, gl, gh)
        dY = tl.load(dy_ptr + at[:, None] + p[None, :], mask=position[:, None] < L, other=0.0)  # (BT, P)
        dYe = (dY.to(tl.float32) * tl.exp(cs_s)[:, None]).to(dY.dtype)
        h = tl.load(h_ptr + bh * P * N + state, mask=n[None, :] < N, other=0.0)  # (P, NP) fp32
        dC += tl.dot(dYe, h.to(dYe.dtype), input_precision=PRECISION)
    out = tl.program_id(0) * Q * N + s[:, None] * N + n[None, :]
    tl.store(db_ptr + out, dB, mask=n[None, :] < N)
    tl.store(dc_ptr + out, dC, mask=n[None, :] < N)


def _no_autocast(x):
    """The products of S, dC and dB in fp32, also under autocast."""
    return torch.autocast(x.device.type, enabled=False)


def _strides(x):
    """(batch, position, head) strides of a (b, l, h, p) tensor whose p are contiguous, as the kernels take them."""
    return x.stride()[:3]


def _addressable(x):
    """x as it lies if its p are contiguous, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernels_backward(dy, h, dstates, x, dt, D, Br, Cr, cs, S):
    """The backward's two kernels: du and ddt's part (the diagonal blocks and the states), dB and dC from dS, dcs's
    parts from the diagonal blocks, the read-out and the states' decays (dw, whose sum also goes to each chunk's
    end), and dD. Br, Cr: B and C as `_rows_in_layout` gives them."""
    b, c, g, r, Q = cs.shape
    l, p, n = x.shape[1], x.shape[-1], Br.shape[-1]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ddt = torch.empty_like(dt)  # (b, c Q, h) fp32
    dw, dro = torch.empty_like(cs), torch.empty_like(cs)  # (b, c, g, r, Q) fp32
    bt, launch = _settings(BWD_X_TILE, Q)
    dD = torch.empty(b, c, g * r, Q // bt, dtype=torch.float32, device=x.device)  # each block's part
    _diag_bwd_x[(b * c * g * r, Q // bt)](x, dt, S, cs, D, Br, Cr, h, dstates, dy, dx, ddt, dw, dro, dD, l, c, r,
                                           g * r, n, *_strides(x), *_strides(dy), *_strides(dx), *Br.stride()[1:4],
                                           *Cr.stride()[1:4], Q=Q, P=p, BT=bt, NP=_n_tile(n),
                                           PRECISION=_precision(x), **launch)
    bt, launch = _settings(BWD_S_TILE, Q)
    heads, blocks = launch.pop("HEADS"), Q // bt
    parts = triton.cdiv(r, heads)
    dS = torch.empty(b, c, g, parts, Q, Q, dtype=torch.float32, device=x.device)  # each part's heads' sum
    rows = torch.empty(b, c, g, r, blocks, Q, dtype=torch.float32, device=x.device)
    cols = torch.empty_like(rows)
    _diag_bwd_s[(b * c * g * parts, blocks, blocks)](x, dt, S, cs, dy, dS, rows, cols, l, c, r, heads, g * r,
                                                     *_strides(x), *_strides(dy), Q=Q, P=p, BT=bt,
                                                     PRECISION=_precision(x), **launch)
    with _no_autocast(x):
        dS = dS.sum(3)  # (b, c, g, Q, Q)
        dC = dS @ Br.float()  # (b, c, g, Q, n)
        dB = dS.transpose(-1, -2) @ Cr.float()  # (b, c, g, Q, n)
    return dx, ddt, dB, dC, rows.sum(-2) - cols.sum(-2) + dro, dw, dD.sum((0, 1, 3))


def _recurrence_backward(dy, dlast, Cr, cs, h):
    """The recurrence between chunks, h_{k+1} = exp(cs_end) h_k + state_k, backward by `_states_bwd`, with the
    read-out's gradient for each entering state (Cr: C as `_rows_in_layout` gives it): the gradient of the state
    leaving each chunk (b, c, g, r, p, n), dcs's part at each chunk's end (b, c, g, r) and the initial state's
    gradient (b, g r, p, n), fp32."""
    b, c, g, r, p, n = h.shape
    Q, l = cs.shape[-1], dy.shape[1]
    grid, tile = _state_launch(STATES_BWD_TILE, b * g * r, p, n, Q)
    leaving = torch.empty_like(h)
    dec = torch.empty(b, c, g, r, grid[1] * grid[2], dtype=torch.float32, device=h.device)  # each tile's part
    dh0 = torch.empty(b, g * r, p, n, dtype=torch.float32, device=h.device)
    _states_bwd[grid](dy, Cr, cs, h, dlast.float().contiguous(), leaving, dec, dh0, l, c, g * r, r, n, *_strides(dy),
                      *Cr.stride()[1:4], Q=Q, P=p, PRECISION=_precision(dy), **tile)
    return leaving, dec.sum(-1) * torch.exp(cs[..., -1]), dh0


def _group_sums(x, dt, cs, h, dstates, dy, n):
    """B's gradient through the states and C's through the read-out, each a sum over the group's heads
    (`_group_bwd`): (b, c, g, Q, n) fp32 each."""
    b, c, g, r, Q = cs.shape
    l, p = x.shape[1], x.shape[-1]
    bt, launch = _settings(GROUP_TILE, Q)
    heads = launch.pop("HEADS")
    parts = triton.cdiv(r, heads)
    dB = torch.empty(b, c, g, parts, Q, n, dtype=torch.float32, device=x.device)  # each part's heads' sum
    dC = torch.empty_like(dB)
    _group_bwd[(b * c * g * parts, Q // bt)](x, dt, cs, h, dstates, dy, dB, dC, l, c, r, heads, g * r, n,
                                              *_strides(x), *_strides(dy), Q=Q, P=p, BT=bt,
                                              NP=_n_tile(n), PRECISION=_precision(x), **launch)
    return dB.sum(3), dC.sum(3)


class ChunkScan(torch.autograd.Function):
    """Eq. 3 by chunks in two kernels: the states entering the chunks (`chunk_states`), then each chunk's whole
    output: its diagonal block, plus the entering state read out by C and decayed from the chunk's start, plus D u.
    x = u (b, l, h, p) where it lies, dt (b, c Q, h) fp32 zero on the padding, Bc, Cc (b, c, g, Q, n), cs
    (b, c, g, r, Q) fp32, h0 (b, g r, p, n) and D (h,) fp32 -> y (b, l, h, p) in x's dtype and the final state
    (b, g r, p, n) fp32. The backward: the recurrence between chunks backward (`_states_bwd`), then the kernels,
    which give X's whole gradient (the diagonal blocks' and the states') through to du and ddt, cs's parts and dS,
    and C's gradient through the read-out and B's through the states (`_group_bwd`)."""

    @staticmethod
    def forward(ctx, x, dt, Bc, Cc, cs, h0, D):
        x, dt, cs, D = _addressable(x), dt.contiguous(), cs.contiguous(), D.float().contiguous()
        Br, Cr = _rows_in_layout(Bc), _rows_in_layout(Cc)
        h, last = chunk_states(x, dt, Br, cs, h0)
        b, c, g, r, Q = cs.shape
        l, p, n = x.shape[1], x.shape[-1], Cc.shape[-1]
        with _no_autocast(x):
            S = (Cc.float() @ Bc.float().transpose(-1, -2)).contiguous()  # C_t . B_s, fp32 (b, c, g, Q, Q)
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        bt, launch = _settings(FWD_TILE, Q)
        _chunk_fwd[(b * c * g * r, Q // bt)](x, dt, S, cs, Cr, h, D, y, l, c, r, g * r, n, *_strides(x), *_strides(y),
                                              *Cr.stride()[1:4], Q=Q, P=p, BT=bt, NP=_n_tile(n),
                                              PRECISION=_precision(x), **launch)
        ctx.save_for_backward(x, dt, Br, Cr, cs, S, h, D)
        return y, last

    @staticmethod
    def backward(ctx, dy, dlast):
        x, dt, Br, Cr, cs, S, h, D = ctx.saved_tensors
        dy = _addressable(dy)
        dstates, dcs_end, dh0 = _recurrence_backward(dy, dlast, Cr, cs, h)
        du, ddt, dB, dC, dcs, dw, dD = _kernels_backward(dy, h, dstates, x, dt, D, Br, Cr, cs, S)
        dB_states, dC_out = _group_sums(x, dt, cs, h, dstates, dy, Br.shape[-1])
        dB = dB + dB_states
        dcs = dcs - dw
        dcs[..., -1] += dw.sum(-1) + dcs_end
        return du, ddt, dB.to(Br.dtype), (dC + dC_out).to(Cr.dtype), dcs, dh0, dD


def _rows_in_layout(Cc):
    """Cc (b, c, g, Q, n) as it lies if batch and chunk merge and n is contiguous, else a contiguous copy."""
    sb, sc, sg, sq, sn = Cc.stride()
    return Cc if (sn == 1 and sb == Cc.shape[1] * sc) else Cc.contiguous()


def _settings(tile, Q):
    """(rows a program, the other launch settings) of a kernel's tile for chunks of Q."""
    rest = dict(tile)
    return min(rest.pop("BT"), Q), rest


def _n_tile(n):
    """The state's n as the kernels tile it: a power of two of at least 16 (tl.dot's tiles), masked past n."""
    return max(16, triton.next_power_of_2(n))


def _state_launch(tile, programs, p, n, Q):
    """A states' kernel's grid, over `programs` (batch, head) pairs and the (BP, BN) tiles of a (p, n) state, and its
    launch settings: the tile's, no larger than the state or the chunk."""
    rest = dict(tile)
    bp, bq, bn = min(rest.pop("BP"), p), min(rest.pop("BQ"), Q), min(rest.pop("BN"), _n_tile(n))
    return (programs, p // bp, triton.cdiv(n, bn)), dict(BP=bp, BN=bn, BQ=bq, **rest)


def _precision(x):
    """tl.dot's precision: fp32 products for fp32 inputs (16-bit inputs multiply in their own dtype)."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def fits(chunk, headdim):
    """Whether the kernels take these sizes: powers of two of at least 16 (tl.dot's tiles)."""
    return all(v >= 16 and not v & (v - 1) for v in (chunk, headdim))


def _check(Q, p):
    if not fits(Q, p):
        raise ValueError(f"the SSD kernels need the chunk and headdim to be powers of two of at least 16 (here {Q}, "
                         f"{p}): use ssd_chunked_fast")


def chunk_states(x, dt, Bc, cs, h0=None):
    """The state entering each chunk and the final state, from one kernel over the chunks (`_states_fwd`; no
    gradients: `ChunkScan` gives them): x (b, l, h, p), dt (b, c Q, h) fp32 zero on the padding, Bc (b, c, g, Q, n),
    cs (b, c, g, r, Q) fp32, h0 (b, h, p, n) the initial state or None (zeros) -> (b, c, g, r, p, n) and
    (b, h, p, n), fp32, for sizes that `fits`."""
    b, c, g, r, Q = cs.shape
    l, h_, p = x.shape[1:]
    n = Bc.shape[-1]
    _check(Q, p)
    x, dt, cs = _addressable(x), dt.contiguous(), cs.contiguous()
    h0 = torch.zeros(b, h_, p, n, dtype=torch.float32, device=x.device) if h0 is None else h0.float().contiguous()
    Br = _rows_in_layout(Bc)
    h = torch.empty(b, c, g, r, p, n, dtype=torch.float32, device=x.device)
    last = torch.empty_like(h0)
    grid, tile = _state_launch(STATES_TILE, b * g * r, p, n, Q)
    _states_fwd[grid](x, dt, Br, cs, h0, h, last, l, c, g * r, r, n, *_strides(x), *Br.stride()[1:4], Q=Q, P=p,
                      PRECISION=_precision(x), **tile)
    return h, last


def chunk_scan(x, dt, Bc, Cc, cs, D, h0=None):
    """Eq. 3 by chunks (`ChunkScan`): x (b, l, h, p), dt (b, c Q, h) fp32 zero on the padding, Bc, Cc
    (b, c, g, Q, n), cs (b, c, g, r, Q) fp32, D (h,), h0 (b, h, p, n) the initial state or None (zeros) ->
    y (b, l, h, p) in x's dtype and the final state (b, h, p, n) fp32, for sizes that `fits`."""
    b, l, h, p = x.shape
    if h0 is None:
        h0 = torch.zeros(b, h, p, Bc.shape[-1], dtype=torch.float32, device=x.device)
    return ChunkScan.apply(x, dt, Bc, Cc, cs, h0, D)
