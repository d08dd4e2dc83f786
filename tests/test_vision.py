"""Vision encoders: parity with transformers on tiny checkpoints, preprocessing, the dual encoder."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from images import ImageError, load_image
from vision import (DINOV2_LARGE, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_SO400M_384, DualEncoder, ViT, ViTBlock, ViTConfig,
                    preprocess)
from weights import CheckpointError

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, patch_size=14)


def randomize(model):
    """Non-trivial values for tensors that init leaves constant (norms, LayerScale, tokens): transformers' names and
    ours (LayerScale ls1, ls2)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "lambda1", "ls1", "ls2", "token", "position")):
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def save(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    torch.manual_seed(0)
    hf = randomize(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(image_size=42, **SMALL)))
    return hf, save(hf, tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    torch.manual_seed(1)
    hf = randomize(transformers.Dinov2Model(transformers.Dinov2Config(image_size=42, mlp_ratio=2, **{
        k: v for k, v in SMALL.items() if k != "intermediate_size"})))
    return hf, save(hf, tmp_path_factory.mktemp("dinov2"))


def check_parity(hf_outputs, ours, pixels, prefix):
    with torch.no_grad():
        for layer, hidden in ((-2, hf_outputs.hidden_states[-2]), (0, hf_outputs.hidden_states[1]),
                              (None, hf_outputs.last_hidden_state)):
            torch.testing.assert_close(ours(pixels, layer=layer), hidden[:, prefix:], rtol=1e-5, atol=1e-5)


def test_siglip_vision_model_parity(siglip):
    hf, folder = siglip
    ours = ViT.from_pretrained(folder, input_size=42).eval()
    assert ours.config.kind == "siglip" and ours.config.num_patches == 9
    pixels = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        check_parity(hf(pixels, output_hidden_states=True), ours, pixels, prefix=0)


def test_full_siglip_model_loads_the_vision_tower_only(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.SiglipConfig(
        vision_config=dict(image_size=42, **SMALL),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=8))
    hf = randomize(transformers.SiglipModel(cfg))
    ours = ViT.from_pretrained(save(hf, tmp_path), input_size=42).eval()
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        check_parity(hf.vision_model(pixels, output_hidden_states=True), ours, pixels, prefix=0)


def test_dinov2_parity_with_position_interpolation(dinov2):
    hf, folder = dinov2
    ours = ViT.from_pretrained(folder, input_size=56).eval()  # trained for 42 px (3 x 3), run at 56 px (4 x 4)
    assert ours.config.num_prefix_tokens == 1 and ours.config.num_patches == 16
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        check_parity(hf(pixels, output_hidden_states=True), ours, pixels, prefix=1)
    # at the native size too (no interpolation)
    pixels = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        check_parity(hf(pixels, output_hidden_states=True), ViT.from_pretrained(folder, input_size=42).eval(),
                     pixels, prefix=1)


def test_dinov2_with_registers_parity(tmp_path):
    torch.manual_seed(3)
    cfg = transformers.Dinov2WithRegistersConfig(image_size=42, num_register_tokens=4, mlp_ratio=2,
                                                 **{k: v for k, v in SMALL.items() if k != "intermediate_size"})
    hf = randomize(transformers.Dinov2WithRegistersModel(cfg))
    ours = ViT.from_pretrained(save(hf, tmp_path), input_size=70).eval()
    assert ours.config.num_prefix_tokens == 5
    pixels = torch.randn(2, 3, 70, 70)
    with torch.no_grad():
        check_parity(hf(pixels, output_hidden_states=True), ours, pixels, prefix=5)


@pytest.mark.parametrize("family", ["siglip", "dinov2", "dinov2_with_registers"])
def test_a_smaller_input_than_the_checkpoints_matches_transformers_own_interpolation(family, tmp_path):
    """The paper's case for DINOv2 (trained at 518 px, used at 384): a transformers checkpoint of 70 px (a 5 x 5 grid)
    run at 42 px (3 x 3) equals the reference model's own position interpolation at 42 px (bicubic; antialiased for
    DINOv2 with registers, where antialiasing matters: the grid shrinks)."""
    torch.manual_seed(4)
    dino = dict(image_size=70, mlp_ratio=2, **{k: v for k, v in SMALL.items() if k != "intermediate_size"})
    hf = randomize({"siglip": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
                        image_size=70, **SMALL)),
                    "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(**dino)),
                    "dinov2_with_registers": lambda: transformers.Dinov2WithRegistersModel(
                        transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **dino))}[family]())
    ours = ViT.from_pretrained(save(hf, tmp_path), input_size=42).eval()
    pixels = torch.randn(2, 3, 42, 42)
    extra = {"interpolate_pos_encoding": True} if family == "siglip" else {}  # SigLIP resizes only when asked
    with torch.no_grad():
        check_parity(hf(pixels, output_hidden_states=True, **extra), ours, pixels, prefix=ours.config.num_prefix_tokens)


def test_bad_vision_checkpoints(dinov2, tmp_path):
    _, folder = dinov2
    from safetensors.torch import load_file, save_file
    sd = load_file(str(folder / "model.safetensors"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    sd.pop("encoder.layer.2.layer_scale2.lambda1")
    sd["encoder.layer.0.norm1.weight"] = torch.ones(31)
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        ViT.from_pretrained(bad)
    assert "missing tensors: encoder.layer.2.layer_scale2.lambda1" in str(e.value)
    assert "encoder.layer.0.norm1.weight: expected (32,), found (31,)" in str(e.value)
    (bad / "config.json").write_text('{"model_type": "clip_vision_model"}')
    with pytest.raises(CheckpointError, match="not a SigLIP or DINOv2"):
        ViT.from_pretrained(bad)
    with pytest.raises(ValueError, match=r"^square inputs only \(found a 3 x 2 patch grid\)$"):
        ViT.from_pretrained(folder, input_size=42)(torch.randn(1, 3, 42, 28))


# ---------------------------------------------------------------- preprocessing

def test_preprocess_known_values():
    img = Image.fromarray(np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], dtype=np.uint8))
    x = preprocess(img, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # same size: no resampling
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(x[:, 1, 1], torch.tensor([1.0, 1.0, 1.0]))
    y = preprocess(img, 2, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(y[:, 1, 0], torch.tensor([(0 - 0.485) / 0.229, (0 - 0.456) / 0.224,
                                                        (1 - 0.406) / 0.225]))


def test_preprocess_matches_transformers_image_processors():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (61, 47, 3), dtype=np.uint8))
    hf = transformers.SiglipImageProcessor(size={"height": 42, "width": 42})
    expected = torch.as_tensor(np.asarray(hf(img, return_tensors="np")["pixel_values"][0]))
    ours = preprocess(img, 42, (0.5,) * 3, (0.5,) * 3)
    # transformers 5.23 resizes with Pillow too (identical); some versions resize with torchvision, whose bicubic
    # rounds a few pixels to the next gray level: allow one level (2/255 in SigLIP's units), and only rarely
    torch.testing.assert_close(ours, expected, rtol=0, atol=2 / 255 + 1e-6)
    assert (ours - expected).abs().gt(1e-5).float().mean() < 0.01


def test_odd_image_modes(tmp_path):
    gray = Image.fromarray(np.full((3, 5), 100, dtype=np.uint8), mode="L")
    assert load_image(gray).getpixel((0, 0)) == (100, 100, 100)
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 255))
    rgba.putpixel((1, 1), (0, 0, 0, 0))  # transparent -> white background
    out = load_image(rgba)
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((1, 1)) == (255, 255, 255)
    pal = Image.new("P", (2, 2))
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 1)
    assert load_image(pal).getpixel((0, 0)) == (200, 100, 50)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): a 4 x 2 file is a 2 x 4 image
    img = Image.new("RGB", (4, 2), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    rotated = load_image(tmp_path / "rot.jpg")
    assert rotated.size == (2, 4)
    assert sum(rotated.getpixel((1, 0))) > 600  # the white corner moved to the top right


def test_bad_image_files_name_the_file(tmp_path):
    with pytest.raises(ImageError, match="image not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot read image .*junk.jpg"):
        load_image(tmp_path / "junk.jpg")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(tmp_path / "cut.png")


# ---------------------------------------------------------------- dual encoder

def test_dual_encoder_concatenates_in_order(siglip, dinov2):
    """Eq. 5: the dual encoder's output (by default, as ML-Mamba's config has it) is the reference models' own hidden
    states after the second-to-last block (transformers' hidden_states[-2]), patch tokens only, DINOv2's then
    SigLIP's on the feature axis."""
    from model import MLMambaConfig
    dino = ViT.from_pretrained(dinov2[1], input_size=42)
    sig = ViT.from_pretrained(siglip[1], input_size=42)
    enc = DualEncoder({"dinov2": dino, "siglip": sig}, layer=MLMambaConfig.vision_layer).freeze()
    assert enc.num_patches == 9 and enc.feature_dim == 64
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    px = {k: v[None] for k, v in enc.preprocess(img).items()}
    feats = enc(px)
    assert feats.shape == (1, 9, 64) and feats.grad_fn is None
    with torch.no_grad():
        dino_ref = dinov2[0](px["dinov2"], output_hidden_states=True).hidden_states[-2][:, 1:]  # class token out
        sig_ref = siglip[0](px["siglip"], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(feats[..., :32], dino_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(feats[..., 32:], sig_ref, rtol=1e-5, atol=1e-5)
    # frozen: no gradients, and eval mode survives .train()
    enc.train()
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.encoders["dinov2"].training
    with pytest.raises(KeyError, match="siglip"):
        enc({"dinov2": px["dinov2"]})


def test_a_trainable_dual_encoder_follows_the_grad_mode_and_reads_its_layer(siglip, dinov2):
    """Not frozen, the encoders build a graph where gradients are on and none under no_grad; `layer` picks the block
    whose output eq. 5 concatenates (here the last, before the final norm: transformers' hidden_states[-1])."""
    dino = ViT.from_pretrained(dinov2[1], input_size=42)
    sig = ViT.from_pretrained(siglip[1], input_size=42)
    enc = DualEncoder({"dinov2": dino, "siglip": sig}, layer=-1)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (42, 42, 3), dtype=np.uint8))
    px = {k: v[None] for k, v in enc.preprocess(img).items()}
    feats = enc(px)
    assert feats.requires_grad
    with torch.no_grad():
        assert not enc(px).requires_grad
        dino_ref = dinov2[0](px["dinov2"], output_hidden_states=True).hidden_states[-1][:, 1:]
        sig_ref = siglip[0](px["siglip"], output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(feats.detach(), torch.cat([dino_ref, sig_ref], -1), rtol=1e-5, atol=1e-5)


TINY_VIT = dict(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4)


def tiny_dual_encoder(device="cpu"):
    """A frozen DINOv2 (position embeddings for a 4 x 4 grid, resized to 3 x 3 at each forward) + SigLIP pair with
    non-trivial norms, LayerScale and class token."""
    torch.manual_seed(0)
    vits = {"dinov2": ViT(ViTConfig("dinov2", image_size=56, input_size=42, **TINY_VIT)),
            "siglip": ViT(ViTConfig("siglip", image_size=42, input_size=42, **TINY_VIT))}
    for vit in vits.values():
        randomize(vit)
    return DualEncoder(vits).freeze().to(device)


def test_compiled_encoders_give_the_eager_features(monkeypatch):
    """fast_decode.compile_encoders (train.py --compile): each ViT's embedding and each of its blocks run through one
    compiled function (Dynamo with the eager backend, so no compiler is needed here) that gives the eager features to
    the bit: one graph for each encoder's embedding (DINOv2's with its position embeddings resized) and one for each
    encoder's blocks; a second call traces nothing; on=False undoes it."""
    from torch._dynamo.utils import counters

    import fast_decode
    enc = tiny_dual_encoder()
    pixels = {name: torch.randn(2, 3, 42, 42) for name in enc.encoders}
    with torch.no_grad():
        eager = enc(pixels)
    torch._dynamo.reset()
    counters.clear()
    compiled = (torch.compile(ViT.embed, backend="eager"), torch.compile(ViTBlock.forward, backend="eager"))
    monkeypatch.setattr(fast_decode, "compiled_vit_forwards", lambda: compiled)
    fast_decode.compile_encoders(enc)
    with torch.no_grad():
        first, second = enc(pixels), enc(pixels)
    assert counters["stats"]["unique_graphs"] == 4
    fast_decode.compile_encoders(enc, False)
    assert not any("forward" in b.__dict__ for e in enc.encoders.values() for b in e.blocks)
    assert all("embed" not in e.__dict__ for e in enc.encoders.values())
    assert eager.abs().max() > 0.1
    for got in (first, second):
        torch.testing.assert_close(got, eager, rtol=0, atol=0)


@pytest.mark.gpu
def test_encoders_compiled_by_inductor_equal_the_eager_ones_on_cuda(monkeypatch):
    """fast_decode.compile_encoders with Inductor on CUDA, fp32 (TF32 off): the features equal the eager encoders'
    within 1e-5 of their largest value, DINOv2's position embeddings resized inside the compiled embedding."""
    import fast_decode
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    enc = tiny_dual_encoder("cuda")
    pixels = {name: torch.randn(2, 3, 42, 42, device="cuda") for name in enc.encoders}
    with torch.no_grad():
        eager = enc(pixels)
        try:
            torch._dynamo.reset()
            fast_decode.compiled_vit_forwards.cache_clear()
            fast_decode.compile_encoders(enc)
            compiled = enc(pixels)
        finally:
            fast_decode.compile_encoders(enc, False)
    assert float((compiled - eager).abs().max() / eager.abs().max()) < 1e-5


def test_paper_configuration_shapes_and_sizes():
    """DINOv2-L/14 + SigLIP so400m/14 at 384 px: 729 tokens of 1024 + 1152 features (meta tensors: no memory)."""
    with torch.device("meta"):
        dino, sig = ViT(DINOV2_LARGE), ViT(SIGLIP_SO400M_384)
        enc = DualEncoder({"dinov2": dino, "siglip": sig})
        out = enc({"dinov2": torch.empty(2, 3, 384, 384), "siglip": torch.empty(2, 3, 384, 384)})
    assert (enc.num_patches, enc.feature_dim, tuple(out.shape)) == (729, 2176, (2, 729, 2176))
    n_dino = sum(p.numel() for p in dino.parameters()) / 1e6
    n_sig = sum(p.numel() for p in sig.parameters()) / 1e6
    assert 303 < n_dino < 305 and 411 < n_sig < 414, (n_dino, n_sig)
    with pytest.raises(ValueError, match="different numbers of patches"):
        DualEncoder({"a": ViT(ViTConfig("siglip", image_size=28, hidden_size=8, intermediate_size=8, num_layers=1,
                                        num_heads=2, input_size=28)),
                     "b": ViT(ViTConfig("siglip", image_size=42, hidden_size=8, intermediate_size=8, num_layers=1,
                                        num_heads=2, input_size=42))})


# ---------------------------------------------------------------- timm-format checkpoints (the authors' release's)

TIMM_TINY = {  # architecture name -> tiny constructor arguments of the same family
    "vit_large_patch14_reg4_dinov2.lvd142m": dict(embed_dim=24, depth=3, num_heads=2, mlp_ratio=2, reg_tokens=4,
                                                  no_embed_class=True, img_size=42, patch_size=14, init_values=1e-5),
    "vit_large_patch14_dinov2.lvd142m": dict(embed_dim=24, depth=3, num_heads=2, mlp_ratio=2, img_size=42,
                                             patch_size=14, init_values=1e-5),
    "vit_so400m_patch14_siglip_384": dict(embed_dim=16, depth=3, num_heads=2, mlp_ratio=3.7362, class_token=False,
                                          img_size=42, patch_size=14, global_pool="map", act_layer="gelu_tanh"),
    "vit_large_patch14_clip_336": dict(embed_dim=16, depth=3, num_heads=2, mlp_ratio=4, img_size=42, patch_size=14,
                                       pre_norm=True, act_layer="quick_gelu", norm_layer=torch.nn.LayerNorm),
}


def tiny_timm_folder(timm, architecture, folder, img_size=42):
    """A tiny random timm VisionTransformer of a family the release uses, at img_size, saved as timm saves for the hub
    (config.json with "architecture" and "model_args", model.safetensors with timm's names, qkv fused)."""
    from safetensors.torch import save_file
    args = {**TIMM_TINY[architecture], "img_size": img_size}
    torch.manual_seed(2)
    model = timm.models.vision_transformer.VisionTransformer(num_classes=0, **args).eval()
    with torch.no_grad():  # non-trivial tokens, norms and LayerScale
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "gamma", "token", "pos_embed")):
                p.add_(0.2 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    model_args = {k: v for k, v in args.items() if k not in ("global_pool", "norm_layer")}  # not timm's JSON
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, "num_classes": 0,
                                                    "model_args": model_args}))
    return model


def assert_timm_parity(reference, ours, size):
    """Our block -2 patch tokens and final output equal timm's own forward (block -2 read by a forward hook)."""
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        second_to_last = []
        hook = reference.blocks[-2].register_forward_hook(lambda module, args, out: second_to_last.append(out))
        final = reference.forward_features(pixels)[:, reference.num_prefix_tokens:]
        hook.remove()
        expected = second_to_last[0][:, reference.num_prefix_tokens:]
        torch.testing.assert_close(ours(pixels, layer=-2), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(pixels, layer=None), final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", list(TIMM_TINY))
def test_timm_format_checkpoints_match_timms_forward(architecture, tmp_path):
    """A timm folder of each family the release uses: our layer -2 patch tokens and final output equal timm's own
    forward."""
    timm = pytest.importorskip("timm")
    model = tiny_timm_folder(timm, architecture, tmp_path)
    assert_timm_parity(model, ViT.from_pretrained(tmp_path, input_size=42).eval(), 42)


@pytest.mark.parametrize("architecture", ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_large_patch14_dinov2.lvd142m",
                                          "vit_so400m_patch14_siglip_384"])
def test_timm_checkpoints_at_another_size_match_timms_own_resizing(architecture, tmp_path):
    """The release's case (DINOv2 trained at 518 px, used at 384): a timm folder saved at 70 px (a 5 x 5 grid) and
    loaded at 42 px (3 x 3) equals timm's model created at 42 px with the checkpoint resized by timm's own
    checkpoint_filter_fn (resample_abs_pos_embed: bicubic with antialias, which matters when shrinking the grid)."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    saved = tiny_timm_folder(timm, architecture, tmp_path, img_size=70)
    reference = VisionTransformer(num_classes=0, **{**TIMM_TINY[architecture], "img_size": 42}).eval()
    reference.load_state_dict(checkpoint_filter_fn(saved.state_dict(), reference))
    ours = ViT.from_pretrained(tmp_path, input_size=42).eval()
    assert ours.config.image_size == 42  # resampled once, at load
    assert_timm_parity(reference, ours, 42)


def test_the_timm_architecture_table_matches_timm():
    """Each name of checkpoints.TIMM_ARCHITECTURES builds, in timm, the shapes our config reads from the table (meta
    tensors: no memory)."""
    timm = pytest.importorskip("timm")
    from checkpoints import TIMM_ARCHITECTURES, timm_layout
    for name in TIMM_ARCHITECTURES:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
        size = model.patch_embed.img_size[0]
        fields, key_map, _ = timm_layout({"architecture": name}, {}, input_size=size)
        config = ViTConfig(**fields)
        assert (config.hidden_size, config.num_layers, config.num_heads) == (model.embed_dim, len(model.blocks),
                                                                             model.blocks[0].attn.num_heads), name
        assert config.intermediate_size == model.blocks[0].mlp.fc1.out_features, name
        assert config.num_register_tokens == model.num_reg_tokens, name
        assert config.has_class_token == (model.cls_token is not None), name
        class_position = int(config.has_class_token and not config.no_embed_class)
        assert model.pos_embed.shape[1] == config.num_patches + class_position, name


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "F outside [0, 1]"])
def test_16_bit_32_bit_and_float_images_load_as_their_8_bit_twin(tmp_path, mode):
    """A grey image stored with 16-bit or 32-bit integers or floats loads as the same picture in 8 bits (PIL's own
    convert would clip it to white or black); floats outside [0, 1] by their own minimum and maximum."""
    grey = np.random.default_rng(0).integers(0, 256, (9, 7)).astype(np.uint8)
    grey[0, :2] = 0, 255  # the full range is present
    values = {"I;16": grey.astype(np.uint16) * 257, "I": grey.astype(np.int32) * 257,
              "F": grey.astype(np.float32) / 255, "F outside [0, 1]": grey.astype(np.float32) * 3 + 50}[mode]
    image = Image.fromarray(values)
    assert image.mode == mode.split()[0]
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")  # PNG holds 16 bits; 32-bit and float go in a TIFF
    image.save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (9, 7, 3) and np.array_equal(loaded[..., 0], grey) and np.array_equal(loaded[..., 2], grey)
