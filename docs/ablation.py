"""The connector ablation (the paper's Tables 6-7) on the synthetic world, over several seeds, runs side by side.

    python docs/ablation.py --seeds 0 1 2 3 4 --jobs 4 --out runs/ablation [-- train.py options, e.g. --patch 8]

For each seed, one text stage (`train.py --stage pretrain`, scored in words with evaluate.py on test_text.json), then
on that LM one new connector of each variant (`train.py --stage both --init-from SEED/text/final --connector K --scan
S`), as the README's ablation; with --probe each connector's linear probes (docs/spatial_probe.py). Prints, per variant,
the mean and the range over the seeds of each family's held-out accuracy (and probe), and spatial per seed; writes the
same to OUT/ablation.json. A run already finished (its eval.json) is kept, so an interrupted ablation goes on where it
stopped; a run that fails is named with its log. Paths are read from the current folder.
"""

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from synthetic import FAMILIES  # noqa: E402
from train import parse_args, prepare_data  # noqa: E402

VARIANTS = ["mlp/bsm", "msc-basic/bsm", "msc-advanced/bsm", "msc-basic/csm", "msc-advanced/csm"]
COLUMNS = sorted(FAMILIES) + ["overall"]  # the README's order


def run(script, args, out, log_name):
    """python ROOT/script args, its output in out/log_name; None when it ends well, else the log's path."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / log_name
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, str(ROOT / script), *args], stdout=f, stderr=subprocess.STDOUT)
    return None if rc == 0 else log


def text_stage(seed, out, extra, world):
    """The seed's text-stage LM in out/seed-N/text/final, scored on the test questions with the scene in words into
    out/seed-N/text/eval.json (both kept when they are there)."""
    folder = out / f"seed-{seed}" / "text"
    if not (folder / "final" / "config.json").is_file():
        failed = run("train.py", ["--stage", "pretrain", "--no-eval", "--seed", str(seed), "--out", str(folder),
                                  "--overwrite", *extra], folder.parent, "text.log")
        if failed:
            return failed
    if (folder / "eval.json").is_file():
        return None
    failed = run("evaluate.py", ["--model", str(folder / "final"), "--questions", str(world / "test_text.json")],
                 folder.parent, "text.eval.log")
    if failed:
        return failed
    lines = [line.split(":") for line in (folder.parent / "text.eval.log").read_text().splitlines() if ":" in line]
    (folder / "eval.json").write_text(json.dumps({k.strip(): float(v) for k, v in lines if k.strip() in COLUMNS}))
    return None


def image_stages(seed, variant, out, extra, world=None):
    """A new `variant` connector on the seed's text-stage LM, align + finetune, scored into its eval.json; with a
    world, its connector probed into probes.json (docs/spatial_probe.py)."""
    kind, scan = variant.split("/")
    name = variant.replace("/", "-")
    folder = out / f"seed-{seed}" / name
    if not (folder / "eval.json").is_file():
        failed = run("train.py", ["--stage", "both", "--init-from", str(out / f"seed-{seed}" / "text" / "final"),
                                  "--connector", kind, "--scan", scan, "--seed", str(seed), "--out", str(folder),
                                  "--overwrite", *extra], folder.parent, f"{name}.log")
        if failed:
            return failed
    if world is None or (folder / "probes.json").is_file():
        return None
    return run("docs/spatial_probe.py", ["--run", str(folder), "--world", str(world), "--probes-only"], folder.parent,
               f"{name}.probe.log")


def in_parallel(jobs, calls, what, t0):
    """Each call (a function of no arguments) on `jobs` threads, a line as each ends; exits naming the logs of the
    runs that failed."""
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        for k, done in enumerate(as_completed([pool.submit(call) for call in calls]), 1):
            if done.result() is not None:
                failed.append(done.result())
            print(f"{what}: {k}/{len(calls)} done, {len(failed)} failed ({time.time() - t0:.0f} s)", flush=True)
    if failed:
        sys.exit("runs failed; their logs: " + ", ".join(str(f) for f in failed))


def run_scores(folder):
    """{column: %} of one run: each family and overall (eval.json), and with probes.json the connector tokens' cell
    index probed after align and after finetune."""
    result = json.loads((folder / "eval.json").read_text())
    scores = {c: 100 * result[c] for c in COLUMNS}
    if (folder / "probes.json").is_file():
        probes = json.loads((folder / "probes.json").read_text())
        scores.update({f"cell index, {stage}": probes[f"after {stage}"]["cell index"] for stage in ("align",
                                                                                                   "finetune")})
    return scores


def summary(out, seeds, variants):
    """{variant: {column: {mean, min, max, per_seed}}} of the runs' scores (run_scores), in %."""
    table = {}
    for variant in variants:
        runs = [run_scores(out / f"seed-{s}" / variant.replace("/", "-")) for s in seeds]
        table[variant] = {c: {"mean": sum(r[c] for r in runs) / len(runs), "min": min(r[c] for r in runs),
                              "max": max(r[c] for r in runs), "per_seed": [r[c] for r in runs]}
                          for c in runs[0] if all(c in r for r in runs)}
    return table


def markdown(table, seeds):
    """The table as markdown: mean (min-max) over the seeds per column, then spatial per seed."""
    columns = list(next(iter(table.values())))
    lines = ["| connector / scan | " + " | ".join(columns) + f" | spatial, seeds {', '.join(map(str, seeds))} |",
             "|---" * (len(columns) + 2) + "|"]
    for variant, row in table.items():
        cells = [f"{row[c]['mean']:.1f} ({row[c]['min']:.1f}-{row[c]['max']:.1f})" for c in columns]
        lines.append(f"| {variant} | " + " | ".join(cells) + " | "
                     + " / ".join(f"{v:.1f}" for v in row["spatial"]["per_seed"]) + " |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS + ["msc-release/bsm"])
    p.add_argument("--jobs", type=int, default=2, help="runs side by side")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--probe", action="store_true", help="each connector's linear probes too (docs/spatial_probe.py)")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = Path(args.out).resolve()
    t0 = time.time()
    cfg = parse_args(extra)
    prepare_data(cfg, SimpleNamespace(rank=0, world_size=1), print)  # the world, built once
    world = Path(cfg.synthetic_dir).resolve()
    in_parallel(args.jobs, [lambda s=s: text_stage(s, out, extra, world) for s in args.seeds], "text stages", t0)
    in_parallel(args.jobs, [lambda s=s, v=v: image_stages(s, v, out, extra, world if args.probe else None)
                            for v in args.variants for s in args.seeds], "connectors", t0)
    table = summary(out, args.seeds, args.variants)
    in_words = {s: json.loads((out / f"seed-{s}" / "text" / "eval.json").read_text()) for s in args.seeds}
    (out / "ablation.json").write_text(json.dumps({"seeds": args.seeds, "train_options": extra, "table": table,
                                                   "text_stage_in_words": in_words}, indent=1))
    print(f"{len(args.seeds) * len(args.variants)} runs in {time.time() - t0:.0f} s; train.py options: "
          f"{' '.join(extra) or '(none)'}\n" + markdown(table, args.seeds) + "\n\nthe text stage in words, per seed: "
          + "; ".join(f"{s}: spatial {100 * r['spatial']:.1f}, overall {100 * r['overall']:.1f}"
                      for s, r in in_words.items()))


if __name__ == "__main__":
    main()
