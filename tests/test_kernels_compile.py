"""Every Triton kernel of fused_step.py and ssd_kernel.py compiles for a Hopper GPU (sm_90) at Mamba-2 2.7B's shapes
and the training step's, with no GPU: Triton's own compiler and the ptxas it ships, run in a fresh process (in this
one, conftest.py's TRITON_INTERPRET=1 makes every kernel an interpreted function, which the compiler cannot take).
The interpreter tests check the kernels' values; this checks what otherwise only a GPU run shows, that each one
lowers to a cubin (with the settings the code launches it with)."""

import contextlib
import io
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The pointers that are not bf16 (the model's weights, x, B, C and their gradients), by kernel
POINTERS = {
    "_norm_matvec_kernel": dict(res_ptr="*fp32", out_ptr="*fp32"),
    "_state_update_kernel": dict(proj_ptr="*fp32", z_ptr="*fp32", state_ptr="*fp32", v_ptr="*fp32"),
    "_gated_matvec_kernel": dict(v_ptr="*fp32", res_ptr="*fp32"),
    "_epilogue_kernel": dict(out_ptr="*fp32"),
    "_add_norm_kernel": dict(x_ptr="*fp32"),
}
SSD_FP32 = ("dt_ptr", "s_ptr", "cs_ptr", "h_ptr", "d_ptr", "h0_ptr", "last_ptr", "dst_ptr", "dec_ptr", "dh0_ptr",
            "dlast_ptr", "ddt_ptr", "dw_ptr", "dro_ptr", "dd_ptr", "ds_ptr", "rows_ptr", "cols_ptr", "db_ptr", "dc_ptr")


def kernels():
    """[(module, kernel, constexprs, launch options)]: each kernel with the constexprs it is launched with at 2.7B
    (decoding: batch 1, and 8 with tl.dot; training: b = 8, chunk 256, p = 64, n = 128). Pointer types: POINTERS."""
    import triton.language as tl

    import fused_step as FS
    import ssd_kernel as SK

    def launch(tile):
        return {k: v for k, v in tile.items() if k in ("num_warps", "num_stages")}

    def tile(t):
        return {k: v for k, v in t.items() if k not in ("num_warps", "num_stages", "HEADS")}
    conv = dict(HAS_CONV_BIAS=True, D_CONV=4, WINDOW=4)
    pdl = dict(PDL=True, DOT_PRECISION="tf32")
    matvec = dict(D_IN=2560, BATCH=1, USE_DOT=False, BLOCK_B=1, PREFETCH_K=512, **conv, **pdl, **tile(FS.MATVEC_TILE))
    dot = dict(matvec, BATCH=8, USE_DOT=True, BLOCK_B=16, **tile(FS.DOT_TILE))
    gated = dict(D_IN=5120, GROUP_SIZE=5120, BATCH=1, USE_DOT=False, PREFETCH_K=1024, BLOCK_B=1,
                 **pdl, **tile(FS.GATED_TILE))
    state = dict(HEADDIM=64, D_STATE=128, Y_DTYPE=tl.bfloat16, PDL=True, BLOCK_P=FS.STATE_TILE["BLOCK_P"],
                 BLOCK_N=128)
    ssd = dict(Q=256, P=64, PRECISION="tf32")
    return [
        ("fused_step", FS._norm_matvec_kernel, matvec, launch(FS.MATVEC_TILE)),
        ("fused_step", FS._norm_matvec_kernel, dot, launch(FS.DOT_TILE)),
        ("fused_step", FS._state_update_kernel, state, launch(FS.STATE_TILE)),
        ("fused_step", FS._gated_matvec_kernel, gated, launch(FS.GATED_TILE)),
        ("fused_step", FS._epilogue_kernel, dict(BATCH=8, BLOCK_B=8, BLOCK_R=64, **conv), {}),
        ("fused_step", FS._add_norm_kernel, dict(HAS_ADD=True, BLOCK=2048), dict(num_warps=8)),
        ("ssd_kernel", SK._chunk_fwd, dict(ssd, BT=SK.FWD_TILE["BT"], NP=128), launch(SK.FWD_TILE)),
        ("ssd_kernel", SK._diag_bwd_x, dict(ssd, BT=SK.BWD_X_TILE["BT"], NP=128), launch(SK.BWD_X_TILE)),
        ("ssd_kernel", SK._diag_bwd_s, dict(ssd, BT=SK.BWD_S_TILE["BT"]), launch(SK.BWD_S_TILE)),
        ("ssd_kernel", SK._group_bwd, dict(ssd, BT=SK.GROUP_TILE["BT"], NP=128), launch(SK.GROUP_TILE)),
        ("ssd_kernel", SK._states_fwd, dict(ssd, **tile(SK.STATES_TILE)), launch(SK.STATES_TILE)),
        ("ssd_kernel", SK._states_bwd, dict(ssd, **tile(SK.STATES_BWD_TILE)), launch(SK.STATES_BWD_TILE)),
    ]


def signature(module, kernel, constexprs):
    """Each argument's type as Triton's compiler takes it: pointers as the step and the SSD pass them (POINTERS,
    SSD_FP32, else bf16), int32 sizes and strides, fp32 eps and dt limits, "constexpr" for the launch's constants."""
    pointers = POINTERS.get(kernel.__name__, {}) if module == "fused_step" else dict.fromkeys(SSD_FP32, "*fp32")
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, "*bf16")
        else:
            sig[name] = "fp32" if name in ("eps", "dt_min", "dt_max") else "i32"
    return sig


def compile_all():
    """Compiles every kernel of `kernels()` for sm_90 and prints one line each, with the bytes a thread spills to
    local memory as ptxas reports them ("?" where this Triton does not print ptxas's report); raises on the first
    that fails. Pointers are 16-byte aligned, as Triton's launcher specializes torch's tensors at run time: the
    loads vectorize, and the registers are those of the kernel that runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    for module, kernel, constexprs, options in kernels():
        names = kernel.arg_names
        sig = signature(module, kernel, constexprs)
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names) if sig[name].startswith("*")}
        source = ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                           attrs=aligned)
        with contextlib.redirect_stdout(io.StringIO()) as log:  # ptxas's report (TRITON_DUMP_PTXAS_LOG)
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        assert "cubin" in compiled.asm, kernel.__name__
        spills = re.search(r"\b(\d+) bytes spill stores", log.getvalue())
        print(f"{module}.{kernel.__name__}: cubin, {compiled.metadata.shared} bytes of shared memory, "
              f"{spills.group(1) if spills else '?'} bytes spill stores", flush=True)


def test_every_triton_kernel_compiles_for_hopper():
    """fused_step.py's and ssd_kernel.py's kernels, each with the constants it is launched with, compile to a cubin
    for sm_90: the GPU path cannot fail to build where the interpreter tests pass. The decoding step's kernels spill
    nothing to local memory (a register cap below what ptxas needs makes them spill)."""
    triton = pytest.importorskip("triton")
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.isdir(nvidia):
        pytest.skip("this Triton has no CUDA backend with its ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # ptxas's report, not the kernel cache's copy
    code = f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]; " \
           "import test_kernels_compile as t; t.compile_all()"
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count(": cubin") == len(kernels()), run.stdout
    decoding = [line for line in run.stdout.splitlines() if line.startswith("fused_step.")]
    assert not [line for line in decoding if not line.endswith((" 0 bytes spill stores", " ? bytes spill stores"))], \
        run.stdout  # the decoding step's kernels keep every value in registers
