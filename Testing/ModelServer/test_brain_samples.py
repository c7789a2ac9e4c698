"""Brain samples: the MNI152 template (fetched once from the nilearn wheel with pip),
synthetic heads around it, and the Colin27 head (fetched once from Debian's mricron-data
with apt-get), all cached in DESAM_DATA_DIR (else ~/.cache/slicer-desam/data)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import time

import numpy as np
import pytest

from desam_server.brain_samples import (
    colin27,
    common,
    fetch_colin27,
    fetch_mni152,
    mni152,
    synthetic_head,
    tissue_probability,
)
from desam_server.brain_samples.synthetic_head import WHITE_MATTER

needs_pip = pytest.mark.skipif(importlib.util.find_spec("pip") is None,
                               reason="pip is not available: the MNI152 template is fetched from the nilearn "
                                      "wheel with `pip download --no-deps`")
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None,
                               reason="apt-get is not available: Colin27 is fetched from Debian's package "
                                      "mricron-data with `apt-get download`")


@pytest.fixture(scope="module")
def template():
    started = time.perf_counter()
    sample = fetch_mni152()
    print(f"fetch_mni152: {time.perf_counter() - started:.1f} s")
    return sample


@pytest.fixture(scope="module")
def probability(template):
    return tissue_probability(template)


@pytest.fixture(scope="module")
def head(template, probability):
    return synthetic_head(template, probability, seed=3)


@pytest.fixture(scope="module")
def colin():
    started = time.perf_counter()
    sample = fetch_colin27()
    print(f"fetch_colin27: {time.perf_counter() - started:.1f} s")
    return sample


def lps(sample, k, j, i):
    return (sample.volume.geometry.ijk_to_lps() @ np.array([i, j, k, 1.0]))[:3]


@needs_pip
def test_mni152_geometry_and_cache(template):
    v = template.volume
    assert v.array.shape == mni152.SHAPE and v.array.dtype == np.uint8
    assert v.geometry.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(v.geometry.direction, np.diag([-1.0, -1.0, 1.0]))
    # the NIfTI is RAS; MNI (0, 0, 0), the anterior commissure, is voxel (i, j, k) = (98, 134, 72)
    np.testing.assert_allclose(lps(template, 72, 134, 98), 0.0, atol=1e-9)
    assert all(p.is_file() for p in template.files)
    started = time.perf_counter()
    assert fetch_mni152(template.files[0].parent.parent).brain_ml == template.brain_ml  # cached, verified
    assert time.perf_counter() - started < 5


@needs_pip
def test_mni152_brain_mask_anatomy(template, probability):
    mask = template.brain_mask.astype(bool)
    assert template.brain_mask.dtype == np.uint8 and mask.shape == mni152.SHAPE
    # MNI space is larger than an average native brain: ~1780 ml with the enclosed CSF
    assert 1650 < template.brain_ml < 1900
    np.testing.assert_array_equal(common.largest_component(mask), mask)  # one piece
    ks, js, _ = np.nonzero(mask)
    # LPS: anterior = negative P. Frontal pole ~70 mm anterior, occipital pole ~105 mm
    # posterior, vertex ~80 mm above the AC: the axes are the right way round.
    front, back = lps(template, 72, js.max(), 98)[1], lps(template, 72, js.min(), 98)[1]
    top = lps(template, ks.max(), 134, 98)[2]
    assert -80 < front < -60 and 95 < back < 115 and 70 < top < 90
    # skull-stripped: nothing bright outside the brain, brain tissue bright inside
    t1 = template.volume.array
    assert np.median(t1[mask]) > 150 and np.percentile(t1[~mask], 99) < 120
    # the CSF the brain encloses (ventricles) counts as brain: > 15 ml of it inside the mask,
    # while the mask itself is gm + wm > 50 % plus hole filling only
    enclosed_csf_ml = common.mask_volume_ml(mask & (probability < 0.2), (1, 1, 1))
    assert 15 < enclosed_csf_ml < 150
    np.testing.assert_array_equal(mask, mni152.brain_mask_from_tissue_maps(
        np.rint(probability * 255).astype(np.uint8), np.zeros_like(t1)).astype(bool))


def test_cache_rejects_tampered_files(tmp_path):
    directory = tmp_path / mni152.SUBDIR
    directory.mkdir()
    for name in mni152.FILES.values():
        (directory / name).write_bytes(b"x")
    manifest = {"format": mni152.MANIFEST_FORMAT,
                "files": {k: {"name": n, "size": 1, "sha256": "0" * 64} for k, n in mni152.FILES.items()}}
    (directory / mni152.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert common.read_manifest(directory, mni152.MANIFEST_NAME, mni152.MANIFEST_FORMAT, mni152.FILES) is None
    bad_wheel = tmp_path / mni152.WHEEL_NAME
    bad_wheel.write_bytes(b"not the wheel")
    with pytest.raises(RuntimeError, match="sha256"):
        fetch_mni152(tmp_path, wheel_file=bad_wheel)


@needs_pip
def test_synthetic_head_adds_non_brain_tissue(template, head):
    brain = template.brain_mask.astype(bool)
    assert head.brain_mask is template.brain_mask  # the template's mask, unchanged
    assert head.volume.geometry == template.volume.geometry and head.volume.array.dtype == np.int16
    a = head.volume.array.astype(np.float32) / WHITE_MATTER
    outside = ~common.dilate(brain, 3)
    # "not black = brain" is wrong here: > 300 ml of mid-grey or brighter tissue outside the brain
    tissue_ml = common.mask_volume_ml(outside & (a > 0.3), (1, 1, 1))
    assert tissue_ml > 300
    # a dark ring (CSF, bone) between the brain and bright tissue (fat, marrow) on a central
    # slice, along the left-right line through the AC
    row = a[72, 134, :]
    inside = np.nonzero(brain[72, 134, :])[0]
    right_side = row[inside.max() + 1:]
    first_bright = int(np.argmax(right_side > 0.75))
    assert first_bright > 0 and right_side[:first_bright].min() < 0.25
    # the brain is still the brain: white matter near WHITE_MATTER (bias field and gamma apart)
    assert 0.6 < np.median(a[brain]) < 1.4


@needs_pip
def test_synthetic_head_is_deterministic_per_seed(template, probability, head):
    started = time.perf_counter()
    again = synthetic_head(template, probability, seed=3)
    assert time.perf_counter() - started < 60
    np.testing.assert_array_equal(again.volume.array, head.volume.array)
    other = synthetic_head(template, probability, seed=4)
    assert not np.array_equal(other.volume.array, head.volume.array)
    with pytest.raises(ValueError, match="one grid"):
        synthetic_head(template, probability[:-1], seed=0)


@needs_apt
def test_colin27_head_and_reference_mask(colin):
    v = colin.volume
    assert v.array.shape == colin27.SHAPE and v.array.dtype == np.uint8 and v.geometry.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_array_equal(v.geometry.direction, np.diag([-1.0, -1.0, 1.0]))
    mask = colin.brain_mask.astype(bool)
    assert 1550 < colin.brain_ml < 1750
    np.testing.assert_array_equal(common.largest_component(mask), mask)
    # independent check: MRIcron's BET mask agrees closely (its own errors apart)
    assert common.dice(mask, colin27.bet_mask(colin)) > 0.95
    # a real head: skull, scalp, face and neck around the brain
    t1 = v.array
    assert common.mask_volume_ml((t1 > 60) & ~common.dilate(mask, 3), (1, 1, 1)) > 800
    ks, js, _ = np.nonzero(mask)
    front, back = lps(colin, 71, js.max(), 90)[1], lps(colin, 71, js.min(), 90)[1]
    assert front < -55 and back > 90  # MNI-like placement: anterior is negative P
    # the rule is reproducible from the cached T1
    np.testing.assert_array_equal(colin27.reference_brain_mask(t1)[70:90], colin.brain_mask[70:90])
