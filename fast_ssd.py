"""The SSD's faster forms, and how a model's mixers are given one (`use_ssd`): `ssd_chunked` (ssd.py) arranged for a
GPU, the same with the chunk states and each chunk's output from Triton kernels (`ssd_triton`, ssd_kernel.py), and
mamba-ssm's Triton kernel where it is installed (`find_kernel`). The values equal the teaching scan's within the
inputs' precision (tests/test_ssd.py).

train.py, evaluate.py and benchmark.py choose the SSD in their main(): on CUDA, mamba-ssm's kernel where it is
installed, else `ssd_chunked_fast`, and `ssd_triton` in train.py's compiled blocks; generate.py takes
`ssd_chunked_fast`, which has nothing to tune before a first answer. The torch forms compile inside
`fast_decode.compile_blocks`, which keeps Inductor from splitting their cumulative sums (`fast_decode.whole_scans`).
"""

import functools

import torch
import torch.nn.functional as F

import ssd as S
from mamba2 import Mamba2Mixer

# ssd_chunked_fast's chunk, at most (any chunk gives the same values): the (Q, Q) work per position grows with Q, the
# work between chunks with l / Q; docs/speed.md measures the chunks at Mamba-2 2.7B's shapes
FAST_CHUNK = 128


def diagonal_blocks(X, Bc, Cc, cs):
    """Each chunk's own contribution: L[t, s] = exp(cs_t - cs_s) for s <= t, times C_t . B_s, times X.
    X (b, c, g, r, Q, p), Bc, Cc (b, c, g, Q, n), cs (b, c, g, r, Q) fp32 -> (b, c, g, r, Q, p) in X's dtype."""
    Q = X.shape[-2]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=X.device).tril()
    L = (cs[..., :, None] - cs[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()  # (b, c, g, r, Q, Q)
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, g, Q, Q)
    return (L * CB[:, :, :, None]).to(X.dtype) @ X


def ssd_chunked_fast(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """Eq. 3 by `ssd_chunked`'s algorithm, arranged for a GPU: the same values within the inputs' precision (tests
    check it), fewer passes over the (Q, Q) tensors, which dominate its time.
    - The segment sums inside a chunk are differences of the chunk's cumulative sum, cs_t - cs_s (as mamba-ssm's
      kernel computes them): one (Q, Q) tensor, masked and exponentiated in place, instead of the masked cumsum's
      five. The sums are in fp32; within a chunk of up to 256 steps the cancellation costs ~1e-6 of |cs|, and the
      gradients of dt and A, which subtract sums of that size, stay within 1e-4 of float64's (ssd_chunked's: 1e-5).
    - The products with x, B and C run in the inputs' dtype (bf16 on tensor cores, fp32 accumulation), as the kernel
      does; the decays, their sums, the chunk states and the recurrence between chunks stay in fp32 (under autocast,
      torch runs every matrix product in bf16, here as in ssd_chunked).
    - The chunk states and their read-out by C are one product per group: B and C are shared by the group's r heads,
      so the heads stack as r * p rows of one product instead of r products of p rows.
    - The recurrence between chunks is a loop over the chunks, s_{k+1} = exp(chunk k's sum of dt A) s_k + state_k,
      elementwise in fp32 (also under autocast), where ssd_chunked multiplies by the (c+1, c+1) matrix of decays.
    Returns (y (b, l, h, p) in x's dtype, final_state (b, h, p, n) in fp32)."""
    l, h = x.shape[1:3]
    X, Bc, Cc, cs = _in_chunks(x, dt, A, B, C, chunk_size)
    f = cs.dtype  # the compute dtype: fp32, or fp64 for fp64 inputs

    # 1. diagonal blocks: L[t, s] = exp(cs_t - cs_s) for s <= t, times C_t . B_s, times X
    Y = diagonal_blocks(X, Bc, Cc, cs)  # (b, c, g, r, Q, p)

    # 2-3. the state entering each chunk, and the final state (fp32)
    states, final_state = _entering_states(X, Bc, cs, initial_state)  # (b, c, g, r, p, n), (b, h, p, n)

    # 4. each chunk's incoming state read out by C, decayed from the chunk's start
    b, c, g, r, Q, p = X.shape
    n = Bc.shape[-1]
    Y_off = Cc @ states.to(x.dtype).reshape(b, c, g, r * p, n).transpose(-1, -2)  # (b, c, g, Q, r p)
    Y_off = Y_off.reshape(b, c, g, Q, r, p).transpose(3, 4).to(f) * torch.exp(cs)[..., None]  # (b, c, g, r, Q, p)
    y = (Y.to(f) + Y_off).permute(0, 1, 4, 2, 3, 5).reshape(b, c * Q, h, p)[:, :l]  # (b, l, h, p)
    if D is not None:
        y = y + D.to(f)[:, None] * x.to(f)
    return y.to(x.dtype), final_state


def _in_chunks(x, dt, A, B, C, Q):
    """The inputs padded to whole chunks of Q and viewed by chunk: X = dt x (b, c, g, r, Q, p) in the inputs' dtype,
    a view of a (b, l + pad, h, p) tensor; Bc, Cc (b, c, g, Q, n); cs (b, c, g, r, Q), the cumulative sum of dt A
    within each chunk, fp32."""
    b, l, h, p = x.shape
    g = B.shape[-2]
    dtf, Bc, Cc, cs = _chunked(dt, A, B, C, Q, S._compute_dtype(x))
    c = dtf.shape[1] // Q
    X = (F.pad(x, (0, 0, 0, 0, 0, c * Q - l)).to(dtf.dtype) * dtf[..., None]).to(x.dtype)  # dt_s x_s (b, l + pad, h, p)
    return X.reshape(b, c, Q, g, h // g, p).permute(0, 1, 3, 4, 2, 5), Bc, Cc, cs  # (b, c, g, r, Q, p), a view


def _chunked(dt, A, B, C, Q, f):
    """dt in f (fp32, or fp64), padded to whole chunks of Q with zeros (no decay, no input) (b, l + pad, h); B and C
    padded and viewed by chunk, Bc, Cc (b, c, g, Q, n); cs (b, c, g, r, Q), the cumulative sum of dt A within each
    chunk, in f."""
    b, l, h = dt.shape
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"the number of heads ({h}) must be a multiple of the number of groups ({g})")
    pad = (-l) % Q
    c = (l + pad) // Q
    dtf = F.pad(dt.to(f), (0, 0, 0, pad))  # (b, l + pad, h)
    Bc, Cc = (F.pad(t, (0, 0, 0, 0, 0, pad)).reshape(b, c, Q, g, n).transpose(2, 3) for t in (B, C))  # (b, c, g, Q, n)
    logA = (dtf * A.to(f)).reshape(b, c, Q, g, h // g).permute(0, 1, 3, 4, 2).contiguous()  # dt_t A (b, c, g, r, Q)
    return dtf, Bc, Cc, torch.cumsum(logA, dim=-1)


def _entering_states(X, Bc, cs, initial_state):
    """The state entering each chunk (b, c, g, r, p, n) and the final state (b, h, p, n), both fp32: each chunk's
    own state from zero, then the recurrence between chunks."""
    b, c, g, r, Q, p = X.shape
    n = Bc.shape[-1]
    f = cs.dtype
    # 2. chunk states, from zero: sum_s exp(cs_end - cs_s) X_s B_s^T, in fp32
    decay_to_end = torch.exp(cs[..., -1:] - cs)  # (b, c, g, r, Q)
    Xd = (X.to(f) * decay_to_end[..., None]).transpose(-1, -2).reshape(b, c, g, r * p, Q)  # (b, c, g, r p, Q)
    states = (Xd @ Bc.to(f)).reshape(b, c, g, r, p, n)  # (b, c, g, r, p, n)

    # 3. the recurrence between chunks (eq. 3 from chunk to chunk), one chunk at a time, in fp32
    if initial_state is None:
        initial_state = torch.zeros(b, g * r, p, n, dtype=f, device=X.device)
    chunk_decay = torch.exp(cs[..., -1])[..., None, None]  # (b, c, g, r, 1, 1)
    s, incoming = initial_state.to(f).reshape(b, g, r, p, n), []  # s: the state entering chunk k (b, g, r, p, n)
    for k in range(c):
        incoming.append(s)
        s = chunk_decay[:, k] * s + states[:, k]
    return torch.stack(incoming, 1), s.reshape(b, g * r, p, n)


_kernel = None  # mamba-ssm's chunked scan, as find_kernel wraps it; None before it is found, or when it is missing
_looked_up = False


def find_kernel():
    """mamba-ssm's chunked scan, called as `ssd.ssd` is and wrapped to run as it is inside compiled graphs (its
    autotuning and launch stay outside them); None when mamba-ssm (or its Triton kernels) cannot be imported. Looked
    up once per process, by use_ssd, so that no compiled graph ever traces the import."""
    global _kernel, _looked_up
    if not _looked_up:
        _looked_up = True
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        except Exception:  # ImportError, or a broken CUDA/Triton install
            return None

        @torch.compiler.disable
        def call(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
            y, final_state = mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, initial_states=initial_state,
                                                       return_final_states=True)
            return y, final_state.float()
        _kernel = call
    return _kernel


def ssd_fast(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """`ssd.ssd` for a GPU: mamba-ssm's kernel where use_ssd found it installed, else `ssd_chunked_fast` (chunks of at
    most FAST_CHUNK); on the CPU, `ssd_chunked`."""
    if not x.is_cuda:
        return S.ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    if _kernel is not None:
        return _kernel(x, dt, A, B, C, chunk_size, D, initial_state)
    return ssd_chunked_fast(x, dt, A, B, C, min(chunk_size, FAST_CHUNK), D=D, initial_state=initial_state)


@functools.cache
def _compiled_ssd_chunked_fast():
    return torch.compile(ssd_chunked_fast)


def ssd_compiled(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """`ssd_chunked_fast` through torch.compile: its elementwise work fused into a few kernels (the first call of each
    shape compiles)."""
    return _compiled_ssd_chunked_fast()(x, dt, A, B, C, min(chunk_size, FAST_CHUNK), D=D, initial_state=initial_state)


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """`ssd_chunked_fast`'s algorithm from ssd_kernel.py's Triton kernels, where their tiles fit (the chunk and
    headdim powers of two of at least 16; else `ssd_chunked_fast`): the states entering the chunks from one kernel
    over the chunks, then each chunk's whole output (its diagonal block, the entering state read out by C and D x)
    from one that never writes the (Q, Q) tensors. Both read x where it lies, and y is written once, (b, l, h, p)."""
    import ssd_kernel  # imports triton
    if not ssd_kernel.fits(chunk_size, x.shape[-1]):
        return ssd_chunked_fast(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    dtf, Bc, Cc, cs = _chunked(dt, A, B, C, chunk_size, torch.float32)
    D = torch.zeros(x.shape[2], dtype=torch.float32, device=x.device) if D is None else D
    return ssd_kernel.chunk_scan(x, dtf, Bc, Cc, cs, D, initial_state)  # (b, l, h, p), fp32 (b, h, p, n)


def kernel(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """mamba-ssm's kernel, or an error that says it cannot run here."""
    if not (x.is_cuda and find_kernel() is not None):
        raise RuntimeError("mamba-ssm's SSD kernel needs the mamba-ssm package importable and CUDA tensors "
                           f"(importable: {find_kernel() is not None}, tensors on: {x.device})")
    return _kernel(x, dt, A, B, C, chunk_size, D, initial_state)


# The SSD forms by name, for use_ssd and benchmark.py: the teaching scan, the GPU arrangement, compiled, the kernel,
# and "auto" (the fastest available: ssd_fast)
SSD_FORMS = {"plain": S.ssd, "torch": S.ssd_chunked, "torch-fast": ssd_chunked_fast, "torch-compiled": ssd_compiled,
             "triton": ssd_triton, "mamba_ssm": kernel, "auto": ssd_fast}


def use_ssd(model, form="auto"):
    """Every Mamba-2 mixer of `model` (its LM's, the connector's) computes eq. 3 with the named SSD form ("plain":
    `ssd.ssd` again), or with `form` itself where it is a function called as `ssd.ssd` is. "auto" and "mamba_ssm"
    look mamba-ssm's kernel up first (`find_kernel`)."""
    if not callable(form) and form not in SSD_FORMS:
        raise ValueError(f"unknown SSD form {form!r}: use one of {', '.join(SSD_FORMS)}")
    if form in ("auto", "mamba_ssm"):
        find_kernel()
    ssd = form if callable(form) else SSD_FORMS[form]
    for module in model.modules():
        if isinstance(module, Mamba2Mixer):  # the release's BiMamba2 too
            module.ssd = ssd
    return model
