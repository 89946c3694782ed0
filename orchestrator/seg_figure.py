"""The segmentation figure of a report: validation images, ground truth and predictions."""
from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import torch

from kdflow.methods.tasks import IGNORE_INDEX


def palette(num_colours: int = 256) -> torch.Tensor:
    """(num_colours, 3) uint8 colours, Pascal VOC's bit-interleaved palette (class 0 black);
    ``IGNORE_INDEX`` is drawn white."""
    colours = torch.zeros(num_colours, 3, dtype=torch.uint8)
    for label in range(num_colours):
        value, r, g, b = label, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours[label] = torch.tensor([r, g, b], dtype=torch.uint8)
    colours[IGNORE_INDEX] = 255
    return colours


def colourise(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) integer label map -> (H, W, 3) uint8 RGB picture."""
    return palette()[labels.long()]


def displayable(x: torch.Tensor) -> torch.Tensor:
    """(3, H, W) normalised image -> (H, W, 3) float in [0, 1], stretched per image."""
    x = x.float()
    low, high = x.amin(), x.amax()
    return ((x - low) / (high - low).clamp(min=1e-6)).permute(1, 2, 0)


def draw_samples(panels: List[Tuple[str, dict]], path: Path) -> None:
    """One row per validation image: the image, its ground truth, then each panel's prediction.

    panels: (title, samples) with samples as a segmentation job writes them (``x``, ``y``,
    ``pred``: see ``orchestrator.runner.save_val_samples``); the image and the ground truth are
    taken from the first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = panels[0][1]
    count = len(first["y"])
    columns = 2 + len(panels)
    fig, axes = plt.subplots(count, columns, figsize=(1.9 * columns, 1.9 * count + 0.4),
                             squeeze=False)
    for i in range(count):
        pictures = [("image", displayable(first["x"][i])), ("ground truth", colourise(first["y"][i]))]
        pictures += [(title, colourise(samples["pred"][i])) for title, samples in panels]
        for ax, (title, picture) in zip(axes[i], pictures):
            ax.imshow(picture.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
