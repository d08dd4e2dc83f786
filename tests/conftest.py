"""Helpers shared by the tests: a tiny byte-level BPE tokenizer and a tiny ML-Mamba configuration."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # fused_step.py's Triton kernels then run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def make_tokenizer(texts, vocab_size=300):
    """A byte-level BPE trained on `texts` (seconds), with the project's special tokens."""
    from data import train_tokenizer
    return train_tokenizer(texts, vocab_size)


TEXTS = ["What is in the picture? A red circle and a blue square.", "Is the circle left of the square? Yes.",
         "How many triangles are there? Two.", "What color is the triangle? Green."] * 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small synthetic world (48 training images, seed 3), built once per test module that reads one."""
    from synthetic import build_synthetic_dataset
    root = tmp_path_factory.mktemp("synthetic")
    build_synthetic_dataset(root, n_train=48, n_val=4, n_test=12, seed=3)
    return root


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    """The world train() builds by default (3000 training images, ~2 s): tests that call train() point it here, so
    it finds its DONE stamp and leaves the small `world` above alone."""
    from synthetic import build_synthetic_dataset
    root = tmp_path_factory.mktemp("default-synthetic")
    build_synthetic_dataset(root)
    return root


@pytest.fixture
def tokenizer():
    return make_tokenizer(TEXTS)


@pytest.fixture
def fake_mamba_ssm(monkeypatch):
    """install(kernel): `kernel` importable as mamba-ssm's mamba_chunk_scan_combined, and fast_ssd's look-up undone,
    for this test alone; returns what fast_ssd.find_kernel then finds."""
    import sys
    import types

    import fast_ssd

    def install(kernel):
        fake = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
        fake.mamba_chunk_scan_combined = kernel
        for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
        monkeypatch.setitem(sys.modules, fake.__name__, fake)
        monkeypatch.setattr(fast_ssd, "_looked_up", False)
        monkeypatch.setattr(fast_ssd, "_kernel", None)
        return fast_ssd.find_kernel()
    return install


def tiny_config(kind="msc-advanced", scan="bsm", vocab_size=300):
    from connector import ConnectorConfig
    from mamba2 import Mamba2Config
    from model import MLMambaConfig
    from vision import ViTConfig
    lm = Mamba2Config(d_model=32, n_layer=2, vocab_size=vocab_size, d_state=16, headdim=8, chunk_size=16)
    vision = {"dinov2": ViTConfig("dinov2", image_size=28, patch_size=14, hidden_size=24, intermediate_size=48,
                                  num_layers=2, num_heads=2, input_size=42),
              "siglip": ViTConfig("siglip", image_size=42, patch_size=14, hidden_size=16, intermediate_size=32,
                                  num_layers=2, num_heads=2, input_size=42)}
    connector = ConnectorConfig.for_lm(lm, vision_dim=40, grid=(3, 3), kind=kind, scan=scan, drop_path=0.0)
    return MLMambaConfig(lm=lm, vision=vision, connector=connector, max_length=200)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA: they skip where there is none (`python -m pytest -m gpu` on a GPU machine runs
    them alone)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a gpu test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it (module-scoped fixtures draw once)."""
    import random
    random.seed(0)
    torch.manual_seed(0)


def assert_adam_close(a, b, lr, steps, betas=(0.9, 0.999)):
    """Weights {name: tensor} after `steps` Adam steps in two runs whose gradients differ only by rounding (another
    batch split, thread count or kernel). Adam divides each gradient by its own running size, so a rounding change is
    amplified only where a gradient is ~0: there it may decide the sign, and the weight moves by up to a whole step,
    at most lr (1 - beta1) / sqrt(1 - beta2) (Kingma & Ba 2015, section 2.1; 3.2 lr here). So every weight must be
    within that bound of the other run's at every step, and all but a thousandth of them within rounding
    (1e-5 relative, 1e-6 absolute); a wrong batch or stale inputs move most weights by about lr."""
    import math
    bound = 2 * steps * lr * max(1.0, (1 - betas[0]) / math.sqrt(1 - betas[1]))
    apart = total = 0
    for n, v in b.items():
        diff = (a[n].float() - v.float()).abs()
        assert diff.max() <= bound, f"{n}: {float(diff.max()):.3g} apart, beyond Adam's bound {bound:.3g}"
        apart += int((diff > 1e-6 + 1e-5 * v.abs()).sum())
        total += diff.numel()
    assert apart <= total / 1000, f"{apart} of {total} weights differ by more than rounding"

