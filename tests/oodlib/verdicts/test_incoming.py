"""Simulated nightly batches: deterministic, the requested shares, unique ids, no byte copies."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from oodlib.data.digits import ImageSet
from oodlib.data.incoming import digits_incoming_batches
from oodlib.data.manifest import manifest_from_image_sets, validate_manifest

DATES = ("2026-11-29", "2026-11-30", "2026-12-01")


@pytest.fixture(scope="module")
def sets(digits_sets):
    return list(digits_sets.values())


@pytest.fixture(scope="module")
def batches(sets):
    return digits_incoming_batches(0, sets=sets)


def test_shape_and_metadata(batches):
    assert [b.batches[0] for b in batches] == list(DATES) and all(len(set(b.batches)) == 1 for b in batches)
    for b in batches:
        assert isinstance(b, ImageSet)
        assert (b.dataset, b.split) == ("prod", "test")
        assert b.images.shape == (120, 32, 32) and b.images.dtype == np.uint8
        assert len(b.labels) == len(b.image_ids) == len(b.subsets) == 120


def test_shares_and_labels(batches):
    for b, share in zip(batches, (0.05, 0.2, 0.45)):
        sub = np.asarray(b.subsets)
        n_shift = round(share * 120)
        assert np.sum(sub != "id") == n_shift
        assert np.sum(sub == "near-ood") == round(0.5 * n_shift)
        assert np.all((b.labels == -1) == (sub == "near-ood"))  # labels kept where known
        assert np.all((b.labels[sub != "near-ood"] >= 0) & (b.labels[sub != "near-ood"] < 8))
        kinds = {s.rsplit("-", 1)[0] for s in sub if s not in ("id", "near-ood")}
        assert kinds <= {"noise", "blur", "occlusion", "contrast"}
        assert np.flatnonzero(sub != "id").min() < 120 - n_shift  # shuffled: the shifted ones are not all at the end


def test_ids_unique_and_formatted(batches):
    ids = [i for b in batches for i in b.image_ids]
    assert len(set(ids)) == len(ids) == 360
    assert batches[2].image_ids[7] == "prod/2026-12-01/00007"
    validate_manifest(manifest_from_image_sets(batches))


def test_deterministic_and_per_date(sets, batches):
    again = digits_incoming_batches(0, sets=sets)
    for a, b in zip(batches, again):
        assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels) and a.subsets == b.subsets
    other = digits_incoming_batches(1, sets=sets)
    assert not np.array_equal(other[0].images, batches[0].images)
    # a batch depends on its own date only: dropping a date leaves the others as they were
    two = digits_incoming_batches(0, dates=DATES[1:], shares=(0.2, 0.45), sets=sets)
    assert np.array_equal(two[0].images, batches[1].images) and np.array_equal(two[1].images, batches[2].images)


def test_no_byte_copies_of_benchmark_images(sets, batches):
    seen = {hashlib.sha1(im.tobytes()).digest() for s in sets for im in s.images}
    prod = [hashlib.sha1(im.tobytes()).digest() for b in batches for im in b.images]
    assert not seen & set(prod)
    assert len(set(prod)) == len(prod)


def test_jitter_is_mild(sets, batches):
    """Jittered ID digits stay close to their source: every ID image is nearer (L2) to some ID
    test image than the typical distance between two different test digits."""
    test = next(s for s in sets if (s.dataset, s.split) == ("digits", "test")).images.reshape(-1, 1024).astype(np.float32)
    b = batches[0]
    ids = b.images[np.asarray(b.subsets) == "id"].reshape(-1, 1024).astype(np.float32)
    d = np.sqrt(((ids[:, None, :] - test[None, :, :]) ** 2).sum(-1))
    typical = np.median(np.sqrt(((test[:50, None] - test[None, 50:100]) ** 2).sum(-1)))
    assert np.all(d.min(1) < 0.6 * typical) and np.all(d.min(1) > 0)


def test_input_checks(sets):
    with pytest.raises(ValueError, match="shares"):
        digits_incoming_batches(0, dates=DATES, shares=(0.1,), sets=sets)
    with pytest.raises(ValueError, match="repeat"):
        digits_incoming_batches(0, dates=("a", "a"), shares=(0.1, 0.1), sets=sets)
    with pytest.raises(ValueError, match="exceeds"):
        digits_incoming_batches(0, size=10_000, sets=sets)
