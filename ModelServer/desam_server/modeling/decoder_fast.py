"""Inference forward of SAM's mask decoder, reassociated for a few prompt tokens.

``segment_anything``'s ``TwoWayTransformer`` projects every one of the L = E x E image
tokens (4,096) through each attention's 256 -> 128 projections: 11 such products per
call, most of the decoder's ~3.5 GFLOP. With T prompt tokens (7 for one click) the same
attention scores and outputs come from products with T columns per head instead:

* tokens -> image (queries are tokens): the score of token t against image token i is
  ``q_t . (Wk x_i + g_i)`` = ``(Wk^T q_t) . x_i + q_t . g_i``, where ``g = Wk P + bk``
  (P the dense positional encoding) is the same for every slice and prompt; the output
  ``sum_i p_ti (Wv x_i + bv)`` is ``Wv (sum_i p_ti x_i) + bv`` because softmax rows sum to 1.
* image -> tokens (queries are image tokens): the score of image token i against token t
  is ``x_i . (Wq^T k_t) + f_i . k_t`` with ``f = Wq P + bq`` fixed, and the output
  ``Wo sum_t p_it v_t + bo`` is ``sum_t p_it (Wo v_t) + bo``.

Per head that is one product of the image tokens with T columns (8 x 7 = 56 for a click)
rather than 128, with the positional halves precomputed once per model (a token's
positional key scores are taken per head, 16 of the 128 dimensions); the dense prompt embedding,
when it is SAM's constant "no mask" vector, never needs adding to 4,096 rows. Given a
slice's ``TransformerSliceCache``, the first block's image-side keys, values and queries
(three 4,096 x 256 -> 128 products, ~0.8 GFLOP) are computed once per slice, since they
depend on the slice and the weights only; later clicks attend to the cached keys and
values per head, as the module does, but without projecting the image tokens again. A
prompt's dense embedding joins them through small products: SAM's "no mask" embedding is
one row, and a mask input's embedding (``MaskDense``) is a row plus a rank-16 term (the
prompt encoder's last mask layer is a 1 x 1 convolution from 16 channels). The upscaling
(``decoder_upscale``) runs channels-last as two matrix products, and the hypernetwork
product is taken only for the masks that are returned. Same arithmetic up to float
rounding (tests compare with the modules and with ``SamPredictor``); for inference only:
``DeSAM`` runs it when its caller passes a ``FastPath``, and refuses it under autograd.
Per-model constants (``TransformerConstants``, ``UpscaleProjection``) and the per-slice
cache are named objects the caller owns and passes in (``decoder_state``); nothing is
kept on ``segment_anything``'s modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention
from torch import Tensor

from .decoder_state import (
    AttentionPositional,
    FirstBlock,
    TransformerConstants,
    TransformerSliceCache,
    UpscaleProjection,
)
from .decoder_upscale import upscaled_masks

__all__ = ["MaskDense", "transformer_constants", "mask_decoder_forward", "two_way_forward"]


def _heads_block_diag(x: Tensor, heads: int) -> Tensor:
    """x: B x T x D (D = heads * d) -> B x D x (T * heads), block diagonal: the column of
    (token t, head h) holds head h's slice of token t in rows h*d .. (h+1)*d, zeros
    elsewhere."""
    b, t, dim = x.shape
    d = dim // heads
    out = x.new_zeros(b, heads, d, t, heads)
    # out[:, h, :, :, h] for every h: the diagonal over the two head axes, shape B x d x T x H.
    out.diagonal(dim1=1, dim2=4).copy_(x.view(b, t, heads, d).permute(0, 3, 1, 2))
    return out.view(b, dim, t * heads)


@torch.no_grad()
def transformer_constants(transformer: TwoWayTransformer, image_pe: Tensor) -> TransformerConstants:
    """The positional halves of every block's image-side key projection (token-to-image
    attention) and query projection (image-to-token attention), and of the final
    attention's keys, for the dense positional encoding ``image_pe`` (1 x C x E x E)."""
    pe = image_pe[0].flatten(1).T  # L x C

    def part(t2i: Attention, i2t: Attention | None) -> AttentionPositional:
        keys = F.linear(pe, t2i.k_proj.weight, t2i.k_proj.bias)
        by_head = keys.reshape(len(keys), t2i.num_heads, -1).permute(1, 2, 0).contiguous()   # H x d x L
        queries = None if i2t is None else F.linear(pe, i2t.q_proj.weight, i2t.q_proj.bias)
        return AttentionPositional(keys=keys, keys_by_head=by_head, queries=queries)

    blocks = tuple(part(layer.cross_attn_token_to_image, layer.cross_attn_image_to_token)
                   for layer in transformer.layers)
    return TransformerConstants(blocks=blocks, final=part(transformer.final_attn_token_to_image, None))


def _spread(m: Tensor, shared: bool) -> Tensor:
    """B x C x K per-prompt columns; with a shared image (batch 1) as 1 x C x (B * K)."""
    return m.permute(1, 0, 2).reshape(1, m.shape[1], -1) if shared else m


@dataclass(frozen=True)
class MaskDense:
    """A mask input's dense prompt embedding, kept factored: ``hidden`` B x r x E x E (the
    prompt encoder's mask downscaling up to its last layer, a 1 x 1 convolution) and that
    convolution as ``weight`` C x r and ``bias`` C (r = 16 for SAM). The image tokens plus
    this embedding are the bare tokens plus a rank-r term and a row."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor

    @classmethod
    def of(cls, mask_downscaling: torch.nn.Sequential, masks: Tensor) -> MaskDense | None:
        """Factor ``mask_downscaling(masks)``; None when its last layer is not a 1 x 1
        convolution with a bias (another prompt encoder)."""
        last = mask_downscaling[-1]
        if not (isinstance(last, torch.nn.Conv2d) and last.kernel_size == (1, 1) and last.stride == (1, 1)
                and last.groups == 1 and last.bias is not None):
            return None
        return cls(mask_downscaling[:-1](masks), last.weight[:, :, 0, 0], last.bias)

    def full(self) -> Tensor:
        """The dense embedding itself, B x C x E x E."""
        return F.conv2d(self.hidden, self.weight[:, :, None, None], self.bias)


@dataclass(frozen=True)
class _LowRank:
    """A low-rank term ``h @ w.T`` added to the image tokens: h 1 x L x r, w C x r."""

    h: Tensor
    w: Tensor


def _token_to_image(attn: Attention, q_tokens: Tensor, x: Tensor, positional: AttentionPositional,
                    row: Tensor | None, first: FirstBlock | None = None, low: _LowRank | None = None) -> Tensor:
    """Attention(q=tokens, k=image + pe, v=image) -> B x T x C.

    x: Bx x L x C image tokens (Bx = 1: shared by the B prompts); positional: the block's
    positional halves (keys per head); row: B x C added to every image token (a constant
    dense prompt), or None. first: the slice's cached first block (keys H x d x L and
    values H x L x d of the bare image tokens, positional part and biases included) --
    then x is unused, the row enters through small products, and so does ``low`` (a mask
    input's dense embedding; B = 1). Scores are laid out (head, token) x L so that the
    softmax over the image tokens runs along contiguous rows."""
    b, t, _ = q_tokens.shape
    heads = attn.num_heads
    d = attn.internal_dim // heads
    q = F.linear(q_tokens, attn.q_proj.weight, attn.q_proj.bias) / math.sqrt(d)
    if first is not None:
        # Per head against the cached, already projected keys and values: T columns of d
        # per head (a block-diagonal product would multiply 7/8 zeros). The row's keys add
        # one constant per (head, token), which the softmax over the image tokens cancels.
        qh = q.view(b, t, heads, d).permute(2, 0, 1, 3).reshape(heads, b * t, d)
        scores = qh @ first.keys                            # H x BT x L
        if low is not None:                                 # B = 1
            wk = (attn.k_proj.weight @ low.w).view(heads, d, -1)
            scores = scores.baddbmm_(qh @ wk, low.h.transpose(1, 2).expand(heads, -1, -1))
        p = torch.softmax(scores, dim=-1)                   # over the image tokens, contiguous
        out = p @ first.values                              # H x BT x d
        if low is not None:
            wv = (attn.v_proj.weight @ low.w).view(heads, d, -1)
            out = out + (p @ low.h[0]) @ wv.transpose(1, 2)
        out = out.view(heads, b, t, d).permute(1, 2, 0, 3).reshape(b, t, -1)
        if row is not None:
            out = out + (row @ attn.v_proj.weight.T)[:, None, :]
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    # Rows (prompt, head, token): a_bht = Wk_h^T q_bht, so a . x_i is the key part of the
    # score and q_bht . g_ih (per head) the positional part.
    qh = q.view(b, t, heads, d).transpose(1, 2)             # B x H x T x d
    a = qh @ attn.k_proj.weight.view(heads, d, -1)          # B x H x T x C
    length, bx = x.shape[1], x.shape[0]
    scores = torch.baddbmm((qh @ positional.keys_by_head).reshape(bx, -1, length),
                           a.reshape(bx, -1, a.shape[-1]), x.transpose(1, 2))   # Bx x (B)HT x L
    # The row's part a . row is constant along each row: the softmax cancels it.
    p = torch.softmax(scores, dim=-1)
    r = (p @ x).view(b, heads, t, -1)                       # B x H x T x C: sum_i p x_i
    if row is not None:
        r = r + row[:, None, None, :]
    wv = attn.v_proj.weight.view(heads, d, -1)
    out = (r @ wv.transpose(1, 2)).transpose(1, 2).reshape(b, t, -1) + attn.v_proj.bias
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def _image_to_token(attn: Attention, x: Tensor, positional: AttentionPositional, row: Tensor | None,
                    k_tokens: Tensor, v_tokens: Tensor, b: int, first: FirstBlock | None = None,
                    low: _LowRank | None = None, own: bool = False) -> Tensor:
    """x + row + Attention(q=image + row + pe, k=tokens + pe, v=tokens) -> B x L x C (before
    the layer norm), computed as x + P U (P B x L x K the attention, U B x K x C).
    positional: the block's (the query projection's positional half); first: the slice's
    cached first block (its queries of the bare image tokens) -- then the row and ``low``
    enter through small products. own: x is a temporary of the caller's, updated in place
    when it has the result's shape."""
    heads = attn.num_heads
    d = attn.internal_dim // heads
    t = k_tokens.shape[1]
    k = F.linear(k_tokens, attn.k_proj.weight, attn.k_proj.bias) / math.sqrt(d)
    v = F.linear(v_tokens, attn.v_proj.weight, attn.v_proj.bias)
    # Columns (token, head): the softmax over tokens then runs over a strided axis with
    # the 8 heads innermost, ~10x faster on CPU than over a contiguous axis of 7.
    kbd = _heads_block_diag(k, heads)                       # B x D x TH
    shared = x.shape[0] == 1 and b > 1
    if first is not None:
        scores = first.queries @ _spread(kbd, shared)
        if row is not None:  # the row's queries: one constant per column, which matters here
            scores = scores + _spread(row[:, None, :] @ attn.q_proj.weight.T @ kbd, shared)
        if low is not None:
            scores = scores.baddbmm_(low.h, (attn.q_proj.weight @ low.w).T @ kbd)
    else:
        bq = attn.q_proj.weight.T @ kbd                     # B x C x TH
        scores = torch.baddbmm(positional.queries @ _spread(kbd, shared), x, _spread(bq, shared))
        if row is not None:
            scores = scores + _spread(row[:, None, :] @ bq, shared)
    lx = scores.shape[1]
    p = torch.softmax(scores.view(scores.shape[0], lx, -1, t, heads), dim=-2).view(scores.shape[0], lx, -1)
    if shared:
        p = p.view(lx, b, heads * t).transpose(0, 1)        # B x L x TH
    # U[(t, h)] = Wo_h v_t: the output projection applied to each token's value per head.
    vbd = _heads_block_diag(v, heads)                       # B x D x TH
    u = vbd.transpose(1, 2) @ attn.out_proj.weight.T        # B x TH x C
    # Each head's probabilities sum to 1 over the tokens, so every row of p sums to H: the
    # bias (and the row) join U as bias / H per column, without a column of ones.
    bias = attn.out_proj.bias if row is None else (attn.out_proj.bias + row)[:, None, :]
    u = u + bias / heads
    if low is not None:  # x + h W^T: the low-rank term joins the same product.
        p, u = torch.cat([p, low.h.expand(b, -1, -1)], dim=2), torch.cat([u, low.w.T.expand(b, -1, -1)], dim=1)
    if own and x.shape[0] == b:
        return x.baddbmm_(p, u)
    return torch.baddbmm(x, p, u)


def _first_block(transformer: TwoWayTransformer, x: Tensor, positional: AttentionPositional) -> FirstBlock:
    """The first block's image side of the bare image tokens x (1 x L x C): what every
    prompt on a slice shares (a prompt's constant dense row or mask input joins later
    through small products)."""
    layer = transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    g, f = positional.keys, positional.queries
    x0 = x[0].contiguous()                                  # L x C
    weight = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight])  # 3D x C
    base = torch.cat([g, t2i.v_proj.bias.expand_as(g), f], dim=1)
    projected = torch.addmm(base, x0, weight.T)
    dim, heads = g.shape[1], t2i.num_heads
    keys = projected[:, :dim].reshape(-1, heads, dim // heads).permute(1, 2, 0).contiguous()   # H x d x L
    values = projected[:, dim : 2 * dim].reshape(-1, heads, dim // heads).transpose(0, 1).contiguous()  # H x L x d
    return FirstBlock(tokens=x0, keys=keys, values=values, queries=projected[:, 2 * dim :])


def two_way_forward(transformer: TwoWayTransformer, constants: TransformerConstants, image: Tensor, tokens: Tensor,
                    dense: Tensor | MaskDense, *, cache: TransformerSliceCache | None = None,
                    ) -> tuple[Tensor, Tensor]:
    """``transformer(image + dense, image_pe, tokens)`` for inference.

    constants: ``transformer_constants(transformer, image_pe)``; image: Bx x C x E x E
    (Bx = 1: one image shared by the B prompts); tokens: B x T x C; dense: B x C x E x E
    dense prompt embeddings (SAM's "no mask" embedding is a broadcast vector and stays
    one), or a ``MaskDense``; cache: the slice's (this image's) cache for this
    transformer: with one image, the first block's image-side projections are computed
    once per slice and reused by later prompts with a constant dense embedding, and by
    single prompts with a mask input (``MaskDense``: its rank-16 term through small
    products). Returns (queries B x T x C, keys B x L x C) as the module does."""
    b = tokens.shape[0]
    x = image.flatten(2).transpose(1, 2)                    # Bx x L x C, a view
    low = None
    if isinstance(dense, MaskDense):
        if cache is not None and x.shape[0] == 1 and b == 1 and dense.hidden.shape[0] == 1:
            row, low = dense.bias[None], _LowRank(h=dense.hidden.flatten(2).transpose(1, 2), w=dense.weight)
        else:
            dense = dense.full()
    if low is None:
        if dense.stride(-1) == 0 and dense.stride(-2) == 0:
            row = dense[:, :, 0, 0].expand(b, -1)
        else:
            x, row = x + dense.flatten(2).transpose(1, 2), None
    first = None
    if cache is not None and row is not None and x.shape[0] == 1:
        if cache.first_block is None:
            cache.first_block = _first_block(transformer, x, constants.blocks[0])
        first = cache.first_block
        x = first.tokens[None]
    queries, query_pe = tokens, tokens
    for i, (layer, positional) in enumerate(zip(transformer.layers, constants.blocks, strict=True)):
        cached = first if i == 0 else None
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        attn = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, x, positional, row, cached,
                               low if cached else None)
        queries = layer.norm2(queries + attn)
        queries = layer.norm3(queries + layer.mlp(queries))
        pre = _image_to_token(layer.cross_attn_image_to_token, x, positional, row, queries + query_pe, queries, b,
                              cached, low if cached else None, own=i > 0)
        row = None
        x = layer.norm4(pre)
    queries = queries + _token_to_image(transformer.final_attn_token_to_image, queries + query_pe, x,
                                        constants.final, row)
    return transformer.norm_final_attn(queries), x.expand(b, -1, -1)


def mask_decoder_forward(decoder: MaskDecoder, constants: TransformerConstants, projection: UpscaleProjection,
                         image: Tensor, sparse: Tensor, dense: Tensor | MaskDense, multimask_output: bool, *,
                         cache: TransformerSliceCache | None = None, matrix_upscaling: bool = True,
                         ) -> tuple[Tensor, Tensor]:
    """``decoder(image, image_pe, sparse, dense, multimask_output)`` for inference:
    (low-res logits B x C x 4E x 4E, iou B x C), C = 3 with multimask_output else 1.
    constants / projection: ``transformer_constants(decoder.transformer, image_pe)`` and
    ``upscale_projection(decoder)``; cache: see ``two_way_forward``; matrix_upscaling: the
    upscaling as channels-last matrix products (``decoder_upscale``), else the modules'."""
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    chosen = range(1, decoder.num_mask_tokens) if multimask_output else range(0, 1)
    queries, keys = two_way_forward(decoder.transformer, constants, image, tokens, dense, cache=cache)
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in chosen], dim=1)
    side = image.shape[-1]
    if matrix_upscaling:
        masks = upscaled_masks(decoder, projection, keys, hyper, side)
    else:
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, -1, side, side))
        masks = (hyper @ upscaled.flatten(2)).view(b, -1, 4 * side, 4 * side)
    iou = decoder.iou_prediction_head(queries[:, 0])
    return masks, iou[:, chosen.start : chosen.stop]
