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
per-slice ``state`` dict, the first block's image-side keys, values and queries (three
4,096 x 256 -> 128 products, ~0.8 GFLOP) are computed once per slice, since they depend
on the slice and the weights only; later clicks attend to the cached keys and values per
head, as the module does, but without projecting the image tokens again. A
prompt's dense embedding joins them through small products: SAM's "no mask" embedding is
one row, and a mask input's embedding (``MaskDense``) is a row plus a rank-16 term (the
prompt encoder's last mask layer is a 1 x 1 convolution from 16 channels).
Only the tokens a caller reads go through the final attention (``outputs``). The
upscaling (``decoder_upscale``) runs channels-last as two matrix products; for one prompt
with a slice state its first layer comes from the slice's cached tokens and the blocks'
low-rank factors, and the hypernetwork product is taken only for the masks that are
returned. Same arithmetic up to float rounding (tests compare with
``SamPredictor``); only for inference (no autograd), which is how callers use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.transformer import Attention
from torch import Tensor

from .decoder_upscale import Projection, projected_tokens, projection, upscaled_masks
from .derived import still_valid, versions

__all__ = ["MaskDense", "mask_decoder_forward", "two_way_forward"]


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


def _positional(transformer: TwoWayTransformer, image_pe: Tensor) -> list[tuple]:
    """Per block (and the final attention): the positional halves of the image-side key
    projection of its token-to-image attention (g, L x D; per head g_heads, H x d x L) and
    of the query projection of its image-to-token attention (f, L x D), recomputed when
    the weights or the encoding change (a decoder swap)."""
    attns: list[tuple[Attention, Attention | None]] = [
        (layer.cross_attn_token_to_image, layer.cross_attn_image_to_token) for layer in transformer.layers
    ]
    attns.append((transformer.final_attn_token_to_image, None))
    projections = [proj for t2i, i2t in attns for proj in (t2i.k_proj, i2t.q_proj if i2t else None) if proj]
    weights = [image_pe] + [w for proj in projections for w in (proj.weight, proj.bias)]
    cached = getattr(transformer, "_desam_constants", None)
    if still_valid(cached, weights):
        return cached[2]
    pe = image_pe[0].flatten(1).T  # L x C
    consts = []
    with torch.no_grad():
        for t2i, i2t in attns:
            g = F.linear(pe, t2i.k_proj.weight, t2i.k_proj.bias)
            heads = t2i.num_heads
            g_heads = g.reshape(len(g), heads, -1).permute(1, 2, 0).contiguous()   # H x d x L
            f = F.linear(pe, i2t.q_proj.weight, i2t.q_proj.bias) if i2t is not None else None
            consts.append((g, f, g_heads))
    transformer._desam_constants = (weights, versions(weights), consts)
    return consts


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
    def of(cls, mask_downscaling: torch.nn.Sequential, masks: Tensor) -> "MaskDense | None":
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


def _token_to_image(attn: Attention, q_tokens: Tensor, x: Tensor, g_heads: Tensor, row: Tensor | None,
                    kv: tuple[Tensor, Tensor] | None = None, low: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Attention(q=tokens, k=image + pe, v=image) -> B x T x C.

    x: Bx x L x C image tokens (Bx = 1: shared by the B prompts); g_heads: H x d x L, the
    positional half of the key projection per head; row: B x C added to every image
    token (a constant dense prompt), or None. kv: the slice's keys (H x d x L) and values
    (H x L x d) of the bare image tokens, positional part and biases included, when
    precomputed -- then x and g_heads are unused, the row enters through small products,
    and so does ``low`` = (h 1 x L x r, W C x r), a low-rank term h W^T added to the image
    tokens (a mask input's dense embedding; B = 1). Scores are laid out (head, token) x L
    so that the softmax over the image tokens runs along contiguous rows."""
    b, t, _ = q_tokens.shape
    heads = attn.num_heads
    d = attn.internal_dim // heads
    q = F.linear(q_tokens, attn.q_proj.weight, attn.q_proj.bias) / math.sqrt(d)
    if kv is not None:
        # Per head against the cached, already projected keys and values: T columns of d
        # per head (a block-diagonal product would multiply 7/8 zeros). The row's keys add
        # one constant per (head, token), which the softmax over the image tokens cancels.
        keys_t, values = kv                                 # H x d x L, H x L x d
        qh = q.view(b, t, heads, d).permute(2, 0, 1, 3).reshape(heads, b * t, d)
        scores = qh @ keys_t                                # H x BT x L
        if low is not None:                                 # B = 1
            h, w = low
            wk = (attn.k_proj.weight @ w).view(heads, d, -1)
            scores = scores.baddbmm_(qh @ wk, h.transpose(1, 2).expand(heads, -1, -1))
        p = torch.softmax(scores, dim=-1)                   # over the image tokens, contiguous
        out = p @ values                                    # H x BT x d
        if low is not None:
            wv = (attn.v_proj.weight @ w).view(heads, d, -1)
            out = out + (p @ h[0]) @ wv.transpose(1, 2)
        out = out.view(heads, b, t, d).permute(1, 2, 0, 3).reshape(b, t, -1)
        if row is not None:
            out = out + (row @ attn.v_proj.weight.T)[:, None, :]
        return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    # Rows (prompt, head, token): a_bht = Wk_h^T q_bht, so a . x_i is the key part of the
    # score and q_bht . g_ih (per head, from g_heads H x d x L) the positional part.
    qh = q.view(b, t, heads, d).transpose(1, 2)             # B x H x T x d
    a = qh @ attn.k_proj.weight.view(heads, d, -1)          # B x H x T x C
    length, bx = x.shape[1], x.shape[0]
    scores = torch.baddbmm((qh @ g_heads).reshape(bx, -1, length), a.reshape(bx, -1, a.shape[-1]),
                           x.transpose(1, 2))               # Bx x (B)HT x L
    # The row's part a . row is constant along each row: the softmax cancels it.
    p = torch.softmax(scores, dim=-1)
    r = (p @ x).view(b, heads, t, -1)                       # B x H x T x C: sum_i p x_i
    if row is not None:
        r = r + row[:, None, None, :]
    wv = attn.v_proj.weight.view(heads, d, -1)
    out = (r @ wv.transpose(1, 2)).transpose(1, 2).reshape(b, t, -1) + attn.v_proj.bias
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


def _image_to_token(attn: Attention, x: Tensor, f: Tensor, row: Tensor | None, k_tokens: Tensor,
                    v_tokens: Tensor, b: int, q_image: Tensor | None = None,
                    low: tuple[Tensor, Tensor] | None = None, own: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """x + row + Attention(q=image + row + pe, k=tokens + pe, v=tokens) -> B x L x C (before
    the layer norm), and its factors (P B x L x K, U B x K x C: the result is x + P U).
    f: L x D positional half of the query projection; q_image: the bare image tokens'
    queries (L x D, positional part and bias included) when precomputed -- then the row
    and ``low`` (see ``_token_to_image``) enter through small products. own: x is a
    temporary of the caller's, updated in place when it has the result's shape."""
    heads = attn.num_heads
    d = attn.internal_dim // heads
    t = k_tokens.shape[1]
    k = F.linear(k_tokens, attn.k_proj.weight, attn.k_proj.bias) / math.sqrt(d)
    v = F.linear(v_tokens, attn.v_proj.weight, attn.v_proj.bias)
    # Columns (token, head): the softmax over tokens then runs over a strided axis with
    # the 8 heads innermost, ~10x faster on CPU than over a contiguous axis of 7.
    kbd = _heads_block_diag(k, heads)                       # B x D x TH
    shared = x.shape[0] == 1 and b > 1
    if q_image is not None:
        scores = q_image @ _spread(kbd, shared)
        if row is not None:  # the row's queries: one constant per column, which matters here
            scores = scores + _spread(row[:, None, :] @ attn.q_proj.weight.T @ kbd, shared)
        if low is not None:
            h, w = low
            scores = scores.baddbmm_(h, (attn.q_proj.weight @ w).T @ kbd)
    else:
        bq = attn.q_proj.weight.T @ kbd                     # B x C x TH
        scores = torch.baddbmm(f @ _spread(kbd, shared), x, _spread(bq, shared))
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
        h, w = low
        p, u = torch.cat([p, h.expand(b, -1, -1)], dim=2), torch.cat([u, w.T.expand(b, -1, -1)], dim=1)
    if own and x.shape[0] == b:
        return x.baddbmm_(p, u), p, u
    return torch.baddbmm(x, p, u), p, u


def _first_block_image_side(transformer: TwoWayTransformer, image: Tensor, x: Tensor, positional: list,
                            state: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(bare image tokens L x C contiguous; keys H x d x L and values H x L x d per head;
    queries L x D) of the first block's image side: what every prompt on this slice shares
    (a prompt's constant dense row or mask input joins later through small products). Kept
    in ``state`` (a dict owned by the slice's features) and recomputed when the image or
    any weight it came from changes."""
    layer = transformer.layers[0]
    t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
    g, f, _ = positional[0]
    sources = [image, g, f, t2i.k_proj.weight, t2i.v_proj.weight, t2i.v_proj.bias, i2t.q_proj.weight]
    key = ("two_way_first_block", id(transformer))
    entry = state.get(key)
    if still_valid(entry, sources):
        return entry[2]
    x0 = x[0].contiguous()                                  # L x C
    weight = torch.cat([t2i.k_proj.weight, t2i.v_proj.weight, i2t.q_proj.weight])  # 3D x C
    base = torch.cat([g, t2i.v_proj.bias.expand_as(g), f], dim=1)
    projected = torch.addmm(base, x0, weight.T)
    dim, heads = g.shape[1], t2i.num_heads
    keys = projected[:, :dim].reshape(-1, heads, dim // heads).permute(1, 2, 0).contiguous()   # H x d x L
    values = projected[:, dim : 2 * dim].reshape(-1, heads, dim // heads).transpose(0, 1).contiguous()  # H x L x d
    out = (x0, keys, values, projected[:, 2 * dim :])
    state[key] = (sources, versions(sources), out)
    return out


def two_way_forward(transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor, tokens: Tensor,
                    dense: "Tensor | MaskDense", state: dict | None = None,
                    outputs: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """``transformer(image + dense, image_pe, tokens)`` for inference.

    image: Bx x C x E x E (Bx = 1: one image shared by the B prompts); image_pe:
    1 x C x E x E; tokens: B x T x C; dense: B x C x E x E dense prompt embeddings
    (SAM's "no mask" embedding is a broadcast vector and stays one), or a ``MaskDense``;
    state: a dict kept with the slice's features: with one image, the first block's
    image-side projections are computed once per slice and reused by later prompts with
    the constant dense embedding, and by single prompts with a mask input (``MaskDense``:
    its rank-16 term through small products). Returns (queries B x T x C, keys B x L x C)
    as the module does; with ``outputs`` (token indices), queries B x len(outputs) x C:
    only those tokens go through the final attention (each token attends to the image on
    its own, so the others are not needed by a caller that reads only these)."""
    queries, keys, _ = _two_way(transformer, image, image_pe, tokens, dense, state, outputs)
    return queries, keys


def _two_way(transformer: TwoWayTransformer, image: Tensor, image_pe: Tensor, tokens: Tensor,
             dense: "Tensor | MaskDense", state: dict | None, outputs: list[int] | None,
             proj: Projection | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``two_way_forward``, and with ``proj`` the keys' projection by its first layer
    (1 x L x N, ``decoder_upscale.projected_tokens``) when the slice's first block is
    cached and there is one prompt, else None."""
    b = tokens.shape[0]
    x = image.flatten(2).transpose(1, 2)                    # Bx x L x C, a view
    low = None
    if isinstance(dense, MaskDense):
        if state is not None and x.shape[0] == 1 and b == 1 and dense.hidden.shape[0] == 1:
            row, low = dense.bias[None], (dense.hidden.flatten(2).transpose(1, 2), dense.weight)
        else:
            dense = dense.full()
    if low is None:
        if dense.stride(-1) == 0 and dense.stride(-2) == 0:
            row = dense[:, :, 0, 0].expand(b, -1)
        else:
            x, row = x + dense.flatten(2).transpose(1, 2), None
    positional = _positional(transformer, image_pe)
    first = None
    if state is not None and row is not None and x.shape[0] == 1:
        first = _first_block_image_side(transformer, image, x, positional, state)
        x = first[0][None]
    # Each block's image-side factors and layer-norm statistics, for the projection.
    blocks = [] if proj is not None and proj.usable and first is not None and b == 1 else None
    queries, query_pe = tokens, tokens
    for i, (layer, (_, f, g_heads)) in enumerate(zip(transformer.layers, positional)):
        cached = i == 0 and first is not None
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        attn = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, x, g_heads, row,
                               first[1:3] if cached else None, low if cached else None)
        queries = layer.norm2(queries + attn)
        queries = layer.norm3(queries + layer.mlp(queries))
        pre, p, u = _image_to_token(layer.cross_attn_image_to_token, x, f, row, queries + query_pe, queries, b,
                                    first[3] if cached else None, low if cached else None, own=i > 0)
        row, norm = None, layer.norm4
        if blocks is None:
            x = norm(pre)
        else:
            x, mean, rstd = torch.native_layer_norm(pre, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            blocks.append((p[0], u[0], mean[0], rstd[0]))
    g_heads = positional[-1][2]
    if outputs is not None:
        queries, query_pe = queries[:, outputs], query_pe[:, outputs]
    queries = queries + _token_to_image(transformer.final_attn_token_to_image, queries + query_pe, x, g_heads, row)
    projected = None
    if blocks is not None:
        key = ("projected_first_block", id(transformer))
        projected = projected_tokens(first[0], proj, blocks, state, key)[None]
    return transformer.norm_final_attn(queries), x.expand(b, -1, -1), projected


def mask_decoder_forward(decoder: MaskDecoder, image: Tensor, image_pe: Tensor, sparse: Tensor,
                         dense: "Tensor | MaskDense", multimask_output: bool,
                         state: dict | None = None) -> tuple[Tensor, Tensor]:
    """``decoder(image, image_pe, sparse, dense, multimask_output)`` for inference:
    (low-res logits B x C x 4E x 4E, iou B x C), C = 3 with multimask_output else 1.
    state: see ``two_way_forward``; with it, one prompt's first upscaling layer also
    comes through the slice's cached tokens (``decoder_upscale``)."""
    b = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
    chosen = range(1, decoder.num_mask_tokens) if multimask_output else range(0, 1)
    # Only the IoU token and the returned masks' tokens are read after the final attention.
    queries, keys, projected = _two_way(decoder.transformer, image, image_pe, tokens, dense, state,
                                        [0] + [1 + i for i in chosen], projection(decoder))
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + j]) for j, i in enumerate(chosen)],
                        dim=1)
    masks = upscaled_masks(decoder, keys, hyper, image.shape[-1], projected=projected)
    iou = decoder.iou_prediction_head(queries[:, 0])
    return masks, iou[:, chosen.start : chosen.stop]
