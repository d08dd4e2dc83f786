"""Fast decoding: the same prefill and steps as `Mamba2LMHeadModel.generate`'s eager loop (mamba2.py), faster.

`Mamba2LMHeadModel.generate(decoder=...)` and `MLMamba.generate(decoder=...)` run one loop on every device; a decoder
gives it `allocate_cache`, `prefill` and `step`. The model itself is the plain decoder. `decoder_for(model)` gives
this file's:

- the step's kernels: "plain" (`Mamba2Block.step`, op by op), "compiled" (`compiled_block_step`: each layer's
  elementwise work fused by torch.compile, the gated norm's scale applied after out_proj) or "fused" (fused_step.py:
  three Triton kernels a layer);
- on CUDA, a `GraphedDecoder`: per batch size, a cache at fixed addresses and the step captured once as a CUDA graph
  and replayed per token (at batch 1 the GPU would otherwise wait for Python's launches). The prefill is captured per
  bucket of prompt lengths (multiples of PREFILL_BUCKET): the prompt is padded to its bucket and `length` marks its
  real positions, so the padding leaves the cache as it was after the last real token (`Mamba2Mixer`). A bucket's
  first prompt captures it (one eager warm-up prefill, then the capture), and every prompt of the bucket replays it:
  no answer after the first pays for a capture. At most MAX_PREFILL_CAPTURES buckets keep theirs. With
  prefill_graphs=False every prefill runs eagerly (generate.py: one conversation, so one prefill from an empty cache,
  where a capture would cost more than it saves).
- the SSM state's dtype (`state_dtype`): fp32 by default; bf16 as mamba-ssm keeps a bf16 model's state, half the
  bytes each step reads and writes, every update still computed in fp32 (`allocate_cache`).

Also here: `generate(model, ...)`, a model's generate with its fast decoder in one call; `generate_batch` (several
questions at once, prompts right-padded); `compile_blocks` (the LM blocks through torch.compile, for training and
prefills), `compile_connector` (the connector, for training) and `compile_encoders` (the frozen ViTs' forward, for
training).
Tests (tests/test_fast_decode.py, tests/test_mamba2.py, tests/test_connector.py, tests/test_vision.py): each form
equals the plain step and the eager loop, each compiled module the eager one.
"""

import functools
import importlib.util
import os
import types
import weakref

import torch

from mamba2 import LayerCache, Mamba2Block, Mamba2Cache
from model import until_stop
from vision import ViT, ViTBlock

PREFILL_BUCKET = 128  # prompt lengths are padded up to a multiple of this in the captured prefill
MAX_PREFILL_CAPTURES = 4  # captured prefills kept at once (each holds its own activation memory)
KERNELS = ("fused", "compiled", "plain")


# ----------------------------------------------------------------------------------------------------------------
# The step's kernels
# ----------------------------------------------------------------------------------------------------------------

def block_step_scale_after_proj(block, residual, conv_state, ssm_state):
    """`Mamba2Block.step` with the gated norm's scale moved after out_proj: with one group and no bias, the scale
    1 / RMS(y * SiLU(z)) is one number per token and out_proj is linear, so a compiled step computes the reduction
    alongside the matrix-vector product instead of in a kernel of its own. Equal to the plain step (tested)."""
    mixer = block.mixer
    if mixer.config.ngroups > 1 or mixer.config.bias:
        return block.step(residual, conv_state, ssm_state)
    y, z = mixer.step_ssm(block.norm(residual), conv_state, ssm_state)  # (b, d_inner) each
    gated = y.float() * torch.nn.functional.silu(z.float())  # fp32, as RMSNorm computes it
    scale = torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + mixer.norm.eps)  # (b, 1)
    out = mixer.out_proj((gated * mixer.norm.weight.float()).to(mixer.out_proj.weight.dtype))
    return residual + (out.float() * scale).to(out.dtype)


@functools.cache
def compiled_block_step():
    """`block_step_scale_after_proj` through torch.compile (Inductor): per layer, the norm, the conv window, the
    ssd_step update and the gated norm become a few fused kernels around the two matrix-vector products. Compiled once
    per process and shared by every layer and model (the block is an input, not a constant); coordinate-descent
    tuning searches the generated kernels' block sizes."""
    return torch.compile(block_step_scale_after_proj, fullgraph=True, dynamic=False,
                         options={"coordinate_descent_tuning": True})


def supports_fused(model):
    """Whether fused_step's kernels can run this model's step here: Triton installed, no linear bias, and CUDA (or
    Triton's interpreter)."""
    if importlib.util.find_spec("triton") is None:
        return False
    import fused_step
    on_device = model.embedding.weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return fused_step.supports(model.config) and on_device


def default_kernels(model):
    """The step's kernels when the caller names none: "fused" on CUDA where fused_step can run them, else "plain"."""
    return "fused" if model.embedding.weight.is_cuda and supports_fused(model) else "plain"


def step_function(model, kernels):
    """step(token (b,), cache) -> logits (b, padded_vocab): one decoding step with the named kernels."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown decoding kernels {kernels!r}: use one of {', '.join(KERNELS)}")
    if kernels == "plain":
        return model.step
    if kernels == "compiled":
        return functools.partial(layer_by_layer_step, model, compiled_block_step())
    if model.config.bias:
        raise ValueError("kernels='fused' needs linear layers without bias (config.bias=False): use 'compiled'")
    if not supports_fused(model):
        raise ValueError("kernels='fused' runs Triton kernels, which need Triton and CUDA (or TRITON_INTERPRET=1)")
    import fused_step
    return functools.partial(fused_step.model_step, model)


def layer_by_layer_step(model, block_step, token, cache):
    """`Mamba2LMHeadModel.step` with block_step(block, residual, conv_state, ssm_state) running each layer."""
    residual = model.embedding(token)  # (b, d_model)
    residual = residual.float() if model.config.residual_in_fp32 else residual
    for layer, layer_cache in zip(model.layers, cache.layers):
        residual = block_step(layer, residual, layer_cache.conv_state, layer_cache.ssm_state)
    cache.seqlen_offset += 1
    return model.lm_head(model.norm_f(residual)).float()


STATE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the SSM state's dtypes, by the options' names


def allocate_cache(model, batch_size, state_dtype=torch.float32):
    """model.allocate_cache with the SSM state in state_dtype: fp32 (the model's), or bf16 as mamba-ssm keeps a bf16
    model's state (half the state's bytes). Every step still computes in fp32 and rounds the new state to bf16;
    tests/test_fast_decode.py and docs/speed.md state the error this costs against the fp32 state."""
    cache = model.allocate_cache(batch_size)
    if state_dtype != torch.float32:
        cache.layers = [LayerCache(l.conv_state, l.ssm_state.to(state_dtype)) for l in cache.layers]
    return cache


class KernelDecoder:
    """The eager loop's decoder with another step: the model's prefill, the named kernels' step, the state in
    state_dtype."""

    def __init__(self, model, kernels, state_dtype=torch.float32):
        self.model, self.step, self.state_dtype = model, step_function(model, kernels), state_dtype

    def allocate_cache(self, batch_size):
        return allocate_cache(self.model, batch_size, self.state_dtype)

    def prefill(self, cache, inputs_embeds, length=None):
        return self.model.prefill(cache, inputs_embeds=inputs_embeds, length=length)


# ----------------------------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------------------------

def capture(fn, warmup=1):
    """(graph, output): fn() captured as a CUDA graph after `warmup` eager calls on a side stream (which compile,
    allocate and select kernels outside the capture). The warm-up calls run for real: fn must be safe to repeat."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn()
    return graph, output


def prefill_bucket(length):
    """The captured prefill's length for a prompt of `length` tokens: the next multiple of PREFILL_BUCKET."""
    return -(-length // PREFILL_BUCKET) * PREFILL_BUCKET


def zero_cache(cache):
    """Empty a cache in place, its tensors keeping their addresses."""
    for layer in cache.layers:
        layer.conv_state.zero_()
        layer.ssm_state.zero_()


class CapturedBatch:
    """One batch size's fixed-address cache, its captured step, and its captured prefills by bucket."""

    def __init__(self, model, batch_size, step, state_dtype=torch.float32):
        self.model = model
        self.cache = allocate_cache(model, batch_size, state_dtype)
        self.holder = None  # the caller's cache that the tensors are lent to
        self.token = torch.zeros(batch_size, dtype=torch.long, device=model.embedding.weight.device)
        self.step_graph, self.step_logits = capture(lambda: step(self.token, self.cache), warmup=3)
        self.prefills = {}  # bucket length -> (graph, embeds, length, logits), oldest capture first

    def lend(self, cache):
        """Give `cache` the fixed-address tensors, with its state copied in (none: an empty cache). The cache that
        held them before gets a copy of its own state, so it can go on later."""
        if self.holder is cache:
            return
        if self.holder is not None:
            self.holder.layers = [LayerCache(l.conv_state.clone(), l.ssm_state.clone()) for l in self.cache.layers]
        if cache.layers:
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.conv_state.copy_(theirs.conv_state)
                mine.ssm_state.copy_(theirs.ssm_state)
        else:
            zero_cache(self.cache)
        cache.layers, self.holder = list(self.cache.layers), cache

    def prefill(self, embeds, length):
        """The prompt from an empty cache; returns each row's last real position's logits (b, padded_vocab)."""
        l = embeds.shape[1]
        bucket = prefill_bucket(l)
        if bucket not in self.prefills:  # the bucket's first prompt captures it; the oldest capture past the cap goes
            for k in list(self.prefills)[:max(0, len(self.prefills) + 1 - MAX_PREFILL_CAPTURES)]:
                del self.prefills[k]
            self.prefills[bucket] = self.capture_prefill(bucket, embeds.dtype)
        graph, static_embeds, static_length, logits = self.prefills[bucket]
        static_embeds[:, :l].copy_(embeds)
        static_embeds[:, l:].zero_()
        if length is None:
            static_length.fill_(l)
        else:
            static_length.copy_(length)
        graph.replay()
        return logits

    def capture_prefill(self, bucket, dtype):
        """The prefill of a prompt padded to `bucket` tokens, from a zeroed cache, as a graph over static buffers."""
        embeds = torch.zeros(len(self.token), bucket, self.model.config.d_model, dtype=dtype, device=self.token.device)
        length = torch.full((len(self.token),), bucket, dtype=torch.long, device=self.token.device)

        def run():
            zero_cache(self.cache)
            return self.model.prefill(self.cache, inputs_embeds=embeds, length=length)
        graph, logits = capture(run)
        return graph, embeds, length, logits


class GraphedDecoder:
    """The eager loop's decoder on CUDA graphs (see the module docstring). A graph reads its inputs from fixed
    addresses: the decoder is valid while the model's parameters stay where they were (`decoder_for` makes a new one
    after model.to(...)). The caller's caches borrow a batch's fixed-address tensors while they decode."""

    def __init__(self, model, kernels, state_dtype=torch.float32, prefill_graphs=True):
        self.model, self.kernels, self.state_dtype, self.prefill_graphs = model, kernels, state_dtype, prefill_graphs
        self.key = decoder_key(model, kernels, state_dtype, prefill_graphs)
        self.batches = {}  # batch size -> CapturedBatch

    def batch(self, batch_size):
        if batch_size not in self.batches:
            self.batches[batch_size] = CapturedBatch(self.model, batch_size, step_function(self.model, self.kernels),
                                                     self.state_dtype)
        return self.batches[batch_size]

    def allocate_cache(self, batch_size):
        return Mamba2Cache()  # empty: prefill lends it a batch's tensors

    def prefill(self, cache, inputs_embeds, length=None):
        """From an empty cache, the bucket's captured prefill; after what a cache holds (a conversation's later turn),
        or without prefill graphs, the prompt runs eagerly through the lent tensors (zeroed for an empty cache)."""
        batch = self.batch(inputs_embeds.shape[0])
        eager = cache.seqlen_offset > 0 or not self.prefill_graphs
        batch.lend(cache)
        if eager:
            return self.model.prefill(cache, inputs_embeds=inputs_embeds, length=length)
        cache.seqlen_offset = inputs_embeds.shape[1]
        return batch.prefill(inputs_embeds, length)

    def step(self, token, cache):
        """token (b,) -> logits (b, padded_vocab) fp32: one replay of the captured step, the cache updated."""
        batch = self.batch(token.shape[0])
        batch.lend(cache)
        batch.token.copy_(token)
        batch.step_graph.replay()
        cache.seqlen_offset += 1
        return batch.step_logits


def decoder_key(model, kernels, state_dtype, prefill_graphs):
    return (kernels, state_dtype, prefill_graphs, model.embedding.weight.dtype,
            tuple(p.data_ptr() for p in model.parameters()))


_DECODERS = weakref.WeakKeyDictionary()  # model -> its GraphedDecoder


def decoder_for(model, kernels=None, cuda_graph=None, state_dtype=torch.float32, prefill_graphs=True):
    """The fast decoder of a Mamba2LMHeadModel (an MLMamba's: model.lm), for generate(decoder=...): on CUDA a
    GraphedDecoder, with the fused step unless `kernels` names another (kept, and made anew when the model's weights
    move), its prefills captured per bucket unless prefill_graphs=False; elsewhere, or with cuda_graph=False, the
    eager loop with the named kernels (default plain, with the fp32 state: then None, the model itself).
    state_dtype: the SSM state's (`allocate_cache`)."""
    graphs = model.embedding.weight.is_cuda and cuda_graph is not False
    kernels = kernels or (default_kernels(model) if graphs else "plain")
    if not graphs:
        plain = kernels == "plain" and state_dtype == torch.float32
        return None if plain else KernelDecoder(model, kernels, state_dtype)
    kept = _DECODERS.get(model)
    if kept is None or kept.key != decoder_key(model, kernels, state_dtype, prefill_graphs):
        _DECODERS.pop(model, None)  # the old captures are freed first
        kept = _DECODERS[model] = GraphedDecoder(model, kernels, state_dtype, prefill_graphs)
    return kept


def forget_decoder(model):
    """Drop the model's kept GraphedDecoder, freeing its captures and fixed-address caches."""
    _DECODERS.pop(model, None)


# ----------------------------------------------------------------------------------------------------------------
# A model's generate with the fast decoder; several questions at once; compiled blocks
# ----------------------------------------------------------------------------------------------------------------

def generate(model, *args, kernels=None, cuda_graph=None, state_dtype=torch.float32, **kwargs):
    """model.generate(*args, **kwargs) (an MLMamba's or a Mamba2LMHeadModel's) with `decoder_for` its LM."""
    decoder = decoder_for(getattr(model, "lm", model), kernels, cuda_graph, state_dtype)
    return model.generate(*args, decoder=decoder, **kwargs)


class PaddedPrompts:
    """A decoder whose prefill reads right-padded prompts: length (b,) marks each row's real tokens, so the padding
    changes nothing (`Mamba2Mixer`)."""

    def __init__(self, decoder, length):
        self.decoder, self.length = decoder, length

    def allocate_cache(self, batch_size):
        return self.decoder.allocate_cache(batch_size)

    def prefill(self, cache, inputs_embeds):
        return self.decoder.prefill(cache, inputs_embeds=inputs_embeds, length=self.length)

    def step(self, token, cache):
        return self.decoder.step(token, cache)


@torch.no_grad()
def generate_batch(model, images, prompts, max_new_tokens=256, kernels=None, cuda_graph=None,
                   state_dtype=torch.float32):
    """Greedy answers of an MLMamba to several questions at once: images[i] (a path, PIL image or None) with
    prompts[i]. The images are encoded as one batch, the prompts right-padded to the longest, then all are decoded
    together until each has stopped. Returns one id list per question, as `MLMamba.generate` returns it."""
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"generate_batch needs one image (or None) per prompt: {len(images)} images, "
                         f"{len(prompts)} prompts")
    ids = [model.prompt_ids(p, image is not None, model.num_image_tokens) for image, p in zip(images, prompts)]
    rows = [i for i, image in enumerate(images) if image is not None]
    image_tokens = None
    if rows:
        pixels = [model.preprocess(images[i]) for i in rows]
        encoded = model.image_tokens({k: torch.cat([p[k] for p in pixels]) for k in pixels[0]})  # (rows, N, D)
        image_tokens = encoded.new_zeros(len(images), *encoded.shape[1:])  # rows without an image stay zero
        image_tokens[rows] = encoded
    longest = max(map(len, ids))
    device = model.lm.embedding.weight.device
    padded = torch.tensor([x + [model.eos_token_id] * (longest - len(x)) for x in ids], device=device)  # (b, L)
    length = torch.tensor([len(x) for x in ids], device=device)
    decoder = PaddedPrompts(decoder_for(model.lm, kernels, cuda_graph, state_dtype) or model.lm, length)
    new = model.lm.generate(inputs_embeds=model.embed(padded, image_tokens), max_new_tokens=max_new_tokens,
                            eos_token_id=model.eos_token_id, decoder=decoder).tolist()
    return [until_stop(row, model.eos_token_id) for row in new]


def whole_scans(up_to=None):
    """Inductor's heuristics (its InductorChoices), except that no reduction or cumulative sum over at most `up_to`
    values (None: any number) is split over several programs; longer ones split as Inductor decides. Inductor's split
    scan fails to generate code for a cumulative sum over more than 128 steps whose input it computes on the fly
    (pytorch/pytorch#180221): ssd_chunked's decay sums over Mamba-2's chunks of 256 are one."""
    from torch._inductor.choices import InductorChoices

    class WholeScans(InductorChoices):
        @staticmethod
        def reduction_split_factor(device, reduction_numel_hint, numel_hint, inner_reduction):
            if up_to is None or reduction_numel_hint <= up_to:
                return 1
            return InductorChoices.reduction_split_factor(device, reduction_numel_hint, numel_hint, inner_reduction)
    return WholeScans()


def use_whole_scans(up_to=None, lower_backward_now=False):
    """`whole_scans(up_to)` as Inductor's heuristics on the calling thread, for the rest of the process.
    lower_backward_now: backward graphs are lowered at compile time, on this thread, so that they take them too (a
    backward lowered lazily runs on autograd's own thread, with Inductor's default heuristics)."""
    from torch._inductor.virtualized import V
    V.set_choices_handler(whole_scans(up_to))
    if lower_backward_now:
        import torch._functorch.config as functorch_config
        functorch_config.force_non_lazy_backward_lowering = True


PRODUCT_OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)  # a linear layer's product


def keep_in_proj(ctx, op, *args, width=None, **kwargs):
    """Selective recomputation's policy: a block keeps in_proj's product (the matrix product `width` columns wide)
    for the backward and recomputes everything else from it. out_proj's product need not be kept: its backward
    needs only its input, and checkpointing recomputes no further than the backward needs."""
    from torch.utils.checkpoint import CheckpointPolicy
    if op in PRODUCT_OPS and args[-1].shape[-1] == width:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def forward_keeping_in_proj(block, residual, cache=None, length=None):
    """`Mamba2Block.forward`, checkpointed by itself when it trains, with `keep_in_proj` as the policy."""
    if not (block.training and torch.is_grad_enabled()) or cache is not None:
        return Mamba2Block.forward(block, residual, cache, length)
    return _checkpoint_keeping_in_proj(block, Mamba2Block.forward, block, residual, cache, length)


def _checkpoint_keeping_in_proj(block, function, *args):
    """function(*args) checkpointed (non-reentrant) with `keep_in_proj` as the policy, at block's in_proj width."""
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    policy = functools.partial(keep_in_proj, width=block.mixer.in_proj.out_features)
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=functools.partial(create_selective_checkpoint_contexts, policy))


def forward_keeping_ssd(block, residual, cache=None, length=None):
    """`Mamba2Block.forward` in three parts when it trains, so that the SSD's forward runs once: the norm, in_proj,
    the conv and dt (`_before_ssd`), checkpointed with `keep_in_proj` as the policy; the SSD (eq. 3), not
    checkpointed, so its own saved tensors stay for the backward; the gated norm, out_proj and the residual add
    (`_after_ssd`), checkpointed. A block keeps in_proj's product, the SSD's inputs, states and output."""
    if not (block.training and torch.is_grad_enabled()) or cache is not None or length is not None:
        return Mamba2Block.forward(block, residual, cache, length)
    mixer = block.mixer
    z, x, B, C, dt = _checkpoint_keeping_in_proj(block, _before_ssd, block, residual)
    A, D = mixer.A_and_D()
    y, _ = mixer.ssd(x, dt, A, B, C, mixer.config.chunk_size, D)  # eq. 3, (b, l, h, p)
    return _checkpoint_keeping_in_proj(block, _after_ssd, block, residual, y, z)


def _before_ssd(block, residual):
    """`Mamba2Mixer.forward` of the block's normed input up to the SSD, without a cache: z, x, B, C and dt."""
    mixer = block.mixer
    z, xBC, dt = mixer.split_projection(block.norm(residual))  # (b, l, d_inner), (b, l, conv_dim), (b, l, h)
    x, B, C = mixer.split_xBC(mixer.causal_conv(xBC, None))  # (b, l, h, p), (b, l, g, n), (b, l, g, n)
    return z, x, B, C, mixer.positive_dt(dt)


def _after_ssd(block, residual, y, z):
    """The rest of `Mamba2Block.forward` from the SSD's output y (b, l, h, p): the gated norm, out_proj, the
    residual add."""
    mixer = block.mixer
    return residual + mixer.out_proj(mixer.norm(y.flatten(-2), gate=z).to(mixer.out_proj.weight.dtype))


@functools.cache
def compiled_block_forward(in_proj_kept=False, ssd_kept=False):
    """`Mamba2Block.forward` through torch.compile, for training at scale and long prefills: per block, the norms, the
    conv, dt, the gated norm and the residual become a few fused kernels around the matrix products. One compilation
    serves every block (the block is an input); mamba-ssm's kernel, when it runs, stays outside the compiled graph.
    in_proj_kept: `forward_keeping_in_proj` (selective recomputation) compiled instead; ssd_kept:
    `forward_keeping_ssd`."""
    forward = forward_keeping_ssd if ssd_kept else forward_keeping_in_proj if in_proj_kept else Mamba2Block.forward
    return torch.compile(forward)


def compile_blocks(lm, on=True, in_proj_kept=False, tune_kernels=False, whole_sums_up_to=None, ssd_kept=False):
    """Each block of a Mamba2LMHeadModel through `compiled_block_forward` (on=False: eager again). The block's own
    __call__ still runs it, so module hooks (FSDP's gathers) and gradient checkpointing work as before. Makes
    `whole_scans` Inductor's heuristics on the calling thread for the rest of the process: both torch forms of eq. 3
    (ssd_chunked, fast_ssd.ssd_chunked_fast) take cumulative sums over a whole chunk, 256 steps in Mamba-2's configs.
    Inductor's heuristics are per thread: a backward graph that autograd lowers on its own CUDA thread, at the first
    backward, keeps the default ones. in_proj_kept: each block compiled with its own selective recomputation
    (`forward_keeping_in_proj`), for a model whose own gradient_checkpointing is off; its backward graphs are lowered
    at compile time, on this thread (their recomputed sums need `whole_scans`). tune_kernels: Inductor times each
    fused kernel's launch settings as it compiles (coordinate descent), for the rest of the process: minutes more at
    the first call, a faster step after (docs/speed.md). whole_sums_up_to: `whole_scans`' up_to (None: no sum split;
    sums over a chunk need it at 256 or more). ssd_kept: `forward_keeping_ssd` instead of `forward_keeping_in_proj`,
    the SSD's forward run once and its saved tensors kept (more memory, less recomputation)."""
    if on:
        use_whole_scans(whole_sums_up_to, lower_backward_now=in_proj_kept or ssd_kept)
        if tune_kernels:
            import torch._inductor.config as inductor_config
            inductor_config.coordinate_descent_tuning = True
    forward = compiled_block_forward(in_proj_kept, ssd_kept) if on else None
    for block in lm.layers:
        _run_through(block, "forward", forward)


def _run_through(module, name, function):
    """module.<name> calls `function` (bound to the module) instead of its class's method; None: the class's method
    again. The module's own __call__ stays, with its hooks."""
    if function is not None:
        setattr(module, name, types.MethodType(function, module))
    else:
        module.__dict__.pop(name, None)


@functools.cache
def compiled_connector_forward(cls):
    """A connector class's forward through torch.compile: the lift, the MSC's scans, mixers and norms, the SwiGLU and
    the projector as one graph and a few fused kernels around the products."""
    return torch.compile(cls.forward)


def compile_connector(connector, on=True):
    """An ML-Mamba connector (any kind) through `compiled_connector_forward` (on=False: eager again), as
    compile_blocks does the LM's blocks. Its mixers' sums over a chunk need `whole_scans` in the forward and the
    backward: it becomes Inductor's heuristics on this thread, and the backward graph is lowered at compile time, on
    this thread, for the rest of the process (a compile_blocks call after it with whole_sums_up_to sets its own)."""
    if on:
        use_whole_scans(lower_backward_now=True)
    _run_through(connector, "forward", compiled_connector_forward(type(connector)) if on else None)


@functools.cache
def compiled_vit_forwards():
    """`ViT.embed` and `ViTBlock.forward` through torch.compile: the patch embedding with the position embeddings'
    bicubic resize, and each block's norms, attention and MLP, as a few fused kernels around the products."""
    return torch.compile(ViT.embed), torch.compile(ViTBlock.forward)


def compile_encoders(vision, on=True):
    """Each ViT of a DualEncoder (eq. 5) through `compiled_vit_forwards` (on=False: eager again), its embedding and
    each of its blocks; one compilation serves every block of an encoder (the block is an input). The ViT's own
    forward still chooses the blocks it runs."""
    embed, block_forward = compiled_vit_forwards() if on else (None, None)
    for encoder in vision.encoders.values():
        _run_through(encoder, "embed", embed)
        for block in encoder.blocks:
            _run_through(block, "forward", block_forward)
