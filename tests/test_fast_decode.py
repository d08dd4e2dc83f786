"""The fused decoding step (fused_step.py: eq. 3 for one token as three Triton kernels a layer) and decoding on CUDA
graphs (fast_decode.py), each against the plain step and the eager loop. On the CPU the Triton kernels run in
Triton's interpreter (TRITON_INTERPRET=1, which conftest.py sets where there is no GPU)."""

import copy

import pytest
import torch

import fast_decode
from mamba2 import Mamba2Cache, Mamba2Config, Mamba2LMHeadModel

triton = pytest.importorskip("triton")
import fused_step as FS  # noqa: E402  (after the skip: it imports triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
    pytest.skip("Triton's interpreter before 3.7 cannot run these kernels with numpy 2.4: pip install 'triton>=3.7'",
                allow_module_level=True)
TINY = dict(d_model=32, n_layer=2, vocab_size=100, d_state=16, headdim=8, ngroups=1, chunk_size=16,
            pad_vocab_size_multiple=16)
SHAPES = {
    "one group": dict(),
    "two groups, bf16-style residual": dict(ngroups=2, residual_in_fp32=False),
    "odd sizes, dt_limit": dict(d_model=36, headdim=12, ngroups=3, d_state=10, d_conv=3, dt_limit=(0.01, 0.05)),
}


def fused_model(seed, **kw):
    """A tiny random LM with norm weights and conv biases away from their init, so that a term left out shows."""
    torch.manual_seed(seed)
    model = Mamba2LMHeadModel(Mamba2Config(**{**TINY, **kw})).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.norm.weight.uniform_(0.5, 1.5)
            layer.mixer.norm.weight.uniform_(0.5, 1.5)
            layer.mixer.conv1d.bias.normal_(0.0, 0.5)
        model.norm_f.weight.uniform_(0.5, 1.5)
    return model.to(DEVICE)


def prefilled_caches(model, ids, n):
    """n caches, each holding the same prompt: the steps start from a non-zero state and conv window."""
    caches = [model.allocate_cache(ids.shape[0]) for _ in range(n)]
    for cache in caches:
        model(ids, cache=cache)
    return caches


@pytest.mark.parametrize("batch", [3, FS.DOT_MIN_BATCH])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_step_equals_the_plain_step(shape, batch):
    """Eq. 3, one token at a time: three fused steps (norm + in_proj + conv + softplus, the state update, the gated
    norm + out_proj + residual) from a prefilled cache give the plain step's logits, conv windows and SSM states
    (fp32, several heads and groups, sizes that are not powers of two, a clamped dt; broadcast products and, from
    DOT_MIN_BATCH sequences, tl.dot)."""
    assert_fused_steps_equal_plain_steps(shape, batch)


def test_fused_step_over_several_weight_tiles_equals_the_plain_step(monkeypatch):
    """Eq. 3 as above with tiles narrower than the rows: 16 columns over 36 (in_proj) and over groups of 24
    (out_proj), 8 rows of a head's 12 (the state update), the last tile partial."""
    monkeypatch.setattr(FS, "MATVEC_TILE", dict(BLOCK_R=4, BLOCK_K=16, num_warps=4))
    monkeypatch.setattr(FS, "GATED_TILE", dict(BLOCK_R=2, BLOCK_K=16, num_warps=4))
    monkeypatch.setattr(FS, "STATE_TILE", dict(BLOCK_P=8, num_warps=2))
    assert_fused_steps_equal_plain_steps("odd sizes, dt_limit", 3)


def test_broadcast_tiles_keep_the_batch_one_sums_per_program():
    """Below DOT_MIN_BATCH, b sequences reduce BLOCK_K / b columns at a time (b a power of two), so a program's
    (B, R, K) fp32 sums, and its registers, stay those of the batch-1 tile; from DOT_MIN_BATCH on, DOT_TILE."""
    weight = torch.empty(40, 64)
    for tile, name in ((FS.MATVEC_TILE, "norm_matvec"), (FS.GATED_TILE, "gated_matvec")):
        for batch, block_b in ((1, 1), (2, 2), (3, 4), (4, 4)):
            args, grid = FS._tiling(batch, weight, tile, name)
            assert (args["BLOCK_B"], args["BLOCK_R"], args["BLOCK_K"]) == (block_b, tile["BLOCK_R"],
                                                                         tile["BLOCK_K"] // block_b)
            assert grid == (-(-40 // tile["BLOCK_R"]),) and not args["USE_DOT"]
        args, _ = FS._tiling(FS.DOT_MIN_BATCH, weight, tile, name)
        assert args["USE_DOT"] and args["BLOCK_K"] == FS.DOT_TILE["BLOCK_K"]


def test_each_matvec_kernel_takes_its_own_prefetch(monkeypatch):
    """fused_step.PREFETCH_K is per kernel: in a step, in_proj's and the LM head's norm_matvec launch with
    norm_matvec's columns and out_proj's gated_matvec with gated_matvec's."""
    monkeypatch.setattr(FS, "PREFETCH_K", dict(norm_matvec=128, gated_matvec=1024))
    launched, tiling = [], FS._tiling

    def spy(batch, weight, tile, kernel):
        args, grid = tiling(batch, weight, tile, kernel)
        launched.append((tuple(weight.shape), args["PREFETCH_K"]))
        return args, grid
    monkeypatch.setattr(FS, "_tiling", spy)
    model = fused_model(2)
    cache = fast_decode.allocate_cache(model, 1)
    with torch.no_grad():
        FS.model_step(model, torch.zeros(1, dtype=torch.long, device=DEVICE), cache)
    mixer = model.layers[0].mixer
    in_proj, out_proj = tuple(mixer.in_proj.weight.shape), tuple(mixer.out_proj.weight.shape)
    want = [(in_proj, 128), (out_proj, 1024)] * len(model.layers) + [(tuple(model.lm_head.weight.shape), 128)]
    assert launched == want


@pytest.mark.parametrize("shape", SHAPES)
def test_the_step_with_cublas_products_equals_the_plain_step(shape):
    """Eq. 3 as above with the products as nn.Linear computes them (`cublas_model_step`: the norms, in_proj's
    epilogue, the state update and the gated norm as kernels between them, each residual add in the next norm)."""
    assert_fused_steps_equal_plain_steps(shape, 3, FS.cublas_model_step)


def assert_fused_steps_equal_plain_steps(shape, batch, fused_step=FS.model_step):
    model = fused_model(1, **SHAPES[shape])
    ids = torch.randint(0, 100, (batch, 12), device=DEVICE)
    with torch.no_grad():
        plain, fused = prefilled_caches(model, ids[:, :9], 2)
        for t in range(9, 12):
            expected = model.step(ids[:, t], plain)
            got = fused_step(model, ids[:, t], fused)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(plain.layers, fused.layers):
        torch.testing.assert_close(b.ssm_state, a.ssm_state, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.conv_state, a.conv_state, rtol=1e-6, atol=1e-6)
    assert fused.seqlen_offset == plain.seqlen_offset == 12
    assert expected.abs().max() > 0.1 and plain.layers[0].ssm_state.abs().max() > 1e-3


# Triton's interpreter rounds fp32 to bf16 toward zero (the GPU to nearest), and its tl.dot cannot take bf16: on
# the CPU the tensor-core path (tl.dot) is checked in fp16.
DOT_DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float16


@pytest.mark.parametrize("batch,dtype,fused_step", [(2, torch.bfloat16, FS.model_step),
                                                    (FS.DOT_MIN_BATCH, DOT_DTYPE, FS.model_step),
                                                    (2, torch.bfloat16, FS.cublas_model_step)])
def test_fused_step_in_16_bits_rounds_like_the_plain_step(batch, dtype, fused_step):
    """16-bit weights: the fused and the plain step are both off the fp32 step of the same weights by rounding,
    and by as much as each other (the fused step rounds where the plain one does); a batch of DOT_MIN_BATCH takes
    the tensor-core path; `cublas_model_step` the products as nn.Linear."""
    model16 = fused_model(2, ngroups=2).to(dtype)
    model32 = copy.deepcopy(model16).float()
    ids = torch.randint(0, 100, (batch, 10), device=DEVICE)
    with torch.no_grad():
        c32, = prefilled_caches(model32, ids[:, :8], 1)
        plain, fused = prefilled_caches(model16, ids[:, :8], 2)
        errors = {"plain": 0.0, "fused": 0.0}
        for t in range(8, 10):
            exact = model32.step(ids[:, t], c32)
            errors["plain"] = max(errors["plain"], (model16.step(ids[:, t], plain) - exact).abs().max().item())
            errors["fused"] = max(errors["fused"], (fused_step(model16, ids[:, t], fused) - exact).abs().max().item())
    factor = 3 if DEVICE == "cpu" and dtype == torch.bfloat16 else 2  # bf16 rounding toward zero doubles it
    assert 0 < errors["plain"] < 0.03 and errors["fused"] <= factor * errors["plain"], errors


def test_the_warm_up_kernel_runs():
    """fused_step.warm_up (generate.py's start-up thread) runs its kernel: 0 + 1."""
    assert FS.warm_up(DEVICE).tolist() == [1.0]


def test_triton_s_interpreter_launches_no_kernel_early(monkeypatch):
    """Programmatic dependent launch is for compiled kernels on a GPU: under TRITON_INTERPRET=1 (the CPU tests'), a
    CUDA device is not asked for its capability and the step kernels get no PDL arguments."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    FS._has_pdl.cache_clear()
    try:
        assert FS._pdl_args(torch.device("cuda", 3)) == dict(PDL=False, launch_pdl=False)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        FS._has_pdl.cache_clear()
        assert FS._pdl_args(torch.device("cuda", 3))["PDL"] is hasattr(triton.language.extra.cuda, "gdc_wait")
        assert FS._pdl_args(torch.device("cuda", 3), overlap=False)["PDL"] is False
    finally:
        FS._has_pdl.cache_clear()


def test_fused_kernels_refuse_a_biased_model():
    model = fused_model(3, bias=True)
    assert not FS.supports(model.config) and fast_decode.default_kernels(model) != "fused"
    with pytest.raises(ValueError, match="without bias"):
        fast_decode.step_function(model, "fused")


def test_a_kernel_decoder_decodes_as_the_eager_loop():
    """decoder_for without CUDA graphs: the eager loop with the fused step (Triton's interpreter on the CPU) gives the
    plain loop's tokens; "plain" is the model itself."""
    model = fused_model(5)
    ids = torch.randint(0, 100, (2, 11), device=DEVICE)
    decoder = fast_decode.decoder_for(model, "fused", cuda_graph=False)
    assert isinstance(decoder, fast_decode.KernelDecoder) and fast_decode.decoder_for(model, cuda_graph=False) is None
    assert torch.equal(model.generate(ids, max_new_tokens=6, decoder=decoder), model.generate(ids, max_new_tokens=6))


def test_a_lent_cache_keeps_its_state_when_another_takes_the_tensors():
    """The fixed-address tensors go to one cache at a time: lending them to a second cache gives the first a copy of
    its state, and lending them back copies that state in again (CapturedBatch.lend, without the graphs)."""
    model = fused_model(9).cpu()
    batch = fast_decode.CapturedBatch.__new__(fast_decode.CapturedBatch)  # the lending alone: no capture
    batch.cache, batch.holder = model.allocate_cache(1), None
    fixed = [layer.ssm_state.data_ptr() for layer in batch.cache.layers]
    first, second = Mamba2Cache(), Mamba2Cache()
    batch.lend(first)
    model.prefill(first, torch.randint(0, 100, (1, 9)))
    state = [layer.ssm_state.clone() for layer in first.layers]
    batch.lend(second)
    assert all(not layer.ssm_state.any() for layer in second.layers)  # an empty cache starts from zeros
    model.prefill(second, torch.randint(0, 100, (1, 5)))
    assert [layer.ssm_state.data_ptr() for layer in second.layers] == fixed
    assert all(torch.equal(a.ssm_state, s) for a, s in zip(first.layers, state))  # kept its own state
    batch.lend(first)
    assert [layer.ssm_state.data_ptr() for layer in first.layers] == fixed
    assert all(torch.equal(a.ssm_state, s) for a, s in zip(first.layers, state)) and state[0].abs().max() > 1e-3


# ---------------------------------------------------------------- decoding on CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["plain", "compiled", "fused"])
def test_graphed_decoding_gives_the_eager_tokens(kernels):
    """generate on CUDA graphs gives the eager plain loop's tokens, greedy and sampled, for three prompts of one
    prefill bucket (the first captures it, the others replay it) and a new batch size."""
    model = fused_model(6, ngroups=2)
    decoder = fast_decode.decoder_for(model, kernels)
    assert isinstance(decoder, fast_decode.GraphedDecoder)
    g = torch.Generator(device="cuda")
    for length in (21, 40, 33):
        ids = torch.randint(0, 100, (3, length), device="cuda")
        eager = model.generate(ids, max_new_tokens=20)
        graph = model.generate(ids, max_new_tokens=20, decoder=decoder)
        assert torch.equal(eager, graph), length
        a = model.generate(ids, max_new_tokens=20, temperature=0.8, top_p=0.9, generator=g.manual_seed(1))
        b = model.generate(ids, max_new_tokens=20, temperature=0.8, top_p=0.9, generator=g.manual_seed(1),
                           decoder=decoder)
        assert torch.equal(a, b), length
    assert list(decoder.batch(3).prefills) == [fast_decode.PREFILL_BUCKET]  # captured once
    assert torch.equal(model.generate(ids[:2], max_new_tokens=5, decoder=decoder),
                       model.generate(ids[:2], max_new_tokens=5))  # another batch size: its own graphs
    assert set(decoder.batches) == {3, 2} and fast_decode.decoder_for(model, kernels) is decoder


@pytest.mark.gpu
def test_graphed_decoding_continues_a_cache_as_the_eager_loop_does():
    """generate(cache=...) on CUDA graphs (the first turn prefilled from nothing, later ones continued eagerly in the
    lent tensors) gives the eager loop's tokens and leaves the same cache, turn after turn, with a second
    conversation decoded in between on the same decoder."""
    model = fused_model(8)
    decoder = fast_decode.decoder_for(model, "fused")
    eager_cache, graph_cache, other = model.allocate_cache(1), decoder.allocate_cache(1), decoder.allocate_cache(1)
    for length in (30, 7, 12):
        ids = torch.randint(0, 100, (1, length), device="cuda")
        eager = model.generate(ids, max_new_tokens=9, cache=eager_cache)
        graph = model.generate(ids, max_new_tokens=9, decoder=decoder, cache=graph_cache)
        assert torch.equal(eager, graph), length
        model.generate(ids.flip(1), max_new_tokens=4, decoder=decoder, cache=other)  # takes the tensors over
        for a, b in zip(eager_cache.layers, graph_cache.layers):
            torch.testing.assert_close(b.ssm_state, a.ssm_state, rtol=1e-4, atol=1e-5)
        assert graph_cache.seqlen_offset == eager_cache.seqlen_offset


@pytest.mark.gpu
def test_without_prefill_graphs_the_prefill_runs_eagerly_and_gives_the_eager_tokens():
    """decoder_for(prefill_graphs=False) (generate.py's): the step still on a CUDA graph, each prefill eager in the
    fixed-address cache; the eager loop's tokens for two prompts, no prefill captured, and a decoder of its own."""
    model = fused_model(5)
    decoder = fast_decode.decoder_for(model, "fused", prefill_graphs=False)
    for length in (21, 40):
        ids = torch.randint(0, 100, (2, length), device="cuda")
        assert torch.equal(model.generate(ids, max_new_tokens=12, decoder=decoder),
                           model.generate(ids, max_new_tokens=12)), length
    assert decoder.batch(2).prefills == {} and fast_decode.decoder_for(model, "fused") is not decoder


@pytest.mark.gpu
def test_captured_prefills_are_capped_and_recaptured(monkeypatch):
    """With room for one captured prefill, a second bucket's capture frees the first's; each bucket, captured or
    captured again, gives the eager tokens."""
    monkeypatch.setattr(fast_decode, "MAX_PREFILL_CAPTURES", 1)
    model = fused_model(7)
    decoder = fast_decode.decoder_for(model, "fused")
    prompts = {n: torch.randint(0, 100, (1, n), device="cuda") for n in (20, 200)}
    eager = {n: model.generate(ids, max_new_tokens=6) for n, ids in prompts.items()}
    for n in (20, 20, 200, 200, 20, 20):
        assert torch.equal(model.generate(prompts[n], max_new_tokens=6, decoder=decoder), eager[n]), n
    assert list(decoder.batch(1).prefills) == [128]  # 256's capture freed when 128 came back


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, FS.DOT_MIN_BATCH, FS.CUBLAS_FROM_BATCH])
def test_fused_step_at_the_2_7b_widths_in_bf16(batch):
    """The fused step at Mamba-2 2.7B's widths (d_model 2560, 80 heads of 64, d_state 128; two layers), bf16: the
    kernels' tiles over real row counts (DOT_MIN_BATCH: the tensor-core path; CUBLAS_FROM_BATCH: cuBLAS products),
    against the plain step within bf16 rounding."""
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=2560, n_layer=2, vocab_size=50277)
    model = Mamba2LMHeadModel(cfg).cuda().to(torch.bfloat16).eval()
    model32 = copy.deepcopy(model).float()
    ids = torch.randint(0, cfg.vocab_size, (batch, 40), device="cuda")
    with torch.no_grad():
        c32, = prefilled_caches(model32, ids[:, :39], 1)
        plain, fused = prefilled_caches(model, ids[:, :39], 2)
        exact = model32.step(ids[:, 39], c32)
        err_plain = (model.step(ids[:, 39], plain) - exact).abs().max().item()
        err_fused = (FS.model_step(model, ids[:, 39], fused) - exact).abs().max().item()
    assert err_fused <= 2 * err_plain + 1e-3, (err_plain, err_fused)
    for a, b in zip(plain.layers, fused.layers):
        torch.testing.assert_close(b.ssm_state, a.ssm_state, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,state", [(1, torch.float32), (3, torch.bfloat16)])
def test_programmatic_dependent_launch_changes_no_bit(monkeypatch, batch, state):
    """fused_step.PDL (each kernel launched while the one before it runs, the weights prefetched, the state loaded
    before the wait) at Mamba-2 2.7B's widths, four layers, bf16, on CUDA graphs: 24 steps give the same logits and
    leave the same cache, to the bit, as the kernels launched one after the other."""
    torch.manual_seed(0)
    model = Mamba2LMHeadModel(Mamba2Config(d_model=2560, n_layer=4, vocab_size=50277)).cuda().to(torch.bfloat16)
    if not FS._has_pdl(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper GPU or later and Triton 3.4 or later")
    ids = torch.randint(0, 50277, (batch, 40), device="cuda")
    runs = []
    for pdl in (False, True):
        monkeypatch.setattr(FS, "PDL", pdl)
        fast_decode.forget_decoder(model)
        decoder = fast_decode.decoder_for(model, "fused", state_dtype=state)
        assert FS._pdl_args(ids.device)["PDL"] is pdl
        cache = decoder.allocate_cache(batch)
        with torch.no_grad():
            logits = [decoder.prefill(cache, model.embedding(ids[:, :16]))]
            logits += [decoder.step(ids[:, t], cache).clone() for t in range(16, 40)]
        runs.append((torch.stack(logits[1:]), [l.ssm_state.clone() for l in cache.layers],
                     [l.conv_state.clone() for l in cache.layers]))
    (a, states_a, convs_a), (b, states_b, convs_b) = runs
    assert torch.equal(a, b) and a.abs().max() > 0
    assert all(torch.equal(x, y) for x, y in zip(states_a + convs_a, states_b + convs_b))


def steps_with_state(model, ids, prompt, state_dtype, kernels="plain"):
    """Logits (steps, b, vocab) of the steps after ids[:, :prompt] with the SSM state in state_dtype, the same tokens
    fed at every step, and the cache."""
    cache = fast_decode.allocate_cache(model, ids.shape[0], state_dtype)
    step = fast_decode.step_function(model, kernels)
    with torch.no_grad():
        model(ids[:, :prompt], cache=cache)
        logits = torch.stack([step(ids[:, t], cache) for t in range(prompt, ids.shape[1])])
    return logits, cache


def test_a_bf16_state_decodes_within_its_stated_error_of_the_fp32_state():
    """The SSM state kept in bf16 (fast_decode.allocate_cache, as mamba-ssm keeps a bf16 model's): over 40 steps of
    eq. 3 from a prefilled prompt, the same tokens fed to both, the logits stay within 1% of their largest value of
    the fp32 state's and the greedy tokens agree; the state is stored in bf16 and is off the fp32 one by bf16
    rounding (within 2%), not by more."""
    model = fused_model(6, ngroups=2)
    ids = torch.randint(0, 100, (3, 48), device=DEVICE)
    exact, c32 = steps_with_state(model, ids, 8, torch.float32)
    got, c16 = steps_with_state(model, ids, 8, torch.bfloat16)
    assert all(l.ssm_state.dtype == torch.bfloat16 for l in c16.layers)
    error = ((got - exact).abs().max() / exact.abs().max()).item()
    assert 1e-5 < error < 0.01, error
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    for a, b in zip(c32.layers, c16.layers):
        torch.testing.assert_close(b.ssm_state.float(), a.ssm_state, rtol=0.02, atol=1e-3)


def test_the_fused_step_with_a_bf16_state_equals_the_plain_step_with_one():
    """Eq. 3 with a bf16 state: the fused step loads it, updates in fp32 and stores it rounded, as the plain step
    (ssd_step) does; after two steps the states are within two bf16 ulps (Triton's interpreter rounds toward
    zero, ssd_step to nearest), the logits within 1e-3 of each other."""
    model = fused_model(7, ngroups=2)
    ids = torch.randint(0, 100, (2, 11), device=DEVICE)
    plain, cp = steps_with_state(model, ids, 9, torch.bfloat16)
    fused, cf = steps_with_state(model, ids, 9, torch.bfloat16, kernels="fused")
    torch.testing.assert_close(fused, plain, rtol=1e-3, atol=1e-3)
    for a, b in zip(cp.layers, cf.layers):
        assert b.ssm_state.dtype == torch.bfloat16
        scale = a.ssm_state.float().abs().max().item()
        torch.testing.assert_close(b.ssm_state.float(), a.ssm_state.float(), rtol=2 ** -6, atol=2 ** -9 * scale)
    assert plain.abs().max() > 0.1


def test_the_fused_step_s_parts_compute_what_they_name():
    """benchmark.fused_step_parts (benchmark.py decode --parts), fp32, two groups: the whole step is fused_step's, and
    with in_proj and the state update in one kernel it gives the same logits within rounding; with in_proj's kernels
    alone the residual stays the embedding, so the logits are the head's of the embedding; with out_proj's alone
    each layer adds out_proj(RMSNorm(v)) to the residual, v all ones (one norm per group)."""
    import torch.nn.functional as F

    import benchmark
    model = fused_model(0, ngroups=2)
    token = torch.tensor([3, 7], device=DEVICE)
    parts = benchmark.fused_step_parts(model)
    assert list(parts) == ["the whole step", "both products, no state update", "in_proj's kernels alone",
                           "out_proj's kernels alone"]

    def head(residual):
        return F.linear(model.norm_f(residual), model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(parts["the whole step"](token, model.allocate_cache(2)),
                           FS.model_step(model, token, model.allocate_cache(2)))
        residual = model.embedding(token)
        torch.testing.assert_close(parts["in_proj's kernels alone"](token, model.allocate_cache(2)), head(residual),
                                   rtol=1e-5, atol=1e-5)
        for layer in model.layers:  # RMSNorm of ones: 1 / sqrt(1 + eps) times the norm's weight
            normed = layer.mixer.norm.weight / (1 + layer.mixer.norm.eps) ** 0.5
            residual = residual + F.linear(normed, layer.mixer.out_proj.weight)
        torch.testing.assert_close(parts["out_proj's kernels alone"](token, model.allocate_cache(2)), head(residual),
                                   rtol=1e-5, atol=1e-5)
