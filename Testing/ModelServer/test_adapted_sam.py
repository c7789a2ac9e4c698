"""``adapted_sam``: an adapted encoder and its mask decoder served as a DeSAM through SAM's
prompted path: embedding-only features, the engine's SlicePredictor answers equal to a
direct computation with the adapted parts, the base model untouched, an identity of its
own; through the scheduler its entries hold one tensor."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from desam_server.engine import SlicePredictor
from desam_server.engine.adapted_sam import adapted_sam
from desam_server.engine.preprocess import prepare_input, to_input_frame, to_rgb
from desam_server.io.slices import slice_view

from scheduler_helpers import VOLUME, WINDOW, make


def _parts(model, seed: int = 3):
    encoder, decoder = copy.deepcopy(model.image_encoder), copy.deepcopy(model.mask_decoder)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*encoder.neck.parameters(), *decoder.output_upscaling.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return encoder, decoder


def test_prompted_answers_equal_a_direct_computation(scheduler_model, scheduler_volume):
    base = scheduler_model
    before = {k: v.clone() for k, v in base.state_dict().items()}
    encoder, decoder = _parts(base)
    model = adapted_sam(base, image_encoder=encoder, mask_decoder=decoder, encoder_name="tiny+test",
                        encoder_weights_sha256="ab" * 32)
    assert (model.encoder_name, model.encoder_weights_sha256) == ("tiny+test", "ab" * 32)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())
    image = slice_view(scheduler_volume, "k", 4)
    predictor = SlicePredictor(model, precision="fp32")
    predictor.set_image(image, WINDOW)
    assert predictor.features.taps == []
    box = np.array([25.0, 15.0, 65.0, 45.0])
    masks, ious, _ = predictor.predict(box=box, multimask_output=False)
    with torch.no_grad():  # the same by hand: the adapted encoder's embedding, the adapted decoder
        x, input_size = prepare_input(base, to_rgb(image, WINDOW))
        embedding = encoder(x)[0]
        b = torch.as_tensor(to_input_frame(box.reshape(2, 2), image.shape, base.img_size).reshape(1, 4),
                            dtype=torch.float32)
        sparse, dense = base.prompt_encoder(points=None, boxes=b, masks=None)
        low, iou = decoder(image_embeddings=embedding, image_pe=base.dense_pe(), sparse_prompt_embeddings=sparse,
                           dense_prompt_embeddings=dense, multimask_output=False)
        expected = base.postprocess_logits(low, input_size, image.shape)[0, 0] > 0
    assert (masks[0] == expected.numpy()).mean() > 0.999
    assert abs(float(ious[0]) - float(iou[0, 0])) < 1e-4
    base_predictor = SlicePredictor(base, precision="fp32")
    base_predictor.set_image(image, WINDOW)
    assert not torch.allclose(base_predictor.features.embedding, predictor.features.embedding, atol=1e-3)
    for k, v in base.state_dict().items():  # the base model is not changed
        assert torch.equal(v, before[k]), k


def test_an_identity_of_its_own_is_required(scheduler_model):
    encoder, decoder = _parts(scheduler_model)
    with pytest.raises(ValueError, match="identity of its own"):
        adapted_sam(scheduler_model, image_encoder=encoder, mask_decoder=decoder,
                    encoder_name=scheduler_model.encoder_name,
                    encoder_weights_sha256=scheduler_model.encoder_weights_sha256)


def test_scheduled_entries_hold_the_embedding_only(scheduler_model, scheduler_volume, tmp_path):
    encoder, decoder = _parts(scheduler_model)
    model = adapted_sam(scheduler_model, image_encoder=encoder, mask_decoder=decoder, encoder_name="tiny+test",
                        encoder_weights_sha256="cd" * 32)
    sched, _, cache = make(scheduler_model, scheduler_volume, tmp_path)
    sched.add_encoder("adapted", model)
    got = sched.features(VOLUME, "k", 2, timeout=60, encoder="adapted")
    base = sched.features(VOLUME, "k", 2, timeout=60)
    assert got.taps == [] and len(base.taps) == 3
    host = cache.stats()["tiers"]["host"]
    assert host["entries"] == 2
    assert host["bytes_used"] == sum(t.numel() * 2 for t in (base.embedding, *base.taps)) + got.embedding.numel() * 2
    sched.close()
