"""Image files read as the models want them: 8-bit RGB (JPEGs decoded at reduced scale where the
transforms allow), and a dataset of (path, label) pairs that names a file it cannot read."""

from __future__ import annotations

import logging

from PIL import Image
from torch.utils.data import Dataset

from finetune.base.errors import UserError
from finetune.data.transforms import to_rgb

log = logging.getLogger(__name__)


def load_rgb(path: str, min_side: int | None = None) -> Image.Image:
    """The image as 8-bit RGB. `min_side`: a JPEG at least twice that on its short side is decoded at a
    reduced scale (libjpeg's DCT scaling, 1/2 to 1/8: Pillow's draft mode) that keeps the short side at or
    above it: most of a 12-megapixel decode is skipped when training at 224 px. The pixels differ slightly
    from a full decode then resized (a different low-pass), never in resolution below `min_side`."""
    with Image.open(path) as im:
        if min_side and im.format == "JPEG" and min(im.size) >= 2 * min_side:
            w, h = im.size
            short = min(w, h)
            im.draft(im.mode, (-(-w * min_side // short), -(-h * min_side // short)))
        return to_rgb(im)


class CheckedImageFolder(Dataset):
    """(PIL RGB image, label) from a list of (path, label). An image that fails to decode raises a UserError
    naming the file, or, with skip_bad, is replaced by the next readable sample (deterministic)."""

    def __init__(self, samples: list[tuple[str, int]], skip_bad: bool, min_side: int | None = None):
        self.samples, self.skip_bad = samples, skip_bad
        self.min_side = min_side  # decode JPEGs at reduced scale down to this short side (load_rgb)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return load_rgb(path, self.min_side), label
            except Exception as e:
                if not self.skip_bad:
                    message = f"cannot read image '{path}' ({e}); fix or delete it, or set data.skip_bad=true."
                    raise UserError(message) from None
                log.warning("skipping unreadable image %s (%s)", path, e)
        raise UserError("no image in the data set could be read.")
