"""The PaliGemma composition: SigLIP tower -> linear projector -> image tokens merged into the Gemma
input at the image-placeholder ids -> prefix-LM decoder -> tied-embedding logits over the real
vocabulary (never `<image>` or HF's padding rows), with Gemma 2's final soft-cap.

Image tokens enter the decoder unscaled; text embeddings are scaled by sqrt(hidden) (big_vision and
transformers >= 5.4 agree). Several frames per example (video, NLVR2) are encoded separately and
their tokens concatenated, as big_vision does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import PaliGemmaConfig
from .gemma import GemmaDecoder, KVCache, positions_and_blocks
from .layers import linear, softcap
from .siglip import SiglipVisionTower


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, device=None, dtype=None):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemmaModel(nn.Module):
    def __init__(self, config: PaliGemmaConfig, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision, device, dtype)
        self.multi_modal_projector = Projector(config.vision.hidden_size, config.text.hidden_size, device, dtype)
        self.language_model = GemmaDecoder(config.text, device, dtype)

    # ------------------------------------------------------------------------------ inputs
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, N, H]; [B, F, 3, S, S] (frames) -> [B, F*N, H]."""
        if pixel_values.ndim == 5:
            B, Fr = pixel_values.shape[:2]
            feats = self.embed_images(pixel_values.flatten(0, 1))  # [B*F, N, H]
            return feats.reshape(B, Fr * feats.shape[1], feats.shape[2])
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Text embeddings with the image-placeholder positions replaced by `image_features`
        (row b's placeholders take row b's features, in order)."""
        image_slots = input_ids == self.config.image_token_index  # [B, T]
        ids = input_ids.masked_fill(image_slots, 0)
        x = self.language_model.embed(ids)
        n_slots = int(image_slots.sum())
        if image_features is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholders but no image was given.")
            return x
        if n_slots != image_features.shape[0] * image_features.shape[1]:
            raise ValueError(
                f"input_ids hold {n_slots} image placeholders but the images give "
                f"{image_features.shape[0]} x {image_features.shape[1]} tokens; each prompt needs exactly "
                f"{self.config.vision.num_image_tokens} placeholders per image/frame."
            )
        return x.masked_scatter(image_slots[..., None], image_features.to(x.dtype))

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T], image placeholders where image tokens go
        pixel_values: torch.Tensor | None = None,
        *,
        image_features: torch.Tensor | None = None,  # precomputed `embed_images` output
        attention_mask: torch.Tensor | None = None,  # [B, T] 1 = real token, 0 = padding
        ar_mask: torch.Tensor | None = None,  # [B, T] 0 = prefix (bidirectional), 1 = suffix (causal)
        positions: torch.Tensor | None = None,  # [B, T]; default: 1-based over real tokens
        block: torch.Tensor | None = None,  # [B, T] overrides the blocks derived from the masks
        logits_to_keep: int = 0,  # 0 = all positions, n = only the last n
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T(or n), output_vocab_size] in fp32-or-model dtype.

        Without `ar_mask` the whole input is one bidirectional prefix (an inference prompt); pass
        it for a prefix + suffix (training) layout."""
        B, T = input_ids.shape
        dev = input_ids.device
        if image_features is None and pixel_values is not None:
            image_features = self.embed_images(pixel_values)
        x = self.embed_inputs(input_ids, image_features)
        valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        default_positions, default_block = positions_and_blocks(valid, ar_mask)
        positions = default_positions if positions is None else positions
        block = default_block if block is None else block
        h = self.language_model(x, positions, block)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        if return_hidden:
            return h
        return self.logits(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        emb, rows = self.language_model.embed_tokens, self.config.output_vocab_size
        if isinstance(emb, nn.Embedding):
            out = linear(hidden, emb.weight[:rows])
        else:  # the int8 tied head (`model.quant.Int8Embedding`)
            out = emb.project(hidden, rows)
        return softcap(out, self.config.text.final_logit_softcapping)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        return KVCache(self.config.text, batch_size, max_len, device=self.device, dtype=dtype or self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (a quantized model's weights are integers; its norms keep this)."""
        return self.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.norm.weight.device

    # ------------------------------------------------------------------------------ helpers
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(config: PaliGemmaConfig, device: str | torch.device | None = "meta", dtype=None) -> PaliGemmaModel:
    """Construct (by default on the meta device: no memory, for counting or `assign=True` loading)."""
    return PaliGemmaModel(config, device=device, dtype=dtype)


def count_parameters(config: PaliGemmaConfig) -> int:
    return build_model(config, "meta").num_parameters()
