"""PRIM, DeSAM's prompt-relevant IoU module.

SAM's mask-decoder path up to and including its two-way transformer, plus the IoU head.
It returns the predicted IoU and the *mask embedding*: the transformer's updated image
tokens. SAM's upscaling and hypernetwork layers are deliberately absent.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import TwoWayTransformer
from segment_anything.modeling.mask_decoder import MLP, MaskDecoder
from torch import nn

from .decoder_fast import two_way_forward
from .decoder_state import TransformerConstants, TransformerSliceCache


class PRIM(nn.Module):
    """Prompt-relevant IoU module.

    Keyword-only arguments:
      transformer_dim: token width (256 for every SAM variant).
      num_mask_tokens: SAM's mask tokens (4: one single-mask + three multimask tokens);
        kept so that the token sequence matches SAM's and weights copy over one to one.
      transformer_depth, transformer_mlp_dim, transformer_heads: the two-way transformer.
      iou_head_depth, iou_head_hidden_dim: the IoU MLP.
    """

    def __init__(
        self,
        *,
        transformer_dim: int = 256,
        num_mask_tokens: int = 4,
        transformer_depth: int = 2,
        transformer_mlp_dim: int = 2048,
        transformer_heads: int = 8,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(num_mask_tokens, transformer_dim)
        self.transformer = TwoWayTransformer(
            depth=transformer_depth,
            embedding_dim=transformer_dim,
            mlp_dim=transformer_mlp_dim,
            num_heads=transformer_heads,
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, num_mask_tokens, iou_head_depth
        )

    @torch.no_grad()
    def load_from_sam_decoder(self, mask_decoder: MaskDecoder) -> None:
        """Copy the shared weights (tokens, transformer, IoU head) from SAM's decoder."""
        for name in ("iou_token", "mask_tokens", "transformer", "iou_prediction_head"):
            source = getattr(mask_decoder, name).state_dict()
            getattr(self, name).load_state_dict(source, strict=True)

    def _tokens(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        batch = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        return torch.cat((output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse_prompt_embeddings), dim=1)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Score prompts and produce mask embeddings: the modules as written (training,
        and the reference of ``infer``).

        Arguments:
          image_embeddings: 1 x C x E x E (one image shared by all prompts) or B x C x E x E.
          image_pe: 1 x C x E x E, the prompt encoder's dense positional encoding.
          sparse_prompt_embeddings: B x N x C (points and/or box corners).
          dense_prompt_embeddings: B x C x E x E (mask prompt, or SAM's "no mask" embedding).

        Returns:
          iou: B, the predicted IoU (first output of the IoU head).
          mask_embedding: B x C x E x E, the transformer's updated image tokens.
        """
        batch = sparse_prompt_embeddings.shape[0]
        tokens = self._tokens(sparse_prompt_embeddings)
        if image_embeddings.shape[0] == 1 and batch != 1:
            image_embeddings = image_embeddings.expand(batch, -1, -1, -1)
        src = image_embeddings + dense_prompt_embeddings
        pos_src = image_pe.expand(batch, -1, -1, -1)
        b, c, h, w = src.shape

        hs, image_tokens = self.transformer(src, pos_src, tokens)
        iou = self.iou_prediction_head(hs[:, 0, :])[:, 0]
        mask_embedding = image_tokens.transpose(1, 2).reshape(b, c, h, w)
        return iou, mask_embedding

    def infer(
        self,
        image_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        *,
        constants: TransformerConstants,
        cache: TransformerSliceCache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward``'s results through the reassociated transformer
        (``decoder_fast.two_way_forward``), for inference only (``DeSAM`` calls it when
        given a ``FastPath``). constants: ``transformer_constants(self.transformer,
        image_pe)``; cache: the slice's ``SliceDecoderState.prim`` (the first block's image
        side once per slice)."""
        batch = sparse_prompt_embeddings.shape[0]
        hs, image_tokens = two_way_forward(self.transformer, constants, image_embeddings,
                                           self._tokens(sparse_prompt_embeddings), dense_prompt_embeddings,
                                           cache=cache)
        iou = self.iou_prediction_head(hs[:, 0, :])[:, 0]
        e = image_embeddings.shape[-1]
        return iou, image_tokens.transpose(1, 2).reshape(batch, -1, e, e)
