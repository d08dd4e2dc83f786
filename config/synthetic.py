"""The synthetic world's recipe (`python train.py` without --data): a tiny LM first learns the world's language from
text, then the image stages. fp32 on every device: docs/speed.md ("The default run on one GPU") says why."""
pretrain_epochs = 40
align_epochs = 1
epochs = 20
lr = 1e-3
align_lr = 1e-4
connector_lr = 1e-4
global_batch = 32
workers = 0
precision = "fp32"
patch = 8  # 2 x 2 image tokens a cell: more accurate than 16 px over seeds 0-4 (docs/synthetic-world.md)
# On CUDA also a 192-wide LM and a last turn that asks for the scene in words: they make every question family
# learnable with seeds 0-4, for seconds of GPU time; on a CPU the wider LM costs many minutes
# (docs/synthetic-world.md). 16 px patches on a GPU, where 8 px runs past the minute.
# --lm-width 96 --no-describe --patch 8 gives a GPU the CPU's recipe.
on_cuda = dict(lm_width=192, describe=True, patch=16)
