"""Each chunk's output of the SSD (eq. 3) as Triton kernels that keep the (Q, Q) tiles on chip, forward and
backward: what `fast_ssd.ssd_chunked_fast` computes with (Q, Q) tensors in memory, for `fast_ssd.ssd_triton`.

    y_t = sum_{s <= t} exp(cs_t - cs_s) (C_t . B_s) X_s  +  exp(cs_t) C_t . h  +  D u_t
          (the diagonal block)                            (the state h entering the chunk, read out by C)

per (batch, chunk, group, head), X = dt u, fp32 until the one store of y. S = C B^T is the same for every head of a
group: it is one product per (batch, chunk, group), in fp32, before the kernels, which multiply it by each head's
decays L. The diagonal block's backward, with M = S * L: dX_s = sum_t M[t, s] dy_t; dM = dy X^T; dS = sum over the
group's heads of dM * L, then dC = dS B and dB = dS^T C; dcs_t = sum_s dM M and dcs_s = -sum_t dM M. The read-out's
and D's gradients are products in PyTorch (`ChunkOutputs.backward`). The products with X and dy run in the inputs'
dtype with fp32 accumulation; S, dS and the decays are fp32. No program adds to another's output, so every gradient
is the same from run to run.

X, u, y, dy and dX are read and written where they lie: a (b, c, g, r, Q, p) view of the model's (b, l, h, p) tensor
(Q positions apart by h p values, the heads by p) needs no copy into (Q, p) blocks. `_layout` gives the kernels three
strides: a chunk's, a head's and a position's.
"""

import torch
import triton
import triton.language as tl

# Each kernel's launch settings: BT a chunk's rows per program (fewer in a shorter chunk), warps, pipeline stages;
# HEADS a group's heads per program of the backward's dS (their parts are summed after it). The fastest of
# `python benchmark.py ssd-tiles` at Mamba-2 2.7B's training shape (docs/speed.md).
FWD_TILE = dict(BT=64, num_warps=4, num_stages=2)  # _chunk_fwd
BWD_X_TILE = dict(BT=128, num_warps=4, num_stages=1)  # _diag_bwd_x
BWD_S_TILE = dict(BT=64, HEADS=32, num_warps=4, num_stages=3)  # _diag_bwd_s


@triton.jit
def _tile(cs_ptr, t, s):
    """L[t, s] = exp(cs_t - cs_s) where t >= s, else 0: (BT, BT) fp32."""
    cs_t = tl.load(cs_ptr + t)
    cs_s = tl.load(cs_ptr + s)
    causal = t[:, None] >= s[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, cs_t[:, None] - cs_s[None, :], 0.0)), 0.0)


@triton.jit
def _block(head, H, chunk_stride, head_stride):
    """Where a (batch, chunk, head) block begins, numbered over (batch, chunk) then the H = g r heads."""
    return (head // H) * chunk_stride + (head % H) * head_stride


@triton.jit
def _matrix(s_ptr, cs_ptr, t, s, Q: tl.constexpr):
    """The SSD matrix's (t, s) block M = S[t, s] * L[t, s]: (BT, BT) fp32."""
    return tl.load(s_ptr + t[:, None] * Q + s[None, :]) * _tile(cs_ptr, t, s)


@triton.jit
def _chunk_fwd(x_ptr, u_ptr, s_ptr, cs_ptr, c_ptr, h_ptr, d_ptr, y_ptr, R, H, N, chunk_stride, head_stride, row_stride,
               c_chunk_stride, c_group_stride, c_row_stride, Q: tl.constexpr, P: tl.constexpr, BT: tl.constexpr,
               NP: tl.constexpr, PRECISION: tl.constexpr):
    """Eq. 3 per (batch, chunk, group, head) and t-block: y_t = sum_{s <= t} M[t, s] X_s + exp(cs_t) C_t . h + D u_t,
    with h (P, N) fp32 the state entering the chunk; fp32 until the store."""
    head = tl.program_id(0)  # over (batch, chunk, group, head)
    tb = tl.program_id(1)
    t, p, n = tb * BT + tl.arange(0, BT), tl.arange(0, P), tl.arange(0, NP)
    at = _block(head, H, chunk_stride, head_stride)
    acc = tl.zeros((BT, P), dtype=tl.float32)
    for sb in range(0, tb + 1):
        s = sb * BT + tl.arange(0, BT)
        X_s = tl.load(x_ptr + at + s[:, None] * row_stride + p[None, :])  # (BT, P)
        M = _matrix(s_ptr + (head // R) * Q * Q, cs_ptr + head * Q, t, s, Q)  # (BT, BT) fp32
        acc += tl.dot(M.to(X_s.dtype), X_s, input_precision=PRECISION)
    C_t = tl.load(c_ptr + (head // H) * c_chunk_stride + ((head % H) // R) * c_group_stride + t[:, None] * c_row_stride
                  + n[None, :], mask=n[None, :] < N, other=0.0)  # (BT, NP), zeros past N
    h_T = tl.load(h_ptr + head * P * N + p[None, :] * N + n[:, None], mask=n[:, None] < N, other=0.0)  # (NP, P)
    acc += tl.exp(tl.load(cs_ptr + head * Q + t))[:, None] * tl.dot(C_t, h_T.to(C_t.dtype), input_precision=PRECISION)
    acc += tl.load(d_ptr + head % H) * tl.load(u_ptr + at + t[:, None] * row_stride + p[None, :]).to(tl.float32)
    tl.store(y_ptr + at + t[:, None] * row_stride + p[None, :], acc.to(y_ptr.dtype.element_ty))


@triton.jit
def _diag_bwd_x(s_ptr, cs_ptr, dy_ptr, dx_ptr, R, H, chunk_stride, head_stride, row_stride, Q: tl.constexpr,
                P: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, head) and s-block: dX_s = sum_{t >= s} M[t, s]^T dY_t."""
    head = tl.program_id(0)
    sb = tl.program_id(1)
    s, p = sb * BT + tl.arange(0, BT), tl.arange(0, P)
    at = _block(head, H, chunk_stride, head_stride)
    dX = tl.zeros((BT, P), dtype=tl.float32)
    for tb in range(sb, Q // BT):
        t = tb * BT + tl.arange(0, BT)
        dY_t = tl.load(dy_ptr + at + t[:, None] * row_stride + p[None, :])  # (BT, P)
        M = _matrix(s_ptr + (head // R) * Q * Q, cs_ptr + head * Q, t, s, Q)
        dX += tl.dot(tl.trans(M).to(dY_t.dtype), dY_t, input_precision=PRECISION)
    tl.store(dx_ptr + at + s[:, None] * row_stride + p[None, :], dX.to(dx_ptr.dtype.element_ty))


@triton.jit
def _diag_bwd_s(x_ptr, s_ptr, cs_ptr, dy_ptr, ds_ptr, rows_ptr, cols_ptr, R, HEADS, H, chunk_stride, head_stride,
                row_stride, Q: tl.constexpr, P: tl.constexpr, BT: tl.constexpr, PRECISION: tl.constexpr):
    """Per (batch, chunk, group, HEADS of its R heads) and (t-block, s-block): the heads' sum of dM * L into their
    part of dS[t, s]; each head's sum_s dM M into rows[head, s-block, t] and sum_t dM M into cols[head, t-block, s].
    Zeros where s-block > t-block."""
    parts = tl.cdiv(R, HEADS)
    group, first = tl.program_id(0) // parts, (tl.program_id(0) % parts) * HEADS  # over (batch, chunk, group, part)
    tb, sb = tl.program_id(1), tl.program_id(2)
    t, s, p = tb * BT + tl.arange(0, BT), sb * BT + tl.arange(0, BT), tl.arange(0, P)
    dS = tl.zeros((BT, BT), dtype=tl.float32)
    S_ts = tl.load(s_ptr + group * Q * Q + t[:, None] * Q + s[None, :])  # (BT, BT) fp32
    for head in range(group * R + first, group * R + tl.minimum(first + HEADS, R)):
        row_sums, col_sums = tl.zeros((BT,), dtype=tl.float32), tl.zeros((BT,), dtype=tl.float32)
        if sb <= tb:
            at = _block(head, H, chunk_stride, head_stride)
            dY_t = tl.load(dy_ptr + at + t[:, None] * row_stride + p[None, :])
            X_s = tl.load(x_ptr + at + s[:, None] * row_stride + p[None, :])
            dML = tl.dot(dY_t, tl.trans(X_s), input_precision=PRECISION) * _tile(cs_ptr + head * Q, t, s)  # dM * L
            dS += dML
            dMM = dML * S_ts  # dM * M
            row_sums, col_sums = tl.sum(dMM, axis=1), tl.sum(dMM, axis=0)
        tl.store(rows_ptr + (head * (Q // BT) + sb) * Q + t, row_sums)
        tl.store(cols_ptr + (head * (Q // BT) + tb) * Q + s, col_sums)
    tl.store(ds_ptr + tl.program_id(0) * Q * Q + t[:, None] * Q + s[None, :], dS)


def _no_autocast(X):
    """The products of S, dC and dB in fp32, also under autocast."""
    return torch.autocast(X.device.type, enabled=False)


def _diagonal_backward(dY, X, Bc, Cc, cs, S):
    """The diagonal blocks' gradients (dX, dB, dC, dcs) from dY, by the backward's two kernels."""
    b, c, g, r, Q, p = X.shape
    dY = dY if dY.stride() == X.stride() else _laid_out_as(X).copy_(dY)
    dX = _laid_out_as(X)
    bt, launch = _settings(BWD_X_TILE, Q)
    _diag_bwd_x[(b * c * g * r, Q // bt)](S, cs, dY, dX, r, g * r, *_layout(X), Q=Q, P=p, BT=bt,
                                           PRECISION=_precision(X), **launch)
    bt, launch = _settings(BWD_S_TILE, Q)
    heads, blocks = launch.pop("HEADS"), Q // bt
    parts = triton.cdiv(r, heads)
    dS = torch.empty(b, c, g, parts, Q, Q, dtype=torch.float32, device=X.device)  # each part's heads' sum
    rows = torch.empty(b, c, g, r, blocks, Q, dtype=torch.float32, device=X.device)
    cols = torch.empty_like(rows)
    _diag_bwd_s[(b * c * g * parts, blocks, blocks)](X, S, cs, dY, dS, rows, cols, r, heads, g * r, *_layout(X),
                                                     Q=Q, P=p, BT=bt, PRECISION=_precision(X), **launch)
    with _no_autocast(X):
        dS = dS.sum(3)  # (b, c, g, Q, Q)
        dC = dS @ Bc.float()  # (b, c, g, Q, n)
        dB = dS.transpose(-1, -2) @ Cc.float()  # (b, c, g, Q, n)
    dcs = rows.sum(-2) - cols.sum(-2)  # (b, c, g, r, Q)
    return dX, dB.to(Bc.dtype), dC.to(Cc.dtype), dcs


class ChunkOutputs(torch.autograd.Function):
    """Each chunk's whole output in one kernel: its diagonal block, plus the state entering it read out by C and
    decayed from the chunk's start, plus D u. X = dt u and u (b, c, g, r, Q, p) in one layout, Bc, Cc (b, c, g, Q, n),
    cs (b, c, g, r, Q) fp32, h (b, c, g, r, p, n) fp32, D (h,) fp32 -> y (b, c, g, r, Q, p) in u's layout and dtype.
    The backward: the diagonal blocks' kernels, and the read-out's and D's gradients as products in u's dtype:
    dh = (exp(cs) dy)^T C, dC += sum over the group's heads of exp(cs) dy h, dcs += sum_p exp(cs) dy (C h^T),
    dD = sum dy u, du = D dy."""

    @staticmethod
    def forward(ctx, X, u, Bc, Cc, cs, h, D):
        X, cs, h, D = _in_layout(X), cs.contiguous(), h.contiguous(), D.float().contiguous()
        u = u if u.stride() == X.stride() else _laid_out_as(X).copy_(u)
        Cr = _rows_in_layout(Cc)
        b, c, g, r, Q, p = X.shape
        n = Cc.shape[-1]
        with _no_autocast(X):
            S = (Cc.float() @ Bc.float().transpose(-1, -2)).contiguous()  # C_t . B_s, fp32 (b, c, g, Q, Q)
        y = _laid_out_as(X)
        bt, launch = _settings(FWD_TILE, Q)
        _chunk_fwd[(b * c * g * r, Q // bt)](X, u, S, cs, Cr, h, D, y, r, g * r, n, *_layout(X), *Cr.stride()[1:4],
                                              Q=Q, P=p, BT=bt, NP=max(16, triton.next_power_of_2(n)),
                                              PRECISION=_precision(X), **launch)
        ctx.save_for_backward(X, u, Bc, Cc, cs, S, h, D)
        return y

    @staticmethod
    def backward(ctx, dy):
        X, u, Bc, Cc, cs, S, h, D = ctx.saved_tensors
        dX, dB, dC, dcs = _diagonal_backward(dy, X, Bc, Cc, cs, S)
        b, c, g, r, Q, p = X.shape
        n = Cc.shape[-1]
        with _no_autocast(X):
            dye = (dy.float() * torch.exp(cs)[..., None]).to(X.dtype)  # exp(cs_t) dy_t (b, c, g, r, Q, p)
            dye_heads = dye.permute(0, 1, 2, 4, 3, 5).reshape(b, c, g, Q, r * p)  # (b, c, g, Q, r p)
            dh = (dye_heads.transpose(-1, -2) @ Cc).reshape(b, c, g, r, p, n)  # (b, c, g, r, p, n)
            hs = h.to(X.dtype).reshape(b, c, g, r * p, n)  # (b, c, g, r p, n)
            dC_out = dye_heads @ hs  # (b, c, g, Q, n)
            read_out = (Cc @ hs.transpose(-1, -2)).reshape(b, c, g, Q, r, p).transpose(3, 4)  # C_t . h, by head
            dcs_out = (dye.float() * read_out.float()).sum(-1)  # (b, c, g, r, Q)
            dD = (dy.float() * u.float()).sum((0, 1, 4, 5)).reshape(-1)  # (g r,)
            du = (dy.float() * D.reshape(g, r)[:, :, None, None]).to(u.dtype)
        return dX, du, dB, (dC.float() + dC_out.float()).to(Cc.dtype), dcs + dcs_out, dh.float(), dD


def _layout(X):
    """(chunk, head, position) strides of X (b, c, g, r, Q, p) for the kernels, which number a block over (batch,
    chunk) and the g r heads: batch and chunk must merge, group and head too, and p be contiguous (`_in_layout`)."""
    sb, sc, sg, sr, sq, sp = X.stride()
    return sc, sr, sq


def _in_layout(X):
    """X as it lies where the kernels can address it (`_layout`), else a contiguous copy."""
    b, c, g, r, Q, p = X.shape
    sb, sc, sg, sr, sq, sp = X.stride()
    return X if (sp == 1 and sb == c * sc and sg == r * sr) else X.contiguous()


def _rows_in_layout(Cc):
    """Cc (b, c, g, Q, n) as it lies if batch and chunk merge and n is contiguous, else a contiguous copy."""
    sb, sc, sg, sq, sn = Cc.stride()
    return Cc if (sn == 1 and sb == Cc.shape[1] * sc) else Cc.contiguous()


def _laid_out_as(X):
    """An empty tensor with X's shape, strides and dtype."""
    return torch.empty_strided(X.shape, X.stride(), dtype=X.dtype, device=X.device)


def _settings(tile, Q):
    """(rows a program, the other launch settings) of a kernel's tile for chunks of Q."""
    rest = dict(tile)
    return min(rest.pop("BT"), Q), rest


def _precision(X):
    """tl.dot's precision: fp32 products for fp32 inputs (16-bit inputs multiply in their own dtype)."""
    return "ieee" if X.dtype == torch.float32 else "tf32"


def fits(chunk, headdim):
    """Whether the kernels take these sizes: powers of two of at least 16 (tl.dot's tiles)."""
    return all(v >= 16 and not v & (v - 1) for v in (chunk, headdim))


def chunk_outputs(X, u, Bc, Cc, cs, h, D):
    """Every chunk's output (`ChunkOutputs`): X = dt u and u (b, c, g, r, Q, p), Bc, Cc (b, c, g, Q, n), cs
    (b, c, g, r, Q) fp32, h (b, c, g, r, p, n) the states entering the chunks, D (h,) -> y (b, c, g, r, Q, p) in u's
    layout and dtype, for sizes that `fits`."""
    Q, p = X.shape[-2:]
    if not fits(Q, p):
        raise ValueError(f"the SSD kernels need the chunk and headdim to be powers of two of at least 16 (here {Q}, "
                         f"{p}): use ssd_chunked_fast")
    return ChunkOutputs.apply(X, u, Bc, Cc, cs, h, D)
