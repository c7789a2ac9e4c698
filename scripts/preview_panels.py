"""Layout previews of the module's panels for the docs: each Resources/UI/*.ui loaded
offscreen with PySide6's QUiLoader and saved as a PNG.

    QT_QPA_PLATFORM=offscreen python scripts/preview_panels.py --out docs/images

These are previews of the .ui layouts, NOT screenshots of Slicer: Slicer's own widgets
(qMRMLNodeComboBox, qMRMLSegmentSelectorWidget, qSlicerMarkupsPlaceWidget,
ctkCollapsibleButton, ctkPathLineEdit) are not available outside Slicer, so the loader falls
back to the Qt base class each file declares for them (QWidget). To keep the picture
readable, each stand-in gets a dashed box naming the Slicer class it stands for, each
collapsible section a title line, and every image a caption saying it is a preview.
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_DIR = ROOT / "SlicerDeSAM" / "Resources" / "UI"
WIDTH = 400
CAPTION = "Layout preview of {name}.ui - not a Slicer screenshot\n(Qt stand-ins for Slicer's own widgets)"


def _ui_bytes(path: Path) -> tuple[bytes, dict[str, str]]:
    """The .ui without its signal/slot connections (they name Slicer signals the stand-ins
    lack), and {widget name: Slicer class} for the custom widgets."""
    tree = ET.parse(path)
    root = tree.getroot()
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    slicer_widgets = {w.get("name"): w.get("class") for w in root.iter("widget") if w.get("class") in custom}
    for connections in root.findall("connections"):
        root.remove(connections)
    return ET.tostring(root, encoding="utf-8"), slicer_widgets


def render(path: Path, out_dir: Path) -> Path:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtGui import QColor, QFont, QPainter, QPixmap
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QLabel, QTableWidget, QVBoxLayout, QWidget

    data, slicer_widgets = _ui_bytes(path)
    buffer = QBuffer()
    buffer.setData(QByteArray(data))
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load {path.name}")
    for name, cls in slicer_widgets.items():
        if name == path.stem:
            continue
        widget = panel.findChild(QWidget, name)
        if cls == "ctkCollapsibleButton":
            title = QLabel("\u25bc " + str(widget.property("text") or ""))
            font = QFont(title.font())
            font.setBold(True)
            title.setFont(font)
            if hasattr(widget.layout(), "insertRow"):
                widget.layout().insertRow(0, title)
            else:
                widget.layout().insertWidget(0, title)
            widget.setStyleSheet(f"QWidget#{name} {{ border: 1px solid #9aa; border-radius: 3px; }}")
        elif widget.layout() is None:
            box = QVBoxLayout(widget)
            box.setContentsMargins(0, 0, 0, 0)
            label = QLabel(f"[{cls}]")
            label.setStyleSheet("color: #555; border: 1px dashed #889; padding: 3px;")
            box.addWidget(label)
    for table in panel.findChildren(QTableWidget):
        table.setFixedHeight(110)
    panel.layout().activate()
    panel.resize(WIDTH, max(panel.sizeHint().height(), panel.minimumSizeHint().height()))
    body = panel.grab()
    caption_height = 38
    image = QPixmap(body.width(), body.height() + caption_height)
    image.fill(QColor("white"))
    painter = QPainter(image)
    painter.fillRect(0, 0, image.width(), caption_height, QColor("#fff3c4"))
    painter.setPen(QColor("#5a4a00"))
    painter.drawText(6, 0, image.width() - 12, caption_height, Qt.AlignVCenter | Qt.AlignLeft,
                     CAPTION.format(name=path.stem))
    painter.drawPixmap(0, caption_height, body)
    painter.end()
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"preview_{path.stem}.png"
    if not image.save(str(target), "PNG"):
        raise RuntimeError(f"could not write {target}")
    return target


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="folder for the PNGs")
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    written = [render(path, args.out) for path in sorted(UI_DIR.glob("*.ui"))]
    for path in written:
        print(path)
    del app
    return written


if __name__ == "__main__":
    main()
