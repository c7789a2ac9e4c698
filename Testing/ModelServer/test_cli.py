"""The headless command line: segment end to end on synthetic volumes, errors, help."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import desam_server
from desam_server.cli import build_parser, main
from desam_server.engine import IntensityWindow, SlicePredictor
from desam_server.io import read_segmentation, read_volume
from desam_server.io.slices import slice_view
from desam_server.modeling import build_desam
from desam_server.segment import PromptRule, parse_slice_range


def oblique_volume(path, shape=(6, 40, 50)):
    """An int16 CT-like volume with an oblique direction and anisotropic spacing, plus an
    exact ellipsoid reference mask on the same grid."""
    k, j, i = np.mgrid[0 : shape[0], 0 : shape[1], 0 : shape[2]]
    inside = ((j - 20) / 10.0) ** 2 + ((i - 28) / 14.0) ** 2 <= 1
    arr = np.where(inside, 60, -1000).astype(np.int16)
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s * np.cos(0.2), c * np.cos(0.2), -np.sin(0.2),
                 s * np.sin(0.2), c * np.sin(0.2), np.cos(0.2))
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.8, 2.5))
    img.SetOrigin((-12.5, 30.25, 101.0))
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path), True)
    ref = sitk.GetImageFromArray(inside.astype(np.uint8))
    ref.CopyInformation(img)
    ref_path = path.with_name("ref.nrrd")
    sitk.WriteImage(ref, str(ref_path), True)
    return img, ref_path


def sam_answer(predictor: SlicePredictor, image: np.ndarray, window: dict, box) -> np.ndarray:
    """SAM's single-mask answer for ``box`` on one slice, in-process: what the command
    must have written there (the same weights file, fp32, the report's window)."""
    predictor.set_image(image, IntensityWindow(**window))
    masks, _, _ = predictor.predict(box=np.asarray(box, float), multimask_output=False)
    return masks[0]


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("segment", "fetch-weights", "fetch-sample", "info", "bench"):
        assert command in out


def test_segment_prompted_keeps_geometry_and_writes_all_outputs(tmp_path, capsys, tiny_sam_checkpoint):
    src = tmp_path / "vol.nrrd"
    img, ref = oblique_volume(src)
    out = tmp_path / "result.seg.nrrd"
    checkpoint = tiny_sam_checkpoint[0]
    rc = main(["segment", str(src), str(out), "--structure", "Organ", "--mode", "prompt",
               "--encoder", "tiny", "--sam-checkpoint", str(checkpoint), "--precision", "fp32",
               "--reference", str(ref), "--prompt-from-mask", "--margin", "2",
               "--nifti", str(tmp_path / "result.nii.gz"), "--device", "cpu", "-q"])
    assert rc == 0
    labelmap, geometry, segments = read_segmentation(out)
    source = read_volume(src)
    assert labelmap.shape == source.array.shape
    assert geometry.is_close(source.geometry, 1e-6)
    assert [(s.name, s.label_value) for s in segments] == [("Organ", 1)]
    report = json.loads((tmp_path / "result_report.json").read_text())
    assert report["slices"] == 6 and report["encode"]["count"] == 6
    assert report["encoder"] == "tiny" and report["window"] == {"center": 40.0, "width": 400.0}
    # Its content: on every slice, SAM's answer to the reference's bounding box grown by 2.
    reference = read_volume(ref).array > 0
    assert set(np.unique(labelmap)) == {0, 1}
    predictor = SlicePredictor(build_desam("tiny", sam_checkpoint=checkpoint), precision="fp32")
    for k in range(6):
        rows, cols = np.nonzero(reference[k])
        box = [cols.min() - 2, rows.min() - 2, cols.max() + 3, rows.max() + 3]
        expected = sam_answer(predictor, source.array[k], report["window"], box)
        np.testing.assert_array_equal(labelmap[k], expected.astype(np.uint8), err_msg=f"slice {k}")
    assert 0 < labelmap.mean() < 1
    nifti = read_volume(tmp_path / "result.nii.gz")
    assert nifti.geometry.is_close(source.geometry, 1e-5)
    np.testing.assert_array_equal(nifti.array, labelmap)
    both = np.logical_and(labelmap > 0, reference).sum()
    assert report["dice_vs_reference"] == pytest.approx(2 * both / ((labelmap > 0).sum() + reference.sum()))
    assert (tmp_path / "result_overlay.png").stat().st_size > 1000
    assert "Dice vs reference" in capsys.readouterr().out


def test_segment_axis_and_slice_range(tmp_path, tiny_sam_checkpoint):
    src = tmp_path / "vol.nrrd"
    oblique_volume(src)
    out = tmp_path / "j.seg.nrrd"
    checkpoint = tiny_sam_checkpoint[0]
    rc = main(["segment", str(src), str(out), "--structure", "S", "--mode", "prompt", "--encoder", "tiny",
               "--sam-checkpoint", str(checkpoint), "--precision", "fp32", "--window", "40,400",
               "--axis", "j", "--slices", "10:13", "--prompt-box", "5,0,45,5", "--device", "cpu", "-q"])
    assert rc == 0
    labelmap, _, _ = read_segmentation(out)
    assert labelmap.shape == (6, 40, 50)
    report = json.loads((tmp_path / "j_report.json").read_text())
    assert report["axis"] == "j" and report["slices"] == 3
    # Slices 10..12 along j (6 x 50 each: rows k, columns i) hold SAM's answer to the box;
    # every other voxel is 0.
    volume = read_volume(src).array
    expected = np.zeros(volume.shape, np.uint8)
    predictor = SlicePredictor(build_desam("tiny", sam_checkpoint=checkpoint), precision="fp32")
    for j in (10, 11, 12):
        expected[:, j, :] = sam_answer(predictor, slice_view(volume, "j", j), report["window"], [5, 0, 45, 5])
    np.testing.assert_array_equal(labelmap, expected)
    assert all(0 < expected[:, j, :].mean() < 1 for j in (10, 11, 12))


def test_segment_errors_are_one_line_and_exit_2(tmp_path, capsys):
    src = tmp_path / "vol.nrrd"
    oblique_volume(src)
    # Automatic mode without a trained decoder.
    rc = main(["segment", str(src), str(tmp_path / "o.seg.nrrd"), "--structure", "S", "--encoder", "tiny",
               "--mode", "box", "--device", "cpu", "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "trained DeSAM decoder" in err and "Traceback" not in err
    assert not (tmp_path / "o.seg.nrrd").exists()
    # Missing input.
    assert main(["segment", str(tmp_path / "none.nrrd"), str(tmp_path / "o.seg.nrrd"), "--structure", "S",
                 "--encoder", "tiny", "--mode", "prompt", "--prompt-point", "3,3"]) == 2
    # Prompted mode without a prompt rule.
    assert main(["segment", str(src), str(tmp_path / "o.seg.nrrd"), "--structure", "S", "--encoder", "tiny",
                 "--mode", "prompt", "--device", "cpu"]) == 2
    assert "needs --prompt-from-mask" in capsys.readouterr().err
    # A point outside the slice.
    assert main(["segment", str(src), str(tmp_path / "o.seg.nrrd"), "--structure", "S", "--encoder", "tiny",
                 "--mode", "prompt", "--prompt-point", "500,3", "--device", "cpu", "-q"]) == 2
    assert "inside" in capsys.readouterr().err


PACKAGE = Path(desam_server.__file__).parent
#: Options of other programs that the package's messages quote (``dpkg-deb --fsys-tarfile``).
OTHER_PROGRAMS_OPTIONS = {"--fsys-tarfile"}


def _strings(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def package_strings() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(every string constant of the package, the strings of its raise statements with
    the module-level constants they name), each as (file, text)."""
    everything, raised = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = str(path.relative_to(PACKAGE))
        constants = {target.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                     for target in node.targets if isinstance(target, ast.Name)}
        everything += [(where, text) for text in _strings(tree)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                raised += [(where, text) for text in _strings(node.exc)]
                raised += [(where, text) for name in ast.walk(node.exc) if isinstance(name, ast.Name)
                           and name.id in constants for text in _strings(constants[name.id])]
    return everything, raised


def help_of(argv: list[str], capsys) -> str | None:
    """``desam-server ARGV --help``'s text, or None when the parser refuses ARGV."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    out = capsys.readouterr().out
    return out if exit_.value.code == 0 else None


def test_messages_name_only_commands_and_options_that_exist(capsys):
    """Every ``desam-server <command>`` in the package's strings (messages, help, docs) is
    a subcommand of the parser, and every --option an error message names is an option
    of one of them."""
    commands = re.findall(r"^    ([a-z][a-z-]*)(?:\s|$)", help_of([], capsys), re.M)
    assert {"serve", "segment", "fetch-weights", "openapi"} <= set(commands)
    helps = {command: help_of([command], capsys) for command in commands}
    assert all(helps.values())
    everything, raised = package_strings()
    named = {(where, command) for where, text in everything
             for command in re.findall(r"desam-server\s+([a-z][a-z-]*)", text)}
    assert {command for _, command in named} >= {"segment", "serve", "fetch-weights"}
    assert not [(where, command) for where, command in named if help_of([command], capsys) is None]
    options = set(re.findall(r"--[a-z][a-z0-9-]*", " ".join(helps.values())))
    quoted = {(where, option) for where, text in raised for option in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)}
    assert {option for _, option in quoted} >= {"--decoder", "--sam-checkpoint", "--prompt-from-mask"}
    assert not [(where, option) for where, option in quoted if option not in options | OTHER_PROGRAMS_OPTIONS]


def test_bad_flag_values_are_rejected_by_the_parser():
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "a", "b", "--structure", "S", "--window", "40"])
    with pytest.raises(SystemExit):
        parser.parse_args(["segment", "a", "b", "--structure", "S", "--prompt-box", "1,2,x,4"])


def test_slice_ranges_and_prompt_rules():
    assert list(parse_slice_range("2:5", 10)) == [2, 3, 4]
    assert list(parse_slice_range("-2:", 10)) == [8, 9]
    assert list(parse_slice_range("7", 10)) == [7]
    assert list(parse_slice_range(None, 3)) == [0, 1, 2]
    with pytest.raises(ValueError):
        parse_slice_range("12", 10)
    with pytest.raises(ValueError):
        parse_slice_range("a:b", 10)
    ref = np.zeros((2, 10, 10), bool)
    ref[1, 2:5, 3:8] = True
    ref[1, 9, 0] = True  # a stray island is not part of the box
    rule = PromptRule(reference=ref, margin=1)
    assert rule.prompt_for("k", 0, (10, 10)) is None
    np.testing.assert_array_equal(rule.prompt_for("k", 1, (10, 10))["box"], [2, 1, 9, 6])
