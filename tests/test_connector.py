"""The Mamba-2 Scan Connector: scan orders and inverses, the merge, directional causality, the variants."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from connector import (MLP, MSC, Connector, ConnectorConfig, SwiGLU, column_major, drop_path, scan, scan_orders,
                       unscan)
from mamba2 import Mamba2Config, Mamba2LMHeadModel
from release import ReleaseConnector

MIXER = Mamba2Config(d_model=16, n_layer=1, vocab_size=1, d_state=8, headdim=8, chunk_size=4)


def test_scan_orders_on_a_non_square_grid():
    """BSM (forward, backward) and CSM (rows, columns, each reversed) reading orders, Fig. 4, written out by hand."""
    H, W = 2, 3  # patches 0 1 2 / 3 4 5
    assert column_major(H, W).tolist() == [0, 3, 1, 4, 2, 5]
    bsm = scan_orders("bsm", H, W)
    assert [o.tolist() for o in bsm] == [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]]
    csm = scan_orders("csm", H, W)
    assert [o.tolist() for o in csm] == [[0, 1, 2, 3, 4, 5], [0, 3, 1, 4, 2, 5], [5, 4, 3, 2, 1, 0],
                                         [5, 2, 4, 1, 3, 0]]
    with pytest.raises(ValueError, match="unknown scan"):
        scan_orders("zigzag", H, W)


@pytest.mark.parametrize("kind", ["bsm", "csm"])
def test_every_scan_has_an_exact_inverse(kind):
    """unscan(scan(x)) = x for every direction of BSM and CSM: each output goes back to its patch (Fig. 5)."""
    x = torch.randn(2, 4 * 5, 3)
    for order in scan_orders(kind, 4, 5):
        assert torch.equal(unscan(scan(x, order), order), x)
    # BSM's backward scan is the reversed sequence
    assert torch.equal(scan(x, scan_orders("bsm", 4, 5)[1]), x.flip(1))


def test_msc_block_is_the_sum_of_the_reordered_directions():
    """An MSC block (eq. 7's MSC, Fig. 5) is x + the sum over directions of unscan(Mixer(scan(RMSNorm(x)))),
    recomputed by hand."""
    torch.manual_seed(0)
    msc = MSC(MIXER, grid=(2, 3), scan="bsm", n_layers=1, drop_path_rate=0.0).eval()
    x = torch.randn(2, 6, 16)
    block = msc.blocks[0]
    with torch.no_grad():
        h = block.norm(x)
        forward = block.mixers[0](h)
        backward = block.mixers[1](h.flip(1)).flip(1)
        expected = msc.norm(x + forward + backward)
        torch.testing.assert_close(msc(x), expected)


@pytest.mark.parametrize("direction", range(4))
def test_each_csm_direction_is_causal_in_its_own_order(direction):
    """With only one direction's mixer switched on, changing patch p changes exactly the outputs of the patches at
    or after p in that direction's reading order (the patch itself through the residual)."""
    torch.manual_seed(1)
    H, W = 3, 4
    msc = MSC(MIXER, grid=(H, W), scan="csm", n_layers=1, drop_path_rate=0.0).eval()
    with torch.no_grad():
        for k, mixer in enumerate(msc.blocks[0].mixers):
            if k != direction:
                mixer.out_proj.weight.zero_()
    order = scan_orders("csm", H, W)[direction]
    rank = torch.argsort(order)  # position of each patch in the reading order
    x = torch.randn(1, H * W, 16)
    p = 5
    x2 = x.clone()
    x2[0, p] += 1.0
    with torch.no_grad():
        changed = (msc(x) - msc(x2)).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == (rank >= rank[p]).tolist()


def test_drop_path_only_in_training():
    """Stochastic depth drops whole samples' residual branches in training, rescaled; identity in eval."""
    torch.manual_seed(2)
    msc = MSC(MIXER, grid=(2, 2), scan="bsm", n_layers=2, drop_path_rate=0.5)
    x = torch.randn(8, 4, 16)
    msc.eval()
    with torch.no_grad():
        assert torch.equal(msc(x), msc(x))
        msc.train()
        assert not torch.equal(msc(x), msc(x))


@pytest.mark.parametrize("p", [0.25, 0.6])
def test_drop_path_zeroes_whole_samples_and_scales_the_rest_by_1_over_1_minus_p(p):
    """drop_path(x, p): each sample's branch is all zeros or x / (1 - p), so its expectation is x; p = 0 or eval:
    x itself."""
    x = torch.randn(400, 3, 5) + 2.0
    out = drop_path(x, p, training=True)
    dropped = (out == 0).flatten(1).all(1)  # (400,)
    kept = ~dropped
    torch.testing.assert_close(out[kept], x[kept] / (1 - p), rtol=1e-6, atol=0)
    assert abs(dropped.float().mean().item() - p) < 0.08  # 400 draws: within 3.5 standard deviations
    assert drop_path(x, p, training=False) is x and drop_path(x, 0.0, training=True) is x


def test_msc_names_the_number_of_tokens_it_was_given():
    msc = MSC(MIXER, grid=(3, 3), scan="bsm", n_layers=1)
    with pytest.raises(ValueError, match="3 x 3 = 9 patch tokens, found 8"):
        msc(torch.randn(2, 8, 16))


def test_mlp_and_swiglu_formulas():
    """Eq. 6's 3-layer MLP and eq. 8's SwiGLU (Fig. 6) against their formulas written with the weights."""
    torch.manual_seed(3)
    mlp, glu = MLP(10, 6), SwiGLU(6)
    x = torch.randn(2, 5, 10)
    with torch.no_grad():
        expected = F.linear(F.gelu(F.linear(F.gelu(F.linear(x, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight,
                                                   mlp.fc2.bias)), mlp.fc3.weight, mlp.fc3.bias)
        torch.testing.assert_close(mlp(x), expected)
        assert mlp.fc1.weight.shape == (24, 10) and torch.all(mlp.fc1.bias == 0)
        y = torch.randn(3, 6)
        W1, W2, W3 = glu.w1.weight, glu.w2.weight, glu.w3.weight  # Fig. 6 as plain matrix products
        gate = y @ W1.T + glu.w1.bias
        torch.testing.assert_close(glu(y), (gate * torch.sigmoid(gate) * (y @ W3.T + glu.w3.bias)) @ W2.T + glu.w2.bias)
        assert glu.w1.out_features == 64  # 8/3 * 6 = 16, rounded up to a multiple of 64


def reading_orders(scan_kind, H, W):
    """The reading orders of Fig. 4 written out cell by cell: BSM row by row, then backwards; CSM row by row, column by
    column, and each backwards."""
    rows = [r * W + c for r in range(H) for c in range(W)]
    columns = [r * W + c for c in range(W) for r in range(H)]
    return [rows, rows[::-1]] if scan_kind == "bsm" else [rows, columns, rows[::-1], columns[::-1]]


def rms(x, weight, eps=1e-5):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


@pytest.mark.parametrize("kind", ["mlp", "msc-basic", "msc-advanced"])
@pytest.mark.parametrize("scan_kind", ["bsm", "csm"])
def test_connector_variants_against_the_equations_written_out(kind, scan_kind):
    """Eqs. 6-8 and Fig. 5 from the paper, position by position: each direction's mixer reads the normed grid in its
    order (a list of cells), its outputs are put back cell by cell, the directions summed onto the residual, a final
    RMSNorm; then SwiGLU(x) = W2 (SiLU(W1 x) * W3 x) (msc-advanced) and MLP = fc3 GELU fc2 GELU fc1 (eq. 6), with the
    modules' weights as matrices. The mixers themselves are the LM's (tested in test_mamba2.py)."""
    torch.manual_seed(4)
    H, W = 2, 3
    cfg = ConnectorConfig(kind=kind, scan=scan_kind, vision_dim=12, grid=(H, W), drop_path=0.0, mixer=MIXER)
    conn = Connector(cfg).eval()
    v = torch.randn(2, H * W, 12)
    with torch.no_grad():
        x = v
        if kind != "mlp":
            x = F.gelu(linear(v, conn.lift))
            for block in conn.msc.blocks:
                h = rms(x, block.norm.weight)
                merged = torch.zeros_like(x)
                for mixer, order in zip(block.mixers, reading_orders(scan_kind, H, W)):
                    y = mixer(torch.stack([h[:, cell] for cell in order], dim=1))  # the grid read in this order
                    for t, cell in enumerate(order):
                        merged[:, cell] += y[:, t]
                x = x + merged
            x = rms(x, conn.msc.norm.weight)
            if kind == "msc-advanced":
                g = conn.swiglu
                x = (F.silu(linear(x, g.w1)) * linear(x, g.w3)) @ g.w2.weight.T + g.w2.bias
        p = conn.projector
        expected = linear(F.gelu(linear(F.gelu(linear(x, p.fc1)), p.fc2)), p.fc3)
        torch.testing.assert_close(conn(v), expected, rtol=1e-5, atol=1e-5)
    if kind != "mlp":
        assert len(conn.msc.blocks[0].mixers) == len(reading_orders(scan_kind, H, W))
        with pytest.raises(ValueError, match="expects 2 x 3 = 6 patch tokens"):
            conn(torch.randn(1, 5, 12))


def test_init_from_the_lm_copies_its_first_layers():
    """init="lm": block i's norm and every direction's mixer equal LM layer i's."""
    torch.manual_seed(5)
    lm = Mamba2LMHeadModel(Mamba2Config(d_model=16, n_layer=3, vocab_size=50, d_state=8, headdim=8, chunk_size=4))
    cfg = ConnectorConfig.for_lm(lm.config, vision_dim=12, grid=(2, 2), scan="csm", init="lm")
    conn = Connector(cfg)
    conn.msc.init_from_lm(lm)
    for i, block in enumerate(conn.msc.blocks):
        assert torch.equal(block.norm.weight, lm.layers[i].norm.weight)
        for mixer in block.mixers:
            for name, p in mixer.state_dict().items():
                assert torch.equal(p, lm.layers[i].mixer.state_dict()[name])
    with pytest.raises(ValueError, match="unknown kind"):
        ConnectorConfig(kind="qformer")


# ---------------------------------------------------------------- the release's connector (msc-release)

def test_release_bimamba2_is_the_mean_of_two_plain_mixers_one_reading_backwards():
    """BiMamba2 = out_proj((forward + backward) / 2), recomputed with two plain Mamba2Mixers that share in_proj,
    the gated norm and out_proj (out_proj is linear without bias, so the mean can go after it); the second has the
    *_b parameters and reads the sequence reversed. Odd length, several heads and groups, float64."""
    from release import BiMamba2
    from mamba2 import Mamba2Mixer
    cfg = Mamba2Config(d_model=16, n_layer=2, vocab_size=1, d_state=4, headdim=4, ngroups=2, chunk_size=4)
    torch.manual_seed(0)
    bi = BiMamba2(cfg).double()
    with torch.no_grad():  # backward parameters unlike the forward ones, so a mix-up shows
        for p in (bi.conv1d_b.weight, bi.dt_bias_b, bi.A_log_b, bi.D_b):
            p.add_(0.3 * torch.randn_like(p))
    forward, backward = Mamba2Mixer(cfg).double(), Mamba2Mixer(cfg).double()
    shared = {k: v for k, v in bi.state_dict().items() if k.startswith(("in_proj", "norm", "out_proj"))}
    forward.load_state_dict({**shared, **{k: v for k, v in bi.state_dict().items() if k in forward.state_dict()}})
    backward.load_state_dict({**shared, "conv1d.weight": bi.conv1d_b.weight, "conv1d.bias": bi.conv1d_b.bias,
                              "dt_bias": bi.dt_bias_b, "A_log": bi.A_log_b, "D": bi.D_b})
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = (forward(u) + backward(u.flip(1)).flip(1)) / 2
        got = bi(u)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # both directions matter: a change at the last position reaches the first
    u2 = u.clone()
    u2[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(bi(u2)[:, 0], got[:, 0])


def test_release_connector_block_structure_and_init():
    """msc-release: lift + GELU, blocks x + BiMamba2(x) then x + SwiGLU(LayerNorm(x)) (hidden D), a final
    LayerNorm, the fused MLP D -> 4D -> D -> D, recomputed by hand; the release's init (backward SSM parameters start
    as the forward ones, out_proj divided by sqrt(2), zero biases in the blocks)."""
    torch.manual_seed(1)
    cfg = ConnectorConfig(kind="msc-release", vision_dim=12, grid=(2, 3), drop_path=0.0, mixer=MIXER)
    conn = ReleaseConnector(cfg).eval()
    block = conn.msc.blocks[0]
    assert torch.equal(block.mixer.A_log_b, block.mixer.A_log) and torch.equal(block.mixer.D_b, block.mixer.D)
    assert torch.equal(block.mixer.dt_bias_b, block.mixer.dt_bias) and block.mixer.dt_bias.std() > 0  # copied
    assert not torch.equal(block.mixer.conv1d_b.weight, block.mixer.conv1d.weight)
    assert block.mlp.w1.weight.shape == (16, 16) and torch.count_nonzero(block.mlp.w1.bias) == 0
    assert conn.projector.fc1.weight.shape == (64, 16)
    # the projector as FusedMLPProjector._initialize_weights leaves it: xavier-normal weights, zero biases
    torch.manual_seed(2)
    big = ReleaseConnector(ConnectorConfig(kind="msc-release", vision_dim=12, grid=(2, 3), mixer=replace(
        MIXER, d_model=256, n_layer=1), n_layers=1))
    for fc in (big.projector.fc1, big.projector.fc2, big.projector.fc3):
        fan_out, fan_in = fc.weight.shape
        std = (2 / (fan_in + fan_out)) ** 0.5  # xavier-normal; PyTorch's default is uniform with std 1/sqrt(3 fan_in)
        assert abs(fc.weight.std().item() / std - 1) < 0.02 and abs(fc.weight.mean().item()) < 0.05 * std
        assert torch.count_nonzero(fc.bias) == 0
    bound = 1 / (16 * 2) ** 0.5  # PyTorch's default bound for in_features 2 d_model = 32, divided by sqrt(2) below
    assert block.mixer.out_proj.weight.abs().max() <= bound / 2 ** 0.5 + 1e-7
    v = torch.randn(2, 6, 12)
    with torch.no_grad():
        x = F.gelu(conn.lift(v))
        for b in conn.msc.blocks:
            x = x + b.mixer(x)
            h = F.layer_norm(x, (16,), b.norm.weight, b.norm.bias, 1e-5)
            x = x + b.mlp.w2(F.silu(b.mlp.w1(h)) * b.mlp.w3(h))
        x = F.layer_norm(x, (16,), conn.msc.norm.weight, conn.msc.norm.bias, 1e-5)
        expected = conn.projector.fc3(F.gelu(conn.projector.fc2(F.gelu(conn.projector.fc1(x)))))
        torch.testing.assert_close(conn(v), expected, rtol=1e-5, atol=1e-6)
    for bad in (dict(scan="csm"), dict(init="lm")):
        with pytest.raises(ValueError, match="release's connector"):
            ConnectorConfig(kind="msc-release", mixer=MIXER, **bad)


@pytest.mark.parametrize("kind,scan_kind", [("msc-advanced", "bsm"), ("msc-basic", "csm"), ("mlp", "bsm"),
                                            ("msc-release", "bsm")])
def test_compiled_connector_trains_as_the_eager_one(monkeypatch, kind, scan_kind):
    """fast_decode.compile_connector (train.py --compile): the connector's forward runs through one compiled function
    of its class, whose output and gradients (in training, drop path off) equal the eager connector's; the MSC's first
    call copies its scan orders to the device, so the second traces once more and no call after it; on=False undoes
    it. (Dynamo with the eager backend, so no compiler is needed here.)"""
    import torch._functorch.config as functorch_config
    from torch._dynamo.utils import counters
    from torch._inductor.virtualized import V

    import fast_decode
    monkeypatch.setattr(V, "set_choices_handler", lambda handler: None)  # compile_connector sets Inductor's choices
    torch.manual_seed(0)
    config = ConnectorConfig(kind=kind, scan=scan_kind, vision_dim=12, grid=(3, 3), mixer=MIXER, drop_path=0.0)
    conn = (ReleaseConnector(config) if kind == "msc-release" else Connector(config)).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(type(conn).forward, backend="eager")
    monkeypatch.setattr(fast_decode, "compiled_connector_forward", lambda cls: compiled if cls is type(conn) else None)
    v = torch.randn(2, 9, 12)
    dy = torch.randn(2, 9, MIXER.d_model)
    results = []
    with functorch_config.patch(force_non_lazy_backward_lowering=False):  # compile_connector sets it
        for on in (True, True, True, False):
            fast_decode.compile_connector(conn, on)
            conn.zero_grad()
            out = conn(v)
            out.backward(dy)
            results.append((out.detach(), {n: p.grad.clone() for n, p in conn.named_parameters()}))
    assert counters["stats"]["unique_graphs"] == (1 if kind in ("mlp", "msc-release") else 2)
    assert "forward" not in conn.__dict__
    for out, grads in results[:3]:
        torch.testing.assert_close(out, results[3][0], rtol=1e-6, atol=1e-6)
        for n, g in grads.items():
            torch.testing.assert_close(g, results[3][1][n], rtol=1e-5, atol=1e-6, msg=n)
    assert results[3][0].abs().max() > 0.1


@pytest.mark.gpu
def test_connector_compiled_by_inductor_equals_the_eager_one_on_cuda(monkeypatch):
    """fast_decode.compile_connector with Inductor on CUDA: the paper's connector kind (msc-advanced, BSM) with its
    mixers at Mamba-2's chunk of 256 over a 16 x 16 grid, the teaching ssd_chunked inside: forward and gradients
    equal the eager connector's, fp32 (TF32 off)."""
    import torch._functorch.config as functorch_config
    from torch._inductor.virtualized import V

    import fast_decode
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    default = V.choices
    torch.manual_seed(0)
    mixer = replace(MIXER, d_model=32, d_state=16, headdim=8, chunk_size=256)
    config = ConnectorConfig(vision_dim=24, grid=(16, 16), mixer=mixer, drop_path=0.0)
    conn = Connector(config).cuda().train()
    v = torch.randn(2, 256, 24, device="cuda")
    dy = torch.randn(2, 256, 32, device="cuda")

    def run():
        out = conn(v)
        return [out, *torch.autograd.grad((out * dy).sum(), list(conn.parameters()))]
    eager = run()
    try:
        torch._dynamo.reset()
        fast_decode.compiled_connector_forward.cache_clear()
        with functorch_config.patch(force_non_lazy_backward_lowering=False):  # compile_connector sets it
            fast_decode.compile_connector(conn)
            compiled = run()
    finally:
        fast_decode.compile_connector(conn, False)
        V.set_choices_handler(default)
    for got, want in zip(compiled, eager):
        assert float((got - want).abs().max() / want.abs().max()) < 1e-5
