"""Adapted encoders served by one scheduler beside the base model's: features of their own
under their own cache identity (never mixed with the base's), equal to a direct pass;
passes never mix encoders; views, precompute and progress per encoder; removal cancels
queued work and tells waiters; bad additions refused."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from desam_server.engine import SlicePredictor
from desam_server.engine.scheduler import UnknownEncoderError
from desam_server.io.slices import slice_view

from scheduler_helpers import VOLUME, WINDOW, Encoder, idle, make, wait_until


def adapted(model, *, seed: int = 1, sha: str = "ab" * 32):
    """A copy of ``model`` whose neck weights differ, with an identity of its own."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.image_encoder.neck.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    other.encoder_name = model.encoder_name + "+test"
    other.encoder_weights_sha256 = sha
    return other


def test_adapted_features_are_their_own_and_equal_a_direct_pass(scheduler_model, scheduler_volume, tmp_path):
    sched, _, cache = make(scheduler_model, scheduler_volume, tmp_path)
    variant = adapted(scheduler_model)
    sched.add_encoder("variant", variant)
    assert sched.encoders() == ["variant"] and sched.stats()["encoders"] == ["variant"]
    base = sched.features(VOLUME, "k", 5, timeout=60)
    mine = sched.features(VOLUME, "k", 5, timeout=60, encoder="variant")
    assert sched.is_cached(VOLUME, "k", 5) and sched.is_cached(VOLUME, "k", 5, encoder="variant")
    assert not sched.is_cached(VOLUME, "k", 6, encoder="variant")
    direct = SlicePredictor(variant, precision="fp32")
    direct.set_image(slice_view(scheduler_volume, "k", 5), WINDOW)
    torch.testing.assert_close(mine.embedding, direct.features.embedding, atol=2e-3, rtol=2e-3)  # float16 storage
    assert not torch.allclose(mine.embedding, base.embedding, atol=1e-2)
    assert cache.stats()["tiers"]["host"]["entries"] == 2
    # a second request is a cache hit, bit-identical
    again = sched.features(VOLUME, "k", 5, timeout=60, encoder="variant")
    assert torch.equal(again.embedding, mine.embedding) and sched.stats()["cache_hits"] == 1
    sched.close()


def test_passes_never_mix_encoders(scheduler_model, scheduler_volume, tmp_path):
    variant = adapted(scheduler_model)
    base_encoder, variant_encoder = Encoder(scheduler_model), Encoder(variant)
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, encoder=base_encoder, encode_batch=4)
    sched.add_encoder("variant", variant, encode_fn=variant_encoder)
    sched.pause()
    sched.precompute(VOLUME, "k")
    sched.precompute(VOLUME, "k", encoder="variant")
    assert sched.stats()["queued_by_priority"] == {"background": 24}
    sched.resume()
    wait_until(lambda: idle(sched), timeout=120)
    assert sum(base_encoder.calls) == 12 and sum(variant_encoder.calls) == 12
    assert max(base_encoder.calls + variant_encoder.calls) <= 4
    assert sched.progress(VOLUME, "k", encoder="variant") == {"total": 12, "cached": 12, "queued": 0, "running": 0}
    assert sched.progress(VOLUME, "j")["cached"] == 0
    sched.close()


def test_view_per_encoder_and_removal(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, neighbours=2)
    sched.add_encoder("variant", adapted(scheduler_model))
    sched.pause()
    sched.set_view(VOLUME, "k", 6, encoder="variant")
    assert sched.stats()["queued_by_priority"] == {"view": 1, "neighbour": 4}
    assert sched.progress(VOLUME, "k", encoder="variant")["queued"] == 5
    assert sched.progress(VOLUME, "k")["queued"] == 0
    result = {}

    def wait():
        try:
            sched.features(VOLUME, "k", 0, timeout=60, encoder="variant")
        except UnknownEncoderError as exc:
            result["error"] = exc

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: sched.stats()["queued_by_priority"].get("prompt") == 1)
    assert sched.remove_encoder("variant") == 6
    t.join(30)
    assert "was removed" in str(result["error"])
    assert sched.stats()["queued"] == 0 and sched.encoders() == []
    with pytest.raises(UnknownEncoderError, match="no encoder named 'variant'"):
        sched.features(VOLUME, "k", 0, timeout=5, encoder="variant")
    with pytest.raises(UnknownEncoderError):
        sched.set_view(VOLUME, "k", 0, encoder="variant")
    sched.resume()
    sched.features(VOLUME, "k", 0, timeout=60)  # the base model still serves
    sched.close()


def test_bad_additions_are_refused(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path)
    same = copy.deepcopy(scheduler_model)
    with pytest.raises(ValueError, match="base encoder's identity"):
        sched.add_encoder("same", same)
    sched.add_encoder("variant", adapted(scheduler_model))
    with pytest.raises(ValueError, match="already added"):
        sched.add_encoder("variant", adapted(scheduler_model, sha="cd" * 32))
    with pytest.raises(ValueError, match="identity of encoder 'variant'"):
        sched.add_encoder("twin", adapted(scheduler_model))
    with pytest.raises(ValueError, match="encoder name must match"):
        sched.add_encoder("../x", adapted(scheduler_model, sha="ef" * 32))
    with pytest.raises(UnknownEncoderError):
        sched.remove_encoder("nothing")
    sched.close()
