"""Where the synthetic world's default run learns or loses the spatial family, stage by stage.

    python docs/spatial_probe.py --run runs/synthetic --world data/synthetic

For a finished `python train.py` run it prints the held-out accuracy per question family of:
- the text stage's LM on the test questions with the scene written in words (test_text.json): spatial in words;
- the align stage's model and the final model on the test images;
and two linear probes, one linear map shared by the image tokens (9, or 36 with `--patch 8`), trained on the training
images and scored on the held-out (val + test) ones:
- each token's cell content (13 classes: empty, or one of 4 colours x 3 shapes);
- each token's cell index (where the token sits: 9 or 36 classes),
of the frozen encoders' features (eq. 5) and of the connector's image tokens (eqs. 6-8) after align and after
finetune. With --probes-only (docs/ablation.py --probe) only the probes, written to RUN/probes.json.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evaluate import evaluate  # noqa: E402
from model import MLMamba  # noqa: E402
from synthetic import COLORS, GRID, SHAPES  # noqa: E402


def latest(stage_dir):
    """A stage's newest complete checkpoint (run_folder.py writes its name into `latest`)."""
    return Path(stage_dir) / (Path(stage_dir) / "latest").read_text().strip()


def cell_labels(scene, side=GRID):
    """(content (side * side,), index (side * side,)) of a side x side grid of image tokens in reading order: the
    content of the scene's cell the token lies in (0 for an empty cell, else 1 + colour x 3 + shape), and the token's
    own number. side is GRID with one token per cell, 2 * GRID with 8 px patches."""
    cells = torch.zeros(GRID, GRID, dtype=torch.long)
    for r, c, shape, color in scene:
        cells[r, c] = 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)
    rows = torch.arange(side) * GRID // side  # the cell row of each token row
    return cells[rows][:, rows].flatten(), torch.arange(side * side)


ENCODERS = "frozen encoders, eq. 5"


@torch.no_grad()
def image_features(models, world, names, batch=256):
    """{features: (n, tokens, d)} of the named images: the frozen encoders' (eq. 5; a run's stages share them) and
    each named model's connector tokens (eqs. 6-8). models: {name: MLMamba}."""
    vision = next(iter(models.values())).vision
    out = {ENCODERS: [], **{name: [] for name in models}}
    for i in range(0, len(names), batch):
        pixels = [vision.preprocess(world / name) for name in names[i:i + batch]]
        v = vision({k: torch.stack([p[k] for p in pixels]) for k in pixels[0]})  # eq. 5
        out[ENCODERS].append(v)
        for name, model in models.items():
            out[name].append(model.connector(v))  # eqs. 6-8
    return {name: torch.cat(parts) for name, parts in out.items()}


def linear_probe(train_x, train_y, test_x, test_y, classes, steps=300):
    """Held-out accuracy of one linear map (d -> classes), fit by full-batch L-BFGS on standardized features: a
    (n, t, d) token tensor is read as t n samples."""
    train_x, test_x = train_x.flatten(0, 1).float(), test_x.flatten(0, 1).float()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    torch.manual_seed(0)
    head = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(train_x), train_y.flatten()) + 1e-4 * head.weight.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (head(test_x).argmax(-1) == test_y.flatten()).float().mean().item()


def probes(models, world):
    """{(features, target): held-out accuracy} for the frozen encoders' features and each named model's connector
    tokens (`image_features`), and the numbers of training and held-out images."""
    scenes = json.loads((world / "scenes.json").read_text())
    split = {s: [n for n in scenes if Path(n).name.startswith(s)] for s in ("train", "val", "test")}
    held_out = split["val"] + split["test"]
    side = int(next(iter(models.values())).num_image_tokens ** 0.5)  # the image tokens' grid
    data = {}
    for part, names in (("train", split["train"]), ("held-out", held_out)):
        labels = [cell_labels(scenes[n], side) for n in names]
        data[part] = (image_features(models, world, names), {"cell content": torch.stack([c for c, _ in labels]),
                                                             "cell index": torch.stack([i for _, i in labels])})
    classes = {"cell content": 1 + len(COLORS) * len(SHAPES), "cell index": side * side}
    out = {(features, target): linear_probe(data["train"][0][features], data["train"][1][target],
                                            data["held-out"][0][features], data["held-out"][1][target], n)
           for features in data["train"][0] for target, n in classes.items()}
    return out, len(split["train"]), len(held_out)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/synthetic", help="a finished train.py run folder")
    p.add_argument("--world", default="data/synthetic", help="the world it trained on")
    p.add_argument("--probes-only", action="store_true",
                   help="only the probes of RUN's align and final connectors (any --stage), into RUN/probes.json")
    args = p.parse_args(argv)
    run, world = Path(args.run), Path(args.world)
    if args.probes_only:
        return probes_json(run, world)
    stages = [("text stage, the scene in words", latest(run / "pretrain"), "test_text.json"),
              ("after align, from the image", latest(run / "align"), "test.json"),
              ("after finetune, from the image", run / "final", "test.json")]
    print("| stage | attribute | counting | existence | spatial | overall |\n|---|---|---|---|---|---|")
    models = {}
    for name, folder, questions in stages:
        models[name] = MLMamba.from_pretrained(folder).eval()
        r = evaluate(models[name], world / questions)
        print(f"| {name} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("attribute", "counting", "existence",
                                                                         "spatial", "overall")) + " |", flush=True)
    connectors = {f"the connector's image tokens after {stage}": models[f"after {stage}, from the image"]
                  for stage in ("align", "finetune")}
    scores, n_train, n_held = probes(connectors, world)
    print(f"\nlinear probes, {n_train} training images, {n_held} held out (% of the held-out tokens)")
    print(f"| features | cell content (13 classes) | cell index ({models[stages[-1][0]].num_image_tokens} classes) |"
          "\n|---|---|---|")
    for features in (ENCODERS, *connectors):
        print(f"| {features} | {100 * scores[features, 'cell content']:.1f} | "
              f"{100 * scores[features, 'cell index']:.1f} |")


def probes_json(run, world):
    """RUN/probes.json: {features: {target: held-out accuracy in %}} of the encoders and RUN's connectors after
    align and after finetune."""
    connectors = {f"after {stage}": MLMamba.from_pretrained(folder).eval()
                  for stage, folder in (("align", latest(run / "align")), ("finetune", run / "final"))}
    scores, _, _ = probes(connectors, world)
    result = {}
    for (features, target), accuracy in scores.items():
        result.setdefault(features, {})[target] = 100 * accuracy
    (run / "probes.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
