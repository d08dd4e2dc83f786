"""The decoding step as three Triton kernels per layer: the fast path of `Mamba2Block.step` (mamba2.py), eq. 3.

A decoding step at batch 1 reads every weight once and does little else: per layer, two matrix-vector products
(in_proj and out_proj, 80 MB at 2.7B in bf16) around a small state update. Here each layer is three kernels, the
norms, the conv and dt's softplus inside the products' own kernels:

    norm_matvec    in_proj(RMSNorm(residual)), then per output row: z as it is; xBC through the causal conv (the
                   window shifted in place) and SiLU; dt through softplus(dt + dt_bias), fp32
    state_update   eq. 3 for one token, per head: h = exp(dt A) h + dt x B^T, y = C h + D x (computed in fp32,
                   the state updated in place, kept in fp32 or bf16), then the gate v = y * SiLU(z)
    gated_matvec   out_proj(RMSNorm(v)) added to the residual in place, one norm per group

The LM head is norm_matvec again, with no conv or dt rows. A matvec program takes a block of weight rows and every
sequence of the batch, so each weight is read once a step. It reads its input rows (a few KB, from L2) in the same
pass as its weight tile: a norm's 1 / RMS is one factor of a sequence's whole row, so the program sums the squares
alongside the product (x * g) . W^T (g the norm's weight) and scales the product at the end. Values are rounded to
the model's dtype where the plain step rounds them, so the results equal `Mamba2Block.step`'s within the rounding of
another summation order (tests/test_fast_decode.py).

On GPUs from Hopper on the kernels overlap (programmatic dependent launch, PDL): each is launched while the
one before it runs, asks the L2 cache for the start of its weight tile and loads what it needs of no predecessor
(the SSM state, written a step ago), then waits for the kernel before it and reads that kernel's output.

With several sequences the weights are read once for all of them, and cuBLAS streams them faster than these tiles:
from CUBLAS_FROM_BATCH sequences on, `cublas_model_step` computes both products as nn.Linear does and puts four
small kernels between them (the residual add and norm, in_proj's epilogue, the state update, the gated norm).

Needs Triton (on the CPU, `TRITON_INTERPRET=1` runs the kernels through Triton's interpreter, as the tests do) and
linear layers without bias (every public Mamba-2 checkpoint); `supports(config)` says whether a model qualifies.
"""

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Tiles of the matrix-vector kernels: rows and reduction width per program, and warps; the fastest of
# `python benchmark.py tiles` (norm_matvec's on one H100 with PDL, the others on one H200; docs/speed.md). Up to
# DOT_MIN_BATCH - 1 sequences, a program multiplies each of them by its weight tile with broadcast products; from
# DOT_MIN_BATCH on, with tl.dot (the tensor cores for 16-bit weights; exact fp32 products for fp32 ones), which needs
# 16 rows and 16 sequences (the batch is padded).
MATVEC_TILE = dict(BLOCK_R=8, BLOCK_K=512, num_warps=4)  # norm_matvec: in_proj and the LM head
GATED_TILE = dict(BLOCK_R=4, BLOCK_K=1024, num_warps=4)  # gated_matvec: out_proj
STATE_TILE = dict(BLOCK_P=32, num_warps=4)  # state_update: rows of a head's state a program
DOT_TILE = dict(BLOCK_R=64, BLOCK_K=64, num_warps=4)  # both, with tl.dot
DOT_MIN_BATCH = 5
CUBLAS_FROM_BATCH = 8  # from this many sequences the products go to cuBLAS (`cublas_model_step`)
# Programmatic dependent launch (GPUs from Hopper on): each kernel of the Triton step is launched while the one
# before it runs; it does the work that needs nothing of its predecessor (pointers, the SSM state's load, an L2
# prefetch of its first PREFETCH_K weight columns, per matvec kernel), then waits for it (`_wait_for_predecessor`).
# PREFETCH_K: the fastest of `python benchmark.py tiles --only PREFETCH_K` on one H100 (docs/speed.md); a power of
# two of at least 64, or 0.
PDL = True
PREFETCH_K = dict(norm_matvec=512, gated_matvec=1024)
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def supports(config):
    """Whether the fused step computes this Mamba-2 config's decoding step (linear layers without bias)."""
    return not config.bias


@triton.jit
def _log1p(t):
    """log(1 + t) accurate for small t (Goldberg's correction of log(u) by t / (u - 1))."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))


@triton.jit
def _wait_for_predecessor(w_ptr, w_stride, rows, row_ok, PDL: tl.constexpr, PREFETCH_K: tl.constexpr):
    """With PDL: ask the L2 cache for the first PREFETCH_K columns of the weight rows (they are never written, so
    they need not wait), wait until the kernel before this one has finished and its writes are visible, then let the
    next kernel launch. Without PDL the launch order already waits, and this does nothing."""
    if PDL:
        if PREFETCH_K > 0:
            lines = tl.minimum(tl.arange(0, PREFETCH_K // 64) * 64, w_stride - 1)  # a 128-byte line of bf16 each
            at = w_ptr + tl.where(row_ok, rows, 0)[:, None] * w_stride + lines[None, :]  # (R, lines), in the weight
            tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [at], dtype=tl.int32,
                                      is_pure=False, pack=1)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _weighted_product(x_ptr, x_stride, norm_w_ptr, w_ptr, w_stride, rows, row_ok, seqs, seq_ok, start, end,
                      USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Over the columns [start, end), in one pass: (x * g) . W[rows]^T (B, R) fp32, x * g rounded to W's dtype as a
    norm's output is, and each sequence's sum of x^2 (B,) fp32. A norm's 1 / RMS is a factor of each sequence's
    whole row, so the caller applies it to the product afterwards."""
    cols = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    if USE_DOT:  # on the tensor cores, as W . u^T: the weight rows fill the product's M side
        acc_t = tl.zeros([BLOCK_R, BLOCK_B], dtype=tl.float32)
    else:  # products summed over K once at the end
        products = tl.zeros([BLOCK_B, BLOCK_R, BLOCK_K], dtype=tl.float32)
    w_cols = w_ptr + rows[:, None] * w_stride + cols[None, :]  # (R, K) pointers to the tile at column 0
    for k in range(start, end, BLOCK_K):
        c = k + cols
        c_ok = c < end
        w = tl.load(w_cols + k, mask=row_ok[:, None] & c_ok[None, :], other=0.0)  # (R, K) from HBM: the long load first
        x = tl.load(x_ptr + seqs[:, None] * x_stride + c[None, :], mask=seq_ok[:, None] & c_ok[None, :],
                    other=0.0).to(tl.float32)  # (B, K)
        g = tl.load(norm_w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        u = (x * g[None, :]).to(w_ptr.dtype.element_ty)
        squares += x * x
        if USE_DOT:
            acc_t += tl.dot(w, tl.trans(u), input_precision=DOT_PRECISION)
        else:
            products += u.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if USE_DOT:
        acc = tl.trans(acc_t)
    else:
        acc = tl.sum(products, axis=2)
    return acc, tl.sum(squares, axis=1)


@triton.jit
def _conv_rows(proj, rows, seqs, seq_ok, n_plain, n_conv, conv_state_ptr, conv_w_ptr, conv_b_ptr,
               HAS_CONV_BIAS: tl.constexpr, D_CONV: tl.constexpr, WINDOW: tl.constexpr):
    """The xBC rows of proj (B, R): SiLU of the causal conv over the window [conv_state, proj] (fp32), the window
    shifted by one in place. Other rows are left alone and give 0."""
    is_conv = (rows >= n_plain) & (rows < n_plain + n_conv)
    c = tl.where(is_conv, rows - n_plain, 0)  # conv channel, (R,)
    j = tl.arange(0, WINDOW)  # window position; D_CONV - 1 is the newest input
    conv_ok = seq_ok[:, None, None] & is_conv[None, :, None]
    state = (conv_state_ptr + (seqs[:, None, None] * n_conv + c[None, :, None]) * (D_CONV - 1)
             + j[None, None, :])  # (B, R, WINDOW)
    past = tl.load(state, mask=conv_ok & (j < D_CONV - 1)[None, None, :], other=0.0).to(tl.float32)
    later = tl.load(state + 1, mask=conv_ok & (j < D_CONV - 2)[None, None, :], other=0.0)
    window = tl.where((j == D_CONV - 1)[None, None, :], proj[:, :, None], past)
    conv_w = tl.load(conv_w_ptr + c[:, None] * D_CONV + j[None, :], mask=is_conv[:, None] & (j < D_CONV)[None, :],
                     other=0.0).to(tl.float32)  # (R, WINDOW)
    conv = tl.sum(window * conv_w[None, :, :], axis=2)  # (B, R)
    if HAS_CONV_BIAS:
        conv += tl.load(conv_b_ptr + c, mask=is_conv, other=0.0).to(tl.float32)[None, :]
    shifted = tl.where((j == D_CONV - 2)[None, None, :], proj[:, :, None].to(later.dtype), later)
    tl.store(state, shifted, mask=conv_ok & (j < D_CONV - 1)[None, None, :])
    return conv * tl.sigmoid(conv)


@triton.jit
def _norm_matvec_kernel(res_ptr, norm_w_ptr, w_ptr, out_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, dt_bias_ptr,
                        n_rows, n_plain, n_conv, eps, dt_min, dt_max,
                        D_IN: tl.constexpr, BATCH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, D_CONV: tl.constexpr,
                        WINDOW: tl.constexpr, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
                        BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[:, rows] = RMSNorm(res) . W[rows]^T for every sequence (W read once), rounded to W's dtype as nn.Linear
    returns it; then by section: rows < n_plain as they are; the next n_conv rows (xBC) through the conv window and
    SiLU; the rest (dt) through softplus(. + dt_bias), clamped to [dt_min, dt_max]. out (BATCH, n_rows) is fp32."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (R,)
    seqs = tl.arange(0, BLOCK_B)  # (B,)
    row_ok, seq_ok = rows < n_rows, seqs < BATCH
    _wait_for_predecessor(w_ptr, D_IN, rows, row_ok, PDL, PREFETCH_K)
    acc, squares = _weighted_product(res_ptr, D_IN, norm_w_ptr, w_ptr, D_IN, rows, row_ok, seqs, seq_ok, 0, D_IN,
                                     USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_R, BLOCK_K)
    inv_rms = tl.rsqrt(squares / D_IN + eps)  # (B,) fp32
    proj = (acc * inv_rms[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32)  # (B, R), rounded as nn.Linear
    out = _in_proj_epilogue(proj, w_ptr, rows, row_ok, seqs, seq_ok, n_plain, n_conv, conv_state_ptr, conv_w_ptr,
                            conv_b_ptr, dt_bias_ptr, dt_min, dt_max, HAS_CONV_BIAS, D_CONV, WINDOW)
    tl.store(out_ptr + seqs[:, None] * n_rows + rows[None, :], out, mask=seq_ok[:, None] & row_ok[None, :])


@triton.jit
def _in_proj_epilogue(proj, dtype_ptr, rows, row_ok, seqs, seq_ok, n_plain, n_conv, conv_state_ptr, conv_w_ptr,
                      conv_b_ptr, dt_bias_ptr, dt_min, dt_max,
                      HAS_CONV_BIAS: tl.constexpr, D_CONV: tl.constexpr, WINDOW: tl.constexpr):
    """in_proj's output rows (B, R) fp32 by section: rows < n_plain (z) as they are; the next n_conv rows (xBC)
    through the conv window and SiLU, rounded to the model's dtype (dtype_ptr's); the rest (dt) through
    softplus(dt + dt_bias), clamped to [dt_min, dt_max], fp32."""
    xbc = _conv_rows(proj, rows, seqs, seq_ok, n_plain, n_conv, conv_state_ptr, conv_w_ptr, conv_b_ptr,
                     HAS_CONV_BIAS, D_CONV, WINDOW).to(dtype_ptr.dtype.element_ty).to(tl.float32)

    # dt rows: softplus(dt + dt_bias) as F.softplus computes it (linear above 20), fp32
    is_dt = (rows >= n_plain + n_conv) & row_ok
    dt_bias = tl.load(dt_bias_ptr + tl.where(is_dt, rows - n_plain - n_conv, 0), mask=is_dt, other=0.0)
    v = proj + dt_bias.to(tl.float32)[None, :]
    dt = tl.where(v > 20.0, v, tl.maximum(v, 0.0) + _log1p(tl.exp(-tl.abs(v))))
    dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)

    is_conv = (rows >= n_plain) & (rows < n_plain + n_conv)
    return tl.where(is_conv[None, :], xbc, tl.where(is_dt[None, :], dt, proj))


@triton.jit
def _state_update_kernel(proj_ptr, z_ptr, state_ptr, a_log_ptr, d_ptr, v_ptr, n_proj, z_stride, x_start, b_start,
                         c_start, dt_start, n_heads, heads_per_group, d_inner,
                         HEADDIM: tl.constexpr, D_STATE: tl.constexpr, Y_DTYPE: tl.constexpr, PDL: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Eq. 3 for one token, heads x (BLOCK_P rows of the state) per program: h = exp(dt A) h + dt x B^T in place
    (computed in fp32, stored in the state's dtype: fp32, or bf16 with fast_decode's option), y = C h + D x rounded
    to Y_DTYPE (the model's), then the gate: v = y * SiLU(z) fp32 for gated_matvec. z: in_proj's first d_inner
    columns, in proj or where z_ptr points."""
    h, pid_p, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    g = h // heads_per_group
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < HEADDIM, n < D_STATE
    A = -tl.exp(tl.load(a_log_ptr + h).to(tl.float32))  # A = -exp(A_log), fp32
    D = tl.load(d_ptr + h).to(tl.float32)
    state = state_ptr + ((b * n_heads + h) * HEADDIM + p[:, None]) * D_STATE + n[None, :]  # (BLOCK_P, BLOCK_N)
    s_ok = p_ok[:, None] & n_ok[None, :]
    s = tl.load(state, mask=s_ok, other=0.0).to(tl.float32)  # the state fp32 or bf16, the update in fp32
    if PDL:  # the state was last written a step ago: only in_proj's rows wait for the kernel before
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    row = proj_ptr + b * n_proj
    x = tl.load(row + x_start + h * HEADDIM + p, mask=p_ok, other=0.0)  # (BLOCK_P,)
    B = tl.load(row + b_start + g * D_STATE + n, mask=n_ok, other=0.0)  # (BLOCK_N,)
    C = tl.load(row + c_start + g * D_STATE + n, mask=n_ok, other=0.0)
    dt = tl.load(row + dt_start + h)
    z = tl.load(z_ptr + b * z_stride + h * HEADDIM + p, mask=p_ok, other=0.0).to(tl.float32)  # loaded before the stores
    s = s * tl.exp(dt * A) + (dt * x)[:, None] * B[None, :]  # eq. 3: A_bar = exp(dt A), B_bar = dt B
    tl.store(state, s.to(state_ptr.dtype.element_ty), mask=s_ok)
    y = (tl.sum(s * C[None, :], axis=1) + D * x).to(Y_DTYPE).to(tl.float32)  # y = C h + D x
    tl.store(v_ptr + b * d_inner + h * HEADDIM + p, y * (z * tl.sigmoid(z)), mask=p_ok)


@triton.jit
def _gated_matvec_kernel(v_ptr, norm_w_ptr, w_ptr, res_ptr, n_rows, eps,
                         D_IN: tl.constexpr, GROUP_SIZE: tl.constexpr, BATCH: tl.constexpr, USE_DOT: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, PDL: tl.constexpr, PREFETCH_K: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """res[:, rows] += RMSNorm(v) . W[rows]^T with one norm per group of GROUP_SIZE channels, v = y * SiLU(z) (B, D_IN)
    fp32; each group's 1 / RMS applied to its part of the product."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    seqs = tl.arange(0, BLOCK_B)
    row_ok, seq_ok = rows < n_rows, seqs < BATCH
    _wait_for_predecessor(w_ptr, D_IN, rows, row_ok, PDL, PREFETCH_K)
    out = tl.zeros([BLOCK_B, BLOCK_R], dtype=tl.float32)
    for start in range(0, D_IN, GROUP_SIZE):
        acc, squares = _weighted_product(v_ptr, D_IN, norm_w_ptr, w_ptr, D_IN, rows, row_ok, seqs, seq_ok, start,
                                         start + GROUP_SIZE, USE_DOT, DOT_PRECISION, BLOCK_B, BLOCK_R, BLOCK_K)
        out += acc * tl.rsqrt(squares / GROUP_SIZE + eps)[:, None]
    out = out.to(w_ptr.dtype.element_ty).to(tl.float32)  # out_proj's output in the model's dtype
    res = res_ptr + seqs[:, None] * n_rows + rows[None, :]
    ok = seq_ok[:, None] & row_ok[None, :]
    tl.store(res, tl.load(res, mask=ok, other=0.0).to(tl.float32) + out, mask=ok)


@triton.jit
def _epilogue_kernel(proj_ptr, out_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, dt_bias_ptr, n_rows, n_plain, n_conv,
                     dt_min, dt_max, BATCH: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, D_CONV: tl.constexpr,
                     WINDOW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr):
    """out = norm_matvec's epilogue of in_proj's output proj (BATCH, n_rows), computed elsewhere (cuBLAS), fp32, on
    the rows from n_plain on (xBC and dt; z is read where it is)."""
    rows = n_plain + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    seqs = tl.arange(0, BLOCK_B)
    row_ok, seq_ok = rows < n_rows, seqs < BATCH
    at = seqs[:, None] * n_rows + rows[None, :]
    ok = seq_ok[:, None] & row_ok[None, :]
    proj = tl.load(proj_ptr + at, mask=ok, other=0.0).to(tl.float32)
    out = _in_proj_epilogue(proj, proj_ptr, rows, row_ok, seqs, seq_ok, n_plain, n_conv, conv_state_ptr, conv_w_ptr,
                            conv_b_ptr, dt_bias_ptr, dt_min, dt_max, HAS_CONV_BIAS, D_CONV, WINDOW)
    tl.store(out_ptr + at, out, mask=ok)


@triton.jit
def _add_norm_kernel(x_ptr, add_ptr, norm_w_ptr, out_ptr, d, group_size, eps,
                     HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
    """One group of one sequence's row (d wide) per program: x += add, stored in x's dtype (with HAS_ADD), then
    out = x / RMS(x) * g over the group, computed in fp32 and stored in out's dtype (RMSNorm)."""
    b, group = tl.program_id(0), tl.program_id(1)
    i = tl.arange(0, BLOCK)
    ok = i < group_size
    at = b * d + group * group_size + i
    x = tl.load(x_ptr + at, mask=ok, other=0.0)
    if HAS_ADD:
        x = (x.to(tl.float32) + tl.load(add_ptr + at, mask=ok, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(x_ptr + at, x, mask=ok)
    x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / group_size + eps)
    g = tl.load(norm_w_ptr + group * group_size + i, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + at, (x * inv_rms * g).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _touch_kernel(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1)


def warm_up(device):
    """Triton's one-time costs in this process (its cache key, a hash of its own files; the CUDA backend's; the
    launcher) paid by one trivial kernel, so that the step's first kernels only load from the cache. Returns its
    output, tensor([1.])."""
    x = torch.zeros(1, device=device)
    _touch_kernel[(1,)](x)
    return x


@functools.cache
def _has_pdl(device):
    """Whether kernels on this device can launch before their predecessor ends: CUDA from Hopper (sm90) on, and a
    Triton that launches them so (3.4 on), not its interpreter (TRITON_INTERPRET=1), which runs them one by one."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
            and torch.cuda.get_device_capability(device)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait"))


def _pdl_args(device, overlap=True):
    """The launch arguments of programmatic dependent launch for a step kernel on device (PDL)."""
    pdl = overlap and PDL and _has_pdl(device)
    return dict(PDL=pdl, launch_pdl=pdl)


def _tiling(batch, weight, tile, kernel):
    """(kernel arguments for the batch and tile, grid over row blocks) for a weight (rows, d_in) of the matvec
    kernel named `kernel` (PREFETCH_K's key). Below DOT_MIN_BATCH, `tile` is the batch-1 tile: b sequences (a power
    of two) reduce BLOCK_K / b columns at a time."""
    use_dot = batch >= DOT_MIN_BATCH
    block_b = max(16, triton.next_power_of_2(batch)) if use_dot else triton.next_power_of_2(batch)
    # broadcast products: the program's (B, R, K) fp32 sums stay the batch-1 tile's size, as do its registers
    tile = DOT_TILE if use_dot else dict(tile, BLOCK_K=max(16, tile["BLOCK_K"] // block_b))
    precision = "ieee" if weight.dtype == torch.float32 else "tf32"  # tf32 applies to fp32 inputs only
    args = dict(BATCH=batch, USE_DOT=use_dot, DOT_PRECISION=precision, BLOCK_B=block_b,
                PREFETCH_K=PREFETCH_K[kernel], **_pdl_args(weight.device), **tile)
    return args, (triton.cdiv(weight.shape[0], tile["BLOCK_R"]),)


def norm_matvec(residual, norm, weight, out, conv_state=None, mixer=None):
    """out (b, rows) fp32 = norm(residual) . weight^T; with a mixer, its in_proj's epilogue as well (the conv on
    xBC rows, updating conv_state in place; softplus on dt rows)."""
    b, d_in = residual.shape
    n_rows = weight.shape[0]
    if mixer is None:  # the LM head: every row plain (the conv and dt pointers are never read)
        n_plain, n_conv, d_conv, dt_limit = n_rows, 0, 4, (0.0, float("inf"))
        conv_state = conv_w = conv_b = dt_bias = weight
    else:
        c = mixer.config
        n_plain, n_conv, d_conv, dt_limit = c.d_inner, c.conv_dim, c.d_conv, c.dt_limit
        conv_w, conv_b, dt_bias = mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias
    has_bias = mixer is not None and conv_b is not None
    args, grid = _tiling(b, weight, MATVEC_TILE, "norm_matvec")
    _norm_matvec_kernel[grid](residual, norm.weight, weight, out, conv_state, conv_w, conv_b if has_bias else conv_w,
                              dt_bias, n_rows, n_plain, n_conv, norm.eps, float(dt_limit[0]), float(dt_limit[1]),
                              D_IN=d_in, HAS_CONV_BIAS=has_bias, D_CONV=d_conv, WINDOW=triton.next_power_of_2(d_conv),
                              **args)
    return out


def state_update(proj, ssm_state, mixer, z=None, overlap=False):
    """Eq. 3 for one token from in_proj's epilogued rows proj (b, z | xBC | dt) fp32: ssm_state (b, h, p, n) updated
    in place; returns v = y * SiLU(z) (b, d_inner) fp32. z: where z's columns are read (default: proj). overlap:
    launched with PDL (where the GPU has it) between norm_matvec and gated_matvec."""
    c = mixer.config
    b = proj.shape[0]
    z = proj if z is None else z
    v = torch.empty(b, c.d_inner, device=proj.device, dtype=torch.float32)
    block_p = min(STATE_TILE["BLOCK_P"], triton.next_power_of_2(c.headdim))
    x_start = c.d_inner  # proj's columns: z (d_inner) | x (d_inner), B, C (ngroups * d_state each) | dt (nheads)
    _state_update_kernel[(c.nheads, triton.cdiv(c.headdim, block_p), b)](
        proj, z, ssm_state, mixer.A_log, mixer.D, v, n_proj=proj.shape[1], z_stride=z.stride(0), x_start=x_start,
        b_start=x_start + c.d_inner, c_start=x_start + c.d_inner + c.ngroups * c.d_state, dt_start=x_start + c.conv_dim,
        n_heads=c.nheads, heads_per_group=c.nheads // c.ngroups, d_inner=c.d_inner, HEADDIM=c.headdim,
        D_STATE=c.d_state, Y_DTYPE=TL_DTYPES[mixer.out_proj.weight.dtype], BLOCK_P=block_p,
        BLOCK_N=triton.next_power_of_2(c.d_state), num_warps=STATE_TILE["num_warps"],
        **_pdl_args(proj.device, overlap))
    return v


def block_step(block, residual, conv_state, ssm_state):
    """`Mamba2Block.step` as three kernels (`norm_matvec`, `state_update`, `gated_matvec`): residual (b, d_model) is
    updated in place and returned, conv_state (b, conv_dim, d_conv - 1) and ssm_state (b, h, p, n) fp32 (or bf16)
    too."""
    mixer = block.mixer
    b = residual.shape[0]
    w_in, w_out = mixer.in_proj.weight, mixer.out_proj.weight
    for t in (residual, conv_state, ssm_state, w_in, w_out):
        assert t.is_contiguous()
    proj = norm_matvec(residual, block.norm, w_in, residual.new_empty(b, w_in.shape[0], dtype=torch.float32),
                       conv_state, mixer)  # (b, z | xBC | dt)
    v = state_update(proj, ssm_state, mixer, overlap=True)  # y * SiLU(z)
    return gated_matvec(v, mixer, residual)


def gated_matvec(v, mixer, residual):
    """residual (b, d_model) += out_proj(mixer.norm(v)) in place, v = y * SiLU(z) (b, d_inner) fp32: one kernel."""
    c, w_out = mixer.config, mixer.out_proj.weight
    args, grid = _tiling(v.shape[0], w_out, GATED_TILE, "gated_matvec")
    _gated_matvec_kernel[grid](v, mixer.norm.weight, w_out, residual, c.d_model, mixer.norm.eps, D_IN=c.d_inner,
                               GROUP_SIZE=c.d_inner // c.ngroups, **args)
    return residual


def model_step(model, token, cache, layer_step=None):
    """`Mamba2LMHeadModel.step` with `block_step` per layer and the final norm + LM head as one norm_matvec:
    token (b,) -> logits (b, padded_vocab) fp32, the cache updated in place. From CUBLAS_FROM_BATCH sequences on
    (on CUDA), `cublas_model_step`. layer_step: another block_step (benchmark.py times parts of the step so)."""
    if token.shape[0] >= CUBLAS_FROM_BATCH and token.is_cuda:
        return cublas_model_step(model, token, cache)
    residual = model.embedding(token)  # (b, d_model)
    residual = residual.float() if model.config.residual_in_fp32 else residual.clone()
    for layer, layer_cache in zip(model.layers, cache.layers):
        (layer_step or block_step)(layer, residual, layer_cache.conv_state, layer_cache.ssm_state)
    cache.seqlen_offset += 1
    logits = residual.new_empty(token.shape[0], model.lm_head.weight.shape[0], dtype=torch.float32)
    return norm_matvec(residual, model.norm_f, model.lm_head.weight, logits)


# ----------------------------------------------------------------------------------------------------------------
# Several sequences: the products through cuBLAS
# ----------------------------------------------------------------------------------------------------------------

def add_norm(x, add, norm, groups=1):
    """norm(x) (b, d) in the norm weight's dtype, one kernel; with `add`, x += add in place first (the residual add
    of the layer before). groups: RMSNorm's groups (the gated norm's)."""
    b, d = x.shape
    out = torch.empty(b, d, dtype=norm.weight.dtype, device=x.device)
    _add_norm_kernel[(b, groups)](x, x if add is None else add, norm.weight, out, d, d // groups, norm.eps,
                                  HAS_ADD=add is not None, BLOCK=triton.next_power_of_2(d // groups),
                                  num_warps=8)
    return out


def in_proj_epilogue(raw, conv_state, mixer):
    """norm_matvec's epilogue (the conv on xBC rows, updating conv_state in place; softplus on dt rows) of in_proj's
    output raw (b, rows) in the model's dtype; returns (b, rows) fp32, its z columns left unwritten."""
    c = mixer.config
    b, n_rows = raw.shape
    out = torch.empty(b, n_rows, dtype=torch.float32, device=raw.device)
    conv_b = mixer.conv1d.bias
    block_b = triton.next_power_of_2(b)
    block_r = max(16, 512 // block_b)  # rows a program: 512 values (with the conv window's 4 each)
    _epilogue_kernel[(triton.cdiv(n_rows - c.d_inner, block_r),)](
        raw, out, conv_state, mixer.conv1d.weight, conv_b if conv_b is not None else raw, mixer.dt_bias, n_rows,
        c.d_inner, c.conv_dim, float(c.dt_limit[0]), float(c.dt_limit[1]), BATCH=b, HAS_CONV_BIAS=conv_b is not None,
        D_CONV=c.d_conv, WINDOW=triton.next_power_of_2(c.d_conv), BLOCK_B=block_b, BLOCK_R=block_r)
    return out


def cublas_mixer_step(mixer, u, conv_state, ssm_state):
    """`Mamba2Mixer.step` of the normed input u (b, d_model) with both products as nn.Linear computes them (cuBLAS)
    and the work between in three kernels: in_proj's epilogue, the state update, the gated norm."""
    raw = F.linear(u, mixer.in_proj.weight)  # (b, z | xBC | dt)
    v = state_update(in_proj_epilogue(raw, conv_state, mixer), ssm_state, mixer, z=raw)  # y * SiLU(z)
    return F.linear(add_norm(v, None, mixer.norm, mixer.config.ngroups), mixer.out_proj.weight)


def cublas_model_step(model, token, cache):
    """`model_step` with the products through cuBLAS, which streams the weights faster than the Triton tiles from
    CUBLAS_FROM_BATCH sequences on: six launches a layer (453 kernels a step at 2.7B: cuBLAS runs out_proj as a
    split-K product and its reduction), each out_proj's output added to the residual in the next norm's kernel."""
    residual = model.embedding(token)  # (b, d_model)
    residual = residual.float() if model.config.residual_in_fp32 else residual.clone()
    out = None  # the last layer's output, not yet added to the residual
    for layer, layer_cache in zip(model.layers, cache.layers):
        out = cublas_mixer_step(layer.mixer, add_norm(residual, out, layer.norm), layer_cache.conv_state,
                                layer_cache.ssm_state)
    cache.seqlen_offset += 1
    return F.linear(add_norm(residual, out, model.norm_f), model.lm_head.weight).float()
