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
The authors' release builds a different connector, here as the option "msc-release" (BiMamba2, ReleaseBlock,
ReleaseMSC below): one mixer with a shared projection and per-direction SSM parameters, the directions averaged, a
SwiGLU in every block, LayerNorms, no drop-path (README, "How this differs").
"""

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba2 import Mamba2Config, Mamba2Mixer, RMSNorm, causal_conv, softplus_step
from ssd import ssd
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
    """The 3-layer projector (Fig. 3(a), eq. 6): Linear(in, 4 out) - GELU - Linear(4 out, out) - GELU - Linear(out, out).
    xavier=False keeps PyTorch's default init (the release's)."""

    def __init__(self, in_dim, out_dim, xavier=True):
        super().__init__()
        init = _init_linear if xavier else (lambda m: m)
        self.fc1 = init(nn.Linear(in_dim, 4 * out_dim))
        self.fc2 = init(nn.Linear(4 * out_dim, out_dim))
        self.fc3 = init(nn.Linear(out_dim, out_dim))

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
# The authors' release's connector, an option ("msc-release"): where it departs from the paper, see the README
# ----------------------------------------------------------------------------------------------------------------

# Where the release departs from the paper's MSC (Fig. 5) as read here: one mixer for both directions (shared in_proj,
# gated norm and out_proj), the directions averaged rather than summed, no norm before the mixer, a SwiGLU of width D
# inside every block (not one of 8/3 D after the MSC), LayerNorms instead of RMSNorms, no drop-path, PyTorch's default
# init with zero biases and out_proj / sqrt(2), and BSM only.

class BiMamba2(Mamba2Mixer):
    """The release's bidirectional Mamba-2 mixer: one in_proj, gated RMSNorm and out_proj shared by the two
    directions, and a conv, dt_bias, A_log and D per direction (the backward ones *_b, starting as copies of the
    forward ones, the conv apart). The backward direction reads in_proj's output reversed; the two directions'
    gated-norm outputs are averaged before out_proj. (b, l, D) -> (b, l, D)."""

    def __init__(self, config: Mamba2Config):
        super().__init__(config)
        c = config
        self.conv1d_b = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias_b = nn.Parameter(self.dt_bias.detach().clone())
        self.A_log_b = nn.Parameter(self.A_log.detach().clone())
        self.D_b = nn.Parameter(self.D.detach().clone())

    def scan(self, zxbcdt, conv1d, dt_bias, A_log, D):
        """One direction over in_proj's output (b, l, ...): causal conv, SSD (eq. 3), gated RMSNorm
        -> (b, l, d_inner)."""
        c = self.config
        z, xBC, dt = zxbcdt.split([c.d_inner, c.conv_dim, c.nheads], dim=-1)
        x, B, C = self.split_xBC(causal_conv(xBC, conv1d)[0])  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
        y, _ = ssd(x, softplus_step(dt, dt_bias, c.dt_limit), -torch.exp(A_log.float()), B, C, c.chunk_size,
                   D.float())
        return self.norm(y.flatten(-2), gate=z)

    def forward(self, u, cache=None):
        if cache is not None:
            raise ValueError("BiMamba2 reads the whole sequence both ways: it has no decoding cache")
        zxbcdt = self.in_proj(u)  # (b, l, 2 d_inner + 2 g n + h), one projection for both directions
        forward = self.scan(zxbcdt, self.conv1d, self.dt_bias, self.A_log, self.D)
        backward = self.scan(zxbcdt.flip(1), self.conv1d_b, self.dt_bias_b, self.A_log_b, self.D_b).flip(1)
        return self.out_proj(((forward + backward) / 2).to(self.out_proj.weight.dtype))


class ReleaseBlock(nn.Module):
    """The release's block: x + BiMamba2(x), with no norm before the mixer, then x + SwiGLU(LayerNorm(x)) with
    hidden width D. (Its drop-path schedule gives both of the release's blocks 0.)"""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.mixer = BiMamba2(config)
        self.norm = nn.LayerNorm(config.d_model)  # eps 1e-5
        self.mlp = SwiGLU(config.d_model, hidden=config.d_model, xavier=False)

    def forward(self, x):
        x = x + self.mixer(x)
        return x + self.mlp(self.norm(x))


class ReleaseMSC(nn.Module):
    """The release's `Bidirectional_Mamba`: n_layers ReleaseBlocks, then a LayerNorm. Each out_proj starts at PyTorch's
    default init divided by sqrt(n_layers), as the release's GPT-2-style rescale. (b, N, D) -> (b, N, D)."""

    def __init__(self, config: Mamba2Config, n_layers=2):
        super().__init__()
        self.blocks = nn.ModuleList([ReleaseBlock(config) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(config.d_model)
        with torch.no_grad():
            for block in self.blocks:
                block.mixer.out_proj.weight.div_(math.sqrt(n_layers))

    def forward(self, x):
        x = x.float()  # the residual stream in fp32, as in the LM
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------------------------
# The connector
# ----------------------------------------------------------------------------------------------------------------

def _default_mixer():
    return Mamba2Config(d_model=2560, n_layer=2, vocab_size=1)  # Mamba-2 2.7B's mixer shape


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
        check_fields(self, "ConnectorConfig", positive=("vision_dim", "n_layers"))
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"ConnectorConfig: drop_path must be in [0, 1), not {self.drop_path!r}")
        self.grid = tuple(self.grid)
        if self.kind not in ("mlp", "msc-basic", "msc-advanced", "msc-release"):
            raise ValueError(f"unknown connector kind {self.kind!r}: use 'mlp', 'msc-basic', 'msc-advanced' or "
                             "'msc-release'")
        if self.kind == "msc-release" and (self.scan != "bsm" or self.init != "random"):
            raise ValueError("the release's connector scans forward and backward (scan 'bsm') from a random init "
                             "(init 'random')")
        if self.scan not in ("bsm", "csm"):
            raise ValueError(f"unknown scan {self.scan!r}: use 'bsm' or 'csm'")
        if self.init not in ("random", "lm"):
            raise ValueError(f"unknown connector init {self.init!r}: use 'random' or 'lm'")

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
    """Vision features (b, H*W, vision_dim) -> image tokens (b, H*W, llm_dim): the three variants of Table 6, or the
    release's connector (lift, its Bidirectional_Mamba, the fused GELU MLP)."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        c = self.config = config
        if c.kind == "mlp":
            self.projector = MLP(c.vision_dim, c.llm_dim)  # eq. 6
            return
        if c.kind == "msc-release":
            self.lift = nn.Linear(c.vision_dim, c.llm_dim)
            self.msc = ReleaseMSC(c.mixer, c.n_layers)
            self.swiglu = None  # inside each block
            self.projector = MLP(c.llm_dim, c.llm_dim, xavier=False)
            return
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
