"""Why 8 px patches help (docs/synthetic-world.md): the 16 px world's run with each image token repeated over a 2 x 2
block, laid out as the 8 px world lays its 36 tokens (a 6 x 6 raster). The LM then reads as many image tokens, in
the same arrangement, as at 8 px, each carrying what the 16 px encoders and connector make of its cell.

    python docs/upsampled_tokens.py --seed 0 --out runs/upsampled-0 [other train.py options]

Trains and scores as `python train.py --patch 16` does, in this process, with MLMamba's image tokens upsampled. The
upsampling is this script's: the saved model loads elsewhere as a plain 16 px model, so it is scored here.
"""

import sys
from pathlib import Path

import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import model as M  # noqa: E402
import train  # noqa: E402


def upsample(tokens):
    """Image tokens (b, g * g, D) on a g x g grid -> (b, 4 g * g, D) on the 2g x 2g grid, in reading order, each token
    over a 2 x 2 block: token (r, c) of the new grid is token (r // 2, c // 2) of the old."""
    b, n, d = tokens.shape
    g = round(n ** 0.5)
    grid = tokens.transpose(1, 2).reshape(b, d, g, g)  # (b, D, g, g)
    return F.interpolate(grid, scale_factor=2, mode="nearest").flatten(2).transpose(1, 2)  # (b, 4 g * g, D)


def main(argv=None):
    image_tokens = M.MLMamba.image_tokens
    M.MLMamba.image_tokens = lambda self, pixel_values: upsample(image_tokens(self, pixel_values))
    M.MLMamba.num_image_tokens = property(lambda self: 4 * self.vision.num_patches)
    return train.main(["--patch", "16", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
