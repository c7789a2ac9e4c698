"""The docs' layout previews: scripts/preview_panels.py renders every panel's .ui offscreen
(PySide6's QUiLoader) into a non-blank PNG labelled as a preview."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("PySide6.QtUiTools")
from PIL import Image, ImageStat

ROOT = Path(__file__).resolve().parents[2]
UI_FILES = sorted((ROOT / "SlicerDeSAM" / "Resources" / "UI").glob("*.ui"))


def _check_rendered(path: Path) -> None:
    image = Image.open(path).convert("RGB")
    assert image.width == 400 and image.height > 200, image.size
    grey = image.convert("L")
    low, high = grey.getextrema()
    assert high - low > 100, f"{path.name}: no contrast ({low}..{high})"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, f"{path.name}: almost uniform"
    # The caption band (a pale yellow strip) marks it as a preview, not a screenshot.
    r, g, b = (int(v) for v in ImageStat.Stat(image.crop((0, 0, image.width, 4))).mean)
    assert r > 240 and g > 230 and b < 215, (r, g, b)
    # The panel below the caption is not empty either.
    body = ImageStat.Stat(grey.crop((0, 60, image.width, image.height)))
    assert body.stddev[0] > 10, f"{path.name}: blank panel"


def test_previews_render_every_panel(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "preview_panels.py"), "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(tmp_path.glob("preview_*.png"))
    assert [p.name for p in written] == [f"preview_{u.stem}.png" for u in UI_FILES]
    for path in written:
        _check_rendered(path)


def test_committed_previews_exist_and_are_small():
    for ui in UI_FILES:
        path = ROOT / "docs" / "images" / f"preview_{ui.stem}.png"
        assert path.is_file(), f"run scripts/preview_panels.py: {path} is missing"
        assert path.stat().st_size < 200_000
        _check_rendered(path)
