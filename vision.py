"""The vision encoders: one readable ViT covering SigLIP and DINOv2, their public checkpoints, image preprocessing,
and the dual encoder of ML-Mamba (paper eq. 5: V_img = [SigLIP(X); DINOv2(X)], concatenated along features).

A ViT: the image is cut into patch x patch squares (a Conv2d with stride = patch), each becomes a token; position
embeddings are added; pre-norm blocks  x + LS1 * Attn(LN(x)),  x + LS2 * MLP(LN(x))  follow; a final LayerNorm.
Where the two variants differ:
- SigLIP: no class token, GELU (tanh approximation) in the MLP, no LayerScale, "post_layernorm" at the end.
- DINOv2: a class token (and optionally register tokens, inserted after it), exact GELU, LayerScale (a learned
  per-channel factor on each residual branch), and position embeddings for 518 px (37 x 37) that are interpolated
  bicubically to the input's grid (27 x 27 at 384 px), as DINOv2 does.
ML-Mamba takes the patch tokens of the second-to-last block (`layer=-2`), without class/register tokens and without
the final norm, as Prismatic-style VLMs do.
"""

import math
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from checkpoints import vit_layout
from images import load_image
from weights import check_fields, config_errors, load_on_meta, read_config, read_tensors, resolve_folder

SIGLIP_MEAN, SIGLIP_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"),
               "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}  # CLIP's QuickGELU


@dataclass
class ViTConfig:
    kind: str = "siglip"  # "siglip", "dinov2" or "clip" (timm's CLIP ViT: a LayerNorm before the blocks, QuickGELU)
    image_size: int = 384  # the size the position embeddings were trained for
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    layer_norm_eps: float = 1e-6
    num_register_tokens: int = 0  # DINOv2 with registers: 4
    interpolate_antialias: bool = False  # DINOv2-with-registers interpolates with antialiasing, DINOv2 without
    input_size: int = 384  # the size images are resized to before encoding
    no_embed_class: bool = False  # timm's: the position embeddings cover the patches only, not the class token
    hidden_act: str = "auto"  # the MLP's: "gelu", "gelu_tanh" or "quick_gelu"; auto: SigLIP gelu_tanh, else gelu

    def __post_init__(self):
        check_fields(self, "ViTConfig", positive=("image_size", "patch_size", "hidden_size", "intermediate_size",
                                                  "num_layers", "num_heads", "layer_norm_eps", "input_size"),
                     nonnegative=("num_register_tokens",),
                     choices={"kind": ("siglip", "dinov2", "clip"), "hidden_act": ("auto", *ACTIVATIONS)})
        if self.kind == "siglip" and self.num_register_tokens:
            raise ValueError("SigLIP has no register tokens")

    @property
    def has_class_token(self):
        return self.kind != "siglip"

    @property
    def num_prefix_tokens(self):  # class + register tokens, removed from the output
        return int(self.has_class_token) + self.num_register_tokens

    @property
    def grid(self):  # patches per side of the input
        return self.input_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid ** 2

    @property
    def mean_std(self):
        return {"siglip": (SIGLIP_MEAN, SIGLIP_STD), "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
                "clip": (CLIP_MEAN, CLIP_STD)}[self.kind]


# The public checkpoints ML-Mamba uses, at the paper's 384 px input.
SIGLIP_SO400M_384 = ViTConfig("siglip", image_size=384, hidden_size=1152, intermediate_size=4304, num_layers=27,
                              num_heads=16)
DINOV2_LARGE = ViTConfig("dinov2", image_size=518, hidden_size=1024, intermediate_size=4096, num_layers=24,
                         num_heads=16)


# ----------------------------------------------------------------------------------------------------------------
# The ViT
# ----------------------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (b, t, d)
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.num_heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, (b, heads, t, head_dim)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class ViTBlock(nn.Module):
    def __init__(self, c: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c.hidden_size, c.num_heads)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        act = c.hidden_act if c.hidden_act != "auto" else ("gelu_tanh" if c.kind == "siglip" else "gelu")
        self.act = ACTIVATIONS[act]
        # LayerScale (DINOv2 only): learned per-channel scales of the two residual branches
        self.ls1 = nn.Parameter(torch.ones(c.hidden_size)) if c.kind == "dinov2" else None
        self.ls2 = nn.Parameter(torch.ones(c.hidden_size)) if c.kind == "dinov2" else None

    def forward(self, x):
        a = self.attn(self.norm1(x))
        x = x + (a * self.ls1 if self.ls1 is not None else a)
        m = self.fc2(self.act(self.fc1(self.norm2(x))))
        return x + (m * self.ls2 if self.ls2 is not None else m)


def interpolate_pos_embed(pos_embed, grid, antialias=False):
    """Bicubic resize of a square grid of position embeddings (1, n*n, d) to (1, grid*grid, d), in fp32: what
    transformers' `interpolate_pos_encoding` does at every forward (SigLIP and DINOv2 without antialias, DINOv2 with
    registers with it; tested against each), and timm's `resample_abs_pos_embed` once at load (antialias)."""
    n = math.isqrt(pos_embed.shape[1])
    if n == grid:
        return pos_embed
    d = pos_embed.shape[-1]
    p = pos_embed.reshape(1, n, n, d).permute(0, 3, 1, 2).float()  # (1, d, n, n)
    p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False, antialias=antialias)
    return p.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos_embed.dtype)


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        c = self.config = config
        self.patch_embed = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size,
                                     bias=c.kind != "clip")  # CLIP's patch projection has no bias
        n_pos = (c.image_size // c.patch_size) ** 2 + int(c.has_class_token and not c.no_embed_class)
        self.pos_embed = nn.Parameter(torch.empty(1, n_pos, c.hidden_size).normal_(std=0.02))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size)) if c.has_class_token else None
        self.register_tokens = (nn.Parameter(torch.zeros(1, c.num_register_tokens, c.hidden_size))
                                if c.num_register_tokens else None)
        self.norm_pre = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.kind == "clip" else None
        self.blocks = nn.ModuleList([ViTBlock(c) for _ in range(c.num_layers)])
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def embed(self, pixel_values):
        """(b, 3, H, W) -> tokens (b, prefix + H/patch * W/patch, d) with position embeddings."""
        c = self.config
        x = self.patch_embed(pixel_values)  # (b, d, H/p, W/p)
        gh, gw = x.shape[-2:]
        if gh != gw:
            raise ValueError(f"square inputs only (found a {gh} x {gw} patch grid)")
        x = x.flatten(2).transpose(1, 2)  # (b, N, d), patches in row-major order
        if self.cls_token is not None and not c.no_embed_class:  # the class token has a position of its own
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + torch.cat([self.pos_embed[:, :1], interpolate_pos_embed(self.pos_embed[:, 1:], gh,
                                                                             c.interpolate_antialias)], dim=1)
        else:  # positions for the patches only; the class token (timm's no_embed_class) comes after, without one
            x = x + interpolate_pos_embed(self.pos_embed, gh, c.interpolate_antialias)
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.register_tokens is not None:  # registers go after the class token and get no position
            x = torch.cat([x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
        return self.norm_pre(x) if self.norm_pre is not None else x

    def forward(self, pixel_values, layer=-2):
        """Patch tokens (b, N, d). layer: the block whose output to return (python indexing: -2 is the
        second-to-last), without the final norm; None runs every block and applies the final norm.
        Class and register tokens are removed either way."""
        x = self.embed(pixel_values)
        last = len(self.blocks) - 1 if layer is None else range(len(self.blocks))[layer]
        for block in self.blocks[:last + 1]:  # blocks after `layer` are not run at all
            x = block(x)
        if layer is None:
            x = self.norm(x)
        return x[:, self.config.num_prefix_tokens:]

    # ------------------------------------------------------------------------------------------------------------
    # Public checkpoints (transformers format: config.json + model.safetensors)
    # ------------------------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, input_size=384, dtype=torch.float32, device="cpu"):
        """google/siglip-so400m-patch14-384 (a full SigLIP: the text tower is ignored), a SigLIP vision model,
        facebook/dinov2-large, or a DINOv2 with registers. input_size: the resolution images are encoded at."""
        folder = resolve_folder(path, allow_patterns=["config.json", "*.safetensors", "*.json", "*.bin"])
        cfg = read_config(folder)
        tensors = read_tensors(folder)
        fields, key_map, ignore = vit_layout(cfg, tensors, input_size)  # the key maps: checkpoints.py
        with config_errors(folder / "config.json"):
            config = ViTConfig(**fields)
        model = load_on_meta(lambda: cls(config), tensors, key_map, ignore=ignore,
                             source=f"{config.kind} checkpoint {folder}")
        if "architecture" in cfg:  # timm's
            model.resample_pos_embed(input_size)
        return model.to(device=device, dtype=dtype)

    @torch.no_grad()
    def resample_pos_embed(self, input_size):
        """The position embeddings resampled once to input_size's grid, as timm does when it loads a checkpoint into a
        model of another size (`timm.layers.resample_abs_pos_embed` through `checkpoint_filter_fn`: bicubic with
        antialias, the class token's own position kept); the config's image_size becomes input_size, so a forward pass
        resamples nothing. (transformers' models resample at every forward instead: `embed`.)"""
        c = self.config
        if c.image_size == input_size:
            return
        prefix = int(c.has_class_token and not c.no_embed_class)
        grid = interpolate_pos_embed(self.pos_embed[:, prefix:], input_size // c.patch_size, antialias=True)
        self.pos_embed = nn.Parameter(torch.cat([self.pos_embed[:, :prefix], grid], dim=1),
                                      requires_grad=self.pos_embed.requires_grad)
        self.config = replace(c, image_size=input_size)


# ----------------------------------------------------------------------------------------------------------------
# Images: preprocessing (images.py reads the files)
# ----------------------------------------------------------------------------------------------------------------

def preprocess(image, size, mean, std):
    """RGB PIL image -> (3, size, size) float tensor: bicubic resize to size x size (no crop, the aspect ratio is
    not kept, as Prismatic's "resize-naive"), scale to [0, 1], then (x - mean) / std per channel."""
    image = image.resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# ----------------------------------------------------------------------------------------------------------------
# The dual encoder (paper eq. 5)
# ----------------------------------------------------------------------------------------------------------------

class DualEncoder(nn.Module):
    """Several ViTs on the same image, patch features concatenated along the feature axis (paper eq. 5).

    encoders: {name: ViT}; the concatenation follows this order. Eq. 5 writes SigLIP first; the models here put
    DINOv2 first, as Prismatic's "dinosiglip" backbone (which the authors' release uses) does. The order only permutes
    the feature axis, which the connector's first layer reads whole: at 384 px, (b, 729, 1024 + 1152). A single
    encoder works the same way.
    Every encoder must produce the same number of patches (same input grid).
    """

    def __init__(self, encoders, layer=-2):
        super().__init__()
        if not encoders:
            raise ValueError("DualEncoder needs at least one encoder")
        self.encoders = nn.ModuleDict(encoders)
        self.layer = layer
        grids = {name: e.config.num_patches for name, e in encoders.items()}
        if len(set(grids.values())) != 1:
            raise ValueError(f"the encoders give different numbers of patches: {grids}; use the same input_size "
                             "and a patch size that divides it the same way")
        self.num_patches = next(iter(grids.values()))
        self.feature_dim = sum(e.config.hidden_size for e in encoders.values())
        self.frozen = False

    def freeze(self, frozen=True):
        """Frozen: eval mode and no gradients (both of ML-Mamba's training stages keep the encoders frozen)."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        self.train(self.training)
        return self

    def train(self, mode=True):
        super().train(mode and not self.frozen)  # a frozen encoder stays in eval mode
        self.training = mode
        return self

    def preprocess(self, image):
        """A path or PIL image -> {name: (3, size, size)} with each encoder's own size and normalization."""
        image = load_image(image)
        return {name: preprocess(image, e.config.input_size, *e.config.mean_std) for name, e in self.encoders.items()}

    def forward(self, pixel_values):
        """pixel_values: {name: (b, 3, size, size)} -> (b, num_patches, feature_dim)."""
        feats = []
        for name, encoder in self.encoders.items():
            if name not in pixel_values:
                raise KeyError(f"no pixel values for encoder {name!r} (got {sorted(pixel_values)})")
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                pixels = pixel_values[name].to(encoder.patch_embed.weight.dtype)  # e.g. fp32 pixels, bf16 model
                feats.append(encoder(pixels, layer=self.layer))
        return torch.cat(feats, dim=-1)  # eq. 5, (b, num_patches, feature_dim)
