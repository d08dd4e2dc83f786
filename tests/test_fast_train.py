"""train.py's fast path (fast_train.py): the same loss and the same steps as the plain loop."""

from functools import partial

import pytest
import torch

import fast_train as FT
import train as T
from synthetic import world_files
from data import collate
from model import IGNORE_INDEX
from conftest import assert_adam_close
from tests.test_train import args_for, params, progress, stop_after


def batch_of(model, dataset, rows):
    return collate([dataset[i] for i in rows])


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_static_loss_equals_the_models_forward(world, tmp_path, stage):
    """static_loss (features in, fixed shapes, extra right-padding) == MLMamba.forward's summed loss, with and without
    images: the gather + where puts the image tokens in the slots the masked assignment does."""
    cfg = args_for(world, tmp_path)
    model = T.build_model(cfg, world_files(world)).eval()
    dataset = T.dataset_for(model, world / ("text.json" if stage == "pretrain" else "train.json"), world)
    b = batch_of(model, dataset, [3, 0, 7, 5, 1])
    _, expected = model(b["pixel_values"], b["input_ids"], b["labels"], loss_reduction="sum", return_logits=False)
    pad = 21  # the fast path pads every batch to the dataset's longest sample
    ids = torch.nn.functional.pad(b["input_ids"], (0, pad))
    labels = torch.nn.functional.pad(b["labels"], (0, pad), value=IGNORE_INDEX)
    features = model.vision(b["pixel_values"]) if b["pixel_values"] is not None else None
    with torch.no_grad():
        got = FT.static_loss(model, ids, labels, features)
    assert expected.item() > 1.0  # an untrained model: a loss far from 0
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_device_data_holds_each_sample_once_padded_with_its_features(world, tmp_path):
    cfg = args_for(world, tmp_path)
    model = T.build_model(cfg, world_files(world)).eval()
    dataset = T.dataset_for(model, world / "train.json", world)
    data = FT.DeviceData.build(model, dataset, "cpu", use_bf16=False, batch=5)  # several feature batches
    assert data.ids.shape == data.labels.shape == (len(dataset), max(data.lengths))
    buffers = data.buffers(3)
    data.batch(torch.tensor([6, 2, 11]), buffers)
    for row, i in enumerate([6, 2, 11]):
        item = dataset[i]
        n = len(item["input_ids"])
        assert buffers[0][row, :n].tolist() == item["input_ids"] and not buffers[0][row, n:].any()
        assert buffers[1][row, :n].tolist() == item["labels"] and (buffers[1][row, n:] == IGNORE_INDEX).all()
        pixels = {k: v[None] for k, v in item["pixels"].items()}
        torch.testing.assert_close(buffers[2][row], model.vision(pixels)[0], rtol=1e-5, atol=1e-5)


def test_align_and_finetune_share_one_device_data(world, tmp_path, monkeypatch):
    """The image stages read the same samples through the same frozen encoders: their features are computed once."""
    built = []
    build = FT.DeviceData.build.__func__

    def counted(cls, *args, **kwargs):
        built.append(1)
        return build(cls, *args, **kwargs)
    monkeypatch.setattr(FT.DeviceData, "build", classmethod(counted))
    cfg = args_for(world, tmp_path, "--stage", "both", "--max-steps", "2", "--fast", "on")
    T.train(cfg)
    assert len(built) == 1


def test_device_data_is_kept_per_encoders_device_and_precision(world, tmp_path, monkeypatch):
    """DeviceData.cached builds once per dataset for the same encoders, device and precision, and again when one of
    them changes: bf16 features, or another model's encoders."""
    built = []
    monkeypatch.setattr(FT.DeviceData, "build", classmethod(lambda cls, *args: built.append(args) or object()))
    cfg = args_for(world, tmp_path)
    model, other = (T.build_model(cfg, world_files(world)) for _ in range(2))
    dataset = T.dataset_for(model, world / "train.json", world)
    first = FT.DeviceData.cached(model, dataset, "cpu", False)
    assert FT.DeviceData.cached(model, dataset, "cpu", False) is first and len(built) == 1
    in_bf16 = FT.DeviceData.cached(model, dataset, "cpu", True)
    assert in_bf16 is not first and FT.DeviceData.cached(other, dataset, "cpu", True) is not in_bf16
    assert [args[0] for args in built] == [model, model, other]


@pytest.mark.parametrize("stage", ["pretrain", "align", "finetune"])
def test_fast_steps_equal_the_plain_loops(world, tmp_path, stage):
    """--fast on (on the CPU: DeviceData, static_loss, eager steps) and --fast off take the same steps: the same
    batches in the same order, the same stochastic-depth draws, the same loss, gradient norm and parameters."""
    lines, models = {}, {}
    for fast in ("off", "on"):
        cfg = args_for(world, tmp_path / fast, "--stage", stage, "--max-steps", "4", "--log-every", "1",
                       "--fast", fast)
        model = T.build_model(cfg, world_files(world))
        dataset = T.dataset_for(model, world / ("text.json" if stage == "pretrain" else "train.json"), world)
        out = []
        torch.manual_seed(0)
        models[fast] = params(T.run_stage(stage, model, dataset, cfg, log=out.append,
                                          steps_for=T.stage_steps(cfg, T.Process())))
        lines[fast] = progress("\n".join(out))
    assert len(lines["on"]) == len(lines["off"]) == 4
    for (loss, norm), (loss_plain, norm_plain) in zip(lines["on"], lines["off"]):
        assert loss == pytest.approx(loss_plain, abs=2e-4) and norm == pytest.approx(norm_plain, rel=1e-2)
    assert_adam_close(models["on"], models["off"], lr=max(cfg.lr, cfg.align_lr), steps=4)
    assert (tmp_path / "on" / stage / "latest").read_text() == "checkpoint-4"


def test_fast_path_resumes_after_interruption_as_an_uninterrupted_run(world, tmp_path):
    """Killed after step 5 with checkpoints every 2 steps, --resume continues from step 4 and ends with the weights of
    a run that was never stopped, to the bit (the batches, the stochastic depth's draws and Adam's state)."""
    common = ["--stage", "finetune", "--max-steps", "6", "--save-every", "2", "--fast", "on"]
    full = params(T.train(args_for(world, tmp_path / "a", *common)))
    with pytest.raises(KeyboardInterrupt):
        T.train(args_for(world, tmp_path / "b", *common), on_step=stop_after(5))
    assert (tmp_path / "b/finetune/latest").read_text() == "checkpoint-4"
    resumed = params(T.train(args_for(world, tmp_path / "b", *common, "--resume")))
    for n, v in full.items():
        torch.testing.assert_close(resumed[n], v, rtol=0, atol=0, msg=n)


def test_fast_path_stops_at_a_nan_naming_its_step(world, tmp_path):
    cfg = args_for(world, tmp_path, "--stage", "finetune", "--max-steps", "3", "--fast", "on")
    model = T.build_model(cfg, world_files(world))
    with torch.no_grad():
        model.lm.norm_f.weight.fill_(float("nan"))
    # on the CPU the loss is a host tensor, so the loop checks it at every step: the message names the step alone
    with pytest.raises(T.TrainingError, match=r"loss is nan at step 1: stopping. The last good checkpoint is none"):
        T.run_stage("finetune", model, T.dataset_for(model, world / "train.json", world), cfg,
                    steps_for=FT.DeviceSteps)
    assert not (tmp_path / "finetune" / "latest").exists()


def test_fast_on_refuses_what_it_cannot_run(world, tmp_path):
    cfg = args_for(world, tmp_path, "--fast", "on", "--per-device-batch", "4")
    with pytest.raises(ValueError, match="--fast on runs one process with one micro-batch per step"):
        T.stage_steps(cfg, T.Process())
    assert T.stage_steps(args_for(world, tmp_path), T.Process()) is T.PlainSteps  # auto: not on the CPU
    assert T.stage_steps(args_for(world, tmp_path), T.Process(device="cuda")) is FT.DeviceSteps
    plain_on_cuda = T.stage_steps(args_for(world, tmp_path, "--data", "x.json"), T.Process(device="cuda"))
    assert plain_on_cuda.func is T.PlainSteps and plain_on_cuda.keywords == {"update": FT.clip_in_update}


@pytest.mark.parametrize("grad_size", [100.0, 1e-3])
def test_clip_in_update_equals_clipping_then_the_step(grad_size):
    """fast_train.clip_in_update == train.clip_and_update over three steps, gradients above the max norm (clipped:
    equal to rounding) and below it (not clipped: exactly equal); both return the norm before clipping."""
    results = []
    for update in (T.clip_and_update, FT.clip_in_update):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        gen, norms = torch.Generator().manual_seed(1), []
        for _ in range(3):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * grad_size
            norms.append(update(opt, list(model.parameters()), 1.0))
        assert not hasattr(opt, "grad_scale")  # the next step of this optimizer is a plain one
        results.append((torch.stack(norms), [p.detach().clone() for p in model.parameters()]))
    (norms, plain), (folded_norms, folded) = results
    assert (norms > 10).all() if grad_size > 1 else (norms < 0.1).all()
    torch.testing.assert_close(folded_norms, norms, rtol=0, atol=0)
    for a, b in zip(folded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6 if grad_size > 1 else 0, atol=1e-7 if grad_size > 1 else 0)


def test_clip_in_update_needs_fused_adamw():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="needs fused AdamW"):
        FT.clip_in_update(torch.optim.AdamW([p]), [p], 1.0)


def test_the_plain_loop_with_clip_in_update_equals_it_with_clip_and_update(world, tmp_path, monkeypatch):
    """PlainSteps with fast_train.clip_in_update (what train.py picks on CUDA) runs the same steps as with its own
    clip_and_update: the same losses and gradient norms, the same weights to rounding (fused AdamW on the CPU)."""
    make = T.make_optimizer
    monkeypatch.setattr(T, "make_optimizer", lambda *a, **k: make(*a, **{**k, "fused": True}))
    results = {}
    for name, steps_for in (("plain", T.PlainSteps), ("folded", partial(T.PlainSteps, update=FT.clip_in_update))):
        cfg = args_for(world, tmp_path / name, "--stage", "finetune", "--max-steps", "3", "--log-every", "1",
                       "--fast", "off", "--drop-path", "0", "--max-grad-norm", "0.05")
        model = T.build_model(cfg, world_files(world))
        dataset = T.dataset_for(model, world / "train.json", world)
        out = []
        T.run_stage("finetune", model, dataset, cfg, log=out.append, steps_for=steps_for)
        results[name] = (progress("\n".join(out)), params(model))
    assert len(results["plain"][0]) == 3 and all(norm > 0.05 for _, norm in results["plain"][0])  # clipped
    flat = {name: [v for step in lines for v in step] for name, (lines, _) in results.items()}  # as printed
    assert flat["folded"] == pytest.approx(flat["plain"], rel=1e-3)
    for name, value in results["plain"][1].items():
        torch.testing.assert_close(results["folded"][1][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_cuda_graph_steps_equal_eager_steps(world, tmp_path, stage):
    """On CUDA: the captured graph's steps == the same steps launched one by one == the plain loop (fp32; stochastic
    depth off: a graph draws its random numbers in another order). Adam moves a weight by ~lr whatever its gradient's
    size, so a near-zero gradient summed in another order (cuBLAS may pick other algorithms inside a graph) can move
    a few weights by up to ~lr per step; a graph that replayed stale inputs would move most of them."""
    results, steps, lr = {}, 4, 1e-3
    for name, fast, graph in (("graph", "on", True), ("eager", "on", False), ("plain", "off", None)):
        cfg = args_for(world, tmp_path / name, "--stage", stage, "--max-steps", str(steps), "--log-every", "1",
                       "--fast", fast, "--device", "cuda", "--drop-path", "0", "--precision", "fp32")
        model = T.build_model(cfg, world_files(world)).cuda()
        dataset = T.dataset_for(model, world / ("text.json" if stage == "pretrain" else "train.json"), world)
        out, proc = [], T.Process(device="cuda")
        steps_for = T.PlainSteps
        if graph is not None:
            steps_for = partial(FT.DeviceSteps, cuda_graph=graph)
        T.run_stage(stage, model, dataset, cfg, proc, log=out.append, steps_for=steps_for)
        results[name] = (progress("\n".join(out)), params(model))
    for other in ("eager", "plain"):
        assert len(results["graph"][0]) == len(results[other][0]) == steps
        for (loss, norm), (loss_other, norm_other) in zip(results["graph"][0], results[other][0]):
            assert loss == pytest.approx(loss_other, abs=2e-4) and norm == pytest.approx(norm_other, rel=1e-2)
        assert_adam_close(results["graph"][1], results[other][1], lr, steps)
