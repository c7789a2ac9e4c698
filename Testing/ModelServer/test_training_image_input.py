"""Image families (``input_kind == "image"``) train through the same loop as feature
families: the trainer reads slices through ``SliceImageReader``, every step runs the
encoder forward and backward, validation predicts from the slice; a reader that does not
give what a family reads is refused. The family here is a test's own: it trains the tiny
encoder's neck (inside the encoder: cached features could not train it) and SAM's mask
decoder on ground-truth boxes."""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from torch import nn

from desam_server.engine.preprocess import prepare_input, to_input_frame, to_rgb
from desam_server.io.slices import slice_view
from desam_server.modeling import build_desam
from desam_server.training.config import TrainConfig
from desam_server.training.desam_family import low_res_target
from desam_server.training.family import SliceImage, TrainItem, get_family
from desam_server.training.features import FeatureReader
from desam_server.training.run import TrainingOptions, prepare_data
from desam_server.training.slice_images import SliceImageReader, check_reader
from desam_server.training.trainer import Trainer, validation_dice

from training_helpers import phantom_cases


class _Trained(nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.neck = model.image_encoder.neck
        self.mask_decoder = model.mask_decoder
        self._model = (model,)

    @property
    def model(self):
        return self._model[0]


def _box(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        h, w = mask.shape
        return np.array([[0.0, 0.0], [w, h]])
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return np.array([[cols[0], rows[0]], [cols[-1] + 1.0, rows[-1] + 1.0]])


class NeckAndDecoderFamily:
    """A minimal image family: the neck and SAM's mask decoder train, boxes from the label."""

    name = "test_neck_and_decoder"
    strategies = ("box",)
    input_kind = "image"

    def __init__(self) -> None:
        self.loss_fn = DiceCELoss(sigmoid=True)
        self.encoder_passes = 0

    def prepare_model(self, model):
        return model

    def training_module(self, model, strategy: str) -> _Trained:
        for p in model.parameters():
            p.requires_grad_(False)
        module = _Trained(model)
        for p in module.parameters():
            p.requires_grad_(True)
        return module

    def _forward(self, model, image: SliceImage, box_xyxy: np.ndarray):
        x, input_size = prepare_input(model, to_rgb(image.image, image.window))
        self.encoder_passes += 1
        embedding, _ = model.encode(x)
        box = torch.as_tensor(to_input_frame(box_xyxy, image.image.shape, model.img_size).reshape(1, 4),
                              dtype=torch.float32)
        logits, _ = model.sam_decode(embedding, points=None, boxes=box, mask_input=None, multimask_output=False)
        return logits, input_size

    def loss(self, module, items: Sequence[TrainItem], strategy: str, generators):
        model = module.model
        logits, targets = [], []
        for it in items:
            assert it.features is None and it.image is not None
            out, input_size = self._forward(model, it.image, _box(it.mask))
            logits.append(out)
            targets.append(low_res_target(it.mask, input_size, model.img_size, model.device))
        loss = self.loss_fn(torch.cat(logits), torch.stack(targets))
        return loss, {"mask": float(loss.detach())}

    def optimizer(self, parameters, learning_rate: float):
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)

    def after_step(self, model) -> None:
        model.weights_changed()

    @torch.no_grad()
    def predict(self, model, source, strategy: str, options: dict) -> np.ndarray:
        assert isinstance(source, SliceImage)
        h, w = source.image.shape
        logits, input_size = self._forward(model, source, np.array([[0.0, 0.0], [w, h]]))
        return (model.postprocess_logits(logits, input_size, (h, w))[0, 0] > 0).numpy()

    def trainable_state(self, model) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in _Trained(model).state_dict().items()}

    def load_trainable_state(self, model, state) -> None:
        _Trained(model).load_state_dict(state, strict=True)

    def save(self, model, path, *, structure: str, training: dict) -> dict:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.trainable_state(model).items()}, str(path))
        return {"structure": structure}

    def load(self, model, path) -> dict:
        from safetensors.torch import load_file

        self.load_trainable_state(model, load_file(str(path)))
        return {}


@pytest.fixture(scope="module")
def data():
    options = TrainingOptions(validation_fraction=0.25, empty_ratio=0.5,
                              config=TrainConfig(strategy="box", batch_size=2, epochs=2, learning_rate=1e-3,
                                                 precision="fp32"))
    return prepare_data(phantom_cases(3), options), options


def test_slice_image_reader_gives_the_raw_slice_and_window(data):
    training, _ = data
    case = training.cases[0]
    for axis in ("k", "j", "i"):
        got = SliceImageReader().load(case, axis, 3)
        assert got.window == case.window
        np.testing.assert_array_equal(got.image, slice_view(case.volume.array, axis, 3))
        assert got.image.flags.c_contiguous


def test_readers_must_match_the_family(tmp_path, data):
    training, options = data
    torch.manual_seed(0)
    model = build_desam("tiny")
    image_family, desam = NeckAndDecoderFamily(), get_family("desam")
    with pytest.raises(TypeError, match="reads image: it needs a SliceImageReader"):
        Trainer(model, image_family, training, FeatureReader(model, tmp_path), options.config, tmp_path)
    with pytest.raises(TypeError, match="reads features: it needs a FeatureReader"):
        Trainer(model, desam, training, SliceImageReader(), options.config, tmp_path)
    with pytest.raises(TypeError, match="reads features"):
        validation_dice(model, desam, training, SliceImageReader(), "grid", {})
    check_reader(image_family, SliceImageReader())
    check_reader(desam, FeatureReader(model, tmp_path))


def test_an_image_family_trains_with_the_encoder_in_the_loop(tmp_path, data):
    training, options = data
    torch.manual_seed(0)
    model = build_desam("tiny")
    frozen = {k: v.clone() for k, v in model.image_encoder.state_dict().items() if not k.startswith("neck.")}
    neck = {k: v.clone() for k, v in model.image_encoder.neck.state_dict().items()}
    family = NeckAndDecoderFamily()
    events = []
    result = Trainer(model, family, training, SliceImageReader(), options.config, tmp_path,
                     events=events.append).run()
    steps = len(training.train) // options.config.batch_size
    validation_slices = sum(len(p.indices) for p in training.validation)
    # one encoder pass per training slice per epoch, one per validation slice per epoch
    assert family.encoder_passes == options.config.epochs * (steps * 2 + validation_slices)
    assert len(result.history) == 2 and all(0.0 <= h["validation_dice"] <= 1.0 for h in result.history)
    assert (tmp_path / "best.safetensors").exists() and (tmp_path / "state.pt").exists()
    record = json.loads((tmp_path / "history.json").read_text())["record"]
    assert record["family"] == "test_neck_and_decoder"
    after = model.image_encoder.state_dict()
    for k, v in frozen.items():  # the frozen blocks stayed bit-identical
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(model.image_encoder.neck.state_dict()[k], v) for k, v in neck.items())
    step_losses = [e["loss"] for e in events if e["event"] == "step"]
    assert len(step_losses) == 2 * steps and all(np.isfinite(step_losses))
