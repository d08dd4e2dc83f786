"""Our code against outputs the references made themselves (tests/golden/, written by tests/golden/make_golden.py with
timm and mamba-ssm; versions.json names their versions and the card): these run on any CPU, without the references.

Tolerances: every fixture is fp32 (Triton's products in IEEE fp32). Each output sums at most a few hundred products
(a ViT's 42 x 42 image and width-24 dot products; the SSD's 37 positions x 16 state entries per output), so two fp32
computations of it differ by at most ~K eps32 |terms| with K a few hundred: 1e-5 absolute and relative for the ViTs,
1e-4 for the SSD and the LM, whose terms reach 10-100 in magnitude.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamba2 import Mamba2LMHeadModel, dt_softplus
from ssd import ssd_chunked, ssd_step
from vision import ViT

GOLDEN = Path(__file__).parent / "golden"
TIMM = ["timm-vit_large_patch14_reg4_dinov2-42px", "timm-vit_large_patch14_dinov2-42px",
        "timm-vit_so400m_patch14_siglip_384-42px", "timm-vit_large_patch14_clip_336-42px",
        "timm-vit_large_patch14_reg4_dinov2-70px", "timm-vit_large_patch14_dinov2-70px",
        "timm-vit_so400m_patch14_siglip_384-70px"]


def io(name):
    return load_file(str(GOLDEN / name / "io.safetensors"))


@pytest.mark.parametrize("name", TIMM)
def test_eq5_timm_checkpoints_give_timms_own_outputs(name):
    """A timm folder (each family the release uses; saved at 42 px, or at 70 px and read at 42 px as timm's
    checkpoint_filter_fn resizes it): our block -2 patch tokens (the layer ML-Mamba uses) and final features equal
    timm's forward, hooked at blocks[-2]."""
    t = io(name)
    ours = ViT.from_pretrained(GOLDEN / name / "checkpoint", input_size=42).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(t["pixels"], layer=-2), t["block_minus_2"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(t["pixels"], layer=None), t["final"], rtol=1e-5, atol=1e-5)


def test_eq3_chunked_scan_gives_mamba_ssm_kernels_outputs():
    """Eq. 3 over a sequence: ssd_chunked equals mamba-ssm's Triton `mamba_chunk_scan_combined` (odd length 37,
    chunk 16, 8 heads in 2 groups, a non-zero initial state), outputs and final state."""
    t = io("mamba-ssm-ssd")
    chunk = json.loads((GOLDEN / "mamba-ssm-ssd" / "settings.json").read_text())["chunk_size"]
    y, state = ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, D=t["D"], initial_state=t["initial_state"])
    torch.testing.assert_close(y, t["y"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, t["final_state"], rtol=1e-4, atol=1e-4)


def test_eq3_one_token_step_gives_mamba_ssm_kernels_outputs():
    """Eq. 3 for one token: dt_softplus + ssd_step equal mamba-ssm's Triton `selective_state_update` as its Mamba2.step
    calls it (dt_bias and softplus inside, 2 groups), output and new state."""
    t = io("mamba-ssm-ssd")
    dt = dt_softplus(t["step_dt"], t["step_dt_bias"])
    y, state = ssd_step(t["step_state"], t["step_x"], dt, t["A"], t["step_B"], t["step_C"], t["D"])
    torch.testing.assert_close(y, t["step_y"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state, t["step_state_after"], rtol=1e-4, atol=1e-4)


def test_mamba_ssm_checkpoint_gives_mamba_ssms_own_logits():
    """A MambaLMHeadModel with Mamba2 layers (2 groups, odd length), saved by mamba-ssm's own save_pretrained
    (pytorch_model.bin): our loader and forward give its logits."""
    t = io("mamba-ssm-lm")
    ours = Mamba2LMHeadModel.from_pretrained(GOLDEN / "mamba-ssm-lm" / "checkpoint").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(t["input_ids"]), t["logits"], rtol=1e-4, atol=1e-4)


def test_every_fixture_names_the_versions_it_came_from():
    versions = json.loads((GOLDEN / "versions.json").read_text())
    assert {"torch", "timm", "mamba_ssm", "triton", "gpu"} <= set(versions)
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) == sorted(TIMM + ["mamba-ssm-lm", "mamba-ssm-ssd"])
