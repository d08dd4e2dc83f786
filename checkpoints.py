"""The public checkpoint formats: how each one's config.json and tensor names map onto this project's models.

Plain translation, no model code: each function reads a checkpoint's config (a dict) and returns the fields of our
config as a dict, and the key map {our parameter name: the checkpoint's name}; the model files build their configs
from those fields and load through `weights.match_tensors`, which checks names and shapes both ways.
- Mamba-2 (mamba2.py): state-spaces/mamba2-* (mamba_ssm's names) and transformers' Mamba2.
- ViTs (vision.py): transformers' SigLIP and DINOv2 (with or without registers), and timm's ViTs (the release's).
- The authors' release's latest-checkpoint.pt (convert_release.py).
"""

from weights import CheckpointError


# ----------------------------------------------------------------------------------------------------------------
# Mamba-2
# ----------------------------------------------------------------------------------------------------------------

def _json_float(v):
    """transformers >= 5 writes non-finite floats as {"__float__": "Infinity"}; older versions as Infinity."""
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


def mamba2_config_fields(cfg):
    """(Mamba2Config's fields as a dict, layout) from a Mamba-2 checkpoint's config.json; layout is "state-spaces" or
    "hf". A missing field is a KeyError, a wrong one a ValueError (`weights.config_errors` names the file)."""
    if "d_model" in cfg and "n_layer" in cfg:  # mamba_ssm's MambaConfig
        ssm = cfg.get("ssm_cfg", {})
        if not isinstance(ssm, dict):
            raise ValueError(f"ssm_cfg must be an object, not {ssm!r}")
        if ssm.get("layer", "Mamba1") != "Mamba2":
            raise CheckpointError("this is a Mamba-1 checkpoint (ssm_cfg.layer is not 'Mamba2'); use a mamba2-* one")
        if cfg.get("d_intermediate", 0) or cfg.get("attn_layer_idx") or not cfg.get("rms_norm", True):
            raise CheckpointError("hybrid checkpoints (MLP or attention layers, or LayerNorm) are not supported: "
                                  "d_intermediate must be 0, attn_layer_idx empty, rms_norm true")
        if ssm.get("D_has_hdim") or not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate"):
            raise CheckpointError("unsupported Mamba2 options in ssm_cfg (D_has_hdim, rmsnorm=false or "
                                  "norm_before_gate=true)")
        config = dict(
            d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
            pad_vocab_size_multiple=cfg.get("pad_vocab_size_multiple", 8),
            tie_embeddings=cfg.get("tie_embeddings", True), residual_in_fp32=cfg.get("residual_in_fp32", True),
            d_state=ssm.get("d_state", 128), d_conv=ssm.get("d_conv", 4), expand=ssm.get("expand", 2),
            headdim=ssm.get("headdim", 64), ngroups=ssm.get("ngroups", 1), chunk_size=ssm.get("chunk_size", 256),
            bias=ssm.get("bias", False), conv_bias=ssm.get("conv_bias", True),
            dt_limit=tuple(_json_float(v) for v in ssm.get("dt_limit", (0.0, float("inf")))))
        return config, "state-spaces"
    if cfg.get("model_type") == "mamba2" or "num_heads" in cfg:  # transformers' Mamba2Config
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if cfg["num_heads"] * cfg["head_dim"] != cfg["expand"] * cfg["hidden_size"]:
            raise CheckpointError(f"config.json: num_heads * head_dim ({cfg['num_heads'] * cfg['head_dim']}) must "
                                  f"equal expand * hidden_size ({cfg['expand'] * cfg['hidden_size']})")
        config = dict(
            d_model=cfg["hidden_size"], n_layer=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"],
            pad_vocab_size_multiple=1,  # HF's vocab_size is already the embedding's size
            tie_embeddings=cfg.get("tie_word_embeddings", False), residual_in_fp32=cfg.get("residual_in_fp32", True),
            d_state=cfg["state_size"], d_conv=cfg["conv_kernel"], expand=cfg["expand"], headdim=cfg["head_dim"],
            ngroups=cfg["n_groups"], chunk_size=cfg.get("chunk_size", 256), norm_eps=cfg["layer_norm_epsilon"],
            bias=cfg.get("use_bias", False), conv_bias=cfg.get("use_conv_bias", True),
            dt_limit=tuple(_json_float(v) for v in cfg.get("time_step_limit", (0.0, float("inf")))))
        return config, "hf"
    raise CheckpointError("config.json is neither a state-spaces Mamba-2 config (d_model, n_layer, ssm_cfg) nor a "
                          "transformers Mamba2 config (model_type 'mamba2')")


def state_spaces_config(c):
    """A Mamba2Config as mamba_ssm's config.json (MambaConfig) writes it: the state-spaces layout."""
    ssm_cfg = dict(layer="Mamba2", d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, headdim=c.headdim,
                   ngroups=c.ngroups, chunk_size=c.chunk_size, bias=c.bias, conv_bias=c.conv_bias)
    if c.dt_limit != (0.0, float("inf")):
        ssm_cfg["dt_limit"] = list(c.dt_limit)
    return dict(d_model=c.d_model, d_intermediate=0, n_layer=c.n_layer, vocab_size=c.vocab_size, ssm_cfg=ssm_cfg,
                attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=c.residual_in_fp32,
                fused_add_norm=True, pad_vocab_size_multiple=c.pad_vocab_size_multiple,
                tie_embeddings=c.tie_embeddings)


def mamba2_key_map(config, layout):
    """Our parameter name -> the checkpoint's name of the same tensor, for every tensor of a Mamba2LMHeadModel with
    this config (a Mamba2Config).

    The two public layouts differ only in the embedding's name; mixer tensors keep their names:
      in_proj.weight  (2 d_inner + 2 g n + h, d_model)  rows in the order [z, x, B, C, dt]
      conv1d.weight   (conv_dim, 1, d_conv), conv1d.bias (conv_dim,)
      dt_bias, A_log, D  (h,)
      norm.weight     (d_inner,)  the gated RMSNorm
      out_proj.weight (d_model, d_inner)
    """
    embedding = {"state-spaces": "backbone.embedding.weight", "hf": "backbone.embeddings.weight"}[layout]
    names = {"embedding.weight": embedding, "norm_f.weight": "backbone.norm_f.weight"}
    mixer = ["in_proj.weight", "conv1d.weight", "dt_bias", "A_log", "D", "norm.weight", "out_proj.weight"]
    if config.conv_bias:
        mixer.append("conv1d.bias")
    if config.bias:
        mixer += ["in_proj.bias", "out_proj.bias"]
    for i in range(config.n_layer):
        names[f"layers.{i}.norm.weight"] = f"backbone.layers.{i}.norm.weight"
        for t in mixer:
            names[f"layers.{i}.mixer.{t}"] = f"backbone.layers.{i}.mixer.{t}"
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


# ----------------------------------------------------------------------------------------------------------------
# ViTs: SigLIP and DINOv2 (transformers), timm's
# ----------------------------------------------------------------------------------------------------------------

def _block_key_map(num_layers, renames, prefix):
    """blocks.{i}.{ours}.{weight|bias} -> {prefix}{i}.{theirs}.{weight|bias} for every block and every rename."""
    return {f"blocks.{i}.{ours}.{t}": f"{prefix}{i}.{theirs}.{t}"
            for i in range(num_layers) for ours, theirs in renames.items() for t in ("weight", "bias")}


def vit_layout(cfg, tensors, input_size):
    """(ViTConfig's fields as a dict, key map {our name: checkpoint name}, names to ignore) for a transformers-format
    SigLIP or DINOv2 checkpoint, or a timm-format one (`timm_layout`). `tensors` may be reshaped or split in place to
    our layout."""
    if "architecture" in cfg:
        return timm_layout(cfg, tensors, input_size)
    model_type = cfg.get("model_type")
    if model_type in ("siglip", "siglip_vision_model"):
        vc = cfg.get("vision_config", {}) if model_type == "siglip" else cfg
        # A full SigLIP and older vision-only saves put the vision tower under "vision_model."; newer ones don't.
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
        if vc.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise CheckpointError(f"SigLIP hidden_act {vc['hidden_act']!r} is not supported")
        config = dict(kind="siglip", image_size=vc.get("image_size", 224), patch_size=vc.get("patch_size", 16),
                      hidden_size=vc.get("hidden_size", 768), intermediate_size=vc.get("intermediate_size", 3072),
                      num_layers=vc.get("num_hidden_layers", 12), num_heads=vc.get("num_attention_heads", 12),
                      layer_norm_eps=vc.get("layer_norm_eps", 1e-6), input_size=input_size)
        p = prefix
        key_map = {"patch_embed.weight": p + "embeddings.patch_embedding.weight",
                   "patch_embed.bias": p + "embeddings.patch_embedding.bias",
                   "pos_embed": p + "embeddings.position_embedding.weight",
                   "norm.weight": p + "post_layernorm.weight", "norm.bias": p + "post_layernorm.bias"}
        block = {"norm1": "layer_norm1", "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
                 "attn.v": "self_attn.v_proj", "attn.proj": "self_attn.out_proj", "norm2": "layer_norm2",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        key_map.update(_block_key_map(config["num_layers"], block, p + "encoder.layers."))
        # not used: the attention-pooling head, the text tower, the contrastive logit scale and bias
        ignore = {k for k in tensors if k.startswith((p + "head.", "text_model.", "logit_"))}
        if key_map["pos_embed"] in tensors:  # nn.Embedding (N, d) in the checkpoint; ours carries a batch axis
            tensors[key_map["pos_embed"]] = tensors[key_map["pos_embed"]][None]
        return config, key_map, ignore
    if model_type in ("dinov2", "dinov2_with_registers"):
        if cfg.get("use_swiglu_ffn"):
            raise CheckpointError("DINOv2 with a SwiGLU MLP (the giant model) is not supported")
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"DINOv2 hidden_act {cfg['hidden_act']!r} is not supported")
        hidden = cfg.get("hidden_size", 768)
        config = dict(kind="dinov2", image_size=cfg.get("image_size", 518), patch_size=cfg.get("patch_size", 14),
                      hidden_size=hidden, intermediate_size=int(hidden * cfg.get("mlp_ratio", 4)),
                      num_layers=cfg.get("num_hidden_layers", 12), num_heads=cfg.get("num_attention_heads", 12),
                      layer_norm_eps=cfg.get("layer_norm_eps", 1e-6),
                      num_register_tokens=cfg.get("num_register_tokens", 0) if model_type != "dinov2" else 0,
                      interpolate_antialias=model_type == "dinov2_with_registers", input_size=input_size)
        key_map = {"patch_embed.weight": "embeddings.patch_embeddings.projection.weight",
                   "patch_embed.bias": "embeddings.patch_embeddings.projection.bias",
                   "pos_embed": "embeddings.position_embeddings", "cls_token": "embeddings.cls_token",
                   "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
        if config["num_register_tokens"]:
            key_map["register_tokens"] = "embeddings.register_tokens"
        block = {"norm1": "norm1", "attn.q": "attention.attention.query", "attn.k": "attention.attention.key",
                 "attn.v": "attention.attention.value", "attn.proj": "attention.output.dense", "norm2": "norm2",
                 "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
        key_map.update(_block_key_map(config["num_layers"], block, "encoder.layer."))
        for i in range(config["num_layers"]):
            key_map[f"blocks.{i}.ls1"] = f"encoder.layer.{i}.layer_scale1.lambda1"
            key_map[f"blocks.{i}.ls2"] = f"encoder.layer.{i}.layer_scale2.lambda1"
        ignore = {"embeddings.mask_token"}  # used only by DINOv2's masked pre-training
        return config, key_map, ignore
    raise CheckpointError(f"config.json model_type {model_type!r} is not a SigLIP or DINOv2 checkpoint (expected "
                          "'siglip', 'siglip_vision_model', 'dinov2' or 'dinov2_with_registers')")


# timm's names for the encoders the authors' release and its parents (Prismatic, Cobra) use, with the constructor
# arguments they stand for; a config.json with "model_args" (timm's own) overrides them.
TIMM_ARCHITECTURES = {
    "vit_large_patch14_reg4_dinov2": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, reg_tokens=4,
                                          no_embed_class=True, img_size=518, patch_size=14, init_values=1e-5),
    "vit_large_patch14_dinov2": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, img_size=518, patch_size=14,
                                     init_values=1e-5),
    "vit_so400m_patch14_siglip_384": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, class_token=False,
                                          img_size=384, patch_size=14),
    "vit_large_patch14_clip_336": dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, img_size=336,
                                       patch_size=14, pre_norm=True),
}


def timm_layout(cfg, tensors, input_size):
    """(ViTConfig's fields as a dict, key map, names to ignore) for a timm-format folder: config.json {"architecture":
    name, optionally "model_args"} + model.safetensors with timm's names. timm fuses q, k and v into one qkv
    projection: its rows are split here, in place, into three tensors the key map names ("blocks.0.attn.qkv.weight[q]",
    ...)."""
    name = cfg["architecture"].split(".")[0]  # "vit_large_patch14_reg4_dinov2.lvd142m" -> the architecture
    kind = next((k for k in ("dinov2", "siglip", "clip") if k in name), None)
    args = {**TIMM_ARCHITECTURES.get(name, {}), **cfg.get("model_args", {})}
    if kind is None or "embed_dim" not in args:
        raise CheckpointError(f"timm architecture {cfg['architecture']!r} is not one this project reads: "
                              f"{', '.join(TIMM_ARCHITECTURES)} (or give its model_args in config.json)")
    d, depth = args["embed_dim"], args["depth"]
    config = dict(kind=kind, image_size=args.get("img_size", 224), patch_size=args.get("patch_size", 16),
                  hidden_size=d, intermediate_size=int(d * args.get("mlp_ratio", 4)), num_layers=depth,
                  num_heads=args["num_heads"], num_register_tokens=args.get("reg_tokens", 0),
                  no_embed_class=args.get("no_embed_class", False), input_size=input_size,
                  hidden_act=args.get("act_layer", "gelu"),  # timm's default is exact GELU, SigLIP's too
                  layer_norm_eps=1e-5 if kind == "clip" else 1e-6,  # timm's CLIP towers: nn.LayerNorm
                  interpolate_antialias=True)  # timm's resample_abs_pos_embed (ViT.resample_pos_embed)
    has_class_token = kind != "siglip"
    if has_class_token != args.get("class_token", True) or (kind == "clip") != args.get("pre_norm", False):
        raise CheckpointError(f"timm {name}: a class token / pre-norm other than a {kind} ViT's is not supported")
    if config["num_register_tokens"] and not config["no_embed_class"]:
        raise CheckpointError(f"timm {name}: register tokens with position embeddings are not supported")
    key_map = {"patch_embed.weight": "patch_embed.proj.weight", "pos_embed": "pos_embed", "norm.weight": "norm.weight",
               "norm.bias": "norm.bias"}
    key_map.update({"patch_embed.bias": "patch_embed.proj.bias"} if kind != "clip" else {})
    key_map.update({"cls_token": "cls_token"} if has_class_token else {})
    key_map.update({"register_tokens": "reg_token"} if config["num_register_tokens"] else {})
    key_map.update({f"norm_pre.{t}": f"norm_pre.{t}" for t in ("weight", "bias")} if kind == "clip" else {})
    block = {"norm1": "norm1", "attn.proj": "attn.proj", "norm2": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    key_map.update(_block_key_map(depth, block, "blocks."))
    for i in range(depth):
        for t in ("weight", "bias"):
            fused = f"blocks.{i}.attn.qkv.{t}"
            if fused in tensors:  # rows [q; k; v], each d
                for part, rows in zip("qkv", tensors.pop(fused).split(d)):
                    tensors[f"{fused}[{part}]"] = rows
            key_map.update({f"blocks.{i}.attn.{part}.{t}": f"{fused}[{part}]" for part in "qkv"})
        if kind == "dinov2":
            key_map.update({f"blocks.{i}.ls{j}": f"blocks.{i}.ls{j}.gamma" for j in (1, 2)})
    ignore = {k for k in tensors if k.startswith(("attn_pool.", "head.", "fc_norm."))}  # pooling / classifier heads
    return config, key_map, ignore


# ----------------------------------------------------------------------------------------------------------------
# The authors' release
# ----------------------------------------------------------------------------------------------------------------

def release_key_map(config):
    """Our name -> the release's name ("group.name", the groups of its latest-checkpoint.pt's "model" dict) for every
    trained tensor of an ML-Mamba (config: an MLMambaConfig) with the msc-release connector: the LM (in mamba_ssm's
    names), the lift ("mlp"), the Bidirectional_Mamba and the fused projector. The release's SwiGLU calls its gate
    pair w1, w2 and its output w3; ours (LLaMA's names) w1, w3 and w2."""
    lm = mamba2_key_map(config.lm, "state-spaces")
    names = {f"lm.{ours}": f"llm_backbone.{theirs}" for ours, theirs in lm.items()}
    names.update({"connector.lift.weight": "mlp.0.weight", "connector.lift.bias": "mlp.0.bias"})
    for ours, theirs in (("fc1", "0"), ("fc2", "2"), ("fc3", "4")):
        for t in ("weight", "bias"):
            names[f"connector.projector.{ours}.{t}"] = f"projector.projector.{theirs}.{t}"
    c = config.connector.mixer
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d_b.weight", "dt_bias", "dt_bias_b", "A_log", "A_log_b", "D",
             "D_b", "norm.weight", "out_proj.weight"]
    mixer += ["conv1d.bias", "conv1d_b.bias"] if c.conv_bias else []
    mixer += ["in_proj.bias", "out_proj.bias"] if c.bias else []
    for i in range(config.connector.n_layers):
        ours, theirs = f"connector.msc.blocks.{i}", f"bidirectional_mamba.layers.{i}"
        names.update({f"{ours}.mixer.{t}": f"{theirs}.mixer.{t}" for t in mixer})
        for t in ("weight", "bias"):
            names[f"{ours}.norm.{t}"] = f"{theirs}.norm.{t}"
            for our_w, their_w in (("w1", "w1"), ("w3", "w2"), ("w2", "w3")):
                names[f"{ours}.mlp.{our_w}.{t}"] = f"{theirs}.mlp.{their_w}.{t}"
    names.update({f"connector.msc.norm.{t}": f"bidirectional_mamba.norm_f.{t}" for t in ("weight", "bias")})
    return names
