"""Benchmarks (figures for the README, not tests).

    python benchmark.py ssd        # ssd_chunked vs ssd_recurrent vs ssd_quadratic: time and peak memory over the
                                   # length, on the CPU (or --device cuda)
    python benchmark.py decode     # Mamba-2 LM generation on the GPU: ours eager, ours with the CUDA-graph step,
                                   # mamba-ssm's generate(cg=True), and the memory-bandwidth bound, in one run
    python benchmark.py vision     # SigLIP so400m and DINOv2-L at 384 px: parameters, forward time, ours vs
                                   # transformers' implementation with the same (random) weights, in one run

Peak memory on the CPU is read from the operating system (ru_maxrss) in a fresh subprocess per measurement, minus
what the process held before the call, so each number is the working memory of that one computation.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import ssd as S


def best_time(fn, repeats, device):
    """Run fn once to warm up, then `repeats` times; (fastest seconds, last output). Syncs CUDA around each run."""
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    with torch.no_grad():
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

        def timed(fn):
            return best_time(fn, args.repeats, device)
        # both run every block (ours with layer=None; the VLM's layer=-2 skips the last one)
        t_ours, _ = timed(lambda: ours(pixels, layer=None))
        t_hf, out_hf = timed(lambda: hf_model(pixels, output_hidden_states=True).hidden_states[-2])
        with torch.no_grad():
            out_ours = ours(pixels, layer=-2)
        out_hf = out_hf[:, config.num_prefix_tokens:]  # hidden_states[-2]: the second-to-last block's output
        diff = (out_ours.float() - out_hf.float()).abs().max().item()
        print(f"| {name} | {params / 1e6:.1f}M | {t_ours:.3f} | {t_hf:.3f} | {t_ours / t_hf:.2f} | {diff:.1e} |",
              flush=True)
        del hf_model, ours


def bench_decode(args):
    """Batch-1 generation of `new` tokens after a `prompt`-token prompt, random weights (the speed does not depend
    on the values when the length is forced), bf16, one GPU, every number from this one run."""
    from mamba2 import Mamba2LMHeadModel, mamba2_preset
    assert torch.cuda.is_available(), "the decode benchmark needs a GPU"
    dev, dtype = "cuda", torch.bfloat16
    cfg = mamba2_preset(args.size)
    torch.manual_seed(0)
    with torch.device(dev):
        model = Mamba2LMHeadModel(cfg).to(dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=dev)

    def timed(fn, repeats=2):  # the warm-up run also lets mamba-ssm capture its graph
        return best_time(fn, repeats, dev)[0]

    rows = []
    with torch.no_grad():
        t_prefill = timed(lambda: model(input_ids=ids, cache=model.allocate_cache(1), num_last_tokens=1))
        t_eager = timed(lambda: model.generate(ids, max_new_tokens=args.eager_tokens, cuda_graph=False), 1)
        rows.append(("ours, eager step", args.eager_tokens, t_eager, (t_eager - t_prefill) / args.eager_tokens))
        t_graph = timed(lambda: model.generate(ids, max_new_tokens=args.new, cuda_graph=True))
        rows.append(("ours, CUDA-graph step", args.new, t_graph, (t_graph - t_prefill) / args.new))
        try:
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        except Exception as e:  # not installed, or its CUDA extension missing
            print(f"(mamba-ssm not measured: {type(e).__name__}: {e})")
        else:
            ref = MambaLMHeadModel(MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=cfg.vocab_size,
                                               ssm_cfg={"layer": "Mamba2"}, rms_norm=True, residual_in_fp32=True,
                                               fused_add_norm=True, pad_vocab_size_multiple=16),
                                   device=dev, dtype=dtype).eval()
            t_ref = timed(lambda: ref.generate(ids, max_length=args.prompt + args.new, cg=True, top_k=1,
                                               eos_token_id=None))
            rows.append(("mamba-ssm generate(cg=True)", args.new, t_ref, float("nan")))
            del ref
    # copy bandwidth: bytes read + written per second by a device-to-device copy
    x = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    t_copy = timed(lambda: y.copy_(x), 5)
    bandwidth = 2 * x.numel() / t_copy
    bound = bandwidth / (n_params * 2)  # tokens/s if each token only reads the bf16 weights once
    print(f"Mamba-2 {args.size} ({n_params / 1e9:.2f}B parameters, bf16) on {torch.cuda.get_device_name()}: "
          f"{args.prompt}-token prompt, batch 1; prefill {t_prefill:.3f} s; copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"-> bound {bound:.0f} tokens/s")
    print("| generation | new tokens | total s | tokens/s (new / total) | decode ms/token | vs mamba-ssm | vs bound |")
    print("|---|---|---|---|---|---|---|")
    ref_rate = next((n / t for name, n, t, _ in rows if name.startswith("mamba-ssm")), None)
    for name, n, t, per in rows:
        rate = n / t
        vs_ref = f"{rate / ref_rate:.2f}x" if ref_rate else "-"
        per_s = f"{per * 1e3:.2f}" if per == per else "-"
        print(f"| {name} | {n} | {t:.3f} | {rate:.1f} | {per_s} | {vs_ref} | {rate / bound:.0%} |")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ssd_once":  # internal: one measurement in a fresh process
        method, l, shape, device, repeats = argv[1:]
        shape = json.loads(shape)
        chunk = shape.pop("chunk")
        return _measure_ssd_once(method, int(l), **shape, chunk=chunk, device=device, repeats=int(repeats))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("ssd", help="the three SSD forms: time and peak memory against the length")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--max-quadratic", type=int, default=4096, help="skip the quadratic form above this length")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--chunk-size", type=int, default=64,
                   help="64 suits a CPU; the checkpoints' 256 suits the GPU kernels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("decode", help="Mamba-2 generation speed on the GPU against mamba-ssm and the bound")
    p.add_argument("--size", default="2.7b")
    p.add_argument("--prompt", type=int, default=745, help="prompt tokens (729 image tokens + a question)")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--eager-tokens", type=int, default=32, help="tokens for the (slow) eager measurement")
    p = sub.add_parser("vision", help="SigLIP and DINOv2 at 384 px: ours vs transformers, same weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.what == "ssd":
        bench_ssd(args)
    elif args.what == "vision":
        bench_vision(args)
    elif args.what == "decode":
        bench_decode(args)


if __name__ == "__main__":
    main()
