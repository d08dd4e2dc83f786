"""The Mamba-2 Scan Connector (MSC) and the projector: ML-Mamba section 3.2.3, eqs. 6-8, Figs. 3-6.

The vision features V (b, H*W, d_v) of the patch grid (row-major) become LLM-width image tokens (b, H*W, D):
    "mlp"          F = MLP(V)                                         eq. 6, Fig. 3(a)
    "msc-basic"    F = MLP(MSC(lift(V)))                              eq. 7
    "msc-advanced" F = MLP(SwiGLU(MSC(lift(V))))                      eq. 8, Fig. 6  (the paper's final choice)
lift = Linear(d_v, D) + GELU: the features are lifted to the LLM width D before scanning, so the MSC's Mamba-2
mixers have the LM's own shape (the paper leaves the MSC's width unsaid; the authors' release lifts the same way).

MSC, the Mamba-2 Visual Selective Scan (MVSS, Figs. 4-5): a 1D SSM reads a sequence, so the 2D grid is read in
several orders, each by its own Mamba-2 mixer, and the results are put back in patch order and merged:
    BSM (bidirectional scan): row-major forward, and backward (the reverse);
    CSM (cross scan): row-major, column-major, and each reversed (four directions).
Merge = sum over directions: each direction is causal, so a patch sees only the patches before it in that order;
the sum gives every patch context from the whole grid while keeping the width D.

Norm and residual placement, our reading of Fig. 5:
    for each of n_layers blocks:   x = x + DropPath( sum_k unscan_k( Mixer_k( scan_k( RMSNorm(x) ) ) ) )
    then a final RMSNorm.
The mixers are Mamba2Mixer from mamba2.py (the LM's own block), one per direction with its own parameters.
Initialisation: "random" (as the paper says) or "lm" (an option of this project: each block's mixers and norm copied
from the corresponding first layers of the pretrained Mamba-2 LM, every direction starting from the same weights).
The authors' release builds a different connector, here as the option "msc-release" (release.py): one mixer with a
shared projection and per-direction SSM parameters, the directions averaged, a SwiGLU in every block, LayerNorms, no
drop-path (README, "How this differs").
"""

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba2 import Mamba2Config, Mamba2Mixer, RMSNorm
from weights import check_fields


# ----------------------------------------------------------------------------------------------------------------
# 2D scan orders and their inverses, on a (b, H*W, d) sequence laid out row-major
# ----------------------------------------------------------------------------------------------------------------

# the index tensors are made on the CPU explicitly (also under `with torch.device("meta")`, used when loading)
def row_major(H, W):
    return torch.arange(H * W, device="cpu")


def column_major(H, W):
    """Patch indices read column by column: (0,0), (1,0), ..., (H-1,0), (0,1), ..."""
    return torch.arange(H * W, device="cpu").view(H, W).t().reshape(-1)


def scan_orders(scan, H, W):
    """The reading orders of a scan: a list of permutations of range(H*W).
    "bsm": [forward, backward];  "csm": [row-major, column-major, row-major reversed, column-major reversed]."""
    if scan == "bsm":
        return [row_major(H, W), row_major(H, W).flip(0)]
    if scan == "csm":
        r, c = row_major(H, W), column_major(H, W)
        return [r, c, r.flip(0), c.flip(0)]
    raise ValueError(f"unknown scan {scan!r}: use 'bsm' or 'csm'")


def scan(x, order):
    """x (b, H*W, d) in patch order -> the sequence read in `order`."""
    return x[:, order.to(x.device)]


def unscan(y, order):
    """Inverse of `scan`: y[:, i] is the output for patch order[i]; put it back at position order[i]."""
    return y[:, torch.argsort(order).to(y.device)]


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------

def _zero_bias(m):
    nn.init.zeros_(m.bias)
    return m


def _init_linear(m):
    """xavier-normal weights, zero biases."""
    nn.init.xavier_normal_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)
    return m


class MLP(nn.Module):
    """The 3-layer projector (Fig. 3(a), eq. 6): Linear(in, 4 out) - GELU - Linear(4 out, out) - GELU -
    Linear(out, out), xavier-normal weights and zero biases (as the release's FusedMLPProjector)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.fc1 = _init_linear(nn.Linear(in_dim, 4 * out_dim))
        self.fc2 = _init_linear(nn.Linear(4 * out_dim, out_dim))
        self.fc3 = _init_linear(nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class SwiGLU(nn.Module):
    """Fig. 6: SwiGLU(x) = W2 (SiLU(W1 x) * W3 x), hidden width 8/3 D rounded up to a multiple of 64 (LLaMA's) unless
    given. xavier=False: PyTorch's default weights and zero biases (the release's init)."""

    def __init__(self, dim, hidden=None, xavier=True):
        super().__init__()
        hidden = hidden or -(-int(8 * dim / 3) // 64) * 64
        init = _init_linear if xavier else _zero_bias
        self.w1 = init(nn.Linear(dim, hidden))
        self.w3 = init(nn.Linear(dim, hidden))
        self.w2 = init(nn.Linear(hidden, dim))

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def drop_path(x, p, training):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (rescaled to keep the mean)."""
    if p == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= p
    return x * keep.to(x.dtype) / (1 - p)


class MSCBlock(nn.Module):
    """x + DropPath(sum over directions k of unscan_k(Mixer_k(scan_k(RMSNorm(x)))))."""

    def __init__(self, mixer_config: Mamba2Config, num_directions, drop_path_rate):
        super().__init__()
        self.norm = RMSNorm(mixer_config.d_model, eps=mixer_config.norm_eps)
        self.mixers = nn.ModuleList([Mamba2Mixer(mixer_config) for _ in range(num_directions)])
        self.drop_path_rate = drop_path_rate

    def forward(self, x, orders):
        h = self.norm(x)
        merged = sum(unscan(mixer(scan(h, order)), order) for mixer, order in zip(self.mixers, orders))
        return x + drop_path(merged, self.drop_path_rate, self.training)


class MSC(nn.Module):
    """The Mamba-2 Visual Selective Scan over an H x W patch grid: (b, H*W, D) -> (b, H*W, D)."""

    def __init__(self, mixer_config: Mamba2Config, grid, scan="bsm", n_layers=2, drop_path_rate=0.1):
        super().__init__()
        self.grid = tuple(grid)
        self.scan = scan
        self.orders = scan_orders(scan, *self.grid)  # plain CPU index tensors (not parameters or buffers)
        self._orders_on = {}  # device -> the orders there
        self.blocks = nn.ModuleList([MSCBlock(mixer_config, len(self.orders), drop_path_rate)
                                     for _ in range(n_layers)])
        self.norm = RMSNorm(mixer_config.d_model, eps=mixer_config.norm_eps)

    def forward(self, x):
        if x.shape[1] != self.grid[0] * self.grid[1]:
            raise ValueError(f"MSC expects {self.grid[0]} x {self.grid[1]} = {self.grid[0] * self.grid[1]} patch "
                             f"tokens, found {x.shape[1]}")
        x = x.float()  # the residual stream in fp32, as in the LM
        if x.device not in self._orders_on:  # copied once: a CUDA graph cannot record a copy from the host
            self._orders_on[x.device] = [order.to(x.device) for order in self.orders]
        for block in self.blocks:
            x = block(x, self._orders_on[x.device])
        return self.norm(x)

    @torch.no_grad()
    def init_from_lm(self, lm):
        """init="lm": block i's norm and every direction's mixer copied from LM layer i."""
        if len(lm.layers) < len(self.blocks):
            raise ValueError(f"the LM has {len(lm.layers)} layers, fewer than the {len(self.blocks)} MSC blocks")
        for block, layer in zip(self.blocks, lm.layers):
            block.norm.load_state_dict(layer.norm.state_dict())
            for mixer in block.mixers:
                mixer.load_state_dict(layer.mixer.state_dict())


# ----------------------------------------------------------------------------------------------------------------
# The connector
# ----------------------------------------------------------------------------------------------------------------

def _default_mixer():
    return Mamba2Config(d_model=2560, n_layer=2, vocab_size=1)  # Mamba-2 2.7B's mixer shape


KINDS = ("mlp", "msc-basic", "msc-advanced", "msc-release")


@dataclass
class ConnectorConfig:
    kind: str = "msc-advanced"  # "mlp", "msc-basic", "msc-advanced" (Table 6) or "msc-release" (the authors' code)
    scan: str = "bsm"  # "bsm" or "csm" (Table 7)
    vision_dim: int = 2176  # DINOv2-L + SigLIP so400m
    grid: tuple = (27, 27)  # the patch grid (H, W): 27 x 27 at 384 px with patch 14
    n_layers: int = 2  # MSC blocks
    drop_path: float = 0.1
    init: str = "random"  # "random" (the paper) or "lm" (mixers copied from the LM's first layers)
    mixer: Mamba2Config = field(default_factory=_default_mixer)  # the MSC's mixers; mixer.d_model is the LLM width

    def __post_init__(self):
        check_fields(self, "ConnectorConfig", positive=("vision_dim", "n_layers"),
                     choices={"kind": KINDS, "scan": ("bsm", "csm"), "init": ("random", "lm")})
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"ConnectorConfig: drop_path must be in [0, 1), not {self.drop_path!r}")
        self.grid = tuple(self.grid)
        if self.kind == "msc-release" and (self.scan != "bsm" or self.init != "random"):
            raise ValueError("the release's connector scans forward and backward (scan 'bsm') from a random init "
                             "(init 'random')")

    @property
    def llm_dim(self):
        return self.mixer.d_model

    @classmethod
    def for_lm(cls, lm_config: Mamba2Config, vision_dim, grid, **kw):
        """Mixers shaped like the LM's (its width, state, heads, conv, chunk), so that init="lm" can copy its layers."""
        mixer = replace(lm_config, n_layer=kw.get("n_layers", cls.n_layers), vocab_size=1)
        return cls(vision_dim=vision_dim, grid=grid, mixer=mixer, **kw)

    def to_dict(self):
        return {**asdict(self), "grid": list(self.grid), "mixer": self.mixer.to_dict()}

    @classmethod
    def from_dict(cls, d):
        return cls(**{**d, "mixer": Mamba2Config.from_dict(d["mixer"])})


class Connector(nn.Module):
    """Vision features (b, H*W, vision_dim) -> image tokens (b, H*W, llm_dim): the three variants of Table 6 (the
    authors' release's connector is release.ReleaseConnector)."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        c = self.config = config
        if c.kind == "mlp":
            self.projector = MLP(c.vision_dim, c.llm_dim)  # eq. 6
            return
        if c.kind == "msc-release":
            raise ValueError("the release's connector is release.ReleaseConnector (model.make_connector picks it)")
        self.lift = _init_linear(nn.Linear(c.vision_dim, c.llm_dim))
        self.msc = MSC(c.mixer, c.grid, c.scan, c.n_layers, c.drop_path)
        self.swiglu = SwiGLU(c.llm_dim) if c.kind == "msc-advanced" else None
        self.projector = MLP(c.llm_dim, c.llm_dim)

    def forward(self, v):
        if self.config.kind == "mlp":
            return self.projector(v)
        x = self.msc(F.gelu(self.lift(v)))  # eq. 7: MSC(lift(V))
        if self.swiglu is not None:
            x = self.swiglu(x.to(self.swiglu.w1.weight.dtype))  # eq. 8
        return self.projector(x.to(self.projector.fc1.weight.dtype))
