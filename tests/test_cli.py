"""The command-line tools as a user meets them: options spelled in full, progress to the last item, figures
written next to the run."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmark
import evaluate as E
import convert_release
import generate
import train as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("parse, argv", [
    (T.parse_args, ["--epoch", "1"]),  # --epochs
    (generate.parse_args, ["--model", "m", "--prompt", "hi", "--max-new", "3"]),  # --max-new-tokens
    (lambda argv: E.main(argv), ["--model", "m", "--questions", "q.json", "--metr", "pope"]),  # --metric
    (lambda argv: benchmark.make_parser().parse_args(argv), ["decode", "--bat", "1"]),  # --batch
    (convert_release.main, ["c.pt", "--ll", "x", "--tokenizer", "t", "--out", "o"]),  # --llm
])
def test_an_abbreviated_option_is_refused_not_guessed(parse, argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and ("unrecognized arguments" in err or "required" in err), err


def test_evaluation_progress_reaches_the_last_question(monkeypatch, capsys):
    """1025 questions in batches of 32: progress at each 200 and at 1025/1025."""
    class Stub:
        tokenizer = type("T", (), {"decode": staticmethod(lambda ids: "yes")})

        def generate_batch(self, images, prompts, max_new_tokens):
            return [[1]] * len(prompts)

    questions = [{"question": "Is there a dog?", "image": None, "answer": "yes", "family": "all"}] * 1025
    stub = Stub()
    answers = E.answer_questions(stub, questions, ".", answer_batch=stub.generate_batch)
    assert answers == ["yes"] * 1025
    lines = capsys.readouterr().out.split("\n")
    assert [line.strip() for line in lines if line.strip()][-1] == "answered 1025/1025"
    assert "answered 224/1025" in lines[0]


@pytest.mark.parametrize("argv, device, expected", [
    ([], "cpu", []),
    ([], "cuda", ["use_ssd", "compile_blocks"]),
    (["--no-compile"], "cuda:1", ["use_ssd"]),
])
def test_evaluation_speeds_up_the_prefill_on_cuda_only(argv, device, expected, monkeypatch):
    """evaluate.py on CUDA: the SSD arranged for the GPU and, unless --no-compile, the LM blocks compiled; on the CPU
    the model as it is."""
    import fast_decode
    import fast_ssd
    import model as M
    calls = []
    model = type("Model", (), {"lm": "the LM"})()
    monkeypatch.setattr(fast_ssd, "use_ssd", lambda m: calls.append("use_ssd") or m)
    monkeypatch.setattr(fast_decode, "compile_blocks", lambda lm: calls.append("compile_blocks") or lm)
    monkeypatch.setattr(M.MLMamba, "from_pretrained", staticmethod(lambda folder, device: model))
    monkeypatch.setattr(E, "evaluate", lambda m, *a: {"accuracy": 1.0} if m is model else {})
    assert E.main(["--model", "m", "--questions", "q.json", "--device", device] + argv) == 0
    assert calls == expected


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_figures_go_next_to_the_runs_log_and_leave_assets_alone(tmp_path):
    log = tmp_path / "run" / "train.log"
    log.parent.mkdir()
    log.write_text("".join(f"[{s}] step {k}/3 epoch 1 loss {4 - k / 2:.4f} grad-norm 1 lr 1e-3 ETA 0m01s\n"
                           for s in ("pretrain", "align", "finetune") for k in (1, 2, 3)))
    before = {f.name: f.read_bytes() for f in (ROOT / "assets").iterdir()}
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "figures.py"), "--log", str(log)], capture_output=True,
                         text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    written = {f.name for f in (tmp_path / "run" / "figures").iterdir()}
    assert written == {"architecture.png", "scan_orders.png", "ssd_matrix.png", "loss_curves.png"}
    assert {f.name: f.read_bytes() for f in (ROOT / "assets").iterdir()} == before


def test_every_training_option_is_declared_once_in_trainconfig(capsys):
    """parse_args builds the command line from TrainConfig's fields: each field is an option of its own name, and a
    field that no preset sets keeps its dataclass default."""
    from dataclasses import fields
    with pytest.raises(SystemExit):
        T.parse_args(["--help"])
    shown = capsys.readouterr().out
    cfg = T.parse_args(["--device", "cpu"])
    for f in fields(T.TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in shown, f.name
        by_preset = any(f.name in T.preset_values(p, "cuda") for p in ("synthetic", "paper", "release"))
        if not by_preset and f.name not in ("preset", "device"):
            assert getattr(cfg, f.name) == f.default, f.name
    assert T.parse_args(["--device", "cpu", "--lm-width", "64", "--no-describe"]).lm_width == 64
    presets = sorted(f.stem for f in T.PRESET_DIR.glob("*.py"))
    assert presets == sorted(next(f for f in fields(T.TrainConfig) if f.name == "preset").metadata["choices"])


def test_the_tour_prints_each_stage_with_its_shape(capsys):
    """python model.py: the path from image to logits at the paper's configuration, on the meta device."""
    import model
    model.tour(size="130m")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 13 and lines[1].endswith("(1, 3, 384, 384)")
    assert lines[2].endswith("(1, 729, 1024)") and lines[3].endswith("(1, 729, 1152)")  # DINOv2, SigLIP: block -2
    assert "eq. 5" in lines[4] and lines[4].endswith("(1, 729, 2176)")
    assert all(line.endswith("(1, 729, 768)") for line in lines[5:9])  # the connector at the LM's width
    assert lines[9].endswith("(1, 744, 768)") and lines[10].endswith("(1, 744, 768)")  # 729 image + 15 text tokens
    assert lines[11].endswith("(1, 1, 50288)") and lines[12].endswith("(1, 24, 64, 128)")  # 24 heads of 64, state 128


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal where there is no GPU")
@pytest.mark.parametrize("argv", [["decode"], ["pipeline"], ["train"], ["ssd", "--device", "cuda"]])
def test_a_gpu_benchmark_without_a_gpu_is_one_line_and_exit_code_2(argv, capsys):
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available here" in err


def load_docs_script(name):
    """A script of docs/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_spatial_probe_labels_cells_and_fits_a_linear_map():
    """docs/spatial_probe.py: a scene's cell labels in reading order, and a linear probe that reads a linearly
    separable target perfectly and random labels near chance."""
    import torch
    probe = load_docs_script("spatial_probe")
    content, index = probe.cell_labels([(0, 1, "circle", "red"), (2, 2, "triangle", "yellow")])
    assert content.tolist() == [0, 1, 0, 0, 0, 0, 0, 0, 1 + 3 * 3 + 2] and index.tolist() == list(range(9))
    content, index = probe.cell_labels([(0, 1, "circle", "red")], side=6)  # 8 px patches: 2 x 2 tokens a cell
    assert content.view(6, 6)[:2, 2:4].eq(1).all() and content.sum() == 4 and index.tolist() == list(range(36))
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 9, 16, generator=g), torch.randn(16, 5, generator=g)
    y = (x @ w).argmax(-1)  # a linear target
    assert probe.linear_probe(x[:200], y[:200], x[200:], y[200:], 5) > 0.97
    noise = torch.randint(0, 5, (300, 9), generator=g)
    assert probe.linear_probe(x[:200], noise[:200], x[200:], noise[200:], 5) < 0.35


def test_upsampled_tokens_lay_each_cell_over_a_2x2_block_as_8px_patches_do():
    """docs/upsampled_tokens.py: a 3 x 3 grid's tokens become the 6 x 6 raster of the 8 px world, token (r, c) being
    the old (r // 2, c // 2)."""
    import torch
    up = load_docs_script("upsampled_tokens")
    tokens = torch.arange(2 * 9 * 5, dtype=torch.float32).reshape(2, 9, 5)
    grid = up.upsample(tokens)
    assert grid.shape == (2, 36, 5)
    assert all(torch.equal(grid[:, 6 * r + c], tokens[:, 3 * (r // 2) + c // 2]) for r in range(6) for c in range(6))
    assert not torch.equal(grid[:, 1], grid[:, 2]) and torch.equal(grid[:, 0], grid[:, 7])  # row-major raster


def test_the_ablation_summarizes_each_variant_over_the_seeds(tmp_path):
    """docs/ablation.py: per variant the mean, min and max over the seeds of each family (eval.json) and of the
    probes (probes.json, where every seed has one), in %; the markdown row gives mean (min-max) and spatial per seed."""
    import json
    ablation = load_docs_script("ablation")
    for seed, spatial in ((0, 0.5), (1, 0.75)):
        run = tmp_path / f"seed-{seed}" / "mlp-bsm"
        run.mkdir(parents=True)
        scores = {"attribute": 1.0, "counting": 0.9, "existence": 0.8, "spatial": spatial, "overall": 0.85,
                  "set_aside": 0}
        (run / "eval.json").write_text(json.dumps(scores))
        if seed == 0:
            (run / "probes.json").write_text(json.dumps({"after align": {"cell index": 99.0},
                                                         "after finetune": {"cell index": 90.0}}))
    table = ablation.summary(tmp_path, [0, 1], ["mlp/bsm"])
    row = table["mlp/bsm"]
    assert row["spatial"] == {"mean": 62.5, "min": 50.0, "max": 75.0, "per_seed": [50.0, 75.0]}
    assert list(row) == ablation.COLUMNS  # seed 1 has no probes: no probe column
    assert "| mlp/bsm | 100.0 (100.0-100.0) |" in ablation.markdown(table, [0, 1])
    assert ablation.markdown(table, [0, 1]).endswith("| 50.0 / 75.0 |")


def test_kernel_classes_sum_each_kernels_time_into_its_first_matching_class():
    """benchmark.kernel_classes: cuDNN's flash attention (whose name holds sm90_) is attention, not a product;
    ssd_kernel.py's kernels are a class of their own; a kernel with no GPU time is left out; the seconds are the
    profile's microseconds / 1e6."""
    import types
    events = [types.SimpleNamespace(key=k, self_device_time_total=us) for k, us in (
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma", 2000.0), ("nvjet_sm90_tst_192x192", 30000.0),
        ("sm80_xmma_gemm_f32f32", 500.0), ("triton_red_fused_add_mean", 1000.0), ("_diag_bwd_s", 250.0),
        ("_chunk_fwd", 150.0), ("_states_fwd", 50.0), ("_group_bwd", 25.0),
        ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 4000.0), ("at::native::reduce_kernel", 100.0),
        ("cudaLaunchKernel", 0.0))]
    totals = benchmark.kernel_classes(types.SimpleNamespace(key_averages=lambda: events))
    assert totals == pytest.approx({"attention (the frozen ViTs)": 0.002, "matrix products": 0.0305,
                                    "optimizer and gradient clipping": 0.004, "SSD scans and decays (compiled)": 0.0,
                                    "SSD chunk kernels (ssd_kernel.py)": 0.000475,
                                    "compiled elementwise and reductions": 0.001, "copies and casts": 0.0,
                                    "other elementwise and reductions": 0.0001})


def test_train_parts_time_each_part_and_the_update_moves_only_what_trains():
    """benchmark._time_step_parts (benchmark.py train --parts) on a tiny ML-Mamba on the CPU: the five parts each take
    a positive time; the update moves the connector's and the LM's weights and not the frozen encoders'; it leaves
    no gradient behind."""
    from conftest import tiny_config
    from model import MLMamba
    torch.manual_seed(0)
    model = MLMamba(tiny_config())
    model.image_token_id = model.config.lm.vocab_size - 1
    model.set_stage("finetune")
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = T.make_optimizer(model, 1e-2, 0.0, fused=True)  # fast_train.clip_in_update needs it
    pixels = {name: torch.randn(2, 3, 42, 42) for name in model.config.vision}
    slots = torch.full((2, model.num_image_tokens), model.image_token_id)
    ids = torch.cat([torch.randint(0, 200, (2, 3)), slots, torch.randint(0, 200, (2, 6))], dim=1)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < ids.shape[1] - 4, -100)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    times = benchmark._time_step_parts(model, opt, trainable, pixels, ids, labels, repeats=1, device="cpu")
    assert list(times) == ["encoders", "connector", "LM", "clipping and AdamW", "AdamW with the clipping inside"]
    assert all(t > 0 for t in times.values())
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.startswith("connector.") for n in moved) and any(n.startswith("lm.") for n in moved)
    assert not any(n.startswith("vision.") for n in moved)
    assert all(p.grad is None for p in model.parameters())


def test_train_benchmark_forms_follow_the_options():
    """benchmark._train_forms: each SSD path eager and compiled with --compile (--no-eager drops the eager rows), a
    row per number of checkpointed blocks, --compile-encoders adds train.py --compile's step (blocks keeping
    in_proj's product, connector and encoders compiled) under a name that says so, and --keep-ssd that step with
    each block's SSD run once; --keep-in-proj, --compile-connector, --compile-encoders or --keep-ssd given SSD paths
    adds its rows for those alone."""
    parse = benchmark.make_parser().parse_args
    forms = benchmark._train_forms(parse(["train", "--backends", "triton", "torch", "--compile",
                                          "--checkpoint-blocks", "64", "32"]), ["triton", "torch"], 64)
    assert [f for _, f in forms[:4]] == [("triton", c, n, False, False, False) for c in (False, True) for n in (64, 32)]
    assert forms[1][0].endswith("32 of 64 blocks checkpointed") and len(forms) == 8
    forms = benchmark._train_forms(parse(["train", "--backends", "triton", "torch", "--no-eager",
                                          "--compile-encoders", "--keep-ssd"]), ["triton", "torch"], 64)
    assert [f for _, f in forms] == [(b, True, 0, kept, True, True) for kept in ("in_proj", "ssd")
                                     for b in ("triton", "torch")]
    assert all(name.endswith("the connector compiled, the encoders compiled") for name, _ in forms)
    assert ["SSD's forward once" in name for name, _ in forms] == [False, False, True, True]
    args = parse(["train", "--backends", "triton", "torch", "--no-eager", "--compile-encoders", "torch",
                  "--keep-ssd", "triton"])
    forms = benchmark._train_forms(args, ["triton", "torch"], 64)
    assert [f for _, f in forms] == [("torch", True, 0, "in_proj", True, True), ("triton", True, 0, "ssd", True, True)]
    forms = benchmark._train_forms(parse(["train", "--backends", "triton", "torch", "--no-eager", "--keep-in-proj",
                                          "--compile-connector", "triton"]), ["triton", "torch"], 64)
    assert [f for _, f in forms] == [("triton", True, 0, "in_proj", False, False), ("torch", True, 0, "in_proj", False,
                                     False), ("triton", True, 0, "in_proj", True, False)]


def test_the_teaching_form_at_another_chunk_gives_the_same_loss(monkeypatch):
    """benchmark.py train --teaching-chunk: benchmark.use_ssd gives every mixer (the LM's, the connector's) ssd_chunked
    at chunks of at most Q, the loss equals the one at the model's chunk, the rows of the teaching form say the chunk
    and the other forms keep their SSD."""
    import fast_ssd
    import ssd
    from conftest import tiny_config
    from model import MLMamba
    model = MLMamba(tiny_config())  # chunks of 16
    model.image_token_id = model.config.lm.vocab_size - 1
    pixels = {name: torch.randn(2, 3, 42, 42) for name in model.config.vision}
    slots = torch.full((2, model.num_image_tokens), model.image_token_id)
    ids = torch.cat([torch.randint(0, 200, (2, 3)), slots, torch.randint(0, 200, (2, 20))], dim=1)
    chunks, plain = [], ssd.ssd_chunked
    monkeypatch.setattr(ssd, "ssd_chunked", lambda *a, **k: chunks.append(a[5]) or plain(*a, **k))
    benchmark.use_ssd(model, "torch")  # the model's chunk
    want = model(pixels, ids, ids)[1].item()
    for q in (4, 64):
        chunks.clear()
        benchmark.use_ssd(model, "torch", q)
        assert abs(model(pixels, ids, ids)[1].item() - want) < 1e-5
        assert len(chunks) == 2 * 2 + 2 and set(chunks) == {min(16, q)}  # 2 MSC blocks of 2 directions, 2 LM blocks
    benchmark.use_ssd(model, "torch-fast", 4)
    assert {m.ssd for m in model.modules() if hasattr(m, "ssd")} == {fast_ssd.ssd_chunked_fast}
    args = benchmark.make_parser().parse_args(["train", "--backends", "triton", "torch", "--no-eager",
                                               "--compile-encoders", "--teaching-chunk", "128"])
    names = [name for name, _ in benchmark._train_forms(args, ["triton", "torch"], 64)]
    assert ["at chunks of 128" in name for name in names] == [False, True]


def test_a_tile_sweep_leaves_the_fastest_set_and_passes_over_a_failing_tile(capsys):
    """benchmark.sweep_tile (benchmark.py tiles, ssd-tiles): each candidate is set as the module's tile before it is
    measured; one that fails is printed as failed and skipped; the fastest stays set and is compared to the first."""
    import types
    module = types.SimpleNamespace()
    seen = []

    def measure():
        seen.append(dict(module.TILE))
        if module.TILE["BT"] == 128:
            raise RuntimeError("out of resource: shared memory\nmore")
        return {32: 0.003, 64: 0.001}[module.TILE["BT"]]
    benchmark.sweep_tile(module, "TILE", ("BT", "num_warps"), [(32, 4), (128, 8), (64, 4)], measure, "a step")
    assert seen == [{"BT": 32, "num_warps": 4}, {"BT": 128, "num_warps": 8}, {"BT": 64, "num_warps": 4}]
    assert module.TILE == {"BT": 64, "num_warps": 4}
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "TILE (128, 8): failed: RuntimeError: out of resource: shared memory"
    assert lines[-1] == "best TILE: {'BT': 64, 'num_warps': 4} (1.000 ms against 3.000 ms with the first)"


def test_decode_benchmark_forms_set_the_prefetch_of_both_matvec_kernels():
    """benchmark.step_forms: --prefetch-k K gives both matvec kernels K columns (fused_step.PREFETCH_K's keys), PDL
    off prefetches nothing, and without --prefetch-k each kernel keeps its own (None: PREFETCH_K as it is)."""
    import fused_step
    parse = benchmark.make_parser().parse_args
    forms = benchmark.step_forms(parse(["decode", "--kernels", "fused", "--pdl", "off", "on", "--prefetch-k", "256",
                                        "1024"]))
    assert [settings["PREFETCH_K"] for _, _, settings, _ in forms] == [
        dict(norm_matvec=0, gated_matvec=0), dict(norm_matvec=256, gated_matvec=256),
        dict(norm_matvec=1024, gated_matvec=1024)]
    assert all(set(s["PREFETCH_K"]) == set(fused_step.PREFETCH_K) for _, _, s, _ in forms)
    assert forms[2][3] == " (auto products, PDL on, prefetch 1024)"
    (_, _, settings, label), = benchmark.step_forms(parse(["decode", "--kernels", "fused"]))
    assert settings["PREFETCH_K"] is None and label == " (auto products, PDL on)"
    assert set(settings) <= set(vars(fused_step))  # each setting is one of fused_step's
