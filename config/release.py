"""The authors' release's recipe (`--preset release`): one "no-align" stage that trains the connector and the LM from
the start, with the release's connector (release.py) and its zephyr prompt; the other settings are the paper's."""
stage = "finetune"
connector = "msc-release"
prompt = "zephyr"
global_batch = 128
gradient_checkpointing = True
epochs = 2
lr = 2e-5
connector_lr = None
workers = 4
pretrain_epochs = 1
align_epochs = 1
align_lr = 1e-3
