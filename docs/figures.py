"""The README's pictures, drawn from the code they show: `python docs/figures.py [--log runs/synthetic/train.log]`
writes them next to the run's log (runs/synthetic/figures/); `--assets` refreshes the README's copies in assets/.

    assets/architecture.png   the ML-Mamba pipeline (Fig. 2 right) with each box's file and tensor shape
    assets/scan_orders.png    BSM's and CSM's reading orders (Fig. 4) on a 4 x 4 grid, from connector.scan_orders
    assets/ssd_matrix.png     one head's SSD matrix M = L o C B^T, read out of ssd.ssd_quadratic, with the chunks of
                              ssd.ssd_chunked marked: diagonal blocks (computed as they are) and off-diagonal blocks
                              (rank n, passed through the chunk states)
    assets/loss_curves.png    the loss of each training stage, from a run's train.log (default: the default run)

Needs matplotlib (in requirements-dev.txt).
"""

import argparse
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from connector import scan_orders  # noqa: E402
from ssd import ssd_quadratic  # noqa: E402


def architecture(file):
    """Boxes and arrows: image -> two ViTs -> concat -> lift + MSC + SwiGLU -> MLP -> splice -> Mamba-2 LM."""
    boxes = [  # (x, y, text, colour)
        (0.5, 3.0, "image\n384 x 384", "#eeeeee"),
        (2.5, 4.0, "DINOv2 ViT-L/14\nlayer -2: (729, 1024)\nvision.py  (frozen)", "#cfe2f3"),
        (2.5, 2.0, "SigLIP so400m\nlayer -2: (729, 1152)\nvision.py  (frozen)", "#cfe2f3"),
        (4.6, 3.0, "concat  eq. 5\n(729, 2176)", "#cfe2f3"),
        (6.6, 3.0, "Scan Connector (MSC)\nlift -> 2 MSC blocks\n(BSM / CSM) -> SwiGLU\n"
                   "eqs. 7-8  connector.py", "#d9ead3"),
        (8.8, 3.0, "3-layer MLP\nprojector  eq. 6\n(729, D)", "#d9ead3"),
        (8.8, 0.9, "prompt text\n\"In: <image> ... Out:\"\ntokens -> embeddings", "#eeeeee"),
        (10.9, 3.0, "splice: image tokens\nat the <image> slots\nmodel.py", "#fff2cc"),
        (13.0, 3.0, "Mamba-2 LM\n(SSD, eqs. 1-4)\neq. 9  mamba2.py", "#f4cccc"),
        (13.0, 0.9, "answer, one token\nper step from a\nfixed-size state", "#eeeeee"),
    ]
    fig, ax = plt.subplots(figsize=(15, 5.2))
    centers = {}
    for x, y, text, colour in boxes:
        ax.add_patch(FancyBboxPatch((x - 0.95, y - 0.6), 1.9, 1.2, boxstyle="round,pad=0.05", fc=colour, ec="#555"))
        ax.text(x, y, text, ha="center", va="center", fontsize=8.5)
        centers[text.split("\n")[0]] = (x, y)
    arrows = [("image", "DINOv2 ViT-L/14"), ("image", "SigLIP so400m"), ("DINOv2 ViT-L/14", "concat  eq. 5"),
              ("SigLIP so400m", "concat  eq. 5"), ("concat  eq. 5", "Scan Connector (MSC)"),
              ("Scan Connector (MSC)", "3-layer MLP"), ("3-layer MLP", "splice: image tokens"),
              ("prompt text", "splice: image tokens"),
              ("splice: image tokens", "Mamba-2 LM"), ("Mamba-2 LM", "answer, one token")]
    for a, b in arrows:
        (x0, y0), (x1, y1) = centers[a], centers[b]
        dx, dy = x1 - x0, y1 - y0
        start = (x0 + 0.98 * (dx > 0.1) - 0.98 * (dx < -0.1), y0 + (0.62 if dy > 0.5 and abs(dx) < 0.1 else 0))
        end = (x1 - 0.98 * (dx > 0.1), y1 - (0.62 if dy > 0.5 and abs(dx) < 0.1 else 0))
        if abs(dx) < 0.1:  # vertical
            start, end = (x0, y0 + 0.62 * (1 if dy > 0 else -1)), (x1, y1 - 0.62 * (1 if dy > 0 else -1))
        ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="#333"))
    ax.set_xlim(-0.6, 14.1)
    ax.set_ylim(0.1, 4.8)
    ax.axis("off")
    ax.set_title("ML-Mamba: two frozen ViTs -> Mamba-2 Scan Connector -> MLP -> Mamba-2 LM", fontsize=11)
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def scan_order_panels(file, H=4, W=4):
    """Each direction of BSM and CSM: the patches numbered in the order the direction's mixer reads them."""
    directions = [("BSM forward", scan_orders("bsm", H, W)[0]), ("BSM backward", scan_orders("bsm", H, W)[1])]
    names = ["CSM row-major", "CSM column-major", "CSM row-major reversed", "CSM column-major reversed"]
    directions += list(zip(names, scan_orders("csm", H, W)))
    fig, axes = plt.subplots(1, len(directions), figsize=(3 * len(directions), 3.3))
    for ax, (name, order) in zip(axes, directions):
        rows, cols = (order // W).numpy(), (order % W).numpy()  # the i-th patch read sits at (rows[i], cols[i])
        ax.plot(cols, rows, color="#c00", lw=1.2, alpha=0.7)
        ax.annotate("", xy=(cols[1], rows[1]), xytext=(cols[0], rows[0]),
                    arrowprops=dict(arrowstyle="-|>", color="#c00", lw=2))
        for i, (r, c) in enumerate(zip(rows, cols)):
            ax.text(c, r, str(i), ha="center", va="center", fontsize=10,
                    bbox=dict(boxstyle="circle", fc="#fde9d9" if i == 0 else "white", ec="#888"))
        ax.set_xlim(-0.6, W - 0.4)
        ax.set_ylim(H - 0.4, -0.6)
        ax.set_xticks(range(W))
        ax.set_yticks(range(H))
        ax.grid(True, color="#ddd")
        ax.set_title(name, fontsize=9)
    fig.suptitle("Reading orders of the Mamba-2 Scan Connector on a 4 x 4 patch grid (number = step of the scan)",
                 fontsize=10)
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def ssd_matrix(l=24, n=4, chunk=8, seed=0):
    """One head's (l, l) SSD matrix M, with y = M (dt x), read out of ssd_quadratic: feed x = e_s / dt_s on channel
    s (headdim p = l), so y[t, s] = M[t, s]."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.rand(1, l, 1, generator=g, dtype=torch.float64) * 0.5 + 0.05
    A = -torch.rand(1, generator=g, dtype=torch.float64) - 0.3
    B = torch.randn(1, l, 1, n, generator=g, dtype=torch.float64)
    C = torch.randn(1, l, 1, n, generator=g, dtype=torch.float64)
    x = torch.diag_embed(1 / dt[0, :, 0])[None, :, None, :]  # (1, l, 1, p = l): x_s = e_s / dt_s
    return ssd_quadratic(x, dt, A, B, C)[0, :, 0, :]  # (l, l): y[t, s] = M[t, s]


def ssd_matrix_figure(file, l=24, n=4, chunk=8):
    M = ssd_matrix(l, n, chunk)
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    shown = torch.where(M == 0, torch.nan, M).numpy()
    im = ax.imshow(shown, cmap="RdBu_r", vmin=-abs(M).max(), vmax=abs(M).max())
    for k in range(chunk, l, chunk):
        ax.axhline(k - 0.5, color="k", lw=1.5)
        ax.axvline(k - 0.5, color="k", lw=1.5)
    for i in range(l // chunk):
        c = i * chunk + chunk / 2 - 0.5
        ax.text(c, c, "diagonal\nblock", ha="center", va="center", fontsize=8, fontweight="bold")
        for j in range(i):
            ax.text(j * chunk + chunk / 2 - 0.5, c, f"rank <= {n}\n(chunk states)", ha="center", va="center",
                    fontsize=7.5)
    ax.set_xlabel("s (input position)")
    ax.set_ylabel("t (output position)")
    ax.set_title(f"SSD matrix of one head, M[t, s] = C_t . B_s exp(A (dt_s+1 + ... + dt_t))\n"
                 f"l = {l}, n = {n}, chunks of {chunk} (ssd_chunked); upper triangle is 0 (causal)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def read_losses(log_file):
    """{stage: [(step, loss)]} from train.py's progress lines."""
    curves = {}
    for m in re.finditer(r"^\[(\w+)\] step (\d+)/\d+ epoch \S+ loss (\S+)", Path(log_file).read_text(), re.M):
        curves.setdefault(m[1], []).append((int(m[2]), float(m[3])))
    return curves


def loss_figure(file, log_file):
    curves = read_losses(log_file)
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
    for ax, (stage, points) in zip(axes if len(curves) > 1 else [axes], curves.items()):
        steps, losses = zip(*points)
        ax.plot(steps, losses, color="#1f4e79")
        ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(True, which="both", color="#eee")
    axes[0].set_ylabel("training loss (per reply token)")
    fig.suptitle(f"`python train.py`: the loss of each stage ({log_file})", fontsize=10)
    fig.savefig(file, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False,
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", default="runs/synthetic/train.log", help="a train.log to plot the loss curves of")
    p.add_argument("--out", help="the folder to write to (default: figures/ next to the log)")
    p.add_argument("--assets", action="store_true", help="write to the repository's assets/ (the README's figures)")
    args = p.parse_args(argv)
    if args.assets and args.out:
        p.error("--assets writes to assets/: give it or --out, not both")
    out = ROOT / "assets" if args.assets else Path(args.out or Path(args.log).parent / "figures")
    out.mkdir(parents=True, exist_ok=True)
    architecture(out / "architecture.png")
    scan_order_panels(out / "scan_orders.png")
    ssd_matrix_figure(out / "ssd_matrix.png")
    if Path(args.log).is_file():
        loss_figure(out / "loss_curves.png", args.log)
    else:
        print(f"no {args.log}: run `python train.py` first for the loss curves", file=sys.stderr)
    print(f"figures written to {out}")


if __name__ == "__main__":
    main()
