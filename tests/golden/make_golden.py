"""Regenerate the golden fixtures of tests/golden/: outputs made by the references themselves, so that
tests/test_golden.py checks our loaders and forward passes against them on any CPU, without the references.

    TRITON_F32_DEFAULT=ieee python tests/golden/make_golden.py      # needs timm; mamba-ssm and a CUDA GPU for the rest

Each fixture is a folder: checkpoint/ in the reference's own format, io.safetensors with the inputs and its outputs.
- timm-*: a tiny random timm VisionTransformer of each family the authors' release uses, saved as timm saves it
  (config.json + model.safetensors), with pixels and timm's own forward: block -2's patch tokens and the final
  features. Saved at 42 px, and for three families at 70 px read at 42 px through timm's checkpoint_filter_fn.
- mamba-ssm-ssd: mamba-ssm's Triton chunked scan (`mamba_chunk_scan_combined`) and one-token update
  (`selective_state_update`) on random inputs: odd length, 8 heads in 2 groups, a non-zero initial state.
- mamba-ssm-lm: a tiny mamba-ssm `MambaLMHeadModel` with Mamba2 layers, saved by its own `save_pretrained`
  (config.json + pytorch_model.bin), with token ids and its logits.
versions.json records the versions and the card. Everything is fp32; with TRITON_F32_DEFAULT=ieee Triton's products
are IEEE fp32, so the kernels' outputs carry fp32 rounding only.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]  # tests/ (its helpers) and the repository


def timm_fixtures(out, versions):
    import timm
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    from test_vision import TIMM_TINY, tiny_timm_folder
    versions["timm"] = timm.__version__
    cases = [(a, 42) for a in TIMM_TINY] + [(a, 70) for a in list(TIMM_TINY)[:3]]
    for architecture, saved_size in cases:
        folder = out / f"timm-{architecture.split('.')[0]}-{saved_size}px"
        (folder / "checkpoint").mkdir(parents=True, exist_ok=True)
        saved = tiny_timm_folder(timm, architecture, folder / "checkpoint", img_size=saved_size)
        reference = VisionTransformer(num_classes=0, **{**TIMM_TINY[architecture], "img_size": 42}).eval()
        reference.load_state_dict(checkpoint_filter_fn(saved.state_dict(), reference))
        torch.manual_seed(3)
        pixels = torch.randn(2, 3, 42, 42)
        with torch.no_grad():
            blocks = []
            hook = reference.blocks[-2].register_forward_hook(lambda module, args, y: blocks.append(y))
            final = reference.forward_features(pixels)[:, reference.num_prefix_tokens:]
            hook.remove()
        save_file({"pixels": pixels, "block_minus_2": blocks[0][:, reference.num_prefix_tokens:].contiguous(),
                   "final": final.contiguous()}, str(folder / "io.safetensors"))
        print(f"{folder.name}: {sum(p.numel() for p in saved.parameters())} parameters", flush=True)


def ssd_fixture(out, versions):
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    torch.manual_seed(4)
    b, l, h, p, g, n, chunk = 2, 37, 8, 8, 2, 16, 16
    t = dict(x=torch.randn(b, l, h, p), dt=torch.rand(b, l, h) * 0.5 + 0.01, A=-torch.rand(h) * 4 - 0.1,
             B=torch.randn(b, l, g, n), C=torch.randn(b, l, g, n), D=torch.randn(h),
             initial_state=torch.randn(b, h, p, n))
    cuda = {k: v.cuda() for k, v in t.items()}
    y, state = mamba_chunk_scan_combined(cuda["x"], cuda["dt"], cuda["A"], cuda["B"], cuda["C"], chunk, D=cuda["D"],
                                         initial_states=cuda["initial_state"], return_final_states=True)
    # one decoding step as mamba-ssm's Mamba2.step calls it: dt raw + dt_bias through softplus, per-head tensors
    # broadcast over (p, n)
    s = dict(step_state=torch.randn(b, h, p, n), step_x=torch.randn(b, h, p), step_dt=torch.randn(b, h),
             step_dt_bias=torch.randn(h), step_B=torch.randn(b, g, n), step_C=torch.randn(b, g, n))
    sc = {k: v.cuda() for k, v in s.items()}
    state_after = sc["step_state"].clone()
    y_step = selective_state_update(
        state_after, sc["step_x"], sc["step_dt"][..., None].expand(b, h, p), cuda["A"][:, None, None].expand(h, p, n),
        sc["step_B"], sc["step_C"], D=cuda["D"][:, None].expand(h, p), dt_bias=sc["step_dt_bias"][:, None].expand(h, p),
        dt_softplus=True)
    folder = out / "mamba-ssm-ssd"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({**t, **s, "y": y.cpu(), "final_state": state.float().cpu(), "step_y": y_step.cpu(),
               "step_state_after": state_after.cpu()}, str(folder / "io.safetensors"))
    (folder / "settings.json").write_text(json.dumps({"chunk_size": chunk}))
    print("mamba-ssm-ssd written", flush=True)


def lm_fixture(out, versions):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    torch.manual_seed(5)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=61, pad_vocab_size_multiple=16, rms_norm=True,
                         residual_in_fp32=True, fused_add_norm=True,
                         ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 16,
                                  "use_mem_eff_path": False})
    model = MambaLMHeadModel(config, device="cuda", dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or name.endswith(".D"):
                p.add_(0.3 * torch.randn_like(p))
    folder = out / "mamba-ssm-lm"
    model.save_pretrained(str(folder / "checkpoint"))
    ids = torch.randint(0, config.vocab_size, (2, 37))
    with torch.no_grad():
        logits = model(ids.cuda()).logits.float().cpu()
    save_file({"input_ids": ids, "logits": logits}, str(folder / "io.safetensors"))
    print(f"mamba-ssm-lm: {sum(p.numel() for p in model.parameters())} parameters", flush=True)


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE), help="where the fixtures go (default: tests/golden)")
    out = Path(p.parse_args().out)
    versions = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    timm_fixtures(out, versions)
    if torch.cuda.is_available():
        import mamba_ssm
        import triton
        versions.update({"mamba_ssm": mamba_ssm.__version__, "triton": triton.__version__,
                         "gpu": torch.cuda.get_device_name(), "triton_f32": os.environ.get("TRITON_F32_DEFAULT", "")})
        ssd_fixture(out, versions)
        lm_fixture(out, versions)
    (out / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")
    print(versions)


if __name__ == "__main__":
    main()
