"""Volume, segmentation and overlay I/O: geometry round trips through every format, the
Slicer .seg.nrrd fields, NIfTI's RAS convention, error cases and atomic writes."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image

from desam_server.atomic import atomic_output_path, atomic_write, atomic_write_bytes
from desam_server.io import (
    LPS_TO_RAS,
    Geometry,
    SegmentInfo,
    Volume,
    read_segmentation,
    read_volume,
    write_labelmap_nifti,
    write_segmentation,
    write_volume,
)
from desam_server.io.overlay import choose_slices, write_overlay_montage

SHAPE = (6, 9, 11)  # K x J x I, all different so that any axis mix-up shows


def oblique_direction(seed: int = 3, proper: bool = True) -> np.ndarray:
    """A random rotation (det +1), or a reflection (det -1) when ``proper`` is False."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] *= -1
    return q


@pytest.fixture()
def geometry() -> Geometry:
    return Geometry(spacing=(0.7, 1.3, 2.9), origin=(-123.456, 87.65, -301.25), direction=oblique_direction())


@pytest.fixture()
def ct_array() -> np.ndarray:
    return np.random.default_rng(7).integers(-1024, 3000, size=SHAPE).astype(np.int16)


def max_matrix_error(a: Geometry, b: Geometry) -> float:
    return float(np.abs(a.ijk_to_lps() - b.ijk_to_lps()).max())


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


# ------------------------------------------------------------------------------ Geometry


def test_geometry_matrix_and_equality(geometry):
    m = geometry.ijk_to_lps()
    point = m @ np.array([2.0, 3.0, 4.0, 1.0])
    expected = (np.asarray(geometry.origin) + 2 * 0.7 * geometry.direction[:, 0]
                + 3 * 1.3 * geometry.direction[:, 1] + 4 * 2.9 * geometry.direction[:, 2])
    np.testing.assert_allclose(point[:3], expected, atol=1e-12)
    np.testing.assert_allclose(geometry.lps_to_ijk() @ point, [2, 3, 4, 1], atol=1e-9)
    np.testing.assert_allclose(geometry.ijk_to_ras(), LPS_TO_RAS @ m)
    again = Geometry.from_ijk_to_lps(m)
    assert again.is_close(geometry, 1e-12)
    assert Geometry.from_ijk_to_ras(geometry.ijk_to_ras()).is_close(geometry, 1e-12)
    same = Geometry(geometry.spacing, geometry.origin, geometry.direction.copy())
    assert same == geometry and hash(same) == hash(geometry) and len({same, geometry}) == 1
    moved = Geometry(geometry.spacing, (geometry.origin[0] + 1e-3, *geometry.origin[1:]), geometry.direction)
    assert not moved.is_close(geometry, 1e-6) and moved.is_close(geometry, 1e-2)
    with pytest.raises(ValueError):
        Geometry(spacing=(1, 0, 1), origin=(0, 0, 0), direction=np.eye(3))
    with pytest.raises(ValueError):
        Geometry(spacing=(1, 1, 1), origin=(0, 0, 0), direction=np.zeros((3, 3)))
    assert not geometry.direction.flags.writeable


# ------------------------------------------------------------------------------ volumes


@pytest.mark.parametrize("proper", [True, False], ids=["rotation", "reflection"])
@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".nii.gz", ".nii"])
def test_volume_round_trip_keeps_data_and_geometry(tmp_path, ext, proper, ct_array):
    geometry = Geometry(spacing=(0.7, 1.3, 2.9), origin=(-123.456, 87.65, -301.25),
                        direction=oblique_direction(proper=proper))
    path = write_volume(tmp_path / f"ct{ext}", Volume(ct_array, geometry))
    back = read_volume(path)
    assert back.array.dtype == np.int16 and back.array.shape == SHAPE
    np.testing.assert_array_equal(back.array, ct_array)
    # NRRD and MetaImage keep float64; NIfTI-1 stores its matrices as float32.
    tol = 1e-5 if ext.startswith(".nii") else 1e-9
    assert max_matrix_error(back.geometry, geometry) < tol
    assert back.geometry.is_close(geometry, 1e-6)
    np.testing.assert_allclose(back.geometry.spacing, geometry.spacing, atol=1e-6)
    assert no_temp_files(tmp_path)


def test_nrrd_header_is_plain_lps_nrrd(tmp_path, geometry, ct_array):
    """An independent reader (pynrrd) sees LPS space directions = direction * spacing."""
    path = write_volume(tmp_path / "ct.nrrd", Volume(ct_array, geometry))
    data, header = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(data, ct_array)
    assert header["space"] == "left-posterior-superior"
    assert header["encoding"] == "gzip" and header["type"] == "short"
    assert list(header["sizes"]) == [SHAPE[2], SHAPE[1], SHAPE[0]]
    assert list(header["kinds"]) == ["domain"] * 3
    np.testing.assert_allclose(header["space directions"], (geometry.direction * geometry.spacing).T, atol=1e-14)
    np.testing.assert_allclose(header["space origin"], geometry.origin, atol=1e-12)


def test_nifti_is_ras(tmp_path, geometry, ct_array):
    path = write_volume(tmp_path / "ct.nii.gz", Volume(ct_array, geometry))
    image = nib.load(str(path))
    np.testing.assert_allclose(image.affine, LPS_TO_RAS @ geometry.ijk_to_lps(), atol=1e-4)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), ct_array)


def write_dicom_series(folder: Path, array: np.ndarray, geometry: Geometry, series_uid: str) -> None:
    """Test data: a CT series written slice by slice with SimpleITK (DS values <= 16 chars)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.ravel()))
    d = geometry.direction

    def ds(values) -> str:
        return "\\".join(f"{float(v):.10g}" for v in values)

    common = {
        "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0020|000d": series_uid + ".1", "0020|000e": series_uid,
        "0020|0037": ds([d[0, 0], d[1, 0], d[2, 0], d[0, 1], d[1, 1], d[2, 1]]),
        "0018|0050": f"{geometry.spacing[2]:.10g}",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        slice_image = image[:, :, k]
        for tag, value in common.items():
            slice_image.SetMetaData(tag, value)
        slice_image.SetMetaData("0020|0032", ds(image.TransformIndexToPhysicalPoint((0, 0, k))))
        slice_image.SetMetaData("0020|0013", str(k + 1))
        slice_image.SetMetaData("0008|0018", f"{series_uid}.2.{k + 1}")
        writer.SetFileName(str(folder / f"slice_{k:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_series_round_trip(tmp_path, geometry, ct_array):
    uid = f"1.2.826.0.1.3680043.8.498.{int(time.time())}"
    write_dicom_series(tmp_path / "study" / "ct", ct_array, geometry, uid + ".10")
    # a smaller second series in a sibling folder: the largest series must win
    write_dicom_series(tmp_path / "study" / "scout", ct_array[:2], geometry, uid + ".20")
    volume = read_volume(tmp_path / "study")
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, ct_array)
    assert max_matrix_error(volume.geometry, geometry) < 1e-6
    # a single DICOM file is one slice with the in-plane geometry of that slice
    one = read_volume(tmp_path / "study" / "ct" / "slice_002.dcm")
    assert one.array.shape == (1, SHAPE[1], SHAPE[2])
    np.testing.assert_array_equal(one.array[0], ct_array[2])
    np.testing.assert_allclose(one.geometry.ijk_to_lps()[:3, :2], geometry.ijk_to_lps()[:3, :2], atol=1e-6)
    np.testing.assert_allclose(one.geometry.origin, geometry.ijk_to_lps()[:3] @ [0, 0, 2, 1], atol=1e-6)


def test_2d_image_becomes_one_slice(tmp_path):
    image = sitk.GetImageFromArray(np.arange(12, dtype=np.int16).reshape(3, 4))
    image.SetSpacing((0.5, 0.25))
    image.SetOrigin((10.0, 20.0))
    sitk.WriteImage(image, str(tmp_path / "flat.nrrd"))
    volume = read_volume(tmp_path / "flat.nrrd")
    assert volume.array.shape == (1, 3, 4)
    assert volume.geometry.spacing == (0.5, 0.25, 1.0)
    assert volume.geometry.origin == (10.0, 20.0, 0.0)


def test_read_errors_are_clear(tmp_path):
    missing = tmp_path / "nope.nrrd"
    with pytest.raises(FileNotFoundError, match="nope.nrrd"):
        read_volume(missing)
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="no DICOM series"):
        read_volume(empty)
    garbage = tmp_path / "notes.nrrd"
    garbage.write_text("this is not an image\n")
    with pytest.raises(ValueError, match="notes.nrrd"):
        read_volume(garbage)
    four_d = sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.int16), isVector=False)
    sitk.WriteImage(four_d, str(tmp_path / "series4d.nii.gz"))
    with pytest.raises(ValueError, match="4-D"):
        read_volume(tmp_path / "series4d.nii.gz")
    rgb = sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(ValueError, match="3-component"):
        read_volume(tmp_path / "rgb.nrrd")
    with pytest.raises(ValueError, match="unsupported output format"):
        write_volume(tmp_path / "out.png", Volume(np.zeros(SHAPE, np.int16), Geometry.identity()))


# ------------------------------------------------------------------------------ segmentations


def labelmap_with_two_segments() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:4, 2:6, 3:8] = 1
    lab[4, 7, 9] = 3
    return lab


def test_seg_nrrd_round_trip(tmp_path, geometry):
    lab = labelmap_with_two_segments()
    segments = [SegmentInfo("Rückenmark", (0.95, 0.55, 0.2), 1),
                SegmentInfo("Lesion \\ 2", (0.1, 0.2, 0.3), 3, "lesion-id")]
    path = write_segmentation(tmp_path / "out.seg.nrrd", lab, geometry, segments)
    labelmap, geometry_back, segments_back = read_segmentation(path)
    assert labelmap.dtype == np.uint8
    np.testing.assert_array_equal(labelmap, lab)
    assert max_matrix_error(geometry_back, geometry) < 1e-12
    assert [s.name for s in segments_back] == ["Rückenmark", "Lesion \\ 2"]
    assert [s.label_value for s in segments_back] == [1, 3]
    assert [s.segment_id for s in segments_back] == ["Segment_1", "lesion-id"]
    for want, got in zip(segments, segments_back, strict=True):
        np.testing.assert_allclose(got.color, want.color, atol=1e-12)
    # also an ordinary volume to any ITK reader
    plain = read_volume(path)
    np.testing.assert_array_equal(plain.array, lab)
    assert no_temp_files(tmp_path)


# The spellings of NRRD's unsigned 8-bit type (teem, and so Slicer, reads all of them).
NRRD_UINT8 = {"uchar", "unsigned char", "uint8", "uint8_t"}


def test_seg_nrrd_has_slicer_fields(tmp_path, geometry):
    lab = labelmap_with_two_segments()
    path = write_segmentation(tmp_path / "out.seg.nrrd", lab, geometry,
                              [SegmentInfo("Liver", (0.8, 0.4, 0.3), 1), SegmentInfo("Tumor", (1, 1, 0), 3)])
    data, h = nrrd.read(str(path), index_order="C")
    np.testing.assert_array_equal(data, lab)
    assert h["type"] in NRRD_UINT8 and h["encoding"] == "gzip"
    assert h["dimension"] == 3 and h["space"] == "left-posterior-superior"
    assert list(h["kinds"]) == ["domain"] * 3
    np.testing.assert_allclose(h["space directions"], (geometry.direction * geometry.spacing).T, atol=1e-14)
    np.testing.assert_allclose(h["space origin"], geometry.origin, atol=1e-12)
    assert h["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert h["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert h["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    name, value, _description = h["Segmentation_ConversionParameters"].rstrip("&").split("|")
    assert name == "Reference image geometry"
    numbers = [float(v) for v in value.rstrip(";").split(";")]
    np.testing.assert_allclose(np.reshape(numbers[:16], (4, 4)), geometry.ijk_to_ras(), atol=1e-12)
    assert numbers[16:] == [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1]
    # union bounding box of the shared layer, as "i0 i1 j0 j1 k0 k1"
    expected_extent = "3 9 2 7 1 4"
    for n, (seg_name, color, label) in enumerate([("Liver", [0.8, 0.4, 0.3], "1"), ("Tumor", [1, 1, 0], "3")]):
        assert h[f"Segment{n}_Name"] == seg_name
        assert h[f"Segment{n}_ID"] == f"Segment_{label}"
        assert [float(c) for c in h[f"Segment{n}_Color"].split()] == color
        assert h[f"Segment{n}_LabelValue"] == label
        assert h[f"Segment{n}_Layer"] == "0"
        assert h[f"Segment{n}_Extent"] == expected_extent
        assert h[f"Segment{n}_ColorAutoGenerated"] == "0"
        assert h[f"Segment{n}_NameAutoGenerated"] == "0"
        assert f"Segment{n}_Tags" in h


def test_seg_nrrd_empty_and_invalid(tmp_path):
    g = Geometry.identity((1.0, 1.0, 2.0))
    empty = np.zeros(SHAPE, np.uint8)
    path = write_segmentation(tmp_path / "empty.seg.nrrd", empty, g, [SegmentInfo("Nothing", (0, 1, 0))])
    _, h = nrrd.read(str(path))
    assert h["Segment0_Extent"] == "0 -1 0 -1 0 -1"
    labelmap, _, segments = read_segmentation(path)
    assert not labelmap.any() and [s.name for s in segments] == ["Nothing"]
    lab = labelmap_with_two_segments()
    with pytest.raises(ValueError, match="no segment declares"):
        write_segmentation(tmp_path / "x.seg.nrrd", lab, g, [SegmentInfo("A", (1, 0, 0), 1)])
    with pytest.raises(ValueError, match="unique"):
        write_segmentation(tmp_path / "x.seg.nrrd", lab, g,
                           [SegmentInfo("A", (1, 0, 0), 1), SegmentInfo("B", (1, 0, 0), 1)])
    with pytest.raises(ValueError, match="1..255"):
        write_segmentation(tmp_path / "x.seg.nrrd", empty, g, [SegmentInfo("A", (1, 0, 0), 0)])
    with pytest.raises(ValueError):
        SegmentInfo("A", (2.0, 0, 0))
    assert not (tmp_path / "x.seg.nrrd").exists() and no_temp_files(tmp_path)


def test_read_segmentation_of_plain_labelmap_and_multilayer(tmp_path):
    lab = labelmap_with_two_segments()
    write_volume(tmp_path / "labels.nrrd", Volume(lab, Geometry.identity()))
    labelmap, _, segments = read_segmentation(tmp_path / "labels.nrrd")
    np.testing.assert_array_equal(labelmap, lab)
    assert [(s.name, s.label_value) for s in segments] == [("Segment_1", 1), ("Segment_3", 3)]
    layers = sitk.GetImageFromArray(np.zeros((*SHAPE, 2), np.uint8), isVector=True)
    sitk.WriteImage(layers, str(tmp_path / "layers.seg.nrrd"))
    with pytest.raises(ValueError, match="2 layers"):
        read_segmentation(tmp_path / "layers.seg.nrrd")
    with pytest.raises(FileNotFoundError):
        read_segmentation(tmp_path / "missing.seg.nrrd")
    # a NIfTI labelmap (no segment fields outside NRRD) reads as any volume does
    write_labelmap_nifti(tmp_path / "labels.nii.gz", lab, Geometry.identity())
    labelmap, _, segments = read_segmentation(tmp_path / "labels.nii.gz")
    np.testing.assert_array_equal(labelmap, lab)
    assert [(s.name, s.label_value) for s in segments] == [("Segment_1", 1), ("Segment_3", 3)]
    # a NRRD without a space field has no patient coordinates: refused, not read as identity
    (tmp_path / "nospace.nrrd").write_bytes(b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\n"
                                            b"spacings: 2 3 4\nencoding: raw\n\n" + bytes(8))
    with pytest.raises(ValueError, match="space"):
        read_segmentation(tmp_path / "nospace.nrrd")


def test_slicerio_reads_our_seg_nrrd(tmp_path, geometry):
    """slicerio (Slicer's own Python reader) sees our file as Slicer would: voxels in NRRD
    axis order (I x J x K), the IJK -> LPS matrix, the Slicer segment and segmentation fields."""
    lab = labelmap_with_two_segments()
    path = write_segmentation(tmp_path / "out.seg.nrrd", lab, geometry,
                              [SegmentInfo("Liver", (0.8, 0.4, 0.3), 1), SegmentInfo("Tumor", (1, 1, 0), 3, "tumor")])
    seg = slicerio.read_segmentation(str(path))
    assert seg["voxels"].shape == SHAPE[::-1]
    np.testing.assert_array_equal(seg["voxels"], lab.T)
    np.testing.assert_allclose(seg["ijkToLPS"], geometry.ijk_to_lps(), atol=1e-12)
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert seg["referenceImageExtentOffset"] == [0, 0, 0]
    (parameter,) = seg["conversionParameters"]
    assert parameter["name"] == "Reference image geometry"
    numbers = [float(v) for v in parameter["value"].rstrip(";").split(";")]
    np.testing.assert_allclose(np.reshape(numbers[:16], (4, 4)), geometry.ijk_to_ras(), atol=1e-12)
    assert numbers[16:] == [0, SHAPE[2] - 1, 0, SHAPE[1] - 1, 0, SHAPE[0] - 1]
    assert [(s["id"], s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == [
        ("Segment_1", "Liver", 1, 0), ("tumor", "Tumor", 3, 0)]
    assert [s["color"] for s in seg["segments"]] == [[0.8, 0.4, 0.3], [1, 1, 0]]
    assert all(s["extent"] == [3, 9, 2, 7, 1, 4] for s in seg["segments"])
    assert not any(s["colorAutoGenerated"] or s["nameAutoGenerated"] for s in seg["segments"])
    np.testing.assert_array_equal(slicerio.segment_mask(seg, "Tumor"), (lab == 3).T)


def test_we_read_seg_nrrd_written_by_slicerio(tmp_path, geometry):
    """A file slicerio writes (its own defaults: I x J x K voxels, compression level 9,
    terminology tags) reads back here as K x J x I with its geometry and segments; once a
    segment overlaps another, slicerio adds a layer and the file is refused."""
    liver = np.zeros(SHAPE[::-1], bool)  # I x J x K, slicerio's order
    liver[2:7, 1:5, 0:3] = True
    tumor = np.zeros_like(liver)
    tumor[9, 8, 5] = True
    seg = slicerio.create_segmentation(SHAPE[::-1], geometry.ijk_to_lps())
    slicerio.add_segment(seg, liver, {"id": "liver", "name": "Liver", "color": [0.8, 0.4, 0.3], "terminology": {
        "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}})
    slicerio.add_segment(seg, tumor, {"id": "tumor", "name": "Tumor", "color": [1.0, 1.0, 0.0]})
    slicerio.write_segmentation(str(tmp_path / "slicerio.seg.nrrd"), seg)
    labelmap, geometry_back, segments = read_segmentation(tmp_path / "slicerio.seg.nrrd")
    assert labelmap.shape == SHAPE and labelmap.dtype == np.uint8
    np.testing.assert_array_equal(labelmap, (liver * 1 + tumor * 2).T)
    assert max_matrix_error(geometry_back, geometry) < 1e-12
    assert [(s.segment_id, s.name, s.label_value) for s in segments] == [("liver", "Liver", 1), ("tumor", "Tumor", 2)]
    assert [s.color for s in segments] == [(0.8, 0.4, 0.3), (1.0, 1.0, 0.0)]
    labelmap[0, 0, 0] = 5  # an ordinary, writable array
    overlapping = liver.copy()
    overlapping[2, 1, 0] = False
    slicerio.add_segment(seg, overlapping, {"id": "lobe", "name": "Lobe"})
    assert seg["voxels"].ndim == 4
    slicerio.write_segmentation(str(tmp_path / "layers.seg.nrrd"), seg)
    with pytest.raises(ValueError, match="2 layers"):
        read_segmentation(tmp_path / "layers.seg.nrrd")


def test_labelmap_nifti_keeps_geometry(tmp_path, geometry):
    lab = labelmap_with_two_segments()
    path = write_labelmap_nifti(tmp_path / "labels.nii.gz", lab.astype(bool).astype(np.int64) * 2, geometry)
    image = nib.load(str(path))
    assert image.get_data_dtype() == np.uint8
    assert image.header.get_intent()[0] == "label"
    np.testing.assert_allclose(image.affine, geometry.ijk_to_ras(), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(image.dataobj).transpose(2, 1, 0), (lab > 0) * 2)
    back = read_volume(path)
    assert max_matrix_error(back.geometry, geometry) < 1e-5
    np.testing.assert_array_equal(back.array, (lab > 0) * 2)
    with pytest.raises(ValueError, match="nii"):
        write_labelmap_nifti(tmp_path / "labels.nrrd", lab, geometry)


# ------------------------------------------------------------------------------ overlay


def test_overlay_montage(tmp_path):
    yy, xx = np.mgrid[0:40, 0:60]
    volume = np.stack([np.where((yy - 20) ** 2 + (xx - 30) ** 2 < 300, 40, -1000) for _ in range(20)]).astype(np.int16)
    volume = volume + np.random.default_rng(0).normal(0, 5, volume.shape).astype(np.int16)
    labels = np.zeros(volume.shape, np.uint8)
    labels[5:15, 12:28, 20:40] = 1
    labels[10, 30:35, 5:10] = 2
    path = tmp_path / "montage.png"
    drawn = write_overlay_montage(path, volume, labels, columns=4, tile=128)
    assert drawn == list(range(5, 15))  # only slices with foreground, all 10 of them
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert image.shape == (3 * 128, 4 * 128, 3)
    colored = (image.max(axis=-1) - image.min(axis=-1)) > 40  # saturated: a label colour
    gray = ((image.max(axis=-1) - image.min(axis=-1)) < 3) & (image[..., 0] > 100)
    assert colored.sum() > 500 and gray.sum() > 500
    assert no_temp_files(tmp_path)
    # explicit slices and window; no foreground -> evenly spaced slices
    assert write_overlay_montage(path, volume, labels, slice_indices=[0, 19], window=(0, 400)) == [0, 19]
    spread = choose_slices(np.zeros((30, 2, 2), np.uint8))
    assert len(spread) == 12 and spread[0] == 0 and spread[-1] == 29 and spread == sorted(set(spread))
    with pytest.raises(ValueError):
        write_overlay_montage(path, volume, labels[:, :, :10])
    with pytest.raises(ValueError):
        write_overlay_montage(path, volume, labels, slice_indices=[25])


# ------------------------------------------------------------------------------ atomic writes


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_bytes(target, b"old")
    with atomic_write(target, "w") as handle:
        handle.write("new")
    assert target.read_text() == "new"
    assert no_temp_files(tmp_path)
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "labels.seg.nrrd"
    atomic_write_bytes(target, b"old content")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as handle:
            handle.write(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old content"
    assert no_temp_files(tmp_path)
    with pytest.raises(RuntimeError):
        with atomic_output_path(tmp_path / "volume.mha") as tmp:
            assert tmp.name.endswith(".mha") and tmp.parent == tmp_path
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer crashed")
    assert not (tmp_path / "volume.mha").exists()
    assert no_temp_files(tmp_path)
    # a failing writer of a real format leaves the previous file intact too
    g = Geometry.identity()
    write_volume(tmp_path / "ct.nrrd", Volume(np.ones(SHAPE, np.int16), g))
    before = (tmp_path / "ct.nrrd").read_bytes()
    with pytest.raises(ValueError):
        write_volume(tmp_path / "ct.nrrd", Volume(np.ones(SHAPE, np.complex64), g))
    assert (tmp_path / "ct.nrrd").read_bytes() == before and no_temp_files(tmp_path)
