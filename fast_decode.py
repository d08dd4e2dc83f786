"""Decoding on CUDA graphs: the fast path of `Mamba2LMHeadModel.generate` (mamba2.py).

Eager decoding launches each of a step's kernels from Python, and at batch 1 the GPU waits for the launches. A
`GraphedDecoder` holds, for one batch size:

- a cache (every layer's conv window and SSM state) at fixed addresses;
- the decoding step (embedding, every layer, LM head) captured once as a CUDA graph and replayed per token. The
  layers run `kernels`: "plain" (`Mamba2Block.step`, op by op), "compiled" (`compiled_block_step`, torch.compile),
  or "fused" (fused_step.py: three Triton kernels a layer);
- the prefill captured per bucket of prompt lengths (multiples of PREFILL_BUCKET): the prompt is padded to its
  bucket and `length` marks its real positions, so the padding leaves the cache as it was after the last real
  token (`Mamba2Mixer`). A bucket's first prompt runs eagerly, its second is captured and replayed, later ones are
  replayed: a single answer never pays for a capture it does not reuse. At most MAX_PREFILL_CAPTURES buckets keep
  their capture.
"""

import os

import torch

from mamba2 import _triton_available, compiled_block_step

PREFILL_BUCKET = 128  # prompt lengths are padded up to a multiple of this in the captured prefill
MAX_PREFILL_CAPTURES = 4  # captured prefills kept at once (each holds its own activation memory)
KERNELS = ("fused", "compiled", "plain")


def prefill_bucket(length):
    """The captured prefill's length for a prompt of `length` tokens: the next multiple of PREFILL_BUCKET."""
    return -(-length // PREFILL_BUCKET) * PREFILL_BUCKET


def default_kernels(model, device):
    """The decoding step's kernels when the caller names none: "fused" on CUDA where Triton is installed and the
    config has no linear bias, else "plain"."""
    if torch.device(device).type == "cuda" and _triton_available():
        import fused_step
        if fused_step.supports(model.config):
            return "fused"
    return "plain"


def step_function(model, kernels):
    """step(token (b,), cache) -> logits (b, vocab): one decoding step with the named kernels."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown decoding kernels {kernels!r}: use one of {', '.join(KERNELS)}")
    if kernels == "fused":
        import fused_step
        if not fused_step.supports(model.config):
            raise ValueError("kernels='fused' needs linear layers without bias (config.bias=False): use 'compiled'")
        if not model.embedding.weight.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernels='fused' runs Triton kernels, which need CUDA (or TRITON_INTERPRET=1, slowly)")
        return lambda token, cache: fused_step.model_step(model, token, cache)
    block_step = compiled_block_step() if kernels == "compiled" else None
    return lambda token, cache: model.step(token, cache, block_step)


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


class GraphedDecoder:
    """One batch size's cache, its captured decoding step, and its captured prefills (see the module docstring).

    A graph reads its inputs from fixed addresses: the decoder is valid while the model's parameter tensors stay
    where they were (`key` records them; after model.to(...) the model builds a new decoder)."""

    def __init__(self, model, batch_size, kernels):
        self.model, self.batch_size, self.kernels = model, batch_size, kernels
        self.key = decoder_key(model, batch_size, kernels)
        self.cache = model.allocate_cache(batch_size)
        step = step_function(model, kernels)
        self.token = torch.zeros(batch_size, dtype=torch.long, device=model.embedding.weight.device)
        self.step_graph, self.step_logits = capture(lambda: step(self.token, self.cache), warmup=3)
        self.prefills = {}  # bucket length -> None (seen once, ran eagerly) or (graph, embeds, length, logits)

    def prefill(self, embeds, length=None):
        """embeds (b, l, d_model) -> each row's last real position's logits (b, padded_vocab) fp32, from an empty
        cache that then holds the prompt; length (b,): the real lengths of right-padded rows (default: all l)."""
        b, l, d = embeds.shape
        bucket = prefill_bucket(l)
        if bucket not in self.prefills:  # first prompt of this bucket: eagerly, at its own length
            self.prefills[bucket] = None
            self.cache.zero_()
            return self.model.prefill(self.cache, inputs_embeds=embeds, length=length)
        if self.prefills[bucket] is None:
            captured = [k for k, kept in self.prefills.items() if kept is not None]
            for k in captured[:max(0, len(captured) + 1 - MAX_PREFILL_CAPTURES)]:
                self.prefills[k] = None  # freed; that bucket is captured again when it comes back
            self.prefills[bucket] = self._capture_prefill(bucket, embeds.dtype)
        graph, static_embeds, static_length, logits = self.prefills[bucket]
        static_embeds[:, :l].copy_(embeds)
        static_embeds[:, l:].zero_()
        if length is None:
            static_length.fill_(l)
        else:
            static_length.copy_(length)
        graph.replay()
        self.cache.seqlen_offset = l
        return logits

    def extend(self, cache, embeds):
        """Continue from `cache` (copied in): embeds (b, l, d_model) run eagerly after what it holds -> the last
        position's logits (b, padded_vocab) fp32. The decoder's cache then holds both."""
        self.cache.copy_(cache)
        return self.model.prefill(self.cache, inputs_embeds=embeds)

    def _capture_prefill(self, bucket, dtype):
        """The prefill of a prompt padded to `bucket` tokens, from a zeroed cache, as a graph over static buffers."""
        model, cache = self.model, self.cache
        embeds = torch.zeros(self.batch_size, bucket, model.config.d_model, dtype=dtype, device=self.token.device)
        length = torch.full((self.batch_size,), bucket, dtype=torch.long, device=self.token.device)

        def run():
            self.cache.zero_()
            return model.prefill(cache, inputs_embeds=embeds, length=length)
        graph, logits = capture(run)
        return graph, embeds, length, logits

    def step(self, token):
        """token (b,) -> logits (b, padded_vocab) fp32: one replay of the captured step, the cache updated."""
        self.token.copy_(token)
        self.step_graph.replay()
        self.cache.seqlen_offset += 1
        return self.step_logits


def decoder_key(model, batch_size, kernels):
    return (batch_size, kernels, model.embedding.weight.dtype, tuple(p.data_ptr() for p in model.parameters()))


def graphed_decoder(model, batch_size, kernels):
    """The model's GraphedDecoder for this batch size and kernels: the one it keeps, or a new one (which replaces
    it, freeing the old captures first)."""
    kept = getattr(model, "_graphed_decoder", None)
    if kept is None or kept.key != decoder_key(model, batch_size, kernels):
        model._graphed_decoder = None
        model._graphed_decoder = GraphedDecoder(model, batch_size, kernels)
    return model._graphed_decoder
