"""The Mamba-2 language model: config, block, LM head, fixed-size decoding cache, generation, public checkpoints.

The Mamba-2 block (Mamba-2 paper, Fig. 2 left; ML-Mamba section 3.1):
    in_proj(u) -> z, xBC, dt                     one projection, split
    xBC = SiLU(causal depthwise conv1d(xBC))      kernel d_conv, over time
    x, B, C = split(xBC)                          B, C shared by the heads of a group
    dt = softplus(dt + dt_bias),  A = -exp(A_log) fp32
    y = SSD(x, dt, A, B, C) + D x                 ssd.py (eq. 3 with A_bar = exp(dt A), B_bar = dt B)
    y = RMSNorm(y * SiLU(z))                      gated norm, per group
    out_proj(y)
Blocks are pre-norm residual (x + mixer(RMSNorm(x))), the residual stream in fp32; a final RMSNorm and the LM head
(tied to the embedding in the public checkpoints) give the logits.

Decoding keeps, per layer, the last d_conv - 1 conv inputs and the SSM state (h, p, n): a fixed size whatever the
length, so each new token costs O(1) time and memory.

Checkpoints: `Mamba2LMHeadModel.from_pretrained` reads both public layouts, state-spaces/mamba2-* (mamba_ssm names)
and HF transformers' Mamba2; `checkpoints.mamba2_key_map` spells out where every tensor lands.
"""

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from checkpoints import mamba2_config_fields, mamba2_key_map, state_spaces_config
from ssd import ssd, ssd_step
from weights import (check_fields, config_errors, known_fields, load_on_meta, read_config, read_tensors,
                     resolve_folder, save_safetensors, write_json)


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Mamba2Config:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277  # GPT-NeoX-20B's tokenizer
    d_state: int = 128  # n
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64  # p
    ngroups: int = 1  # g
    chunk_size: int = 256
    norm_eps: float = 1e-5
    pad_vocab_size_multiple: int = 16  # the embedding has vocab_size rounded up to this
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    bias: bool = False  # in_proj / out_proj bias
    conv_bias: bool = True
    dt_limit: tuple = (0.0, float("inf"))
    # initialisation of a fresh model (as mamba_ssm)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_init_range: tuple = (1.0, 16.0)

    @property
    def d_inner(self):
        return self.expand * self.d_model

    @property
    def nheads(self):
        return self.d_inner // self.headdim

    @property
    def conv_dim(self):  # channels of the causal conv: x, B and C
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab_size(self):
        m = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / m) * m

    def __post_init__(self):
        check_fields(self, "Mamba2Config", positive=("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                                                     "headdim", "ngroups", "chunk_size", "pad_vocab_size_multiple",
                                                     "norm_eps", "dt_min", "dt_max"))
        self.dt_limit = tuple(self.dt_limit)
        self.A_init_range = tuple(self.A_init_range)
        if self.d_inner % self.headdim:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be a multiple of headdim ({self.headdim})")
        if self.nheads % self.ngroups:
            raise ValueError(f"nheads ({self.nheads}) must be a multiple of ngroups ({self.ngroups})")

    def to_dict(self):
        d = asdict(self)
        d["dt_limit"] = list(self.dt_limit)
        return d

    @classmethod
    def from_dict(cls, d):
        return cls(**known_fields(cls, d))


# The public state-spaces/mamba2-* sizes (Mamba-2 paper, Table 10; d_state 128, headdim 64, expand 2, ngroups 1).
MAMBA2_PRESETS = {
    "130m": dict(d_model=768, n_layer=24),
    "370m": dict(d_model=1024, n_layer=48),
    "780m": dict(d_model=1536, n_layer=48),
    "1.3b": dict(d_model=2048, n_layer=48),
    "2.7b": dict(d_model=2560, n_layer=64),
}


def mamba2_preset(name, **overrides):
    if name not in MAMBA2_PRESETS:
        raise ValueError(f"unknown Mamba-2 size {name!r}: choose one of {', '.join(MAMBA2_PRESETS)}")
    return Mamba2Config(**{**MAMBA2_PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in the weight's dtype.

    group_size < dim normalizes each group of that many channels on its own (Mamba-2's gated norm, one per group,
    so the norm splits along heads like the rest of the block). With `gate`, the input is x * SiLU(gate) first.
    """

    def __init__(self, dim, eps=1e-5, group_size=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size or dim

    def forward(self, x, gate=None):
        x = x.float()  # the norm in fp32
        if gate is not None:
            x = x * F.silu(gate.float())
        xg = x.unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        xg = xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xg.flatten(-2) * self.weight.float()).to(self.weight.dtype)


def dt_softplus(dt, dt_bias, dt_limit=(0.0, float("inf"))):
    """The raw dt projection (..., h) -> dt = softplus(dt + dt_bias), clamped to dt_limit. In fp32 on purpose:
    exp(dt A) of a small dt loses everything in bf16."""
    dt = F.softplus(dt.float() + dt_bias.float())
    return dt.clamp(*dt_limit) if tuple(dt_limit) != (0.0, float("inf")) else dt


def causal_conv(xBC, conv1d, past=None, length=None):
    """Depthwise causal conv over time + SiLU: out_t = SiLU(bias + sum_j w[:, j] xBC_{t - (k - 1) + j}), with the
    k - 1 inputs before xBC taken from `past` (b, k - 1, channels), zeros when None. conv1d: the nn.Conv1d holding
    the weight (channels, 1, k) and bias. xBC (b, l, channels) -> (out (b, l, channels), the last k - 1 inputs);
    with `length` (b,) (a padded batch), the last k - 1 inputs before position length[i] of each sequence.

    Written as k shifted multiply-adds, summed in fp32 like the decoding step's: the same values as F.conv1d over a
    left-padded window (a test checks it), without transposing the (b, l, channels) tensor."""
    k = conv1d.weight.shape[-1]
    b, l, channels = xBC.shape
    past = xBC.new_zeros(b, k - 1, channels) if past is None else past.to(xBC.dtype)
    window = torch.cat([past, xBC], dim=1)  # (b, k - 1 + l, channels)
    f = torch.promote_types(xBC.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
    weight = conv1d.weight[:, 0].to(f)  # (channels, k)
    out = sum(window[:, j:j + l].to(f) * weight[:, j] for j in range(k))
    if conv1d.bias is not None:
        out = out + conv1d.bias.to(f)
    if length is None:
        return F.silu(out).to(xBC.dtype), window[:, -(k - 1):]
    last = length[:, None] + torch.arange(k - 1, device=xBC.device)  # window index of position t is t + k - 1
    return F.silu(out).to(xBC.dtype), window.gather(1, last[:, :, None].expand(-1, -1, channels))


@dataclass
class LayerCache:
    """One layer's decoding state; its size does not depend on the sequence length."""
    conv_state: torch.Tensor  # (b, conv_dim, d_conv - 1): the last conv inputs, in the model's dtype
    ssm_state: torch.Tensor  # (b, h, p, n), fp32


@dataclass
class Mamba2Cache:
    layers: list = field(default_factory=list)
    seqlen_offset: int = 0  # positions consumed so far (a padded prompt's padding included)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 block's mixer (Fig. 2 left), mapping (b, l, d_model) -> (b, l, d_model).

    With a `LayerCache` it continues from the cached conv inputs and SSM state and updates them in place: a
    prompt of any length (chunked scan from the cached state) or one token (`ssd_step`). A padded prompt gives
    `length` (b,): positions from length[i] on are padding, and the cache is left as it was after position
    length[i] - 1 (their dt is 0, so exp(dt A) = 1 and dt B x = 0 carry the state through unchanged).
    """

    def __init__(self, config: Mamba2Config):
        super().__init__()
        c = self.config = config
        self.in_proj = nn.Linear(c.d_model, 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, c.d_conv, groups=c.conv_dim, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.nheads))
        self.A_log = nn.Parameter(torch.empty(c.nheads))
        self.D = nn.Parameter(torch.empty(c.nheads))
        self.norm = RMSNorm(c.d_inner, eps=c.norm_eps, group_size=c.d_inner // c.ngroups)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        self.ssd = ssd  # eq. 3 over a sequence (ssd.py); fast_ssd.use_ssd gives a mixer another form of it
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """mamba_ssm's init: dt log-uniform in [dt_min, dt_max] stored as softplus^-1(dt); A uniform in
        A_init_range stored as log; D = 1."""
        c = self.config
        if self.dt_bias.is_meta:
            return
        dt = torch.exp(torch.rand(c.nheads) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
        dt = dt.clamp(min=c.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        self.A_log.copy_(torch.log(torch.empty(c.nheads).uniform_(*c.A_init_range)))
        self.D.fill_(1.0)

    def positive_dt(self, dt):
        """The raw dt projection (..., h) -> dt = softplus(dt + dt_bias), clamped to dt_limit (`dt_softplus`)."""
        return dt_softplus(dt, self.dt_bias, self.config.dt_limit)

    def causal_conv(self, xBC, cache, length=None):
        """`causal_conv` with this mixer's conv1d, continuing from the cached inputs and updating them."""
        past = cache.conv_state.transpose(1, 2) if cache is not None else None
        out, last = causal_conv(xBC, self.conv1d, past, length)
        if cache is not None:
            cache.conv_state.copy_(last.transpose(1, 2))
        return out

    def split_projection(self, u):
        """in_proj(u), (..., d_model) -> z (..., d_inner), xBC (..., conv_dim), dt (..., h) before its softplus."""
        c = self.config
        return self.in_proj(u).split([c.d_inner, c.conv_dim, c.nheads], dim=-1)

    def split_xBC(self, xBC):
        """The conv's output (..., conv_dim) -> x (..., h, p), B and C (..., g, n)."""
        c = self.config
        x, B, C = xBC.split([c.d_inner, c.ngroups * c.d_state, c.ngroups * c.d_state], dim=-1)
        return (x.unflatten(-1, (c.nheads, c.headdim)), B.unflatten(-1, (c.ngroups, c.d_state)),
                C.unflatten(-1, (c.ngroups, c.d_state)))

    def A_and_D(self):
        """A = -exp(A_log) and D, (h,) each, in fp32 like dt."""
        return -torch.exp(self.A_log.float()), self.D.float()

    def forward(self, u, cache=None, length=None):
        """u (b, l, d_model) -> (b, l, d_model); with a cache, continues from it and updates it in place; length
        (b,): the real positions of a padded batch (see the class docstring)."""
        if cache is not None and u.shape[1] == 1 and length is None:
            return self.step(u[:, 0], cache.conv_state, cache.ssm_state)[:, None]
        z, xBC, dt = self.split_projection(u)  # (b, l, d_inner), (b, l, conv_dim), (b, l, h)
        x, B, C = self.split_xBC(self.causal_conv(xBC, cache, length))  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
        A, D = self.A_and_D()
        dt = self.positive_dt(dt)  # (b, l, h) fp32
        if length is not None:  # padding: dt = 0 leaves the state as it is
            dt = dt.masked_fill(torch.arange(u.shape[1], device=u.device)[None, :, None] >= length[:, None, None], 0)
        # eq. 3 over the sequence (ssd.py): h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t h_t + D x_t
        y, new_state = self.ssd(x, dt, A, B, C, self.config.chunk_size, D,
                                initial_state=cache.ssm_state if cache is not None else None)
        if cache is not None:
            cache.ssm_state.copy_(new_state)
        y = self.norm(y.flatten(-2), gate=z)  # RMSNorm(y * SiLU(z)), (b, l, d_inner)
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def step_ssm(self, u, conv_state, ssm_state):
        """One token up to the gated norm: u (b, d_model) -> (y (b, d_inner), z (b, d_inner)), updating conv_state
        (b, conv_dim, d_conv - 1) and ssm_state (b, h, p, n) in place. The conv is a multiply-add over the cached
        window, written with few, simple ops so that torch.compile can fuse it."""
        z, xBC, dt = self.split_projection(u)
        window = torch.cat([conv_state, xBC[:, :, None].to(conv_state.dtype)], dim=-1)  # (b, conv_dim, d_conv)
        conv_state.copy_(window[:, :, 1:])
        xBC = (window.float() * self.conv1d.weight[:, 0].float()).sum(-1)  # the causal conv at the newest position
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias.float()
        x, B, C = self.split_xBC(F.silu(xBC).to(u.dtype))
        A, D = self.A_and_D()
        # eq. 3 for one token: h_t = exp(dt A) h_{t-1} + dt B_t x_t^T, y_t = C_t h_t + D x_t; state fp32 (b, h, p, n)
        y, new_state = ssd_step(ssm_state, x, self.positive_dt(dt), A, B, C, D)
        ssm_state.copy_(new_state)
        return y.flatten(-2), z

    def step(self, u, conv_state, ssm_state):
        """One decoding step: u (b, d_model) -> (b, d_model), the states updated in place. The same computation as
        `forward` on one token, in O(1) time and memory whatever the length so far."""
        y, z = self.step_ssm(u, conv_state, ssm_state)
        return self.out_proj(self.norm(y, gate=z).to(self.out_proj.weight.dtype))


class Mamba2Block(nn.Module):
    """Pre-norm residual block: x + Mixer(RMSNorm(x)); the residual stream stays in fp32 if configured."""

    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer = Mamba2Mixer(config)

    def forward(self, residual, cache=None, length=None):
        return residual + self.mixer(self.norm(residual), cache, length)

    def step(self, residual, conv_state, ssm_state):
        """One token: residual (b, d_model) -> (b, d_model); what the decoding loop runs."""
        return residual + self.mixer.step(self.norm(residual), conv_state, ssm_state)


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------

def sample_next_token(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """logits (b, vocab) -> token ids (b,). temperature <= 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# The language model
# ----------------------------------------------------------------------------------------------------------------

class Mamba2LMHeadModel(nn.Module):
    def __init__(self, config: Mamba2Config):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList([Mamba2Block(config) for _ in range(config.n_layer)])
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False  # True: every block recomputed in the backward; an int n: the first n
        self._init_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def _init_weights(self):
        self.tie_weights()
        if self.embedding.weight.is_meta:
            return
        nn.init.normal_(self.embedding.weight, std=0.02)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        for layer in self.layers:  # GPT-2 style: keep the residual stream's variance from growing with depth
            layer.mixer.out_proj.weight.mul_(1 / math.sqrt(self.config.n_layer))

    def allocate_cache(self, batch_size, device=None, dtype=None):
        """An empty Mamba2Cache: the conv inputs in the model's dtype, the SSM state in fp32."""
        c, w = self.config, self.embedding.weight
        device, dtype = device or w.device, dtype or w.dtype
        return Mamba2Cache([LayerCache(torch.zeros(batch_size, c.conv_dim, c.d_conv - 1, device=device, dtype=dtype),
                                       torch.zeros(batch_size, c.nheads, c.headdim, c.d_state, device=device,
                                                   dtype=torch.float32)) for _ in range(c.n_layer)])

    def forward(self, input_ids=None, inputs_embeds=None, cache=None):
        """input_ids (b, l) or inputs_embeds (b, l, d_model) -> logits (b, l, padded_vocab) in fp32; cache: a
        Mamba2Cache to continue from and update."""
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds, cache)).float()

    def hidden_states(self, input_ids=None, inputs_embeds=None, cache=None, length=None):
        """The final normed hidden states (b, l, d_model), what the LM head reads: a trainer that needs the logits
        of only some positions (the targets) applies `lm_head` to those alone. length (b,): the real positions of
        a right-padded batch (`Mamba2Mixer`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        residual = x.float() if self.config.residual_in_fp32 else x
        checkpointed = len(self.layers) if self.gradient_checkpointing is True else int(self.gradient_checkpointing)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if i < checkpointed and self.training and cache is None:
                residual = checkpoint(layer, residual, use_reentrant=False)
            else:
                residual = layer(residual, layer_cache, length)
        if cache is not None:
            cache.seqlen_offset += x.shape[1]
        return self.norm_f(residual)

    def prefill(self, cache, input_ids=None, inputs_embeds=None, length=None):
        """Run a prompt (b, l) into `cache`: the logits (b, padded_vocab) fp32 at each row's last real position.
        length (b,): the real lengths of a right-padded batch (default: every row is l long)."""
        hidden = self.hidden_states(input_ids, inputs_embeds, cache, length)  # (b, l, d_model)
        if length is None:
            return self.lm_head(hidden[:, -1]).float()
        last = hidden.gather(1, (length - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
        return self.lm_head(last).float()

    def step(self, token, cache):
        """One decoding step: token (b,) -> logits (b, padded_vocab) in fp32, the cache updated in place."""
        residual = self.embedding(token)  # (b, d_model)
        residual = residual.float() if self.config.residual_in_fp32 else residual
        for layer, layer_cache in zip(self.layers, cache.layers):
            residual = layer.step(residual, layer_cache.conv_state, layer_cache.ssm_state)
        cache.seqlen_offset += 1
        return self.lm_head(self.norm_f(residual)).float()

    @torch.no_grad()
    def generate(self, input_ids=None, inputs_embeds=None, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
                 eos_token_id=None, generator=None, on_token=None, cache=None, decoder=None):
        """Prefill the prompt once, then decode one token per step from the fixed-size cache. Returns the new tokens
        (b, <= max_new_tokens), a row padded with eos_token_id after it says it; stops when every row has.
        on_token(tokens (b,)) streams. cache: a Mamba2Cache to continue from (a conversation's earlier turns); on return
        it holds every new token but a final eos_token_id. decoder: what allocates the cache and runs the prefill and
        the steps (default: this model; `fast_decode.decoder_for(model)` gives the CUDA-graph one)."""
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got temperature "
                             f"{temperature}, top_k {top_k}, top_p {top_p})")
        decoder = decoder or self
        embeds = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds  # (b, l, d_model)
        batch_size = embeds.shape[0]
        cache = cache if cache is not None else decoder.allocate_cache(batch_size)
        logits = decoder.prefill(cache, inputs_embeds=embeds)  # (b, padded_vocab) at the last position
        finished = torch.zeros(batch_size, dtype=torch.bool, device=embeds.device)
        out = []
        for _ in range(max_new_tokens):
            logits = logits[:, :self.config.vocab_size]  # never sample the padding rows of the vocabulary
            token = sample_next_token(logits, temperature, top_k, top_p, generator)  # (b,)
            if eos_token_id is not None:
                token = token.masked_fill(finished, eos_token_id)
                finished |= token == eos_token_id
            out.append(token)
            if on_token is not None:
                on_token(token)
            if eos_token_id is not None and finished.all():
                break
            logits = decoder.step(token, cache)  # eq. 3 for one token, the cache updated in place
        return torch.stack(out, dim=1) if out else torch.zeros(batch_size, 0, dtype=torch.long, device=embeds.device)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a public Mamba-2 checkpoint: a local folder (config.json + model.safetensors, shards, or
        pytorch_model.bin) in the state-spaces or the transformers layout, or a hub repo id (needs huggingface_hub
        and the network)."""
        folder = resolve_folder(path, allow_patterns=["config.json", "*.safetensors", "*.json", "*.bin"])
        with config_errors(folder / "config.json"):
            fields, layout = mamba2_config_fields(read_config(folder))
            config = Mamba2Config(**fields)
        return load_on_meta(lambda: cls(config), read_tensors(folder, device), mamba2_key_map(config, layout),
                            ignore={"lm_head.weight"} if config.tie_embeddings else (),
                            source=f"Mamba-2 checkpoint {folder} ({layout} layout)", dtype=dtype, device=device)

    def save_pretrained(self, folder):
        """Save in the state-spaces layout (config.json + model.safetensors with mamba_ssm's names)."""
        c = self.config
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key_map = mamba2_key_map(c, "state-spaces")
        state = self.state_dict()
        save_safetensors({ck: state[ours] for ours, ck in key_map.items()}, folder / "model.safetensors")
        write_json(state_spaces_config(c), folder / "config.json")

