"""The Mamba-2 LM: parity with transformers on tiny public-format checkpoints, cached decoding, loading errors."""

import importlib.util
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoints import mamba2_key_map
from mamba2 import LayerCache, Mamba2Block, Mamba2Config, Mamba2LMHeadModel, mamba2_preset, sample_next_token
from weights import CheckpointError, load_tokenizer

TINY = dict(d_model=32, n_layer=2, vocab_size=100, d_state=16, headdim=8, ngroups=2, chunk_size=16,
            pad_vocab_size_multiple=16)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Mamba2LMHeadModel(Mamba2Config(**{**TINY, **kw})).eval()


# ---------------------------------------------------------------- parity with transformers

def gated_norm_is_per_group(norm, n_groups):
    """Whether a reference gated RMSNorm normalizes each group on its own, told by its output, not by its name."""
    width = norm.weight.numel()
    x = torch.randn(1, width) * torch.logspace(0, 2, n_groups).repeat_interleave(width // n_groups)  # unequal scales
    with torch.no_grad():
        got = norm(x, torch.full_like(x, 20.0)) / norm.weight  # SiLU(20) = 20 to fp32 round-off
    g = (x * 20).view(1, n_groups, -1)
    per_group = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(1, width)
    return torch.allclose(got, per_group, rtol=1e-3, atol=1e-3)


def tiny_hf_mamba2(tmp_path_factory, n_groups):
    """A tiny random transformers Mamba2ForCausalLM saved with save_pretrained (safetensors)."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("mamba_ssm") is not None:  # e.g. on a GPU machine
        pytest.skip("with mamba-ssm installed, transformers runs its CPU reference through mamba-ssm's Triton "
                    "kernels, which need CUDA tensors")
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_heads=8, head_dim=8,
                                    expand=2, state_size=16, n_groups=n_groups, conv_kernel=4, chunk_size=16,
                                    tie_word_embeddings=False)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    if n_groups > 1 and not gated_norm_is_per_group(hf.backbone.layers[0].mixer.norm, n_groups):
        pytest.skip("this transformers version normalizes Mamba2's gated RMSNorm over all groups at once; "
                    "mamba-ssm (and so the public checkpoints) normalize each group, as newer transformers do")
    with torch.no_grad():  # non-trivial values for the tensors that init leaves at 1 or 0
        for name, p in hf.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "conv1d.bias", ".D")):
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(f"hf_mamba2_g{n_groups}")
    hf.save_pretrained(folder, safe_serialization=True)
    return hf, folder


@pytest.fixture(scope="module", params=[1, 2], ids=["1group", "2groups"])
def hf_checkpoint(tmp_path_factory, request):
    return tiny_hf_mamba2(tmp_path_factory, request.param)


def test_hf_checkpoint_loads_with_identical_logits(hf_checkpoint):
    hf, folder = hf_checkpoint
    assert (folder / "model.safetensors").is_file()
    ours = Mamba2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 96, (2, 37))  # 37: not a multiple of chunk_size 16
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sharded_safetensors_load(hf_checkpoint, tmp_path):
    hf, _ = hf_checkpoint
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    ours = Mamba2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_state_spaces_layout_as_pytorch_model_bin_loads(hf_checkpoint, tmp_path):
    """The same weights renamed to mamba_ssm's names, saved as pytorch_model.bin with a state-spaces config.json."""
    hf, _ = hf_checkpoint
    c = hf.config
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(dict(
        d_model=c.hidden_size, d_intermediate=0, n_layer=c.num_hidden_layers, vocab_size=c.vocab_size,
        ssm_cfg=dict(layer="Mamba2", d_state=c.state_size, d_conv=c.conv_kernel, expand=c.expand,
                     headdim=c.head_dim, ngroups=c.n_groups, chunk_size=c.chunk_size),
        attn_layer_idx=[], attn_cfg={}, rms_norm=True, residual_in_fp32=True, fused_add_norm=True,
        pad_vocab_size_multiple=16, tie_embeddings=False)))
    ours = Mamba2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 96, (1, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_cached_generation_matches(hf_checkpoint):
    hf, folder = hf_checkpoint
    ours = Mamba2LMHeadModel.from_pretrained(folder).eval()
    ids = torch.randint(0, 96, (1, 19))
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12, eos_token_id=None,
                      pad_token_id=0)[:, 19:]
    assert torch.equal(ours.generate(ids, max_new_tokens=12), ref)


# ---------------------------------------------------------------- our own save / load and the state-spaces layout

def test_save_pretrained_round_trip_in_state_spaces_layout(tmp_path):
    model = tiny_model(seed=3, vocab_size=90)  # padded to 96 in the embedding
    assert model.embedding.weight.shape == (96, 32)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["vocab_size"] == 90 and cfg["tie_embeddings"]
    loaded = Mamba2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.embedding.weight  # tied again
    ids = torch.randint(0, 90, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_key_map_lists_every_tensor():
    model = tiny_model()
    key_map = mamba2_key_map(model.config, "state-spaces")
    assert set(key_map) == set(model.state_dict()) - {"lm_head.weight"}  # tied: lm_head is the embedding
    assert key_map["layers.1.mixer.A_log"] == "backbone.layers.1.mixer.A_log"
    assert mamba2_key_map(model.config, "hf")["embedding.weight"] == "backbone.embeddings.weight"


def test_bad_checkpoints_fail_clearly(tmp_path):
    model = tiny_model()
    good = tmp_path / "good"
    model.save_pretrained(good)
    from safetensors.torch import load_file, save_file
    sd = load_file(str(good / "model.safetensors"))

    def variant(name, tensors):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text((good / "config.json").read_text())
        save_file(tensors, str(folder / "model.safetensors"))
        return folder

    missing = variant("missing", {k: v for k, v in sd.items() if k != "backbone.layers.1.mixer.D"})
    with pytest.raises(CheckpointError, match=r"missing tensors: backbone\.layers\.1\.mixer\.D"):
        Mamba2LMHeadModel.from_pretrained(missing)
    extra = variant("extra", {**sd, "backbone.layers.7.mixer.D": torch.zeros(8)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: backbone\.layers\.7\.mixer\.D"):
        Mamba2LMHeadModel.from_pretrained(extra)
    shape = variant("shape", {**sd, "backbone.norm_f.weight": torch.ones(31)})
    with pytest.raises(CheckpointError, match=r"backbone\.norm_f\.weight: expected \(32,\), found \(31,\)"):
        Mamba2LMHeadModel.from_pretrained(shape)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((good / "config.json").read_text())
    data = (good / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Mamba2LMHeadModel.from_pretrained(truncated)
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "nope")
    (tmp_path / "mamba1").mkdir()
    (tmp_path / "mamba1" / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 10,
                                                                 "ssm_cfg": {}}))
    with pytest.raises(CheckpointError, match="Mamba-1 checkpoint"):
        Mamba2LMHeadModel.from_pretrained(tmp_path / "mamba1")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_chunked_reads_give_the_files_bytes(tmp_path, monkeypatch, device):
    """weights.read_bytes: several threads, each alternating between two buffers, fill one buffer with the file's
    bytes [offset, offset + size), in chunks of a size that does not divide it; a file that ends early is an error."""
    import weights
    data = torch.randint(0, 256, (10_007,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (tmp_path / "f.bin").write_bytes(data.numpy().tobytes())
    monkeypatch.setattr(weights, "READ_CHUNK", 333)
    monkeypatch.setattr(weights, "READ_THREADS", 3)
    got = weights.read_bytes(tmp_path / "f.bin", 17, 9_000, device)
    assert got.device.type == device and torch.equal(got.cpu(), data[17:9_017])
    assert weights.read_bytes(tmp_path / "f.bin", 5, 0, device).numel() == 0
    with pytest.raises(ValueError, match="the file ends 10 bytes early"):
        weights.read_bytes(tmp_path / "f.bin", 17, 10_000, device)


def test_the_one_buffer_reader_equals_safetensors_own(hf_checkpoint, tmp_path):
    """weights.load_safetensors_to (a GPU load's reader: the data section read into one buffer, each tensor a view)
    gives safetensors' own load_file, to the bit, on transformers' file and on one with every dtype, odd sizes, a 0-d
    and an empty tensor and metadata; the written values of a file laid out by hand with unaligned offsets; a dtype
    it does not read, and a truncated file, are CheckpointErrors that say so."""
    from safetensors.torch import load_file, save_file
    from weights import load_safetensors_to, read_tensors
    _, folder = hf_checkpoint
    odd = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "f16": torch.randn(2, 3).half(),
           "i64": torch.arange(5), "i8": torch.tensor([-3, 4], dtype=torch.int8), "bool": torch.tensor(True),
           "f64": torch.randn(3, dtype=torch.float64), "empty": torch.zeros(0, 4)}
    save_file(odd, str(tmp_path / "odd.safetensors"), metadata={"format": "pt"})
    for file in (folder / "model.safetensors", tmp_path / "odd.safetensors"):
        expected, got = load_file(str(file)), load_safetensors_to(file, "cpu")
        assert got.keys() == expected.keys()
        for k, v in expected.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    by_hand = {"one": torch.tensor([7], dtype=torch.int8), "odd": torch.randn(3).bfloat16(), "f32": torch.randn(2, 2)}
    header, body = {}, b""
    for k, v in by_hand.items():  # back to back, unsorted: "odd" starts at byte 1, "f32" at 7
        raw = v.view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": {torch.int8: "I8", torch.bfloat16: "BF16"}.get(v.dtype, "F32"), "shape": list(v.shape),
                     "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    head = json.dumps(header).encode()
    (tmp_path / "by_hand.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + body)
    got = load_safetensors_to(tmp_path / "by_hand.safetensors", "cpu")
    assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in by_hand.items())
    header["one"]["dtype"] = "F4"  # a dtype the reader does not know: named, with the way out
    head = json.dumps(header).encode()
    (tmp_path / "by_hand.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + body)
    with pytest.raises(CheckpointError, match="tensor 'one' is stored as F4, which this loader does not read"):
        load_safetensors_to(tmp_path / "by_hand.safetensors", "cpu")
    data = (folder / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_tensors(tmp_path, device="meta")
    (tmp_path / "model.safetensors").write_bytes(data[:6])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_tensors(tmp_path, device="meta")


def test_importing_the_model_and_loading_a_checkpoint_pull_in_no_compiler(hf_checkpoint):
    """The teaching files and generate.py's speed-ups import neither torch._dynamo nor sympy (what torch.compile's
    decorators, and a random fill on the meta device, import: seconds of start-up) nor mamba-ssm, and neither does
    loading a checkpoint (weights.NoRandomFills): a fresh process, its modules listed."""
    import subprocess
    from pathlib import Path
    _, folder = hf_checkpoint
    code = ("import sys; import ssd, mamba2, vision, connector, model, data, fast_ssd, fast_decode, generate; "
            f"mamba2.Mamba2LMHeadModel.from_pretrained({str(folder)!r}); "
            "print(' '.join(m for m in ('torch._dynamo', 'sympy', 'mamba_ssm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == ""


def test_no_random_fills_skips_only_the_meta_devices_draws():
    """weights.NoRandomFills: on the meta device a normal fill returns its tensor (nothing drawn); on the CPU every
    fill draws as without it, to the bit."""
    from weights import NoRandomFills
    torch.manual_seed(0)
    plain = Mamba2LMHeadModel(Mamba2Config(**TINY)).state_dict()
    with NoRandomFills():
        torch.manual_seed(0)
        inside = Mamba2LMHeadModel(Mamba2Config(**TINY)).state_dict()
        with torch.device("meta"):
            t = torch.empty(3, 4)
            assert torch.nn.init.normal_(t) is t and t.normal_() is t and torch.nn.init.xavier_normal_(t) is t
    assert all(torch.equal(plain[k], inside[k]) for k in plain)


@pytest.mark.gpu
def test_a_checkpoint_loaded_straight_to_the_gpu_equals_the_cpu_load(hf_checkpoint):
    _, folder = hf_checkpoint
    on_cpu = Mamba2LMHeadModel.from_pretrained(folder, dtype=torch.bfloat16)
    on_gpu = Mamba2LMHeadModel.from_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    for (name, a), (_, b) in zip(on_cpu.state_dict().items(), on_gpu.state_dict().items()):
        assert b.is_cuda and b.dtype == a.dtype and torch.equal(a, b.cpu()), name


def test_repo_id_without_network_says_how_to_download(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the network in a test
    with pytest.raises(CheckpointError, match="state-spaces/mamba2-130m"):
        Mamba2LMHeadModel.from_pretrained("state-spaces/mamba2-130m")


# ---------------------------------------------------------------- decoding with the fixed-size cache

def test_cached_decode_logits_equal_the_full_forward():
    model = tiny_model(seed=1)
    ids = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        pieces = [model(ids[:, :23], cache=cache)]  # prefill (not a multiple of chunk_size)
        pieces.append(model(ids[:, 23:30], cache=cache))  # a second multi-token piece from the cached state
        pieces.append(model(ids[:, 30:32], cache=cache))  # two tokens, then three
        pieces.append(model(ids[:, 32:35], cache=cache))
        for t in range(35, 40):  # then one token at a time
            pieces.append(model(ids[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.seqlen_offset == 40
    with torch.no_grad():
        torch.testing.assert_close(model(ids[:, :1]), full[:, :1], rtol=1e-5, atol=1e-5)  # one token, no cache
        cache = model.allocate_cache(2)  # prefill: the last position's logits; each step: the next one's
        torch.testing.assert_close(model.prefill(cache, ids[:, :37]), full[:, 36], rtol=1e-5, atol=1e-5)
        assert cache.seqlen_offset == 37
        for t in range(37, 40):
            torch.testing.assert_close(model.step(ids[:, t], cache), full[:, t], rtol=1e-5, atol=1e-5)
            assert cache.seqlen_offset == t + 1
    # the cache does not grow: the same tensors, the same size, whatever the length
    assert cache.layers[0].ssm_state.shape == (2, 8, 8, 16) and cache.layers[0].conv_state.shape == (2, 128, 3)


def test_padded_prompts_leave_the_cache_of_their_real_tokens():
    """`length` marks a padded batch's real positions: each row's cache (SSM state and conv window) and its last real
    position's hidden state equal those of its prompt alone, whatever the padding holds (lengths on both sides of a
    chunk boundary, one unpadded)."""
    model = tiny_model(seed=3)  # chunk_size 16
    ids = torch.randint(0, 100, (3, 40))
    length = torch.tensor([5, 17, 40])
    with torch.no_grad():
        cache = model.allocate_cache(3)
        hidden = model.hidden_states(ids, cache=cache, length=length)
        for i, n in enumerate(length.tolist()):
            own = model.allocate_cache(1)
            expected = model.hidden_states(ids[i:i + 1, :n], cache=own)
            torch.testing.assert_close(hidden[i, n - 1], expected[0, -1], rtol=1e-5, atol=1e-5)
            for a, b in zip(cache.layers, own.layers):
                torch.testing.assert_close(a.ssm_state[i], b.ssm_state[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(a.conv_state[i], b.conv_state[0], rtol=1e-5, atol=1e-6)
    assert cache.layers[0].ssm_state.abs().max() > 1e-3


def test_dt_is_the_softplus_of_dt_plus_its_bias_clamped_to_dt_limit():
    """dt = softplus(dt_raw + dt_bias) in fp32, clamped to the config's dt_limit when it has one (log1p(exp(.)) in
    float64 as the reference)."""
    from mamba2 import dt_softplus
    raw, bias = torch.linspace(-6, 6, 40).reshape(5, 8), torch.linspace(-1, 1, 8)
    plain = torch.log1p(torch.exp(raw.double() + bias.double()))
    assert plain.min() < 0.01 and plain.max() > 0.5
    torch.testing.assert_close(dt_softplus(raw.bfloat16(), bias).double(), torch.log1p(torch.exp(
        raw.bfloat16().double() + bias.double())), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dt_softplus(raw, bias, (0.01, 0.5)).double(), plain.clamp(0.01, 0.5), rtol=1e-6,
                               atol=1e-7)
    mixer = tiny_model(dt_limit=(0.01, 0.5)).layers[0].mixer
    with torch.no_grad():
        mixer.dt_bias.copy_(bias)
    torch.testing.assert_close(mixer.positive_dt(raw).double(), plain.clamp(0.01, 0.5), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fp32", [True, False])
def test_the_residual_stream_is_fp32_only_where_the_config_says(fp32, monkeypatch):
    """residual_in_fp32 (mamba-ssm's option): a bf16 model's blocks receive an fp32 residual stream, in the forward
    and in each decoding step, or the model's own bf16."""
    model = tiny_model(seed=2, residual_in_fp32=fp32).to(torch.bfloat16)
    seen = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    plain_step = Mamba2Block.step
    monkeypatch.setattr(Mamba2Block, "step", lambda self, r, *a: seen.append(r.dtype) or plain_step(self, r, *a))
    ids = torch.randint(0, 100, (1, 5))
    with torch.no_grad():
        model(ids)
        model.step(ids[:, 0], model.allocate_cache(1))
    assert seen == [torch.float32 if fp32 else torch.bfloat16] * 4


def test_gradient_checkpointing_recomputes_each_block_and_keeps_the_gradients():
    """In training with gradient_checkpointing each block runs again during the backward (two forwards per block;
    with an int n, the first n blocks only), and every gradient equals the one without it."""
    model = tiny_model(seed=4).train()
    ids = torch.randint(0, 100, (2, 21))
    calls = []
    for layer in model.layers:
        layer.register_forward_pre_hook(lambda *args: calls.append(1))

    def run(checkpointing):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        calls.clear()
        model(ids).logsumexp(-1).mean().backward()
        return len(calls), {n: p.grad.clone() for n, p in model.named_parameters()}
    (n_plain, plain), (n_ckpt, ckpt), (n_first, first) = run(False), run(True), run(1)
    assert (n_plain, n_ckpt, n_first) == (2, 4, 3)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)
        torch.testing.assert_close(first[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)
    assert plain["layers.0.mixer.A_log"].abs().max() > 1e-6


def test_blocks_keeping_in_proj_recompute_the_rest_and_keep_the_gradients():
    """Selective recomputation (fast_decode.forward_keeping_in_proj, what compile_blocks(in_proj_kept=True)
    compiles): each block, checkpointed by itself, keeps in_proj's product, so its backward computes fewer FLOPs
    than whole-block checkpointing by exactly that product's forward FLOPs (out_proj's is recomputed by neither).
    With the SSD outside the checkpoints (fast_decode.forward_keeping_ssd, compile_blocks(ssd_kept=True)) the
    backward computes fewer still, by exactly the SSD's forward FLOPs (eq. 3 run once). Every gradient equals the
    one without checkpointing."""
    import types

    import fast_decode
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model(seed=4).train()
    ids = torch.randint(0, 100, (2, 21))

    def run(checkpointing, forward=None):
        model.gradient_checkpointing = checkpointing
        for layer in model.layers:
            layer.__dict__.pop("forward", None)
            if forward is not None:
                layer.forward = types.MethodType(forward, layer)
        model.zero_grad()
        loss = model(ids).logsumexp(-1).mean()
        with FlopCounterMode(display=False) as flops:
            loss.backward()
        return flops.get_total_flops(), {n: p.grad.clone() for n, p in model.named_parameters()}
    (_, plain), (f_whole, _) = run(False), run(True)
    (f_kept, kept), (f_ssd, ssd_kept) = run(False, fast_decode.forward_keeping_in_proj), run(
        False, fast_decode.forward_keeping_ssd)
    for layer in model.layers:
        layer.__dict__.pop("forward", None)
    c = model.config
    in_proj = 2 * ids.numel() * c.d_model * model.layers[0].mixer.in_proj.out_features * c.n_layer
    assert f_whole - f_kept == in_proj
    assert f_kept - f_ssd == ssd_forward_flops(model, ids) > 0
    for name in plain:
        torch.testing.assert_close(kept[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)
        torch.testing.assert_close(ssd_kept[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)


def ssd_forward_flops(model, ids):
    """The FLOPs of every mixer's SSD in one forward of ids: the model's forward FLOPs less those with each SSD
    replaced by zeros of its outputs' shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    def zeros(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
        return torch.zeros_like(x), x.new_zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    counts, kept = [], [layer.mixer.ssd for layer in model.layers]
    for ssds in (kept, [zeros] * len(kept)):
        for layer, ssd in zip(model.layers, ssds):
            layer.mixer.ssd = ssd
        with torch.no_grad(), FlopCounterMode(display=False) as flops:
            model(ids)
        counts.append(flops.get_total_flops())
    for layer, ssd in zip(model.layers, kept):
        layer.mixer.ssd = ssd
    return counts[0] - counts[1]


def test_causal_conv_equals_conv1d_over_a_left_padded_window():
    """The mixer's shifted multiply-adds are the depthwise causal conv: F.conv1d over the inputs with d_conv - 1
    zeros (or the cached inputs) in front, then SiLU; the cache keeps the last d_conv - 1 inputs."""
    mixer = tiny_model(seed=5).layers[0].mixer.double()
    with torch.no_grad():
        mixer.conv1d.bias.normal_()
    w, bias, k = mixer.conv1d.weight, mixer.conv1d.bias, mixer.config.d_conv
    x = torch.randn(2, 11, mixer.config.conv_dim, dtype=torch.float64)  # (b, l, conv_dim)

    def reference(window):  # (b, conv_dim, k - 1 + l) -> (b, l, conv_dim)
        return F.silu(F.conv1d(window, w, bias, groups=w.shape[0])).transpose(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(mixer.causal_conv(x, None), reference(F.pad(x.transpose(1, 2), (k - 1, 0))),
                                   rtol=1e-12, atol=1e-12)
        past = torch.randn(2, mixer.config.conv_dim, k - 1, dtype=torch.float64)
        cache = LayerCache(past.clone(), torch.zeros(2, 1, 1, 1, dtype=torch.float64))
        out = mixer.causal_conv(x, cache)
        torch.testing.assert_close(out, reference(torch.cat([past, x.transpose(1, 2)], -1)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cache.conv_state, x[:, -(k - 1):].transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_causal_conv_in_bf16_sums_in_fp32(padded):
    """A bf16 model's conv: the multiply-adds in fp32, so the output is within one bf16 rounding of the float64
    conv of the same bf16 values, and comes back in bf16, with the last k - 1 inputs (of each row's real positions
    when padded) as the new conv state, unchanged."""
    from mamba2 import causal_conv
    conv = tiny_model(seed=5).layers[0].mixer.conv1d.to(torch.bfloat16)
    with torch.no_grad():
        conv.bias.normal_()
    k, channels = conv.weight.shape[-1], conv.weight.shape[0]
    xBC = torch.randn(2, 11, channels).bfloat16()
    past = torch.randn(2, k - 1, channels).bfloat16()
    length = torch.tensor([11, 6]) if padded else None
    out, state = causal_conv(xBC, conv, past, length)
    window = torch.cat([past, xBC], 1).double().transpose(1, 2)  # (b, channels, k - 1 + l)
    ref = F.silu(F.conv1d(window, conv.weight.double(), conv.bias.double(), groups=channels)).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=2 ** -8, atol=1e-6)
    ends = [11, 6] if padded else [11, 11]
    for i, n in enumerate(ends):
        assert torch.equal(state[i], torch.cat([past[i], xBC[i, :n]])[-(k - 1):])


def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    ids = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(inputs_embeds=model.embedding(ids)), model(ids))
    with pytest.raises(ValueError, match="^give exactly one of input_ids and inputs_embeds$"):
        model()


def test_greedy_generate_equals_repeated_full_forward():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 100, (1, 7))
    new = model.generate(ids, max_new_tokens=10)
    seq = ids
    with torch.no_grad():
        for _ in range(10):
            nxt = model(seq)[:, -1, :100].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(new, seq[:, 7:])


def test_generate_stops_on_eos_and_streams():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 100, (1, 7))
    first = model.generate(ids, max_new_tokens=10)
    eos = int(first[0, 3])
    streamed = []
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos, on_token=lambda t: streamed.append(int(t[0])))
    stop = first[0].tolist().index(eos)
    assert out[0].tolist() == first[0, :stop + 1].tolist() == streamed


def test_sampling_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = [int(sample_next_token(logits, 1.0, top_p=0.7, generator=g)) for _ in range(300)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: tokens 2 and 3 are cut
    draws = [int(sample_next_token(logits, 1.0, top_k=1, generator=g)) for _ in range(20)]
    assert set(draws) == {0}
    draws = [int(sample_next_token(logits, 1.0, generator=g)) for _ in range(2000)]
    assert abs(draws.count(0) / 2000 - 0.5) < 0.05
    assert int(sample_next_token(logits, 0.0)) == 0


def test_presets_and_tokenizer(tmp_path):
    c = mamba2_preset("2.7b")
    assert (c.d_model, c.n_layer, c.nheads, c.padded_vocab_size) == (2560, 64, 80, 50288)
    with pytest.raises(ValueError, match="unknown Mamba-2 size"):
        mamba2_preset("3b")
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path).encode("a b c").ids == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match="gpt-neox-20b"):
        load_tokenizer(tmp_path / "missing")


def test_parameter_counts_of_the_public_sizes():
    """Meta-device models (no memory): the counts the names promise."""
    counts = {}
    for name in ("130m", "780m", "2.7b"):
        with torch.device("meta"):
            m = Mamba2LMHeadModel(mamba2_preset(name))
        counts[name] = sum(p.numel() for p in m.parameters()) / 1e6
    assert 120 < counts["130m"] < 135 and 760 < counts["780m"] < 800 and 2650 < counts["2.7b"] < 2750


@pytest.mark.gpu
def test_cuda_lm_same_logits_with_either_ssd_backend_and_cached_decode(monkeypatch):
    """On the GPU: the LM gives the same logits through mamba-ssm's kernel, ssd_chunked and ssd_chunked_fast, and
    the cached decode (prefill + ssd_step) equals the full forward."""
    from fast_ssd import find_kernel, use_ssd
    model = tiny_model(seed=4, chunk_size=64).cuda()
    ids = torch.randint(0, 100, (2, 150), device="cuda")
    with torch.no_grad():
        use_ssd(model, "torch")
        ref = model(ids)
        cache = model.allocate_cache(2)
        steps = [model(ids[:, :140], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(140, 150)]
        torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)
        if find_kernel() is None:
            pytest.skip("mamba-ssm not installed: only the torch path was checked")
        use_ssd(model, "mamba_ssm")
        torch.testing.assert_close(model(ids), ref, rtol=2e-3, atol=2e-3)
        use_ssd(model, "torch-fast")
        torch.testing.assert_close(model(ids), ref, rtol=1e-4, atol=1e-4)


def test_compiled_block_step_is_one_graph_for_all_layers():
    """The compiled decoding step compiles `fast_decode.block_step_scale_after_proj` once: every layer (and every model
    of the same shapes) reuses it, and its result equals the plain step. (Dynamo with the eager backend, so no compiler
    is needed here.)"""
    from fast_decode import block_step_scale_after_proj, layer_by_layer_step
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(seed=8)
    compiled = torch.compile(block_step_scale_after_proj, backend="eager", fullgraph=True, dynamic=False)
    ids = torch.randint(0, 100, (2, 13))
    with torch.no_grad():
        plain, fused = model.allocate_cache(2), model.allocate_cache(2)
        model(ids[:, :12], cache=plain)
        model(ids[:, :12], cache=fused)
        for _ in range(2):
            expected = model.step(ids[:, 12], plain)
            got = layer_by_layer_step(model, compiled, ids[:, 12], fused)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        for a, b in zip(plain.layers, fused.layers):
            torch.testing.assert_close(b.ssm_state, a.ssm_state, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(b.conv_state, a.conv_state, rtol=0, atol=0)
    assert model.config.n_layer > 1 and counters["stats"]["unique_graphs"] == 1


def test_compile_blocks_makes_inductor_split_no_scan(monkeypatch):
    """compile_blocks makes fast_decode.whole_scans inductor's heuristics: no reduction split over several programs
    (inductor's split scan fails on the SSD's cumulative sums over a chunk of 256); with whole_sums_up_to=N, the sums
    over more than N values split as inductor's own heuristics decide, the shorter ones not at all."""
    import fast_decode
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V
    monkeypatch.setattr(fast_decode, "compiled_block_forward",
                        lambda kept=False, ssd_kept=False: Mamba2Block.forward)  # not compiled
    model, cpu = tiny_model(), torch.device("cpu")
    own = InductorChoices.reduction_split_factor
    V.set_choices_handler(InductorChoices())
    try:
        fast_decode.compile_blocks(model, False)
        assert type(V.choices) is InductorChoices
        fast_decode.compile_blocks(model)
        assert V.choices.reduction_split_factor(cpu, 2 ** 20, 1, True) == 1 and own(cpu, 2 ** 20, 1, True) > 1
        assert V.choices.reduction_split_factor(cpu, 6600, 2560, False) == 1
        fast_decode.compile_blocks(model, whole_sums_up_to=2048)
        assert V.choices.reduction_split_factor(cpu, 256, 1, False) == 1 < own(cpu, 256, 1, False)
        for n, outputs, inner in ((2 ** 20, 1, True), (6600, 2560, False), (6600, 1, False)):
            assert V.choices.reduction_split_factor(cpu, n, outputs, inner) == own(cpu, n, outputs, inner) > 1
    finally:
        V.set_choices_handler(InductorChoices())
        fast_decode.compile_blocks(model, False)


@pytest.mark.parametrize("checkpointing,kernel_importable,in_proj_kept,ssd_kept",
                         [(False, False, False, False), (True, False, False, False), (False, True, False, False),
                          (False, False, True, False), (False, False, True, True)])
def test_compiled_blocks_are_one_graph_and_train_as_the_eager_blocks(monkeypatch, fake_mamba_ssm, checkpointing,
                                                                     kernel_importable, in_proj_kept, ssd_kept):
    """fast_decode.compile_blocks (train.py --compile): every block's forward runs through one compiled function, whose
    loss and gradients equal the eager blocks', with and without gradient checkpointing, with each block keeping
    in_proj's product and recomputing the rest (selective recomputation, train.py --compile --gradient-checkpointing),
    also with its SSD's forward run once (ssd_kept), and with mamba-ssm's kernel found by use_ssd("auto") (CPU
    tensors never run it); compile_blocks(False) undoes it. (Dynamo with the eager backend, so no compiler is needed
    here.)"""
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters

    import fast_decode
    import fast_ssd
    model = tiny_model(seed=9).train()
    if kernel_importable:  # a stand-in for the installed package, found by use_ssd
        assert fake_mamba_ssm(lambda *args, **kwargs: None) is not None
        fast_ssd.use_ssd(model, "auto")
    torch._dynamo.reset()
    counters.clear()
    forward = (fast_decode.forward_keeping_ssd if ssd_kept else fast_decode.forward_keeping_in_proj if in_proj_kept
               else Mamba2Block.forward)
    compiled = torch.compile(forward, backend="eager")
    monkeypatch.setattr(fast_decode, "compiled_block_forward",
                        lambda kept=False, ssd=False: compiled if (kept, ssd) == (in_proj_kept, ssd_kept) else None)
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(0, 100, (2, 19))
    results = []
    with functorch_config.patch(force_non_lazy_backward_lowering=False):  # in_proj_kept sets it
        for on in (False, True, False):
            fast_decode.compile_blocks(model, on, in_proj_kept, ssd_kept=ssd_kept)
            model.zero_grad()
            loss = F.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.config.n_layer > 1 and counters["stats"]["unique_graphs"] == 1
    assert all("forward" not in block.__dict__ for block in model.layers)
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for n, g in grads.items():
            torch.testing.assert_close(g, results[0][1][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("ngroups,bias", [(1, False), (2, False), (1, True)])
def test_one_token_step_equals_the_full_forward(ngroups, bias):
    """`step` (eq. 3 one token at a time) and its fast form `fast_decode.block_step_scale_after_proj` (with one group
    and no bias, the gated norm's scale applied after out_proj) give, token by token from an empty cache, the logits
    of the full forward (fp32: the norms compute in fp32)."""
    from fast_decode import block_step_scale_after_proj, layer_by_layer_step
    model = tiny_model(seed=9, ngroups=ngroups, bias=bias)
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        full = model(ids)
        for block_step in (Mamba2Block.step, block_step_scale_after_proj):
            cache = model.allocate_cache(2)
            steps = torch.stack([layer_by_layer_step(model, block_step, ids[:, t], cache)
                                 for t in range(ids.shape[1])], dim=1)
            torch.testing.assert_close(steps, full, rtol=1e-5, atol=1e-6)
            assert cache.seqlen_offset == ids.shape[1]
    assert full.abs().max() > 0.1


