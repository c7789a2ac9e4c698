"""Training data: case checks, the split (by subject, or slabs of one volume), the slices a
run uses and the image-changing variants."""

from __future__ import annotations

import numpy as np
import pytest

from desam_server.io import Geometry, Volume, write_volume
from desam_server.io.segmentation import SegmentInfo, write_segmentation
from desam_server.training.cases import Case, CaseError, case_from_arrays, check_cases, load_case
from desam_server.training.samples import build_training_data
from desam_server.training.split import split_cases
from desam_server.training.variants import AUGMENTATIONS, apply_variant, parse_augmentations

from training_helpers import WINDOW, phantom, phantom_cases, write_phantom_files


def test_mask_shape_geometry_and_emptiness_are_checked():
    volume, mask = phantom(0)
    with pytest.raises(CaseError, match="shape"):
        case_from_arrays(volume, mask[:, :-1], None, structure="blob", window=WINDOW)
    other = Geometry.identity((1.0, 1.0, 2.5))
    with pytest.raises(CaseError, match="geometry"):
        case_from_arrays(volume, mask, other, structure="blob", window=WINDOW)
    with pytest.raises(CaseError, match="empty"):
        case_from_arrays(volume, np.zeros_like(mask), None, structure="blob", window=WINDOW)
    case = case_from_arrays(volume, mask.astype(np.uint8), volume.geometry, structure="blob", window=WINDOW)
    assert case.mask.dtype == bool and case.case_id == case.volume_id[:12]


def test_structure_absent_everywhere_and_mixed_sets_are_refused():
    volume, mask = phantom(0)
    empty = Case(volume=volume, mask=np.zeros_like(mask), structure="blob", window=WINDOW)
    with pytest.raises(CaseError, match="absent from every case"):
        check_cases([empty])
    a, b = phantom_cases(2)
    b.structure = "other"
    with pytest.raises(CaseError, match="several structures"):
        check_cases([a, b])
    with pytest.raises(CaseError, match="same volume"):
        check_cases([a, a])
    with pytest.raises(CaseError, match="no training cases"):
        check_cases([])


def test_cases_from_files_labelmap_and_segmentation(tmp_path):
    (v, m), = write_phantom_files(tmp_path, 1)
    case = load_case(v, m, structure="blob", window=WINDOW)
    assert case.mask.sum() == phantom(0)[1].sum()
    volume, mask = phantom(0)
    labelmap = mask.astype(np.uint8) * 2
    seg = tmp_path / "case.seg.nrrd"
    write_segmentation(seg, labelmap, volume.geometry, [SegmentInfo("liver", (1, 0, 0), 2)])
    assert load_case(v, seg, structure="liver").mask.sum() == mask.sum()
    with pytest.raises(CaseError, match="no segment named 'kidney'.*'liver'"):
        load_case(v, seg, structure="kidney", segment="kidney")
    shifted = tmp_path / "shifted.nrrd"
    write_volume(shifted, Volume(mask.astype(np.uint8), Geometry.identity((1.0, 1.0, 2.0), origin=(5, 0, 0))))
    with pytest.raises(CaseError, match="geometry"):
        load_case(v, shifted, structure="blob")


def test_split_by_subject_is_reproducible_and_disjoint():
    cases = phantom_cases(6)
    a = split_cases(cases, validation_fraction=0.34, seed=3)
    b = split_cases(cases, validation_fraction=0.34, seed=3)
    assert a == b and a.kind == "volume"
    train = {p.case for p in a.train}
    val = {p.case for p in a.validation}
    assert len(val) == 2 and not train & val and train | val == set(range(6))
    assert "split by subject" in a.description
    # Variants of one subject (one group) never straddle the split.
    for c in cases:
        c.group = "g0" if c in cases[:3] else "g1"
    s = split_cases(cases, seed=0)
    groups = {cases[p.case].group for p in s.validation}
    assert len(groups) == 1 and not groups & {cases[p.case].group for p in s.train}


def test_single_volume_is_split_into_slabs_with_guard_bands():
    volume, mask = phantom(1, shape=(60, 24, 24))
    mask[:] = False
    mask[5:55, 8:16, 8:16] = True
    case = case_from_arrays(volume, mask, None, structure="blob", window=WINDOW)
    split = split_cases([case], validation_fraction=0.2, seed=0, slabs=2, gap=3)
    assert split.kind == "slab" and "slab" in split.description
    val = set(split.validation[0].indices)
    train = set(split.train[0].indices)
    assert len(val) == 12 and not val & train
    for i in train:  # no training slice within the guard band of a validation slice
        assert min(abs(i - v) for v in val) > 3
    assert split == split_cases([case], validation_fraction=0.2, seed=0, slabs=2, gap=3)
    with pytest.raises(CaseError, match="too thin"):
        split_cases([case], validation_fraction=0.5, slabs=4, gap=10)


def test_training_slices_follow_the_empty_ratio_and_variants():
    cases = phantom_cases(4, shape=(12, 40, 48))
    split = split_cases(cases, validation_fraction=0.25, seed=0)
    data = build_training_data(cases, split, empty_ratio=0.2, seed=0)
    positives = [r for r in data.train if r.positive]
    empties = [r for r in data.train if not r.positive]
    counts = [cases[p.case].slices_with_structure(0).size for p in split.train]
    assert positives and len(empties) == sum(min(12 - n, int(np.ceil(0.2 * n))) for n in counts)
    for r in data.train:
        assert data.cases[r.case].mask[r.index].any() == r.positive
    val = data.validation_refs()
    assert len(val) == 12 and any(not r.positive for r in val)  # whole volume, empty slices included
    with_variants = build_training_data(cases, split, variants=parse_augmentations("flip_lr,bright"), seed=0)
    assert len(with_variants.train) == 3 * len(build_training_data(cases, split, seed=0).train)
    assert len(with_variants.cases) == 4 + 2 * len(split.train)
    with pytest.raises(ValueError, match="mirrors along the slicing axis"):
        build_training_data(cases, split_cases(cases, axis="i"), variants=parse_augmentations("flip_lr"))
    with pytest.raises(ValueError, match="unknown augmentation"):
        parse_augmentations("rotate")


def test_variants_change_the_feature_key_inputs():
    case = phantom_cases(1)[0]
    flipped = apply_variant(case, AUGMENTATIONS["flip_lr"])
    assert flipped.volume_id != case.volume_id and flipped.group == case.group
    assert np.array_equal(flipped.mask, case.mask[:, :, ::-1])
    bright = apply_variant(case, AUGMENTATIONS["bright"])
    assert bright.volume_id == case.volume_id and bright.window.center < case.window.center


def test_slice_step_thins_training_slices_only():
    cases = phantom_cases(4, shape=(12, 40, 48))
    split = split_cases(cases, validation_fraction=0.25, seed=0)
    every = build_training_data(cases, split, empty_ratio=0.0, seed=0)
    third = build_training_data(cases, split, empty_ratio=0.0, seed=0, slice_step=3)
    for p in split.train:
        positives = [r.index for r in every.train if r.case == p.case]
        assert [r.index for r in third.train if r.case == p.case] == positives[::3]
    assert third.validation_refs() == every.validation_refs()
    assert third.summary()["slice_step"] == 3
    with pytest.raises(ValueError, match="slice_step"):
        build_training_data(cases, split, slice_step=0)


def test_volume_dice_and_surface_dice():
    from desam_server.training.evaluate import dice_and_nsd, volume_dice

    a = np.zeros((10, 20, 20), bool)
    a[2:8, 5:15, 5:15] = True
    b = np.roll(a, 1, axis=2)  # shifted by one voxel (1 mm along i)
    assert volume_dice(a, a) == pytest.approx(1.0)
    assert volume_dice(a, b) == pytest.approx(2 * 6 * 10 * 9 / (2 * 600))
    spacing = (2.0, 1.0, 1.0)  # k, j, i in mm
    dice, nsd = dice_and_nsd(a, b, spacing, tolerance_mm=1.5)
    assert dice == pytest.approx(0.9) and nsd == pytest.approx(1.0)
    _, tight = dice_and_nsd(a, b, spacing, tolerance_mm=0.5)
    assert tight < 1.0
    empty = np.zeros_like(a)
    assert dice_and_nsd(empty, empty, spacing, 1.0) == (1.0, 1.0)
    assert dice_and_nsd(a, empty, spacing, 1.0) == (0.0, 0.0)
