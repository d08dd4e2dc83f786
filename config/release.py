"""The authors' release's recipe (`--preset release`): one "no-align" stage that trains the connector and the LM from
the start, with the release's connector (release.py) and its zephyr prompt."""
stage = "finetune"
connector = "msc-release"
prompt = "zephyr"
pretrain_epochs = 1
align_epochs = 1
epochs = 2
lr = 2e-5
align_lr = 1e-3
connector_lr = None
global_batch = 128
workers = 4
gradient_checkpointing = True
