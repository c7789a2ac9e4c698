"""The README's main job: segment the sample head CT on every slice, headlessly.

Fetches the InVesalius "Cranium" head CT (GPL-2, Debian's invesalius-examples package)
into the data cache, then runs ``desam-server segment`` with the embedded default model
(pretrained MobileSAM) in prompted mode. The prompt on each slice is the bounding box of
the sample's reference head mask (its largest component): it stands in for the box a user
would draw, until a trained DeSAM decoder allows the prompt-free modes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("out"), help="output folder")
    parser.add_argument("--slices", default=None, help="slice range, e.g. 40:70 (default: all 108)")
    args, extra = parser.parse_known_args(argv)

    from desam_server.cli import main as cli_main
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    center, width = sample.window
    out = args.out / "cranium_head.seg.nrrd"
    command = [
        "segment", str(sample.volume), str(out), "--structure", "Head", "--mode", "prompt",
        "--reference", str(sample.head_mask), "--prompt-from-mask", f"--window={center},{width}",
        "--nifti", str(args.out / "cranium_head.nii.gz"),
    ]
    if args.slices:
        command += ["--slices", args.slices]
    return cli_main(command + extra)


if __name__ == "__main__":
    sys.exit(main())
