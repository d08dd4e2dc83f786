"""Benchmarks (figures for the README, not tests).

    python benchmark.py ssd        # ssd_chunked vs ssd_recurrent vs ssd_quadratic: time and peak memory over the
                                   # length, on the CPU (or --device cuda)
    python benchmark.py decode     # Mamba-2 LM generation on the GPU at batch 1, 8, 32: ours eager and on CUDA
                                   # graphs with each step form, mamba-ssm's generate(cg=True), the bandwidth bound
    python benchmark.py tiles      # fused_step's tiles and L2 prefetch: batch-1 decode time for each candidate
    python benchmark.py ssd-tiles  # ssd_kernel.py's launch settings at the training step's shape: each one's time
    python benchmark.py ssd-step   # the SSD as train.py's compiled blocks run it: time and each kernel's
    python benchmark.py coldstart  # python generate.py on a random paper-size model: load, first token, wall
    python benchmark.py vision     # SigLIP so400m and DINOv2-L at 384 px: parameters, forward time, ours vs
                                   # transformers' implementation with the same (random) weights, in one run
    python benchmark.py pipeline   # the whole ML-Mamba answer at the paper's configuration on the GPU (vision,
                                   # connector, prefill, 256 tokens), our LM alone, mamba-ssm, the bound
    python benchmark.py scaling    # prefill and decoding time and memory against the number of image tokens,
                                   # ours against a Transformer LM of the same size (Phi-2 architecture)
    python benchmark.py train      # a stage-2 training step at the paper's configuration with each SSD path, its
                                   # model FLOPs utilization; the SSD forward + backward at the step's shape

Peak memory on the CPU is read from the operating system (ru_maxrss) in a fresh subprocess per measurement, minus
what the process held before the call, so each number is the working memory of that one computation.
"""

import argparse
import contextlib
import functools
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import fast_decode
import fast_ssd
import run_folder
import ssd as S

# Keep Triton's autotuning results on disk (mamba-ssm's SSD kernel autotunes each new shape), so that one benchmark
# does not tune again what another tuned before it.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")


def seconds(fn, repeats, device, grad=False):
    """The fastest of `repeats` runs of fn after one warm-up run (see best_time)."""
    return best_time(fn, repeats, device, grad)[0]


def best_time(fn, repeats, device, grad=False):
    """Run fn once to warm up, then `repeats` times; (fastest seconds, last output). Syncs CUDA around each run.
    Without grad=True, autograd is off."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with torch.set_grad_enabled(grad):
        out = fn()
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            best = min(best, time.perf_counter() - t0)
    return best, out


def _ssd_inputs(l, b, h, p, g, n, device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, l, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, generator=gen) - 2)
    A = -torch.rand(h, generator=gen) - 0.5
    B = torch.randn(b, l, g, n, generator=gen)
    C = torch.randn(b, l, g, n, generator=gen)
    return [t.to(device) for t in (x, dt, A, B, C)]


def _measure_ssd_once(method, l, b, h, p, g, n, chunk, device, repeats):
    """Runs in a subprocess: prints {"seconds", "peak_mb"} as JSON."""
    torch.set_num_threads(torch.get_num_threads())
    inputs = _ssd_inputs(l, b, h, p, g, n, device)
    fn = {"chunked": lambda: S.ssd_chunked(*inputs, chunk),
          "recurrent": lambda: S.ssd_recurrent(*inputs),
          "quadratic": lambda: S.ssd_quadratic(*inputs)}[method]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        fn()
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"seconds": min(times), "peak_mb": max(peak, 0) / 2 ** 20}))


def bench_ssd(args):
    shape = dict(b=1, h=args.heads, p=args.headdim, g=1, n=args.d_state, chunk=args.chunk_size)
    print(f"SSD on {args.device} ({torch.get_num_threads()} threads): b=1, h={args.heads}, p={args.headdim}, "
          f"n={args.d_state}, chunk={args.chunk_size}, fp32; best of {args.repeats} (recurrent: 1 run)")
    print("| l | chunked s | recurrent s | quadratic s | chunked MB | recurrent MB | quadratic MB | "
          "recurrent / chunked |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for l in args.lengths:
        row = {}
        for method in ("chunked", "recurrent", "quadratic"):
            if method == "quadratic" and l > args.max_quadratic:
                continue
            repeats = 1 if method == "recurrent" else args.repeats
            cmd = [sys.executable, __file__, "_ssd_once", method, str(l), json.dumps(shape), args.device,
                   str(repeats)]
            # time in the default environment; memory in a second process with a fixed mmap threshold, which
            # makes glibc return freed large blocks at once so that the peak RSS is the peak of live memory (by
            # default the threshold grows after frees and freed memory stays in the process). The fixed threshold
            # slows small allocations, hence two processes.
            result = {}
            for key, env in (("seconds", None), ("peak_mb", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})):
                out = subprocess.run(cmd if key == "seconds" else cmd[:-1] + ["1"], capture_output=True, text=True,
                                     env=env)
                if out.returncode:
                    print(f"  ({method} at l={l} failed: {out.stderr.strip().splitlines()[-1]})", file=sys.stderr)
                    break
                result[key] = json.loads(out.stdout.strip().splitlines()[-1])[key]
            row[method] = result if len(result) == 2 else None
        rows[l] = row

        def cell(m, k, fmt):
            return format(row[m][k], fmt) if row.get(m) else "-"
        ratio = (f"{row['recurrent']['seconds'] / row['chunked']['seconds']:.0f}x"
                 if row.get("recurrent") and row.get("chunked") else "-")
        print(f"| {l} | {cell('chunked', 'seconds', '.4f')} | {cell('recurrent', 'seconds', '.3f')} | "
              f"{cell('quadratic', 'seconds', '.4f')} | {cell('chunked', 'peak_mb', '.0f')} | "
              f"{cell('recurrent', 'peak_mb', '.0f')} | {cell('quadratic', 'peak_mb', '.0f')} | {ratio} |",
              flush=True)
    return rows


def bench_vision(args):
    """Our ViTs against transformers' at the public configs, same random weights, same inputs, in one run."""
    import transformers
    from vision import ViT

    device, dtype = args.device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    hf_configs = {
        "siglip": transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                                  num_attention_heads=16, image_size=384, patch_size=14),
        "dinov2": transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                            image_size=518, patch_size=14),
    }
    print(f"vision encoders at 384 px on {device} ({dtype}), batch {args.batch}, best of {args.repeats}")
    print("| encoder | parameters | ours s | transformers s | ours / transformers | max diff at layer -2 |")
    print("|---|---|---|---|---|---|")
    for name, hf_cfg in hf_configs.items():
        torch.manual_seed(0)
        hf_model = (transformers.SiglipVisionModel if name == "siglip" else transformers.Dinov2Model)(hf_cfg)
        hf_model = hf_model.to(device=device, dtype=dtype).eval()
        with tempfile.TemporaryDirectory() as tmp:  # through the public format, as a user would load it
            hf_model.save_pretrained(tmp, safe_serialization=True)
            ours = ViT.from_pretrained(tmp, input_size=384, dtype=dtype, device=device).eval()
        config = ours.config
        params = sum(p.numel() for p in ours.parameters())
        pixels = torch.randn(args.batch, 3, 384, 384, device=device, dtype=dtype)

        # both run every block (ours with layer=None; the VLM's layer=-2 skips the last one)
        t_ours = seconds(lambda: ours(pixels, layer=None), args.repeats, device)
        t_hf, out_hf = best_time(lambda: hf_model(pixels, output_hidden_states=True).hidden_states[-2],
                                   args.repeats, device)
        with torch.no_grad():
            out_ours = ours(pixels, layer=-2)
        out_hf = out_hf[:, config.num_prefix_tokens:]  # hidden_states[-2]: the second-to-last block's output
        diff = (out_ours.float() - out_hf.float()).abs().max().item()
        print(f"| {name} | {params / 1e6:.1f}M | {t_ours:.3f} | {t_hf:.3f} | {t_ours / t_hf:.2f} | {diff:.1e} |",
              flush=True)
        del hf_model, ours


def time_mamba_ssm_generate(config, ids, new, repeats=2):
    """(seconds for 1 token, seconds for `new` tokens, decode seconds per step) of mamba-ssm's
    MambaLMHeadModel.generate(cg=True) after ids (b, l), as time_generation's for ours, on a random model of the same
    Mamba-2 config (bf16; the warm-up run captures its graph); None when mamba-ssm cannot be imported."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception as e:  # not installed, or its CUDA extension missing
        print(f"(mamba-ssm not measured: {type(e).__name__}: {e})")
        return None
    ref = MambaLMHeadModel(MambaConfig(d_model=config.d_model, n_layer=config.n_layer, vocab_size=config.vocab_size,
                                       ssm_cfg={"layer": "Mamba2"}, rms_norm=True, residual_in_fp32=True,
                                       fused_add_norm=True, pad_vocab_size_multiple=16),
                           device=ids.device, dtype=torch.bfloat16).eval()
    def timed(n):
        return best_time(lambda: ref.generate(ids, max_length=ids.shape[1] + n, cg=True, top_k=1, eos_token_id=None),
                         repeats, ids.device)[0]
    t_one, t_all = timed(1), timed(new)
    del ref
    return t_one, t_all, (t_all - t_one) / (new - 1)


def copy_bandwidth(device):
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / best_time(lambda: y.copy_(x), 5, device)[0]


def step_kernels(model, batch, kernels):
    """[(name, GPU microseconds)] of the CUDA kernels one eager decoding step launches (profiled)."""
    from torch.profiler import ProfilerActivity, profile
    step = fast_decode.step_function(model, kernels)
    cache = model.allocate_cache(batch)
    token = torch.zeros(batch, dtype=torch.long, device="cuda")
    step(token, cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(token, cache)
        torch.cuda.synchronize()
    return [(e.name, e.device_time) for e in prof.events() if e.device_type.name == "CUDA"]


def kernels_per_step(model, batch, kernels):
    return len(step_kernels(model, batch, kernels))


def time_generation(model, ids, new, kernels, timed, state_dtype=torch.float32):
    """(seconds for 1 token, seconds for `new` tokens, decode seconds per step) of generate on CUDA graphs; the
    first call (capture, compilation) is reported, not timed."""
    gen = partial(fast_decode.generate, model, ids, kernels=kernels, state_dtype=state_dtype)
    t0 = time.perf_counter()
    gen(max_new_tokens=1)
    torch.cuda.synchronize()
    print(f"({kernels} kernels, batch {ids.shape[0]}: first call {time.perf_counter() - t0:.1f} s)", flush=True)
    t_one = timed(lambda: gen(max_new_tokens=1))
    t_all = timed(lambda: gen(max_new_tokens=new))
    return t_one, t_all, (t_all - t_one) / (new - 1)


@torch.no_grad()
def state_error(model, ids, steps, kernels):
    """(largest |logit difference| / largest |logit|, share of equal greedy tokens) of `steps` steps with the bf16
    state against the fp32 state, from the same prompt, the fp32 run's greedy tokens fed to both."""
    step = fast_decode.step_function(model, kernels)
    caches = {name: fast_decode.allocate_cache(model, ids.shape[0], dtype)
              for name, dtype in fast_decode.STATE_DTYPES.items()}
    logits = {name: [model.prefill(cache, input_ids=ids)] for name, cache in caches.items()}
    for _ in range(steps):
        token = logits["fp32"][-1].argmax(-1)
        for name, cache in caches.items():
            logits[name].append(step(token, cache))
    exact, got = torch.stack(logits["fp32"]).float(), torch.stack(logits["bf16"]).float()
    same = (got.argmax(-1) == exact.argmax(-1)).float().mean().item()
    return ((got - exact).abs().max() / exact.abs().max()).item(), same


def bench_decode(args):
    """Generation of `new` tokens after a `prompt`-token prompt, at each batch size, random bf16 weights (the speed
    does not depend on the values when the length is forced), one GPU, every number from this one run: ours eagerly
    and on CUDA graphs with each form of the step, mamba-ssm's generate(cg=True), the memory-bandwidth bound."""
    import fused_step
    assert torch.cuda.is_available(), "the decode benchmark needs a GPU"
    dev = "cuda"
    model = random_lm(args.size)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    bandwidth = copy_bandwidth(dev)
    bound_ms = n_params * 2 / bandwidth * 1e3  # one step reads the bf16 weights once
    print(f"Mamba-2 {args.size} ({n_params / 1e9:.2f}B parameters, bf16) on {torch.cuda.get_device_name()}: "
          f"{args.prompt}-token prompt, {args.new} new tokens; copy bandwidth {bandwidth / 1e12:.2f} TB/s -> a step "
          f"reads the weights in {bound_ms:.2f} ms at best", flush=True)
    timed = partial(seconds, repeats=3, device=dev)
    if args.compile:
        fast_decode.compile_blocks(model)
    with torch.no_grad():
        for batch in args.batch:
            ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt), device=dev)
            rows = []
            if batch == 1:
                t_one = timed(lambda: model.generate(ids, max_new_tokens=1), repeats=1)
                t_all = timed(lambda: model.generate(ids, max_new_tokens=args.eager_tokens),
                              repeats=1)
                rows.append(("ours, eager plain step", args.eager_tokens, t_one, t_all,
                             (t_all - t_one) / (args.eager_tokens - 1), kernels_per_step(model, batch, "plain")))
            for kernels, state, settings, options in step_forms(args):
                with step_settings(model, **settings):
                    t_one, t_all, per = time_generation(model, ids, args.new, kernels, timed,
                                                        fast_decode.STATE_DTYPES[state])
                    n_kernels = kernels_per_step(model, batch, kernels)
                name = f"ours, {kernels} step{options} on CUDA graphs" + (", bf16 state" if state == "bf16" else "")
                rows.append((name, args.new, t_one, t_all, per, n_kernels))
            if "bf16" in args.states:
                error, same = state_error(model, ids, 64, args.kernels[0])
                print(f"bf16 state against fp32, batch {batch}, {args.kernels[0]} step, 64 steps: logits within "
                      f"{error:.2%} of their largest, {same:.1%} of the greedy tokens equal", flush=True)
            fast_decode.forget_decoder(model)  # frees the captured graphs before mamba-ssm runs
            t_ref = time_mamba_ssm_generate(cfg, ids, args.new)
            if t_ref is not None:
                rows.append(("mamba-ssm generate(cg=True)", args.new, *t_ref, None))
            print_decode_table(batch, rows, bound_ms)
        for batch in args.batch if args.profile else []:
            profile_fused_step(model, batch)
        for batch in [b for b in args.batch if args.parts and b < fused_step.CUBLAS_FROM_BATCH]:
            print(f"fused step at batch {batch} by part (CUDA graphs):")
            for name, ms in time_fused_step_parts(model, batch).items():
                print(f"  {name}: {ms:.3f} ms a step, {bound_ms / ms:.0%} of the bound")


PRODUCTS = {"auto": None, "tiles": 2 ** 31, "cublas": 1}  # fused_step.CUBLAS_FROM_BATCH for each --products


def step_forms(args):
    """(kernels, state, fused_step settings, label) of each generation that bench_decode times: the products and
    programmatic dependent launch matter to the fused step only. --prefetch-k sets both matvec kernels'; without
    --prefetch-k, fused_step's settings stay as they are (None)."""
    prefetch = args.prefetch_k or [None]
    fused = [(dict(CUBLAS_FROM_BATCH=PRODUCTS[p], PDL=pdl == "on",
                   PREFETCH_K=None if k is None else dict(norm_matvec=k, gated_matvec=k)),
              f" ({p} products, PDL {pdl}" + (f", prefetch {k})" if pdl == "on" and k is not None else ")"))
             for p in args.products for pdl in args.pdl for k in (prefetch if pdl == "on" else [0])]
    return [(k, s, settings, label) for k in args.kernels for settings, label in (fused if k == "fused" else [({}, "")])
            for s in args.states]


@contextlib.contextmanager
def step_settings(model, **settings):
    """fused_step's module settings (CUBLAS_FROM_BATCH, PDL, PREFETCH_K; None: as it is) inside the block, the
    model's captured decoder made anew on the way in and out."""
    import fused_step
    kept = {name: getattr(fused_step, name) for name in settings}
    for name, value in settings.items():
        setattr(fused_step, name, kept[name] if value is None else value)
    fast_decode.forget_decoder(model)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(fused_step, name, value)
        fast_decode.forget_decoder(model)


def print_decode_table(batch, rows, bound_ms):
    print(f"batch {batch}:")
    print("| generation | new tokens | first token ms | total s | tokens/s (batch x new / total) | decode ms/step | "
          "kernels/step | vs mamba-ssm | decode vs bound |")
    print("|---|---|---|---|---|---|---|---|---|")
    ref = next((n / t for name, n, _, t, _, _ in rows if name.startswith("mamba-ssm")), None)
    for name, n, t_one, t_all, per, n_kernels in rows:
        rate = batch * n / t_all
        vs_ref = f"{n / t_all / ref:.2f}x" if ref else "-"
        print(f"| {name} | {n} | {f'{t_one * 1e3:.1f}' if t_one else '-'} | {t_all:.3f} | {rate:.1f} | "
              f"{f'{per * 1e3:.2f}' if per else '-'} | {n_kernels or '-'} | {vs_ref} | "
              f"{f'{bound_ms / (per * 1e3):.0%}' if per else '-'} |", flush=True)


TILES = {"MATVEC_TILE": [(8, 128, 4), (8, 256, 4), (8, 512, 4), (8, 512, 8), (16, 256, 4), (16, 256, 8), (16, 512, 8),
                         (4, 512, 4), (4, 1024, 8)],
         "GATED_TILE": [(8, 512, 8), (4, 512, 4), (4, 1024, 4), (4, 1024, 8), (2, 1024, 4), (2, 2048, 4), (2, 2048, 8),
                        (8, 1024, 8)],
         "DOT_TILE": [(32, 128, 4), (16, 128, 4), (32, 64, 4), (64, 64, 4), (64, 128, 4), (64, 64, 8), (128, 64, 4)],
         "STATE_TILE": [(32, 4), (8, 1), (8, 2), (8, 4), (16, 2), (16, 4), (32, 2), (32, 8), (64, 4), (64, 8)],
         "PREFETCH_K": [(512, 512), (512, 0), (512, 1024), (512, 2048), (512, 4096), (256, 2048), (1024, 2048)]}
TILE_KEYS = {"STATE_TILE": ("BLOCK_P", "num_warps"),  # the others: (BLOCK_R, BLOCK_K, num_warps)
             "PREFETCH_K": ("norm_matvec", "gated_matvec")}


def bench_calls(args):
    """Answers in a row on one decoder, each a new `prompt`-token prompt and `new` tokens at batch 1 (random bf16
    weights): the first call compiles and captures the step and its prompt bucket's prefill, later ones replay them.
    Prints each call's seconds and the slowest after the first against the median of the third and later."""
    assert torch.cuda.is_available(), "the calls benchmark needs a GPU"
    model = random_lm(args.size)
    decoder = fast_decode.decoder_for(model, args.kernels)
    times = []
    for _ in range(args.calls):
        ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=args.new, decoder=decoder)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = sorted(times[2:])[len(times[2:]) // 2]
    print(f"Mamba-2 {args.size} on {torch.cuda.get_device_name()}, {args.kernels} step, {args.prompt}-token prompts, "
          f"{args.new} new tokens; seconds per call: {', '.join(f'{t:.3f}' for t in times)}; the slowest after the "
          f"first is {max(times[1:]) / steady:.2f}x the steady state")


def bench_tiles(args):
    """fused_step's tiles: decode ms/token of the 2.7B model for each (rows, reduction width, warps) of
    norm_matvec (in_proj, LM head), then of gated_matvec (out_proj) with the best of the first, at batch 1; then of
    the tensor-core tile at batch 8, then of state_update (rows of the state, warps) and of the two matvec kernels'
    L2 prefetch under PDL (PREFETCH_K's columns) at batch 1. Ends with the kernels' times in one batch-1 step
    (profiled). args.only: the tiles swept (default: all)."""
    import fused_step as FS
    model = random_lm(args.size)
    cfg = model.config
    timed = partial(seconds, repeats=3, device="cuda")
    with torch.no_grad():
        for name, candidates in TILES.items():
            if args.only and name not in args.only:
                continue
            ids = torch.randint(0, cfg.vocab_size, (8 if name == "DOT_TILE" else 1, 128), device="cuda")

            def per_step():
                fast_decode.forget_decoder(model)  # the new tiles are captured anew
                fast_decode.generate(model, ids, max_new_tokens=2, kernels="fused")
                t_one = timed(lambda: fast_decode.generate(model, ids, max_new_tokens=1, kernels="fused"))
                t_65 = timed(lambda: fast_decode.generate(model, ids, max_new_tokens=65, kernels="fused"))
                return (t_65 - t_one) / 64
            sweep_tile(FS, name, TILE_KEYS.get(name, ("BLOCK_R", "BLOCK_K", "num_warps")), candidates, per_step,
                       "a decoding step")
        profile_fused_step(model)


def sweep_tile(module, name, keys, candidates, measure, what):
    """Each candidate tile (its values for `keys`) set as module.<name>, then measure() (seconds of `what`); prints
    each, and leaves the fastest set. A candidate that fails to run (too large for the GPU's shared memory or
    registers) is printed as failed and passed over."""
    results = []
    for tile in candidates:
        setattr(module, name, dict(zip(keys, tile)))
        try:
            t = measure()
        except Exception as e:
            print(f"{name} {tile}: failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
            continue
        results.append((t, tile))
        print(f"{name} " + " ".join(f"{k}={v}" for k, v in zip(keys, tile)) + f": {t * 1e3:.3f} ms ({what})",
              flush=True)
    best_time, best = min(results)
    setattr(module, name, dict(zip(keys, best)))
    print(f"best {name}: {dict(zip(keys, best))} ({best_time * 1e3:.3f} ms against {results[0][0] * 1e3:.3f} ms with "
          "the first)", flush=True)


def profile_fused_step(model, batch=1):
    """Each kernel's GPU time in one fused step, summed over the layers."""
    print(f"fused step at batch {batch}, profiled:")
    totals = {}
    for name, t in step_kernels(model, batch, "fused"):
        n, total = totals.get(name[:60], (0, 0.0))
        totals[name[:60]] = (n + 1, total + t)
    for name, (n, t) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name}: {n} launches, {t / 1e3:.3f} ms in all, {t / n:.1f} us each")


def fused_step_parts(model, batch=1):
    """{part: step(token, cache) -> logits} of the fused Triton step at `batch` sequences (below
    fused_step.CUBLAS_FROM_BATCH), each with the final norm and the LM head: the whole step; its two products a layer
    without the state update between them (out_proj's input v all ones); in_proj's kernels alone; out_proj's alone.
    Timing only: the parts other than the whole step compute no decoding step."""
    import fused_step

    @functools.cache
    def v_of(b, d_inner, device):  # out_proj's input in place of the state update's output
        return torch.ones(b, d_inner, device=device, dtype=torch.float32)

    def in_proj(block, residual, conv_state, ssm_state):
        w = block.mixer.in_proj.weight
        fused_step.norm_matvec(residual, block.norm, w, residual.new_empty(residual.shape[0], w.shape[0],
                               dtype=torch.float32), conv_state, block.mixer)

    def out_proj(block, residual, conv_state, ssm_state):
        v = v_of(residual.shape[0], block.mixer.config.d_inner, residual.device)
        fused_step.gated_matvec(v, block.mixer, residual)

    def both(*args):
        in_proj(*args)
        out_proj(*args)
    parts = [("the whole step", None), ("both products, no state update", both), ("in_proj's kernels alone", in_proj),
             ("out_proj's kernels alone", out_proj)]
    return {name: partial(fused_step.model_step, model, layer_step=layer_step) for name, layer_step in parts}


def time_fused_step_parts(model, batch, repeats=50):
    """{part of fused_step_parts: ms a step}: on CUDA each part captured as a CUDA graph and replayed `repeats`
    times (the best of 3 such runs), elsewhere called."""
    token = torch.zeros(batch, dtype=torch.long, device=model.embedding.weight.device)
    times = {}
    for name, step in fused_step_parts(model, batch).items():
        cache = fast_decode.allocate_cache(model, batch)
        if token.is_cuda:
            graph, _ = fast_decode.capture(lambda: step(token, cache), warmup=2)
            run = graph.replay
        else:
            run = partial(step, token, cache)
        times[name] = seconds(lambda: [run() for _ in range(repeats)], 3, token.device) / repeats * 1e3
    return times


# ----------------------------------------------------------------------------------------------------------------
# The paper's configuration: DINOv2-L + SigLIP so400m at 384 px, MSC (advanced, BSM), Mamba-2 2.7B; random weights
# ----------------------------------------------------------------------------------------------------------------

def random_lm(size):
    """A Mamba-2 LM of a preset size (mamba2_preset) with random weights (seed 0), bf16, on the GPU, its SSD arranged
    there: the decoding benchmarks' model."""
    from mamba2 import Mamba2LMHeadModel, mamba2_preset
    torch.manual_seed(0)
    with torch.device("cuda"):
        return fast_ssd.use_ssd(Mamba2LMHeadModel(mamba2_preset(size)).to(torch.bfloat16).eval())


def paper_model(size="2.7b", device="cuda"):
    """The paper's ML-Mamba (model.paper_config) with random weights, its SSD arranged for the GPU."""
    from model import MLMamba, paper_config
    config = paper_config(size)
    torch.manual_seed(0)
    with torch.device(device):
        model = MLMamba(config)
    model.image_token_id = config.lm.vocab_size  # a padding row of the embedding stands for "<image>" (no tokenizer)
    return fast_ssd.use_ssd(model)


def _prompt_ids(model, n_text, device):
    """3 text tokens ("In: "), the N image slots, then the rest of a n_text-token question."""
    ids = torch.randint(0, model.config.lm.vocab_size, (1, n_text), device=device)
    slots = torch.full((1, model.num_image_tokens), model.image_token_id, device=device)
    return torch.cat([ids[:, :3], slots, ids[:, 3:]], dim=1)


def bench_pipeline(args):
    """The whole ML-Mamba answer at the paper's configuration, bf16, batch 1, 256 new tokens forced, in one run:
    image encoding, connector, prefill, decoding; our LM alone on the same prompt length; mamba-ssm's
    generate(cg=True) on the same LM config; the device's copy bandwidth and the tokens/s bound."""
    assert torch.cuda.is_available(), "the pipeline benchmark needs a GPU"
    dev, dtype = "cuda", torch.bfloat16
    model = paper_model(args.size, dev).to(dtype).eval()
    lm = model.lm
    if args.compile:
        fast_decode.compile_blocks(lm)  # the prefill's blocks fused by torch.compile; the decoding step is unchanged
    n_params = {name: sum(p.numel() for p in part.parameters()) for name, part in
                (("vision", model.vision), ("connector", model.connector), ("lm", lm))}
    pixels = {name: torch.randn(1, 3, 384, 384, device=dev, dtype=dtype) for name in model.config.vision}
    ids = _prompt_ids(model, args.text_tokens, dev)

    timed = partial(seconds, repeats=3, device=dev)

    def answer(new):  # pixels -> image tokens -> spliced prompt -> prefill + `new` tokens
        embeds = model.embed(ids, model.image_tokens(pixels))
        return fast_decode.generate(lm, inputs_embeds=embeds, max_new_tokens=new)

    with torch.no_grad():
        feats = model.vision(pixels)
        image_tokens = model.connector(feats).to(dtype)
        embeds = model.embed(ids, image_tokens)
        n_prompt = embeds.shape[1]
        t0 = time.perf_counter()
        answer(1)  # captures the decoding step (and compiles its kernels): reported, not timed below
        torch.cuda.synchronize()
        print(f"(first call: graph capture and compilation {time.perf_counter() - t0:.1f} s)", flush=True)
        t_vision = timed(lambda: model.vision(pixels))
        t_connector = timed(lambda: model.connector(feats))
        t_prefill = timed(lambda: lm.prefill(lm.allocate_cache(1), inputs_embeds=embeds))
        decoder = fast_decode.decoder_for(lm)
        t_prefill_graph = timed(lambda: decoder.prefill(decoder.allocate_cache(1), embeds))  # warm-up captures it
        t_one = timed(lambda: answer(1))
        t_total = timed(lambda: answer(args.new))
        t_decode = (t_total - t_one) / (args.new - 1)
        lm_ids = torch.randint(0, lm.config.vocab_size, (1, n_prompt), device=dev)
        t_lm = timed(lambda: fast_decode.generate(lm, lm_ids, max_new_tokens=args.new))
        rows = [("ML-Mamba: image -> 256 tokens", t_total), ("our Mamba-2 LM alone", t_lm)]
        t_ref = time_mamba_ssm_generate(lm.config, lm_ids, args.new)
        if t_ref is not None:
            rows.append(("mamba-ssm generate(cg=True), LM alone", t_ref[1]))
    bandwidth = copy_bandwidth(dev)
    bound = bandwidth / (n_params["lm"] * 2)
    print(f"ML-Mamba at the paper's configuration on {torch.cuda.get_device_name()}, bf16, random weights: vision "
          f"{n_params['vision'] / 1e6:.0f}M (DINOv2-L + SigLIP so400m, 384 px), connector "
          f"{n_params['connector'] / 1e6:.0f}M (MSC advanced, BSM), LM {n_params['lm'] / 1e9:.2f}B (Mamba-2 "
          f"{args.size}{', compiled blocks' if args.compile else ''}); prompt {n_prompt} tokens (729 image + "
          f"{n_prompt - 729} text), {args.new} new tokens forced")
    print(f"stages: vision {t_vision * 1e3:.1f} ms, connector {t_connector * 1e3:.1f} ms, prefill "
          f"{t_prefill * 1e3:.1f} ms eager, {t_prefill_graph * 1e3:.1f} ms captured (bucket of "
          f"{fast_decode.prefill_bucket(n_prompt)}), first token "
          f"{t_one * 1e3:.1f} ms, decoding {t_decode * 1e3:.2f} ms/token; copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s -> bound {bound:.0f} tokens/s (the LM's bf16 weights read once per token)")
    print_pipeline_table(rows, args.new, bound)


def print_pipeline_table(rows, new, bound):
    """rows: (run, seconds for `new` tokens); bound: the tokens/s of reading the LM's weights once per token."""
    print("| run | total s | Eval_avg tokens/s (new / total) | vs mamba-ssm | vs bound | vs paper (171, A100) |")
    print("|---|---|---|---|---|---|")
    ref_rate = next((new / t for name, t in rows if name.startswith("mamba-ssm")), None)
    for name, t in rows:
        rate = new / t
        vs_ref = f"{rate / ref_rate:.2f}x" if ref_rate else "-"
        print(f"| {name} | {t:.3f} | {rate:.1f} | {vs_ref} | {rate / bound:.0%} | {rate / 171.0:.2f}x |", flush=True)


def word_tokenizer(vocab_size):
    """A word-level tokenizer ("w0", "w1", ..., then "<|endoftext|>") of an LM's vocabulary size, as GPT-NeoX's
    ends with its stop token; MLMamba.set_tokenizer adds "<image>" after it. A stand-in for the LM's own."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from model import EOS_TOKEN
    words = {f"w{i}": i for i in range(vocab_size - 1)}
    tokenizer = Tokenizer(models.WordLevel({**words, EOS_TOKEN: vocab_size - 1}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def paper_answerer(size):
    """The paper's ML-Mamba (random weights) in bf16 on the GPU, with a word_tokenizer: a model generate.py and
    evaluate.py can ask."""
    model = paper_model(size, "cuda").to(torch.bfloat16).eval()
    model.set_tokenizer(word_tokenizer(model.config.lm.vocab_size))
    return model


def save_random_image(file, generator=None):
    """A 384 px image of uniform random pixels, saved to `file`."""
    from PIL import Image
    Image.fromarray(torch.randint(0, 255, (384, 384, 3), dtype=torch.uint8, generator=generator).numpy()).save(file)


def bench_coldstart(args):
    """`python generate.py` answering one question about an image in a fresh process, on a random ML-Mamba at the
    paper's configuration saved in bf16 (a word-level tokenizer stands in for GPT-NeoX's), `runs` times in a row,
    the first with Triton's kernel cache empty: what generate.py prints (start-up and load, first token, last
    token) and the wall time of the whole call seen from outside; then the start-up's phases in one more fresh
    process (STARTUP_PHASES). Python's bytecode is cached in the folder and written by one import before the first
    run, as an installed package has it (pip compiles it)."""
    import shutil
    folder = Path(args.folder)
    if not (folder / "config.json").is_file():
        model = paper_answerer(args.size)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    save_random_image(folder / "image.png")
    cache = folder / "triton-cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache), PYTHONPYCACHEPREFIX=str(folder / "pycache"))
    subprocess.run([sys.executable, "-c", "import generate, fast_decode, fast_ssd, fused_step, model"], env=env,
                   cwd=Path(__file__).parent, check=True)
    print(f"generate.py on {torch.cuda.get_device_name()}, random ML-Mamba ({args.size}, bf16) in {folder}, 256 new "
          f"tokens; run 1 with an empty Triton cache")
    for run in range(1, args.runs + 1):
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "generate.py"), "--model", str(folder),
                              "--image", str(folder / "image.png"), "--prompt", "w1 w2 w3 w4 w5",
                              "--max-new-tokens", "256"], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        timing = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "(nothing on stderr)"
        print(f"run {run}: exit {out.returncode}, wall seen from outside {wall:.2f} s; {timing}", flush=True)
        if out.returncode:
            print(out.stderr[-3000:])
    out = subprocess.run([sys.executable, "-c", STARTUP_PHASES, str(folder)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent)
    print(f"start-up phases in a fresh process: {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)


STARTUP_PHASES = """if True:  # generate.py's start-up and load, phase by phase: python -c STARTUP_PHASES FOLDER
    import time
    t0 = time.perf_counter()
    import sys
    import torch
    t1 = time.perf_counter()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    import generate, fast_decode, fast_ssd
    from model import MLMamba
    t3 = time.perf_counter()
    MLMamba.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    print(f"import torch {t1 - t0:.2f} s, CUDA context {t2 - t1:.2f} s, our modules {t3 - t2:.2f} s, "
          f"from_pretrained {t4 - t3:.2f} s")
"""

LOADERS = {  # a safetensors file onto the GPU, four ways: code run in a fresh process by bench_load
    "load_file, then .to": "from safetensors.torch import load_file; t = {k: v.to('cuda') for k, v in "
                           "load_file(FILE).items()}",
    "load_file(device='cuda')": "from safetensors.torch import load_file; t = load_file(FILE, device='cuda')",
    "the file mapped, then one .to": "import os; t = torch.from_file(FILE, size=os.path.getsize(FILE), "
                                     "dtype=torch.uint8).to('cuda')",
    "weights.load_safetensors_to (threads, pinned chunks)": "from weights import load_safetensors_to; "
                                                            "t = load_safetensors_to(FILE, 'cuda')",
}


def bench_load(args):
    """A checkpoint's model.safetensors onto the GPU by each of LOADERS, each in a fresh process (CUDA initialized
    first, not timed), `repeats` rounds in turn; the file in the page cache after the first read."""
    file = Path(args.folder) / "model.safetensors"
    print(f"{file} ({file.stat().st_size / 1e9:.2f} GB) onto {torch.cuda.get_device_name()}, seconds:")
    for _ in range(args.repeats):
        for name, code in LOADERS.items():
            timed = ("import time, torch; torch.zeros(1, device='cuda'); t0 = time.perf_counter(); "
                     + code.replace("FILE", repr(str(file)))
                     + "; torch.cuda.synchronize(); print(f'{time.perf_counter() - t0:.2f}')")
            out = subprocess.run([sys.executable, "-c", timed], capture_output=True, text=True,
                                 cwd=Path(__file__).parent)
            print(f"  {name}: {out.stdout.strip() or out.stderr.strip()[-300:]}", flush=True)


def bench_answers(args):
    """evaluate.py's batched answers at the paper's configuration: `questions` questions, each about its own random
    384 px image, through evaluate.answer_questions (fast_decode.generate_batch on the model's GraphedDecoder), 32 a
    batch and one at a time; each batch size's first pass (kernel choices, graph captures) timed apart from the
    second. A random model rarely stops early: most answers run to max-new-tokens."""
    import evaluate
    model = evaluate.speed_up(paper_answerer(args.size), "cuda", args.compile)  # as evaluate.py sets it up
    root = Path(tempfile.mkdtemp())
    gen = torch.Generator().manual_seed(0)
    for i in range(args.questions):
        save_random_image(root / f"{i}.png", gen)
    questions = [{"question": "w1 w2 w3 w4 w5", "image": f"{i}.png"} for i in range(args.questions)]
    print(f"evaluate.answer_questions on {torch.cuda.get_device_name()}: random ML-Mamba ({args.size}, bf16), "
          f"{args.questions} questions (729 image + 9 text tokens each), up to {args.max_new_tokens} new tokens; "
          f"LM blocks {'compiled' if args.compile else 'eager'}")
    print("| questions a batch | first pass s | second pass s | questions/s | ms a question |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                evaluate.answer_questions(model, questions, root, args.max_new_tokens, progress=False,
                                          batch_size=batch)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(f"| {batch} | {times[0]:.2f} | {times[1]:.2f} | {args.questions / times[1]:.2f} | "
              f"{1000 * times[1] / args.questions:.1f} |", flush=True)


def peak_mb(fn):
    """The CUDA memory fn() takes at its peak above what was allocated before it, MB (autograd off)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench_scaling(args):
    """Prefill and decoding against the number of image tokens: our Mamba-2 LM and a Transformer LM of the same
    size (transformers' Phi-2 architecture, 2.7B, sdpa attention; TinyLLaVA's LM) in one run, bf16, batch 1,
    random weights. The prompt is the image tokens + 16 text tokens (random embeddings)."""
    import transformers
    assert torch.cuda.is_available(), "the scaling benchmark needs a GPU"
    dev, dtype = "cuda", torch.bfloat16
    ours = random_lm(args.size)
    phi_cfg = transformers.PhiConfig(vocab_size=51200, hidden_size=2560, intermediate_size=10240,
                                     num_hidden_layers=32, num_attention_heads=32, max_position_embeddings=16384,
                                     attn_implementation="sdpa")
    with torch.device(dev):
        phi = transformers.PhiForCausalLM(phi_cfg).to(dtype).eval()
    phi.generation_config.eos_token_id = phi.generation_config.pad_token_id = None
    params = {"ours": sum(p.numel() for p in ours.parameters()), "phi": sum(p.numel() for p in phi.parameters())}
    d = ours.config.d_model
    k, k_ours = args.decode_tokens, args.our_decode_tokens  # ours is fast: more tokens for the same precision

    timed = partial(seconds, repeats=2, device=dev)
    print(f"scaling with the image tokens on {torch.cuda.get_device_name()}, bf16, batch 1: ours = Mamba-2 "
          f"{args.size} ({params['ours'] / 1e9:.2f}B, decoding on CUDA graphs, the default step), Transformer = Phi-2 "
          f"architecture ({params['phi'] / 1e9:.2f}B, transformers {transformers.__version__}, sdpa, its default "
          f"dynamic KV cache); decoding ms/token from {k_ours} new tokens (ours) and {k} (Transformer), minus the "
          f"prefill; peak = memory above the weights")
    print("| image tokens | ours prefill ms | ours prefill peak MB | ours decode ms/token | ours state MB | "
          "Transformer prefill ms | Transformer prefill peak MB | Transformer decode ms/token | KV cache MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    cache_mb = sum(t.numel() * t.element_size() for l in ours.allocate_cache(1).layers
                   for t in (l.conv_state, l.ssm_state)) / 2 ** 20
    for n in args.image_tokens:
        emb = torch.randn(1, n + 16, d, device=dev, dtype=dtype) * 0.02
        mask = torch.ones(1, n + 16, dtype=torch.long, device=dev)
        with torch.no_grad():
            fast_decode.generate(ours, inputs_embeds=emb, max_new_tokens=2)  # capture / compile once
            o_pre = timed(lambda: ours.prefill(ours.allocate_cache(1), inputs_embeds=emb))
            o_mem = peak_mb(lambda: ours.prefill(ours.allocate_cache(1), inputs_embeds=emb))
            o_dec = (timed(lambda: fast_decode.generate(ours, inputs_embeds=emb, max_new_tokens=k_ours + 1)) -
                     timed(lambda: fast_decode.generate(ours, inputs_embeds=emb, max_new_tokens=1))) / k_ours

            def phi_gen(new):
                return phi.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False)
            p_pre = timed(lambda: phi(inputs_embeds=emb, attention_mask=mask, use_cache=True,
                                      logits_to_keep=1))
            p_mem = peak_mb(lambda: phi(inputs_embeds=emb, attention_mask=mask, use_cache=True, logits_to_keep=1))
            p_dec = (timed(lambda: phi_gen(k + 1)) - timed(lambda: phi_gen(1))) / k
        kv_mb = 2 * phi_cfg.num_hidden_layers * (n + 16 + k) * phi_cfg.hidden_size * 2 / 2 ** 20
        rows.append((n, o_pre, o_mem, o_dec, p_pre, p_mem, p_dec, kv_mb))
        print(f"| {n} | {o_pre * 1e3:.1f} | {o_mem:.0f} | {o_dec * 1e3:.2f} | {cache_mb:.0f} | {p_pre * 1e3:.1f} | "
              f"{p_mem:.0f} | {p_dec * 1e3:.2f} | {kv_mb:.0f} |", flush=True)
    first, last = rows[0], rows[-1]
    print(f"decode ms/token from {first[0]} to {last[0]} image tokens: ours x{last[3] / first[3]:.2f}, "
          f"Transformer x{last[6] / first[6]:.2f}")
    if args.plot:
        plot_scaling(rows, args.size, args.plot)
    return rows


def plot_scaling(rows, size, path):
    """bench_scaling's rows as two panels, prefill and decoding against the image tokens, written to path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r[0] for r in rows]
    for ax, (i, j, title) in zip(axes, ((1, 4, "prefill (ms)"), (3, 6, "decode (ms / token)"))):
        ax.plot(xs, [r[i] * 1e3 for r in rows], "o-", label=f"Mamba-2 {size} (ours)")
        ax.plot(xs, [r[j] * 1e3 for r in rows], "s-", label="Transformer (Phi-2 architecture)")
        ax.set_xscale("log")
        ax.set_xlabel("image tokens")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"(plot written to {path})")


def step_flops(model, pixels, ids, labels):
    """(model FLOPs, recomputed FLOPs) of one training step on this batch, as torch.utils.flop_counter counts them
    (the matrix products: linear layers, the SSD's einsums with ssd_chunked, attention): the forward, and the backward
    of what needs a gradient (the frozen encoders run forward only); then the LM blocks' forward again, which gradient
    checkpointing recomputes during the backward. Counted without checkpointing; the optimizer is not counted."""
    from torch.utils.flop_counter import FlopCounterMode
    checkpointing = model.lm.gradient_checkpointing
    model.lm.gradient_checkpointing = False
    fast_ssd.use_ssd(model, "torch")  # ssd_chunked: its einsums are counted
    with FlopCounterMode(display=False) as counter, torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(pixels, ids, labels, return_logits=False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as recompute, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.lm.hidden_states(inputs_embeds=model.embed(ids, model.image_tokens(pixels)))
        lm_only = recompute.get_total_flops()
    with FlopCounterMode(display=False) as vision_and_connector, torch.no_grad(), \
            torch.autocast("cuda", dtype=torch.bfloat16):
        model.embed(ids, model.image_tokens(pixels))
    model.lm.gradient_checkpointing = checkpointing
    fast_ssd.use_ssd(model)
    return counter.get_total_flops(), lm_only - vision_and_connector.get_total_flops()


def _train_batch(model, batch, text_tokens, dev):
    pixels = {name: torch.randn(batch, 3, 384, 384, device=dev) for name in model.config.vision}
    ids = torch.cat([_prompt_ids(model, text_tokens, dev) for _ in range(batch)])
    first_target = ids.shape[1] - text_tokens // 2 - 1  # the second half of the text is the reply
    labels = ids.masked_fill(torch.arange(ids.shape[1], device=dev) < first_target, -100)
    return pixels, ids, labels


KERNEL_CLASSES = (  # (class, words in a CUDA kernel's name), first match wins
    ("attention (the frozen ViTs)", ("flash", "fmha", "attention")),  # cuDNN's names hold sm90_ too
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "magma", "cublas", "sm90_", "sm80_")),
    ("optimizer and gradient clipping", ("multi_tensor_apply", "adam")),
    ("SSD scans and decays (compiled)", ("cumsum", "segsum")),
    ("SSD chunk kernels (ssd_kernel.py)", ("_chunk_fwd", "_states_", "_diag_", "_group_bwd")),
    ("compiled elementwise and reductions", ("triton_",)),
    ("copies and casts", ("copy", "cat", "fill")),
    ("other elementwise and reductions", ("",)),
)


def kernel_classes(prof):
    """{class: GPU seconds} of a profile's CUDA kernels, by KERNEL_CLASSES."""
    totals = {name: 0.0 for name, _ in KERNEL_CLASSES}
    for event in prof.key_averages():
        if event.self_device_time_total <= 0:
            continue
        name = event.key.lower()
        kind = next(k for k, words in KERNEL_CLASSES if any(w in name for w in words))
        totals[kind] += event.self_device_time_total / 1e6
    return totals


def _profile_step(step, file):
    """One step under torch.profiler: the CUDA kernels by total time, and by class, to `file`; returns the classes
    as text."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals = kernel_classes(prof)
    gpu = sum(totals.values())
    by_class = "\n".join(f"  {k}: {v:.3f} s ({v / gpu:.0%})" for k, v in totals.items())
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    Path(file).write_text(f"GPU time by kernel class, {gpu:.3f} s in all:\n{by_class}\n\n{table}")
    return f"GPU time by kernel class, {gpu:.3f} s in all:\n{by_class}"


SSD_PATHS = {"torch": "ssd_chunked (torch)", "torch-fast": "ssd_chunked_fast (torch)",
             "torch-compiled": "ssd_chunked_fast compiled (torch)", "triton": "ssd_triton (our chunk-output kernels)",
             "mamba_ssm": "mamba_chunk_scan_combined (kernel)"}


def ssd_chunked_at(Q):
    """ssd.ssd_chunked at chunks of at most Q, whatever chunk the mixer passes: the same values at any chunk, the
    (Q, Q) work per position growing with Q."""
    def ssd_at_chunk(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
        return S.ssd_chunked(x, dt, A, B, C, min(chunk_size, Q), D=D, initial_state=initial_state)
    return ssd_at_chunk


def use_ssd(model, backend, teaching_chunk=None):
    """fast_ssd.use_ssd, with the teaching form at chunks of teaching_chunk where one is given."""
    return fast_ssd.use_ssd(model, ssd_chunked_at(teaching_chunk) if backend == "torch" and teaching_chunk else backend)


def _time_train_step(model, opt, trainable, backend, args, name, flops, recomputed, peak, dev):
    """Seconds per training step with this SSD path, at the largest batch up to args.batch that fits; prints a row.
    recomputed: the FLOPs a sample's recomputation adds (HFU), None where they are not counted."""
    import fast_train
    import train
    use_ssd(model, backend, args.teaching_chunk)
    update = fast_train.clip_in_update if args.clip_in_update else train.clip_and_update
    batch = args.batch
    while batch >= 1:
        try:
            pixels, ids, labels = _train_batch(model, batch, args.text_tokens, dev)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    _, loss = model(pixels, ids, labels, return_logits=False)  # as train.py: no full logits
                loss.backward()
                update(opt, trainable, 1.0)
                opt.zero_grad(set_to_none=True)
            step()  # warm-up: optimizer state, kernel selection, compilation
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            t = (time.perf_counter() - t0) / args.steps
            mfu = f"{flops * batch / t / peak:.1%}" if peak else "-"
            hfu = f"{(flops + recomputed) * batch / t / peak:.1%}" if peak and recomputed is not None else "-"
            print(f"| {name} | {batch} | {t:.3f} | {batch / t:.1f} | {mfu} | {hfu} | "
                  f"{torch.cuda.max_memory_allocated() / 2 ** 30:.1f} |", flush=True)
            if args.parts:
                print("  parts, each timed alone: " + ", ".join(
                    f"{k} {v * 1e3:.1f} ms" for k, v in _time_step_parts(model, opt, trainable, pixels, ids,
                                                                         labels).items()), flush=True)
            if args.profile:
                tag = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:100]  # a file name's length
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                print(_profile_step(step, Path(args.profile) / f"step_{tag}.txt"), flush=True)
            return t
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"(batch {batch} ran out of memory with {name}; trying {batch // 2})")
            batch //= 2
    return None


def _time_step_parts(model, opt, trainable, pixels, ids, labels, repeats=3, device="cuda"):
    """{part: seconds} of a training step's parts, each run alone (the fastest of `repeats`): the frozen encoders'
    forward (eq. 5), the connector's forward and backward (eqs. 6-8), the LM's (the embedding, the blocks, the head
    at the targets, the loss) forward and backward, clipping and the optimizer's update, and the update with the
    clipping inside (fast_train.clip_in_update)."""
    import fast_train
    import train
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    with torch.no_grad(), autocast():
        feats = model.vision(pixels)  # (b, N, d_v)
        tokens = model.connector(feats)  # (b, N, D)
    d_tokens = torch.randn_like(tokens)

    def encoders():
        with torch.no_grad(), autocast():
            model.vision(pixels)

    def connector():
        with autocast():
            out = model.connector(feats)
        out.backward(d_tokens)

    def lm():  # the model's own forward from the embedding on, the image tokens given without the connector's graph
        model.image_tokens = lambda pixel_values: tokens
        try:
            with autocast():
                _, loss = model(pixels, ids, labels, return_logits=False)
        finally:
            del model.image_tokens
        loss.backward()

    parts = {"encoders": encoders, "connector": connector, "LM": lm,
             "clipping and AdamW": partial(train.clip_and_update, opt, trainable, 1.0),
             "AdamW with the clipping inside": partial(fast_train.clip_in_update, opt, trainable, 1.0)}
    times = {name: seconds(fn, repeats, device, grad=True) for name, fn in parts.items()}
    opt.zero_grad(set_to_none=True)
    return times


def _chosen(flag, backends):
    """The backends an option of optional backends names: none where it is not given, all where it names none."""
    return [] if flag is None else [b for b in backends if not flag or b in flag]


def _train_forms(args, backends, n_layer):
    """[(row name, (SSD path, blocks compiled, blocks checkpointed, what each block keeps (False, "in_proj" or "ssd":
    in_proj's product, and the SSD's forward too), connector compiled, encoders compiled))]: the forms of the
    training step that args ask for."""
    forms = [(b, c, n, False, False, False) for b, c, n in itertools.product(
        backends, (False, True) if args.compile else (False,), args.checkpoint_blocks or [n_layer])
        if c or not args.no_eager]
    forms += [(b, True, 0, "in_proj", False, False) for b in _chosen(args.keep_in_proj, backends)]
    forms += [(b, True, 0, "in_proj", True, False) for b in _chosen(args.compile_connector, backends)]
    forms += [(b, True, 0, "in_proj", True, True) for b in _chosen(args.compile_encoders, backends)]
    forms += [(b, True, 0, "ssd", True, True) for b in _chosen(args.keep_ssd, backends)]
    named = []
    for backend, compiled, n_ckpt, kept, connector, encoders in forms:
        name = (SSD_PATHS[backend] + (f" at chunks of {args.teaching_chunk}" if backend == "torch"
                                      and args.teaching_chunk else "") + (", blocks compiled" if compiled else "")
                + (f", {n_ckpt} of {n_layer} blocks checkpointed" if n_ckpt != n_layer and not kept else "")
                + (", every block keeping in_proj's product (selective recomputation)" if kept else "")
                + (" and running its SSD's forward once" if kept == "ssd" else "")
                + (", the connector compiled" if connector else "")
                + (", the encoders compiled" if encoders else "")
                + (f", sums over more than {args.whole_sums_up_to} values split"
                   if compiled and args.whole_sums_up_to is not None else ""))
        named.append((name, (backend, compiled, n_ckpt, kept, connector, encoders)))
    return named


def bench_train(args):
    """One stage-2 (finetune) training step at the paper's configuration on one GPU: bf16 autocast on fp32 master
    weights, fused AdamW, gradient checkpointing of the LM blocks, the vision frozen; with each SSD path, and the
    model FLOPs utilization (MFU) of each. Then the SSD alone, forward + backward, at the step's shape."""
    import train
    assert torch.cuda.is_available(), "the training benchmark needs a GPU"
    dev = "cuda"
    model = paper_model(args.size, dev)
    model.set_stage("finetune")
    model.lm.gradient_checkpointing = True
    model.train()
    opt = train.make_optimizer(model, 2e-5, 0.1, fused=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    flops, recomputed = step_flops(model, *_train_batch(model, 1, args.text_tokens, dev))  # per sample
    peak = run_folder.peak_flops(dev)  # FLOP/s, None for a GPU not in run_folder.PEAK_BF16_TFLOPS
    print(f"training step at the paper's configuration on {torch.cuda.get_device_name()}: "
          f"{sum(p.numel() for p in trainable) / 1e9:.2f}B trainable (connector + LM), fp32 master weights, fused "
          f"AdamW, bf16 autocast, LM gradient checkpointing; per sample 729 image + {args.text_tokens} text tokens, "
          f"{flops / 1e12:.2f} TFLOP of model FLOPs (forward + backward, matrix products) + {recomputed / 1e12:.2f} "
          f"TFLOP recomputed; MFU against the {peak / 1e12 if peak else None} TFLOP/s bf16 peak, recomputation not "
          "counted (HFU counts it)")
    print("| SSD path | per-device batch | s / step | samples/s | MFU | HFU | peak GB |")
    print("|---|---|---|---|---|---|---|")
    backends = [b for b in args.backends if b != "mamba_ssm" or fast_ssd.find_kernel() is not None]
    n_layer = len(model.lm.layers)
    times = {}
    for name, (backend, compiled, n_ckpt, kept, connector, encoders) in _train_forms(args, backends, n_layer):
        model.lm.gradient_checkpointing = n_ckpt
        try:
            fast_decode.compile_encoders(model.vision, encoders)
            fast_decode.compile_connector(model.connector, connector)
            fast_decode.compile_blocks(model.lm, compiled, in_proj_kept=bool(kept), tune_kernels=args.tune_kernels,
                                       whole_sums_up_to=args.whole_sums_up_to, ssd_kept=kept == "ssd")
            times[name] = _time_train_step(model, opt, trainable, backend, args, name, flops,
                                           None if kept else recomputed * n_ckpt / n_layer, peak, dev)
        except Exception as e:  # a path that cannot run here (a compiler error): say so, measure the others
            print(f"| {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} |", flush=True)
            opt.zero_grad(set_to_none=True)
    fast_decode.compile_blocks(model.lm, False)
    fast_decode.compile_connector(model.connector, False)
    fast_decode.compile_encoders(model.vision, False)
    model.lm.gradient_checkpointing = True
    base = times.get(SSD_PATHS["mamba_ssm"])
    if base:
        print("step time / the kernel path's: " + ", ".join(f"{k} {v / base:.2f}x" for k, v in times.items() if v))
    del model, opt, trainable
    torch.cuda.empty_cache()
    bench_ssd_backward(args, backends)


def _step_ssd_inputs(args, dev="cuda"):
    """The SSD's inputs at the training step's shape (args.batch, 729 + text tokens, Mamba-2's heads, one group),
    x, B and C in bf16 as autocast gives them, each input a leaf that takes a gradient: ((x, dt, A, B, C, D), a
    gradient for y in fp32, the model's chunk, a description)."""
    from mamba2 import mamba2_preset
    c = mamba2_preset(args.size)
    b, l, h, p, n = args.batch, 729 + args.text_tokens, c.nheads, c.headdim, c.d_state
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, l, h, p, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device=dev, generator=gen) - 2).requires_grad_()
    A = (-torch.rand(h, device=dev, generator=gen) - 0.5).requires_grad_()
    Bm = torch.randn(b, l, 1, n, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
    Cm = torch.randn(b, l, 1, n, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
    D = torch.ones(h, device=dev).requires_grad_()
    dy = torch.randn(b, l, h, p, device=dev, generator=gen)
    return (x, dt, A, Bm, Cm, D), dy, c.chunk_size, f"b={b}, l={l}, h={h}, p={p}, n={n}, g=1, x/B/C bf16"


def bench_ssd_backward(args, backends):
    """The SSD alone, forward + backward, at the training step's shape (b, 729 + text tokens, Mamba-2 2.7B's heads):
    each path, and ssd_chunked_fast at other chunk sizes (the same values at any chunk size) and compiled."""
    leaves, dy, chunk, shape = _step_ssd_inputs(args)
    x, dt, A, Bm, Cm, D = leaves

    def fwd_bwd(fn, q):
        def run():
            y, _ = fn(x, dt, A, Bm, Cm, q, D=D)
            torch.autograd.backward(y, dy.to(y.dtype))
            for t in leaves:
                t.grad = None
        return run
    print(f"SSD forward + backward, {shape}, model chunk {chunk}:")
    runs = {SSD_PATHS[k]: (fast_ssd.SSD_FORMS[k], chunk) for k in backends}
    if "torch" in backends and args.teaching_chunk:
        runs[f"{SSD_PATHS['torch']} at chunks of {args.teaching_chunk}"] = (ssd_chunked_at(args.teaching_chunk), chunk)
    runs.update({f"ssd_chunked_fast, chunk {q}": (fast_ssd.ssd_chunked_fast, q) for q in args.chunk_sweep})
    if args.compile:
        compiled = torch.compile(fast_ssd.ssd_chunked_fast, dynamic=False)
        runs.update({f"ssd_chunked_fast compiled, chunk {q}": (compiled, q) for q in args.chunk_sweep})
    base = None
    for name, (fn, q) in runs.items():
        try:
            t = seconds(fwd_bwd(fn, q), 5, x.device.type, grad=True)
        except Exception as e:
            print(f"  {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:150]}", flush=True)
            continue
        base = t if name == SSD_PATHS["mamba_ssm"] else base
        print(f"  {name}: {t * 1e3:.2f} ms" + (f" ({t / base:.2f}x the kernel)" if base else ""), flush=True)


def bench_ssd_step(args):
    """The SSD as train.py's compiled blocks run it: ssd_triton through torch.compile with `whole_scans`, under bf16
    autocast, at the training step's shape. Its forward (with autograd recording) and its forward and backward timed,
    then each CUDA kernel's time in one run of each."""
    from torch.profiler import ProfilerActivity, profile
    fast_decode.use_whole_scans(lower_backward_now=True)
    leaves, dy, chunk, shape = _step_ssd_inputs(args)
    compiled = torch.compile(lambda x, dt, A, B, C, D: fast_ssd.ssd_triton(x, dt, A, B, C, chunk, D=D)[0])

    def forward():
        with torch.autocast("cuda", torch.bfloat16):
            return compiled(*leaves)

    def forward_backward():
        torch.autograd.backward(forward(), dy.to(torch.bfloat16))
        for t in leaves:
            t.grad = None
    print(f"ssd_triton compiled on {torch.cuda.get_device_name()}, {shape}, chunk {chunk}:")
    for name, run in (("forward", forward), ("forward and backward", forward_backward)):
        t = seconds(run, args.repeats, "cuda", grad=True)
        with torch.enable_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        kernels = sorted(((e.self_device_time_total, e.count, e.key) for e in prof.key_averages()
                          if e.self_device_time_total > 0), reverse=True)
        print(f"{name}: {t * 1e3:.3f} ms; its kernels, {sum(k[0] for k in kernels) / 1e3:.3f} ms in all:")
        for us, count, key in kernels[:args.kernels]:
            print(f"  {us / 1e3:.3f} ms  x{count}  {key[:110]}", flush=True)


SSD_TILES = {  # ssd_kernel.py's tiles that `ssd-tiles` sweeps: (BT, num_warps, num_stages), dS's and the group sums'
    # with HEADS after BT, the states' (BP, BN, BQ, num_warps, num_stages)
    "STATES_TILE": [(64, 64, 64, 4, 2)] + list(itertools.product((32, 64), (64, 128), (32, 64), (4, 8), (2, 3))),
    "STATES_BWD_TILE": [(32, 128, 64, 4, 3)] + list(itertools.product((32, 64), (64, 128), (32, 64), (4, 8), (2, 3))),
    "FWD_TILE": [(64, 4, 3)] + list(itertools.product((32, 64, 128), (4, 8), (1, 2, 3))),
    "BWD_X_TILE": [(64, 4, 3)] + list(itertools.product((32, 64, 128), (4, 8), (1, 2, 3))),
    "BWD_S_TILE": [(64, 16, 4, 3)] + list(itertools.product((32, 64, 128), (8, 16, 32), (4, 8), (2, 3))),
    "GROUP_TILE": [(64, 16, 4, 2)] + list(itertools.product((32, 64), (8, 16, 32), (4, 8), (2, 3)))}
SSD_TILE_KEYS = {"STATES_TILE": ("BP", "BN", "BQ", "num_warps", "num_stages"),
                 "STATES_BWD_TILE": ("BP", "BN", "BQ", "num_warps", "num_stages"),
                 "BWD_S_TILE": ("BT", "HEADS", "num_warps", "num_stages"),
                 "GROUP_TILE": ("BT", "HEADS", "num_warps", "num_stages")}


def kernel_seconds(run, repeats):
    """The GPU time of all the CUDA kernels of one run() (autograd on), the least of `repeats` profiled runs after a
    warm-up: free of the host's launch times, which vary more between runs than a tile changes the kernels."""
    from torch.profiler import ProfilerActivity, profile
    best = float("inf")
    with torch.enable_grad():
        run()
        for _ in range(repeats):
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
            best = min(best, sum(e.self_device_time_total for e in prof.key_averages()) / 1e6)
    return best


def bench_ssd_tiles(args):
    """ssd_kernel.py's launch settings at the training step's shape (b, 729 + text tokens, Mamba-2's heads and
    chunk, x, B, C bf16): for each kernel in turn, the GPU time of the chunk states and outputs' kernels with each
    candidate (the forward's tiles by the forward, the backward's by the forward and backward), the fastest kept
    for the next kernel's sweep."""
    import ssd_kernel
    from mamba2 import mamba2_preset
    c, dev = mamba2_preset(args.size), "cuda"
    b, l, Q = args.batch, 729 + args.text_tokens, c.chunk_size
    chunks, g, r = -(-l // Q), c.ngroups, c.nheads // c.ngroups
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, l, c.nheads, c.headdim, device=dev, generator=gen, dtype=torch.bfloat16).requires_grad_()
    dt = torch.nn.functional.pad(0.1 * torch.rand(b, l, c.nheads, device=dev, generator=gen), (0, 0, 0, chunks * Q - l))
    Bc, Cc = (torch.randn(b, chunks, g, Q, c.d_state, device=dev, generator=gen, dtype=torch.bfloat16)
              for _ in range(2))
    cs = (-0.01 * torch.rand(b, chunks, g, r, Q, device=dev, generator=gen)).cumsum(-1)  # (b, c, g, r, Q)
    D, dY = torch.randn(c.nheads, device=dev, generator=gen), torch.randn_like(x)

    def forward():
        return ssd_kernel.chunk_scan(x, dt, Bc, Cc, cs, D)[0]

    def forward_backward():
        torch.autograd.backward(forward(), dY)
        x.grad = None
    print(f"ssd_kernel.py's chunk states and outputs on {torch.cuda.get_device_name()}: b={b}, {chunks} chunks of "
          f"{Q}, {g} group(s) of {r} heads, p={c.headdim}, n={c.d_state}, bf16")
    for name, candidates in SSD_TILES.items():
        if args.only and name not in args.only:
            continue
        keys = SSD_TILE_KEYS.get(name, ("BT", "num_warps", "num_stages"))
        run, what = ((forward, "the forward's kernels") if name in ("STATES_TILE", "FWD_TILE")
                     else (forward_backward, "the forward and backward's kernels"))
        sweep_tile(ssd_kernel, name, keys, candidates, lambda: kernel_seconds(run, args.repeats), what)


# the subcommands with no CPU form
GPU_ONLY = ("decode", "calls", "tiles", "ssd-tiles", "ssd-step", "coldstart", "load", "answers", "pipeline", "scaling",
            "train")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ssd_once":  # internal: one measurement in a fresh process
        method, l, shape, device, repeats = argv[1:]
        shape = json.loads(shape)
        chunk = shape.pop("chunk")
        return _measure_ssd_once(method, int(l), **shape, chunk=chunk, device=device, repeats=int(repeats))
    args = make_parser().parse_args(argv)
    if not torch.cuda.is_available() and (args.what in GPU_ONLY or getattr(args, "device", "").startswith("cuda")):
        print(f"error: benchmark.py {args.what} measures a GPU, and CUDA is not available here"
              + ("; use --device cpu" if args.what not in GPU_ONLY else ""), file=sys.stderr)
        return 2
    {"ssd": bench_ssd, "vision": bench_vision, "decode": bench_decode, "calls": bench_calls, "tiles": bench_tiles,
     "ssd-tiles": bench_ssd_tiles, "ssd-step": bench_ssd_step, "coldstart": bench_coldstart, "load": bench_load,
     "answers": bench_answers, "pipeline": bench_pipeline, "scaling": bench_scaling,
     "train": bench_train}[args.what](args)


def make_parser():
    """One subcommand per benchmark, each with its options."""
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    for add_parsers in (_ssd_parsers, _decoding_parsers, _answer_parsers, _training_parsers):
        add_parsers(sub)
    return parser


def _ssd_parsers(sub):
    """The SSD's benchmarks: its three forms, its kernels' tiles, its step at the training shape."""
    p = sub.add_parser("ssd", allow_abbrev=False, help="the three SSD forms: time and peak memory against the length")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--max-quadratic", type=int, default=4096, help="skip the quadratic form above this length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64,
                   help="64 suits a CPU; the checkpoints' 256 suits the GPU kernels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("ssd-tiles", allow_abbrev=False,
                       help="ssd_kernel.py's launch settings at the training step's shape: time for each candidate")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--only", nargs="+", choices=list(SSD_TILES), help="sweep these tiles alone (default: all)")
    p = sub.add_parser("ssd-step", allow_abbrev=False,
                       help="the SSD as train.py's compiled blocks run it, at the training step's shape: time and "
                            "each kernel's")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--kernels", type=int, default=25, help="the longest kernels printed")


def _decoding_parsers(sub):
    """The decoding step's benchmarks: the step's forms, calls in a row, the fused step's tiles."""
    p = sub.add_parser("decode", allow_abbrev=False,
                       help="Mamba-2 generation speed on the GPU against mamba-ssm and the bound")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prompt", type=int, default=745, help="prompt tokens (729 image tokens + a question)")
    p.add_argument("--eager-tokens", type=int, default=32, help="tokens for the (slow) eager measurement")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--kernels", nargs="+", default=list(fast_decode.KERNELS), choices=fast_decode.KERNELS,
                   help="the step forms timed on CUDA graphs")
    p.add_argument("--states", nargs="+", default=["fp32"], choices=list(fast_decode.STATE_DTYPES),
                   help="the SSM state's dtype (bf16 as mamba-ssm keeps it; then also its error against fp32)")
    p.add_argument("--products", nargs="+", default=["auto"], choices=list(PRODUCTS),
                   help="the fused step's matrix products: auto (Triton tiles below fused_step.CUBLAS_FROM_BATCH "
                        "sequences, cuBLAS from there), or one of them at every batch")
    p.add_argument("--pdl", nargs="+", default=["on"], choices=["on", "off"],
                   help="the fused step's Triton kernels with programmatic dependent launch (where the GPU has it)")
    p.add_argument("--prefetch-k", type=int, nargs="+", choices=[0, 256, 512, 1024, 2048],
                   help="with PDL: weight columns each matvec program asks L2 for before it waits, the same for both "
                        "matvec kernels (default: fused_step.PREFETCH_K, each kernel's own)")
    p.add_argument("--compile", action="store_true",
                   help="the LM blocks through torch.compile for our prefills (fast_decode.compile_blocks)")
    p.add_argument("--profile", action="store_true", help="then each kernel's time in one fused step at each batch")
    p.add_argument("--parts", action="store_true",
                   help="then, below fused_step.CUBLAS_FROM_BATCH sequences, the fused step's parts timed alone "
                        "(fused_step_parts: without the state update, in_proj's kernels, out_proj's)")
    p = sub.add_parser("calls", allow_abbrev=False,
                       help="answers in a row on one decoder: the first, the second, the steady state")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--prompt", type=int, default=745)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--kernels", default="fused", choices=fast_decode.KERNELS)
    p = sub.add_parser("tiles", allow_abbrev=False,
                       help="fused_step's tiles (products, state update, L2 prefetch): decode time for each candidate")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--only", nargs="+", choices=list(TILES), help="sweep these tiles alone (default: all)")


def _answer_parsers(sub):
    """Whole answers' benchmarks: a cold start, loading, batched answers, one answer, scaling."""
    p = sub.add_parser("coldstart", allow_abbrev=False,
                       help="python generate.py on a random paper-size model: load, first token, wall")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--folder", default="/tmp/ml-mamba-random", help="where the random model is written")
    p.add_argument("--runs", type=int, default=2, help="generate.py runs, one after the other")
    p = sub.add_parser("load", allow_abbrev=False,
                       help="a checkpoint onto the GPU: safetensors' loaders and ours, each in a fresh process")
    p.add_argument("--folder", default="/tmp/ml-mamba-random", help="a model folder (coldstart writes one)")
    p.add_argument("--repeats", type=int, default=2)
    p = sub.add_parser("answers", allow_abbrev=False,
                       help="evaluate.py's batched answers at the paper's configuration: questions a second")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[32, 1])
    p.add_argument("--max-new-tokens", type=int, default=10, help="evaluate.py's default")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="as evaluate.py's option")
    p = sub.add_parser("pipeline", allow_abbrev=False,
                       help="the whole ML-Mamba answer at the paper's configuration, vs mamba-ssm")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--text-tokens", type=int, default=15, help="text tokens around the image (729 + 15 = 744)")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--compile", action="store_true",
                   help="the LM blocks through torch.compile (compile_blocks) in the prefill; the first call compiles")
    p = sub.add_parser("scaling", allow_abbrev=False,
                       help="prefill and decoding against the number of image tokens, vs a Transformer")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--image-tokens", type=int, nargs="+", default=[144, 576, 729, 2304, 9216])
    p.add_argument("--decode-tokens", type=int, default=32, help="new tokens timed for the Transformer")
    p.add_argument("--our-decode-tokens", type=int, default=256, help="new tokens timed for ours")
    p.add_argument("--plot", help="write a plot here (needs matplotlib)")


def _training_parsers(sub):
    """Training's benchmarks: the vision encoders, the training step."""
    p = sub.add_parser("vision", allow_abbrev=False,
                       help="SigLIP and DINOv2 at 384 px: ours vs transformers, same weights")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p = sub.add_parser("train", allow_abbrev=False,
                       help="a stage-2 training step at the paper's configuration; the SSD fwd + bwd")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--batch", type=int, default=8, help="per-device batch (halved on out-of-memory)")
    p.add_argument("--text-tokens", type=int, default=96)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=list(SSD_PATHS), choices=list(SSD_PATHS))
    p.add_argument("--chunk-sweep", type=int, nargs="*", default=[], help="ssd_chunked_fast at these chunk sizes too")
    p.add_argument("--teaching-chunk", type=int, metavar="Q",
                   help="the teaching form (torch) at chunks of Q, not the model's (the same values at any chunk)")
    p.add_argument("--checkpoint-blocks", type=int, nargs="*", default=[],
                   help="each path with gradient checkpointing of this many LM blocks (the first ones; default: all)")
    p.add_argument("--keep-in-proj", nargs="*", choices=list(SSD_PATHS), metavar="PATH",
                   help="each path (or these of --backends) also with compiled blocks that keep in_proj's product and "
                        "recompute the rest (fast_decode.compile_blocks(in_proj_kept=True))")
    p.add_argument("--compile", action="store_true",
                   help="each path also with the LM blocks compiled, and torch.compile(ssd_chunked_fast) alone")
    p.add_argument("--compile-connector", nargs="*", choices=list(SSD_PATHS), metavar="PATH",
                   help="each path (or these of --backends) also with compiled blocks that keep in_proj's product and "
                        "the connector compiled (fast_decode.compile_connector)")
    p.add_argument("--compile-encoders", nargs="*", choices=list(SSD_PATHS), metavar="PATH",
                   help="each path (or these of --backends) also with compiled blocks that keep in_proj's product, the "
                        "connector and the frozen encoders compiled (fast_decode.compile_encoders)")
    p.add_argument("--keep-ssd", nargs="*", choices=list(SSD_PATHS), metavar="PATH",
                   help="then each path (or these of --backends) in train.py --compile's step, each block's SSD "
                        "outside its recomputation (fast_decode.compile_blocks(ssd_kept=True)): its forward runs once")
    p.add_argument("--no-eager", action="store_true", help="skip the rows with eager LM blocks")
    p.add_argument("--tune-kernels", action="store_true",
                   help="compiled blocks with their fused kernels' settings timed, as train.py --compile does "
                        "(fast_decode.compile_blocks(tune_kernels=True))")
    p.add_argument("--whole-sums-up-to", type=int, metavar="N",
                   help="compiled blocks with Inductor splitting the sums over more than N values as it decides "
                        "(fast_decode.whole_scans(up_to=N)); default: no sum split, as train.py --compile")
    p.add_argument("--clip-in-update", action="store_true",
                   help="the step's clipping inside fused AdamW's pass (fast_train.clip_in_update), as train.py's "
                        "plain loop on CUDA; default: clip_grad_norm_, then AdamW")
    p.add_argument("--profile", help="a folder: each path's step profiled (CUDA kernels by time) into it")
    p.add_argument("--parts", action="store_true",
                   help="then each path's step by part, each part timed alone: the encoders, the connector, the LM, "
                        "clipping and AdamW, AdamW with the clipping inside")


if __name__ == "__main__":
    sys.exit(main())
