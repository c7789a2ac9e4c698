"""Draw the extension's and the module's icons (128 x 128 PNG) so they can be rebuilt.

    python scripts/draw_icons.py          # writes the three icons in place

The picture: a dark slice with a bright organ outline (the segment), a green positive
point and a red negative point (the prompts). The Segment Editor effect's icon is the
same picture, drawn at 21 x 21 pixels as the editor's effect buttons are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "Resources/Icons/SlicerDeSAM.png": 128,
    "SlicerDeSAM/Resources/Icons/SlicerDeSAM.png": 128,
    "SlicerDeSAM/Resources/Icons/SegmentEditorEffect.png": 21,
}


def draw(size: int) -> Image.Image:
    """The icon at ``size`` x ``size``, drawn at 4x then reduced (smooth edges)."""
    s = size * 4
    image = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    pad = s // 16
    pen.rounded_rectangle([pad, pad, s - pad, s - pad], radius=s // 8, fill=(28, 34, 48, 255))
    # The "organ": an ellipse with a filled translucent inside and a bright outline.
    box = [s * 0.22, s * 0.26, s * 0.74, s * 0.78]
    pen.ellipse(box, fill=(64, 160, 220, 150), outline=(120, 210, 255, 255), width=max(1, s // 28))
    r = s * 0.075
    for (cx, cy), colour in (((s * 0.45, s * 0.50), (60, 220, 90, 255)), ((s * 0.80, s * 0.24), (235, 70, 60, 255))):
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, outline=(255, 255, 255, 255),
                    width=max(1, s // 64))
    return image.resize((size, size), Image.LANCZOS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="repository root to write into")
    args = parser.parse_args(argv)
    for relative, size in TARGETS.items():
        path = args.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        draw(size).save(path, optimize=True)
        print(f"{path} ({size} x {size})")


if __name__ == "__main__":
    main()
