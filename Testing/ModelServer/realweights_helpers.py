"""Helpers for the real-weights tests: the head CT's slices and prompts, and the stock
``segment_anything.SamPredictor`` on the same MobileSAM / LiteMedSAM checkpoint as the
reference for our ``SlicePredictor``.

Nothing here downloads when the caches are filled: the weights come from
``fetch_weights`` (``DESAM_WEIGHTS_DIR``) and the CT from ``samples.fetch_cranium``
(``DESAM_DATA_DIR``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from segment_anything import SamPredictor
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from desam_server.atomic import atomic_write_bytes
from desam_server.engine import IntensityWindow, SlicePredictor, prepare_input, to_rgb
from desam_server.engine.feature_packed import pack_features
from desam_server.engine.postprocess import largest_component
from desam_server.io import read_volume
from desam_server.io.slices import slice_view
from desam_server.modeling import FastPath, build_desam
from desam_server.modeling.desam import DeSAM
from desam_server.segment import PromptRule
from desam_server.weights import fetch_weights, get_entry

from conftest import dice


# ------------------------------------------------------------------------------ the CT
@dataclass(frozen=True)
class Cranium:
    """The InVesalius head CT (K x J x I int16 HU), its reference head mask and window."""

    volume: np.ndarray
    head: np.ndarray
    window: IntensityWindow
    reference_slice: int


@lru_cache(maxsize=1)
def cranium() -> Cranium:
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    center, width = sample.window
    return Cranium(volume=read_volume(sample.volume).array, head=read_volume(sample.head_mask).array > 0,
                   window=IntensityWindow(center=center, width=width), reference_slice=sample.reference_slice)


#: Slices of the 108 x 256 x 256 head CT (k: inferior -> superior), spread over the
#: volume: axial from the maxilla (k 4) to just under the vertex, the last two small
#: (k 98: ~8 000 px, k 104: ~1 800 px of head), the reference slice 54 among them; one
#: coronal (j: a 108 x 256 slice) and one sagittal (i) slice through the middle.
SLICES: tuple[tuple[str, int], ...] = (
    ("k", 4), ("k", 20), ("k", 38), ("k", 54), ("k", 70), ("k", 86), ("k", 98), ("k", 104),
    ("j", 120), ("i", 140),
)


def slice_id(view: tuple[str, int]) -> str:
    return f"{view[0]}{view[1]}"


def box_prompt(head: np.ndarray) -> np.ndarray:
    """``segment.PromptRule``'s box for a 2-D reference slice: the bounding box of its
    largest component (x0, y0, x1, y1; exclusive upper corner)."""
    prompt = PromptRule(reference=head[None]).prompt_for("k", 0, head.shape)
    assert prompt is not None, "the reference mask is empty on this slice"
    return prompt["box"]


def click_prompt(head: np.ndarray) -> np.ndarray:
    """One foreground click well inside the reference: the pixel of the largest component
    farthest from its boundary (maximum of the Euclidean distance map; the first such pixel
    in row-major order), as x, y."""
    component = largest_component(head)
    distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
        sitk.GetImageFromArray(component.astype(np.uint8)), insideIsPositive=True, squaredDistance=False,
        useImageSpacing=False))
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    assert component[y, x]
    return np.array([[float(x), float(y)]])


def prompts_for(head: np.ndarray) -> dict[str, dict]:
    """The two prompts of every checked slice: the box (one mask, as the service asks for a
    box) and the click (three masks, SAM's advice for one ambiguous point)."""
    return {
        "box": dict(box=box_prompt(head), multimask_output=False),
        "click": dict(point_coords=click_prompt(head), point_labels=np.array([1]), multimask_output=True),
    }


# ------------------------------------------------------------------------------ models
def load_model(name: str, device: torch.device | str) -> DeSAM:
    model = build_desam(name, sam_checkpoint=fetch_weights(name), sam_checkpoint_sha256=get_entry(name).sha256)
    return model.to(device)


class EncodedInputs(nn.Module):
    """The stock ``Sam``'s image encoder in these tests: it answers, once, with the neck
    embedding our ``SlicePredictor`` computed from the identical input tensor
    (``remember``), and fails on any other input. So each slice is encoded once, the stock predictor's own
    preprocessing (resize, normalisation, padding) is checked bit for bit against ours,
    and the comparison isolates what comes after the encoder: prompt encoding, SAM's mask
    decoder (our fast path against ``segment_anything``'s modules) and postprocessing."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size  # read by SamPredictor (ResizeLongestSide) and Sam.postprocess_masks
        self._known: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remember(self, x: torch.Tensor, embedding: torch.Tensor) -> None:
        self._known.append((x, embedding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (known, embedding) in enumerate(self._known):
            if known.shape == x.shape and torch.equal(known, x):
                del self._known[i]
                return embedding
        raise AssertionError("SamPredictor's preprocessing produced an input tensor that is not bit for bit "
                             "one our prepare_input produced")


def stock_sam(name: str, model: DeSAM) -> tuple[Sam, EncodedInputs]:
    """``segment_anything.Sam`` with the prompt encoder and mask decoder read from the
    checkpoint file itself (the official layout, loaded strictly, not through our loader),
    on the model's device, and an ``EncodedInputs`` as its image encoder."""
    state = torch.load(fetch_weights(name), map_location="cpu", weights_only=True)
    grid = model.prompt_encoder.image_embedding_size[0]
    img = model.img_size
    encoder = EncodedInputs(img)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(img, img),
                                     mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=list(model.convention.pixel_mean), pixel_std=list(model.convention.pixel_std),
    )
    for part in ("prompt_encoder", "mask_decoder"):
        prefix = part + "."
        getattr(sam, part).load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                                           strict=True)
    return sam.eval().to(model.device), encoder


@dataclass
class EncodedSlice:
    """One slice encoded once: our predictor (fp32 encoder) and the stock one on the same
    embedding, with the slice's reference mask and prompts."""

    view: tuple[str, int]
    head: np.ndarray
    ours: SlicePredictor
    stock: SamPredictor
    prompts: dict[str, dict]


def slice_image(view: tuple[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(intensities, reference head mask) of one slice of the CT."""
    ct = cranium()
    return slice_view(ct.volume, *view), np.ascontiguousarray(slice_view(ct.head, *view))


def encode_slice(model: DeSAM, sam: Sam, encoder: EncodedInputs, view: tuple[str, int],
                 storage: str = "float32") -> EncodedSlice:
    """Encode one slice with our predictor (fp32 encoder, default fast path) and give the
    stock predictor the same embedding, after a round trip through the feature cache's
    ``storage`` dtype (float32: exact; the service's float16 default: what it decodes from)."""
    ct = cranium()
    image, head = slice_image(view)
    rgb = to_rgb(image, ct.window)
    ours = SlicePredictor(model, precision="fp32")
    ours.set_image(image, ct.window)
    x, _ = prepare_input(model, rgb)
    encoder.remember(x, pack_features(ours.features, storage).unpack(taps=False).embedding)
    stock = SamPredictor(sam)
    stock.set_image(rgb)
    return EncodedSlice(view=view, head=head, ours=ours, stock=stock, prompts=prompts_for(head))


# ------------------------------------------------------------------------------ comparison
# Tolerances of the fp32 comparison with the stock predictor.
# Both sides compute the same function in float32; they differ by rounding only: our fast
# path reassociates the two-way transformer's attentions and products, so sums are taken in
# another order (the modules as written are SAM's own). Measured on the CPU over
# the 10 slices x (box, click) x (fast path, modules): low-res logits differ by at most
# 2.5e-6 of the largest |logit| (9.9e-5 at 40, slice k104's click), IoU scores by at most
# 4.8e-7, and no pixel of any mask differs. Allowed: 1e-5 of the largest |logit|; a pixel
# may differ only where the stock logit is that close to the threshold (twice the bound:
# the resize to the slice spreads the low-res rounding), and at most 1e-4 of the pixels (6.5 of a 256 x 256
# mask); IoU scores within 1e-4; SAM's pick the same.
LOGIT_RTOL = 1e-5
IOU_ATOL = 1e-4
MAX_DIFFERING_FRACTION = 1e-4


@dataclass(frozen=True)
class Comparison:
    """Our answer against the stock predictor's for one prompt.

    differing_fraction: of all pixels of all returned masks, those where the two binary
      masks differ; boundary_logit: the largest |stock logit| at such a pixel (0 when
      none differ); logit_max_diff: max |difference| of the low-res logits; logit_scale:
      max |stock low-res logit|; iou_max_diff: of the predicted IoU scores; pick_*: SAM's
      pick (argmax IoU) of each; dice_*: of each pick against the reference mask.
    """

    differing_fraction: float
    boundary_logit: float
    logit_max_diff: float
    logit_scale: float
    iou_max_diff: float
    pick_ours: int
    pick_stock: int
    dice_ours: float
    dice_stock: float


def ieee_fp32(device: torch.device):
    """A context in which float32 stays float32 on ``device``. On CUDA, cuDNN rounds
    convolution inputs to TF32 (10 significand bits) by default: the stock mask decoder's
    transposed convolutions would then carry TF32 rounding (~1e-3) that our fast path's
    matrix products (cuBLAS, float32 by default) do not, and the comparison would measure
    TF32, not our computation. torch's own scoped switch (``cudnn.flags``, the other flags
    kept as they are) turns it off for the comparison only. On the CPU: nothing."""
    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                       allow_tf32=False)


def compare(ours: SlicePredictor, stock: SamPredictor, head: np.ndarray, prompt: dict) -> Comparison:
    """Both predictors on one prompt, in IEEE float32 (``ieee_fp32``)."""
    with ieee_fp32(ours.device):
        m1, s1, l1 = ours.predict(**prompt)
        # SamPredictor's masks are its logits > model.mask_threshold; one call gives both.
        logits2, s2, l2 = stock.predict(**prompt, return_logits=True)
    m2 = logits2 > stock.model.mask_threshold
    assert m1.shape == m2.shape and m1.dtype == m2.dtype == bool
    differ = m1 != m2
    pick1, pick2 = int(np.argmax(s1)), int(np.argmax(s2))
    return Comparison(
        differing_fraction=float(differ.mean()),
        boundary_logit=float(np.abs(logits2[differ]).max()) if differ.any() else 0.0,
        logit_max_diff=float(np.abs(l1 - l2).max()),
        logit_scale=float(np.abs(l2).max()),
        iou_max_diff=float(np.abs(s1 - s2).max()),
        pick_ours=pick1, pick_stock=pick2,
        dice_ours=dice(m1[pick1], head), dice_stock=dice(m2[pick2], head),
    )


def assert_same_as_stock(c, what: str) -> None:
    assert c.logit_max_diff <= LOGIT_RTOL * c.logit_scale, (what, c)
    assert c.iou_max_diff <= IOU_ATOL, (what, c)
    assert c.differing_fraction <= MAX_DIFFERING_FRACTION, (what, c)
    assert c.boundary_logit <= 2 * LOGIT_RTOL * c.logit_scale, (what, c)
    assert c.pick_ours == c.pick_stock, (what, c)
    assert abs(c.dice_ours - c.dice_stock) <= 1e-3, (what, c)


@dataclass(frozen=True)
class Bf16Comparison:
    """A bf16-encoded slice against the same slice encoded in fp32 (same model, decoder in
    fp32 for both, same prompts).

    neck_rel_err: relative Frobenius error of the neck embedding; box_dice: bf16 vs fp32
    box masks; click_pick_fp32 / _bf16: SAM's pick (argmax IoU) of each; click_top2_gap:
    fp32's two best IoU scores apart; click_dice: bf16 vs fp32 at fp32's pick;
    click_other_dice_min: the lowest of the other two masks' (not what SAM shows);
    *_ref_fp32 / *_ref_bf16: Dice of those masks against the reference; *_iou_diff: max
    |IoU score difference|.
    """

    neck_rel_err: float
    box_dice: float
    box_ref_fp32: float
    box_ref_bf16: float
    box_iou_diff: float
    click_pick_fp32: int
    click_pick_bf16: int
    click_top2_gap: float
    click_dice: float
    click_other_dice_min: float
    click_ref_fp32: float
    click_ref_bf16: float
    click_iou_diff: float


def compare_bf16(bf16: SlicePredictor, fp32: EncodedSlice) -> Bf16Comparison:
    e16, e32 = bf16.features.embedding, fp32.ours.features.embedding
    b16, bs16, _ = bf16.predict(**fp32.prompts["box"])
    b32, bs32, _ = fp32.ours.predict(**fp32.prompts["box"])
    c16, cs16, _ = bf16.predict(**fp32.prompts["click"])
    c32, cs32, _ = fp32.ours.predict(**fp32.prompts["click"])
    pick = int(np.argmax(cs32))
    top2 = np.sort(cs32)[-2:]
    return Bf16Comparison(
        neck_rel_err=float((e16 - e32).norm() / e32.norm()),
        box_dice=dice(b16[0], b32[0]), box_ref_fp32=dice(b32[0], fp32.head), box_ref_bf16=dice(b16[0], fp32.head),
        box_iou_diff=float(np.abs(bs16 - bs32).max()),
        click_pick_fp32=pick, click_pick_bf16=int(np.argmax(cs16)), click_top2_gap=float(top2[1] - top2[0]),
        click_dice=dice(c16[pick], c32[pick]),
        click_other_dice_min=min(dice(c16[i], c32[i]) for i in range(len(c32)) if i != pick),
        click_ref_fp32=dice(c32[pick], fp32.head), click_ref_bf16=dice(c16[pick], fp32.head),
        click_iou_diff=float(np.abs(cs16 - cs32).max()),
    )


# ------------------------------------------------------------------------------ measurement
def measure(device: str, bf16_views: list[tuple[str, int]]) -> dict:
    """The quantities the tests bound, on every slice of ``SLICES``: the stock comparison
    (default fast path and the modules as written) and, on ``bf16_views``, bf16 against
    fp32 (bf16 autocast forced, whatever ``auto`` would pick here)."""
    model = load_model("mobile_sam", device)
    sam, encoder = stock_sam("mobile_sam", model)
    out: dict = {"device": str(model.device), "torch": torch.__version__, "slices": {}}
    if model.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(model.device)
    for view in SLICES:
        t0 = time.perf_counter()
        s = encode_slice(model, sam, encoder, view)
        row: dict = {"area": int(s.head.sum()), "encode_s": round(time.perf_counter() - t0, 3)}
        for fast_name, fast in (("fast", FastPath()), ("modules", None)):
            ours = SlicePredictor(model, precision="fp32", fast=fast)
            ours.set_features(s.ours.features)
            for name, prompt in s.prompts.items():
                row[f"{name}_{fast_name}"] = asdict(compare(ours, s.stock, s.head, prompt))
        if view in bf16_views:
            bf16 = SlicePredictor(model, precision="bf16")
            t0 = time.perf_counter()
            bf16.set_image(slice_image(view)[0], cranium().window)
            row["bf16_encode_s"] = round(time.perf_counter() - t0, 3)
            row["bf16"] = asdict(compare_bf16(bf16, s))
        out["slices"][slice_id(view)] = row
        print(slice_id(view), json.dumps(row), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """``python Testing/ModelServer/realweights_helpers.py [--device cpu|cuda] [--bf16 k54,...]
    [--json FILE]``: print the numbers the real-weights tests bound (and write them as JSON)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", default="", help="slices (e.g. k20,k54,k104 or 'all') to compare in bf16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    ids = {slice_id(v): v for v in SLICES}
    wanted = list(ids) if args.bf16 == "all" else [v for v in args.bf16.split(",") if v]
    unknown = set(wanted) - set(ids)
    if unknown:
        parser.error(f"unknown slices {sorted(unknown)}; known: {', '.join(ids)}")
    result = measure(args.device, [ids[v] for v in wanted])
    if args.json is not None:
        atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode("utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
