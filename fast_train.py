"""The fast steps of train.py's stage loop, for a dataset that fits on the device (the synthetic world): on one GPU,
`python train.py` runs the loop (train.run_stage) with `DeviceSteps`; `--fast off` with train.PlainSteps. Same
batches, same optimizer, same loss; the steps are computed in another way:

1. `DeviceData`: every sample tokenized once and right-padded to the dataset's longest, and every image's features
   from the frozen encoders (eq. 5) computed once; all held on the device. A batch is one index_select.
2. `static_loss`: MLMamba.forward's summed loss from those features, with no data-dependent shape and no host sync
   (the image tokens go into their slots by a gather and a where instead of a masked assignment).
3. `CapturedStep`: the forward, the backward and the gradient clipping recorded once as a CUDA graph and replayed at
   every step, so the step's many small kernels leave Python as one launch. Fused AdamW and the lr schedule run
   after it.
4. The loss stays on the device: the loop checks it for NaN / inf at each progress line and before each checkpoint,
   not after every step.

`clip_in_update` serves the plain loop (train.PlainSteps) on CUDA: the clipping's scaling done inside fused AdamW's
own pass over the gradients.

Tests (tests/test_fast_train.py): static_loss equals MLMamba.forward; steps of this path equal the plain loop's on
the CPU (without the graph); on CUDA, the graph's steps equal the same steps run eagerly and the plain loop's;
clip_in_update equals train.clip_and_update.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import collate
from model import IGNORE_INDEX


@dataclass
class DeviceData:
    """A dataset held on the device: ids and labels (n, L), right-padded; features (n, N, d_v) from the frozen
    encoders, or None for text-only data (rows without an image get zeros, never read: they hold no image slot);
    lengths (n,) on the host, for the progress line's tokens/s."""
    ids: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    lengths: list

    @classmethod
    @torch.no_grad()
    def build(cls, model, dataset, device, use_bf16, batch=256):
        """Every sample of `dataset` (an LLaVADataset), its image through the frozen encoders once, in batches of
        `batch`. A sample the plain loop would skip (an unreadable image) is an error here: use --fast off."""
        items = [dataset[i] for i in range(len(dataset))]
        bad = [x["skip"] for x in items if "skip" in x]
        if bad:
            raise ValueError(f"--fast needs every sample usable, and {len(bad)} are not (first: {bad[0]}); "
                             "train with --fast off, which skips them")
        text = collate([{**x, "pixels": None} for x in items])  # ids, labels right-padded to the longest sample
        features = None
        with_image = [x for x in items if x["pixels"] is not None]
        if with_image:
            zeros = {k: torch.zeros_like(v) for k, v in with_image[0]["pixels"].items()}
            features = []
            for start in range(0, len(items), batch):
                chunk = [x["pixels"] or zeros for x in items[start:start + batch]]
                pixels = {k: torch.stack([px[k] for px in chunk]).to(device) for k in zeros}
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=use_bf16):
                    features.append(model.vision(pixels))  # eq. 5, (batch, N, d_v)
            features = torch.cat(features)
        return cls(text["input_ids"].to(device), text["labels"].to(device), features,
                   [len(x["input_ids"]) for x in items])

    @classmethod
    def cached(cls, model, dataset, device, use_bf16):
        """`build`, once per dataset and encoders: the align and finetune stages read the same samples through the
        same frozen encoders. The DeviceData is kept on the dataset object."""
        key = (model.vision, device, use_bf16)  # a module compares by identity
        kept = getattr(dataset, "_device_data", None)
        if kept is None or kept[0] != key:
            dataset._device_data = kept = (key, cls.build(model, dataset, device, use_bf16))
        return kept[1]

    def batch(self, idx, out):
        """Rows idx (b,) (a device tensor) copied into the static buffers `out` (ids, labels, features)."""
        for source, buffer in zip((self.ids, self.labels, self.features), out):
            if source is not None:
                torch.index_select(source, 0, idx, out=buffer)

    def buffers(self, b):
        return tuple(None if t is None else t.new_zeros(b, *t.shape[1:]) for t in (self.ids, self.labels,
                                                                                    self.features))


def static_loss(model, ids, labels, features=None):
    """MLMamba.forward(..., loss_reduction="sum")'s loss, from encoder features (b, N, d_v) instead of pixels, with
    fixed shapes: image token k of a row goes into the row's k-th slot through a gather, and the LM head runs at
    every position, the padding's and the prompt's losses masked out by ignore_index. Returns the summed loss."""
    embeds = model.lm.embedding(ids.masked_fill(ids == model.image_token_id, 0))  # (b, L, D)
    if features is not None:
        is_image = ids == model.image_token_id  # (b, L)
        tokens = model.connector(features).to(embeds.dtype)  # eqs. 6-8, (b, N, D)
        slot = (is_image.cumsum(1) - 1).clamp(min=0)  # (b, L): position t holds image token slot[t]
        from_image = tokens.gather(1, slot[..., None].expand(-1, -1, tokens.shape[-1]))  # (b, L, D)
        embeds = torch.where(is_image[..., None], from_image, embeds)
    hidden = model.lm.hidden_states(inputs_embeds=embeds)  # eq. 9, (b, L, D)
    logits = model.lm.lm_head(hidden[:, :-1]).float()  # (b, L - 1, vocab)
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


class CapturedStep:
    """forward + backward + gradient clipping on static buffers, as train.PlainSteps.train_step computes them for one
    micro-batch per step. On CUDA it is captured as a CUDA graph after a few eager warm-up runs (on a side stream, as
    capture needs), and each call replays it; elsewhere each call runs it eagerly. The gradients live in the graph's
    memory and are overwritten by each replay, so they are never set to None in between.
    Returns (mean loss, gradient norm before clipping), device tensors rewritten by each call."""

    def __init__(self, model, buffers, params, max_grad_norm, use_bf16, device, cuda_graph=True, warmup=3):
        self.model, self.buffers, self.params = model, buffers, params
        self.max_grad_norm, self.use_bf16, self.device_type = max_grad_norm, use_bf16, device.split(":")[0]
        self.graph = None
        if self.device_type == "cuda" and cuda_graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # allocations and kernel choices, then the gradients are dropped
                for _ in range(warmup):
                    self.run()
                    for p in params:
                        p.grad = None
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.run()

    def run(self):
        ids, labels, features = self.buffers
        n_tokens = (labels != IGNORE_INDEX).sum().clamp(min=1)  # the batch's target tokens (train_step's count)
        # cache_enabled=False: the bf16 copies of the weights are made inside the graph, so each replay remakes them
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.use_bf16, cache_enabled=False):
            loss_sum = static_loss(self.model, ids, labels, features)
        (loss_sum / n_tokens).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        return loss_sum.detach() / n_tokens, grad_norm

    def __call__(self):
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.outputs


class DeviceSteps:
    """train.PlainSteps's steps for a dataset that fits on the device (see the module docstring): the same batches in
    the same order, from DeviceData through static buffers into a CapturedStep, then fused AdamW and the lr schedule.
    steps(step) returns (loss, grad-norm, tokens), the loss and norm device tensors of their own (never read here: the
    loop checks them at its progress lines). cuda_graph=False runs each step eagerly on CUDA too (what the tests
    compare the graph with)."""

    def __init__(self, model, dataset, st, cfg, proc, log, cuda_graph=True):
        self.st = st
        use_bf16 = cfg.uses_bf16(proc.device)
        self.data = DeviceData.cached(model, dataset, proc.device, use_bf16)
        self.buffers = self.data.buffers(cfg.global_batch)
        self.rows = [st.batches.indices(step) for step in range(st.start, st.batches.total)]  # the plain loop's batches
        self.order = torch.tensor(self.rows, device=proc.device)  # (steps, b): one copy to the device for the stage
        self.data.batch(self.order[0], self.buffers)  # the capture's warm-up runs on real data
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = CapturedStep(model, self.buffers, self.params, cfg.max_grad_norm, use_bf16, proc.device,
                                 cuda_graph)

    def __call__(self, step):
        k = step - self.st.start
        self.data.batch(self.order[k], self.buffers)
        loss, grad_norm = self.step()
        self.st.optimizer.step()
        self.st.scheduler.step()
        if self.step.graph is None:
            self.st.optimizer.zero_grad(set_to_none=True)
        tokens = sum(self.data.lengths[i] for i in self.rows[k])
        return loss.clone(), grad_norm.clone(), tokens  # clones: the next replay rewrites the graph's outputs

    def finish(self):
        for p in self.params:
            p.grad = None  # frees the graph's gradients; the next stage captures its own graph


def clip_in_update(optimizer, params, max_norm):
    """train.clip_and_update with one pass over the gradients fewer: instead of scaling every gradient in place by
    min(1, max_norm / norm), fused AdamW divides each by max(1, norm / max_norm) as it reads it (its `grad_scale`, the
    hook torch.amp.GradScaler uses). Returns the norm before clipping. Needs an optimizer built with fused=True."""
    if not optimizer.defaults.get("fused"):
        raise ValueError("clip_in_update needs fused AdamW (torch.optim.AdamW(..., fused=True)); use "
                         "train.clip_and_update")
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # fp32, on the device
    optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)  # clip_grad_norm_'s 1e-6, its factor inverted
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale
    return norm
