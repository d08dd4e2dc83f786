"""The paper's recipe (Table 1, section 4.1; `python train.py --data ...`): AdamW, cosine decay after a linear warmup
over 3% of the steps, lr 2e-5 (align 1e-3), weight decay 0.1, 2 epochs, global batch 64 = per-device batch x
gradient accumulation x devices, bf16 autocast on fp32 master weights, gradient clipping at 1.0. The pretrain stage
runs only when given --pretrain-data."""
pretrain_epochs = 1
align_epochs = 1
epochs = 2
lr = 2e-5
align_lr = 1e-3
connector_lr = None
global_batch = 64
workers = 4
# On CUDA the LM blocks (the SSD's diagonal blocks as ssd_kernel.py's Triton kernels), the connector and the frozen
# encoders through torch.compile: the fastest training step measured at the paper's configuration (docs/speed.md);
# --no-compile runs them eagerly
on_cuda = dict(compile=True)
