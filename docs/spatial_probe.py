"""Where the synthetic world's default run learns or loses the spatial family, stage by stage.

    python docs/spatial_probe.py --run runs/synthetic --world data/synthetic

For a finished `python train.py` run it prints the held-out accuracy per question family of:
- the text stage's LM on the test questions with the scene written in words (test_text.json): spatial in words;
- the align stage's model and the final model on the test images;
and two linear probes, one linear map shared by the 9 image tokens, trained on the training images and scored on the
held-out (val + test) ones:
- each token's cell content (13 classes: empty, or one of 4 colours x 3 shapes);
- each token's cell index (9 classes: where the token sits),
of the frozen encoders' features (eq. 5) and of the connector's image tokens (eqs. 6-8) after align and after
finetune.
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


def cell_labels(scene):
    """(content (9,), index (9,)) of a scene's cells in reading order: 0 for an empty cell, else 1 + colour x 3 +
    shape; the index is the cell's own number."""
    content = torch.zeros(GRID * GRID, dtype=torch.long)
    for r, c, shape, color in scene:
        content[r * GRID + c] = 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)
    return content, torch.arange(GRID * GRID)


@torch.no_grad()
def token_features(model, world, names, batch=256):
    """(encoder features (n, 9, d_v), connector tokens (n, 9, D)) of the named images."""
    feats, tokens = [], []
    for i in range(0, len(names), batch):
        pixels = [model.vision.preprocess(world / name) for name in names[i:i + batch]]
        v = model.vision({k: torch.stack([p[k] for p in pixels]) for k in pixels[0]})  # eq. 5
        feats.append(v)
        tokens.append(model.connector(v))  # eqs. 6-8
    return torch.cat(feats), torch.cat(tokens)


def linear_probe(train_x, train_y, test_x, test_y, classes, steps=300):
    """Held-out accuracy of one linear map (d -> classes), fit by full-batch L-BFGS on standardized features: a
    (n, 9, d) token tensor is read as 9n samples."""
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


def probes(model, world):
    """{(features, target): held-out accuracy} for the encoders' features and the connector's tokens."""
    scenes = json.loads((world / "scenes.json").read_text())
    split = {s: [n for n in scenes if Path(n).name.startswith(s)] for s in ("train", "val", "test")}
    held_out = split["val"] + split["test"]
    out = {}
    data = {}
    for part, names in (("train", split["train"]), ("held-out", held_out)):
        labels = [cell_labels(scenes[n]) for n in names]
        data[part] = (*token_features(model, world, names), torch.stack([c for c, _ in labels]),
                      torch.stack([i for _, i in labels]))
    for k, features in ((0, "frozen encoders, eq. 5"), (1, "the connector's image tokens")):
        for j, (target, classes) in ((2, ("cell content", 1 + len(COLORS) * len(SHAPES))),
                                     (3, ("cell index", GRID * GRID))):
            out[features, target] = linear_probe(data["train"][k], data["train"][j], data["held-out"][k],
                                                 data["held-out"][j], classes)
    return out, len(split["train"]), len(held_out)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/synthetic", help="a finished train.py run folder")
    p.add_argument("--world", default="data/synthetic", help="the world it trained on")
    args = p.parse_args(argv)
    run, world = Path(args.run), Path(args.world)
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
    rows = []
    for stage in ("align", "finetune"):
        scores, n_train, n_held = probes(models[f"after {stage}, from the image"], world)
        if not rows:
            rows.append(("frozen encoders, eq. 5", scores["frozen encoders, eq. 5", "cell content"],
                         scores["frozen encoders, eq. 5", "cell index"]))
        rows.append((f"the connector's image tokens after {stage}", scores["the connector's image tokens",
                     "cell content"], scores["the connector's image tokens", "cell index"]))
    print(f"\nlinear probes, {n_train} training images, {n_held} held out (% of the held-out tokens)")
    print("| features | cell content (13 classes) | cell index (9 classes) |\n|---|---|---|")
    for features, content, index in rows:
        print(f"| {features} | {100 * content:.1f} | {100 * index:.1f} |")


if __name__ == "__main__":
    main()
