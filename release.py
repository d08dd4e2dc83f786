"""The authors' release's connector (github WenjunHuang94/ML-Mamba, `mlmamba/`), the option "msc-release".

    F = MLP_gelu(ReleaseMSC(GELU(lift(V))))      lift: Linear(d_v, D); the fused GELU MLP D -> 4D -> D -> D

Where the release departs from the paper's MSC (Fig. 5), as read here: one mixer for both directions (shared in_proj,
gated norm and out_proj), the directions averaged rather than summed, no norm before the mixer, a SwiGLU of width D
inside every block (not one of 8/3 D after the MSC), LayerNorms instead of RMSNorms, no drop-path, PyTorch's default
init in the blocks with zero biases and out_proj / sqrt(2) (the projector: xavier-normal, zero biases), and BSM only.
The README's "How this differs" table lists the rest.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from connector import MLP, ConnectorConfig, SwiGLU
from mamba2 import Mamba2Config, Mamba2Mixer, causal_conv, dt_softplus


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
        y, _ = self.ssd(x, dt_softplus(dt, dt_bias, c.dt_limit), -torch.exp(A_log.float()), B, C, c.chunk_size,
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


class ReleaseConnector(nn.Module):
    """Vision features (b, H*W, vision_dim) -> image tokens (b, H*W, llm_dim), as the release computes them: the lift
    ("mlp" in its checkpoint), its Bidirectional_Mamba and its fused GELU projector."""

    def __init__(self, config: ConnectorConfig):
        super().__init__()
        c = self.config = config
        self.lift = nn.Linear(c.vision_dim, c.llm_dim)
        self.msc = ReleaseMSC(c.mixer, c.n_layers)
        self.projector = MLP(c.llm_dim, c.llm_dim)  # xavier-normal, zero biases: FusedMLPProjector._initialize_weights

    def forward(self, v):
        x = self.msc(F.gelu(self.lift(v)))
        return self.projector(x.to(self.projector.fc1.weight.dtype))
