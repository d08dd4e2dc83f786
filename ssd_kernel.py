"""The SSD's diagonal blocks (eq. 3 inside each chunk) as Triton kernels that keep the (Q, Q) tiles on chip, forward
and backward: what `fast_ssd.ssd_chunked_fast` computes with (Q, Q) tensors in memory, for `fast_ssd.ssd_triton`.

    Y[t] = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) X_s        per (batch, chunk, group, head), X = dt x

The backward, with M = S * L (S = C B^T, L the decays): dX_s = sum_t M[t, s] dY_t; dM = dY X^T; dC_t = sum_s (dM L)
B_s and dB_s = sum_t (dM L) C_t over the heads of a group; dcs_t = sum_s dM M and dcs_s = -sum_t dM M. The products
run in the inputs' dtype with fp32 accumulation; the decays in fp32.
"""

import torch
import triton
import triton.language as tl

BACKWARD_SPLITS = 8  # each group's heads are split over this many programs in the backward (dB, dC added atomically)


@triton.jit
def _tile(cs_ptr, t, s):
    """L[t, s] = exp(cs_t - cs_s) where t >= s, else 0: (BT, BT) fp32."""
    cs_t = tl.load(cs_ptr + t)
    cs_s = tl.load(cs_ptr + s)
    causal = t[:, None] >= s[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, cs_t[:, None] - cs_s[None, :], 0.0)), 0.0)


@triton.jit
def _program_heads(R, HEADS):
    """A backward program's share of the heads: (its group, its first head and one past its last, of the group's
    R heads, HEADS a program)."""
    splits = tl.cdiv(R, HEADS)
    group, first = tl.program_id(0) // splits, (tl.program_id(0) % splits) * HEADS
    return group, first, tl.minimum(first + HEADS, R)


@triton.jit
def _matrix(C_t, B_s, L, PRECISION: tl.constexpr):
    """The SSD matrix's (t, s) block M = (C_t . B_s) * L: (BT, BT) fp32."""
    return tl.dot(C_t, tl.trans(B_s), input_precision=PRECISION) * L


@triton.jit
def _matrix_and_grad(C_t, B_s, X_s, dY_t, L, PRECISION: tl.constexpr):
    """The SSD matrix's (t, s) block M (`_matrix`) and its gradient dM = dY_t . X_s^T, both (BT, BT) fp32."""
    return _matrix(C_t, B_s, L, PRECISION), tl.dot(dY_t, tl.trans(X_s), input_precision=PRECISION)


@triton.jit
def _diag_fwd(x_ptr, b_ptr, c_ptr, cs_ptr, y_ptr, R, Q: tl.constexpr, N: tl.constexpr, P: tl.constexpr,
              BT: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, head) and t-block: Y_t = sum_{s <= t} M[t, s] X_s, M = (C_t . B_s) L[t, s]."""
    head = tl.program_id(0)  # over (batch, chunk, group, head)
    tb = tl.program_id(1)
    group = head // R
    t = tb * BT + tl.arange(0, BT)
    n, p = tl.arange(0, N), tl.arange(0, P)
    C_t = tl.load(c_ptr + group * Q * N + t[:, None] * N + n[None, :])  # (BT, N)
    acc = tl.zeros((BT, P), dtype=tl.float32)
    for sb in range(0, tb + 1):
        s = sb * BT + tl.arange(0, BT)
        B_s = tl.load(b_ptr + group * Q * N + s[:, None] * N + n[None, :])  # (BT, N)
        X_s = tl.load(x_ptr + head * Q * P + s[:, None] * P + p[None, :])  # (BT, P)
        M = _matrix(C_t, B_s, _tile(cs_ptr + head * Q, t, s), PRECISION)  # (BT, BT) fp32
        acc += tl.dot(M.to(X_s.dtype), X_s, input_precision=PRECISION)
    tl.store(y_ptr + head * Q * P + t[:, None] * P + p[None, :], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _diag_bwd_s(x_ptr, b_ptr, c_ptr, cs_ptr, dy_ptr, dx_ptr, db_ptr, dcs_ptr, R, HEADS, Q: tl.constexpr,
                N: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, HEADS of its R heads) and s-block: dX_s and the -sum_t part of dcs_s for each head;
    dB_s summed over the heads, added to db (zeros at first) atomically, as other programs add their heads'."""
    group, first, last = _program_heads(R, HEADS)
    sb = tl.program_id(1)
    s = sb * BT + tl.arange(0, BT)
    n, p = tl.arange(0, N), tl.arange(0, P)
    B_s = tl.load(b_ptr + group * Q * N + s[:, None] * N + n[None, :])
    dB = tl.zeros((BT, N), dtype=tl.float32)
    for r in range(first, last):
        head = group * R + r
        X_s = tl.load(x_ptr + head * Q * P + s[:, None] * P + p[None, :])
        dX = tl.zeros((BT, P), dtype=tl.float32)
        dcs = tl.zeros((BT,), dtype=tl.float32)
        for tb in range(sb, Q // BT):
            t = tb * BT + tl.arange(0, BT)
            C_t = tl.load(c_ptr + group * Q * N + t[:, None] * N + n[None, :])
            dY_t = tl.load(dy_ptr + head * Q * P + t[:, None] * P + p[None, :])
            L = _tile(cs_ptr + head * Q, t, s)
            M, dM = _matrix_and_grad(C_t, B_s, X_s, dY_t, L, PRECISION)  # (BT_t, BT_s) fp32 each
            dX += tl.dot(tl.trans(M).to(dY_t.dtype), dY_t, input_precision=PRECISION)
            dB += tl.dot(tl.trans(dM * L).to(C_t.dtype), C_t, input_precision=PRECISION)
            dcs -= tl.sum(dM * M, axis=0)
        tl.store(dx_ptr + head * Q * P + s[:, None] * P + p[None, :], dX.to(dx_ptr.dtype.element_ty))
        tl.store(dcs_ptr + head * Q + s, dcs)
    tl.atomic_add(db_ptr + group * Q * N + s[:, None] * N + n[None, :], dB)


@triton.jit
def _diag_bwd_t(x_ptr, b_ptr, c_ptr, cs_ptr, dy_ptr, dc_ptr, dcs_ptr, R, HEADS, Q: tl.constexpr, N: tl.constexpr,
                P: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, HEADS of its R heads) and t-block: the sum_s part of dcs_t for each head (added to
    _diag_bwd_s's part); dC_t summed over the heads, added to dc (zeros at first) atomically."""
    group, first, last = _program_heads(R, HEADS)
    tb = tl.program_id(1)
    t = tb * BT + tl.arange(0, BT)
    n, p = tl.arange(0, N), tl.arange(0, P)
    C_t = tl.load(c_ptr + group * Q * N + t[:, None] * N + n[None, :])
    dC = tl.zeros((BT, N), dtype=tl.float32)
    for r in range(first, last):
        head = group * R + r
        dY_t = tl.load(dy_ptr + head * Q * P + t[:, None] * P + p[None, :])
        dcs = tl.zeros((BT,), dtype=tl.float32)
        for sb in range(0, tb + 1):
            s = sb * BT + tl.arange(0, BT)
            B_s = tl.load(b_ptr + group * Q * N + s[:, None] * N + n[None, :])
            X_s = tl.load(x_ptr + head * Q * P + s[:, None] * P + p[None, :])
            L = _tile(cs_ptr + head * Q, t, s)
            M, dM = _matrix_and_grad(C_t, B_s, X_s, dY_t, L, PRECISION)
            dC += tl.dot((dM * L).to(B_s.dtype), B_s, input_precision=PRECISION)
            dcs += tl.sum(dM * M, axis=1)
        at = dcs_ptr + head * Q + t
        tl.store(at, tl.load(at) + dcs)
    tl.atomic_add(dc_ptr + group * Q * N + t[:, None] * N + n[None, :], dC)


class DiagonalBlocks(torch.autograd.Function):
    """Y (b, c, g, r, Q, p) in X's dtype from X (b, c, g, r, Q, p), B, C (b, c, g, Q, n), cs (b, c, g, r, Q) fp32."""

    @staticmethod
    def forward(ctx, X, Bc, Cc, cs):
        X, Bc, Cc, cs = X.contiguous(), Bc.contiguous(), Cc.contiguous(), cs.contiguous()
        b, c, g, r, Q, p = X.shape
        n = Bc.shape[-1]
        bt = min(64, Q)
        precision = "ieee" if X.dtype == torch.float32 else "tf32"
        Y = torch.empty_like(X)
        _diag_fwd[(b * c * g * r, Q // bt)](X, Bc, Cc, cs, Y, r, Q=Q, N=n, P=p, BT=bt, PRECISION=precision)
        ctx.save_for_backward(X, Bc, Cc, cs)
        return Y

    @staticmethod
    def backward(ctx, dY):
        X, Bc, Cc, cs = ctx.saved_tensors
        b, c, g, r, Q, p = X.shape
        n = Bc.shape[-1]
        bt = min(64, Q)
        precision = "ieee" if X.dtype == torch.float32 else "tf32"
        dY = dY.contiguous()
        dX = torch.empty_like(X)
        dB = torch.zeros(Bc.shape, dtype=torch.float32, device=X.device)
        dC = torch.zeros(Cc.shape, dtype=torch.float32, device=X.device)
        dcs = torch.empty(cs.shape, dtype=torch.float32, device=X.device)
        heads = triton.cdiv(r, BACKWARD_SPLITS)  # a program's heads
        grid = (b * c * g * triton.cdiv(r, heads), Q // bt)
        _diag_bwd_s[grid](X, Bc, Cc, cs, dY, dX, dB, dcs, r, heads, Q=Q, N=n, P=p, BT=bt, PRECISION=precision)
        _diag_bwd_t[grid](X, Bc, Cc, cs, dY, dC, dcs, r, heads, Q=Q, N=n, P=p, BT=bt, PRECISION=precision)
        return dX, dB.to(Bc.dtype), dC.to(Cc.dtype), dcs


def fits(chunk, headdim, d_state):
    """Whether the kernels take these sizes: powers of two of at least 16 (tl.dot's tiles)."""
    return all(v >= 16 and not v & (v - 1) for v in (chunk, headdim, d_state))


def diagonal_blocks(X, Bc, Cc, cs):
    """`fast_ssd.diagonal_blocks` by the kernels: X (b, c, g, r, Q, p), Bc, Cc (b, c, g, Q, n), cs (b, c, g, r, Q) fp32
    -> Y (b, c, g, r, Q, p) in X's dtype, for sizes that `fits`."""
    Q, p, n = X.shape[-2], X.shape[-1], Bc.shape[-1]
    if not fits(Q, p, n):
        raise ValueError(f"the SSD kernels need the chunk, headdim and d_state to be powers of two of at least 16 "
                         f"(here {Q}, {p}, {n}): use ssd_chunked_fast")
    return DiagonalBlocks.apply(X, Bc, Cc, cs)
