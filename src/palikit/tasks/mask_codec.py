"""PaliGemma's segmentation-mask VQ-VAE (big_vision `vae-oid.npz`, the AiT instance-seg VQ-VAE) in PyTorch.

Owns the codec module, its npz load/save and mask <-> 16 `<seg>` token conversion at full image
resolution (inference only; training a codec is `palikit.train.mask_codec`).

Architecture (verified against big_vision `pp/proj/paligemma/segmentation.py` (TF encoder),
`evaluators/proj/paligemma/transfers/segmentation.py` (Flax decoder) and AiT `vae/models/VQVAE.py`
+ `vae/configs/insseg/ait_insseg_vqvae.py`); names are the npz / PyTorch state-dict keys:

    encoder.0/2/4/6   Conv k4 s2, TF "SAME" padding (= PyTorch padding 1 for k4), ReLU after each
                      1 -> 16 -> 32 -> 64 -> 128 channels, 64x64 -> 4x4
    encoder.8, .9     ResBlock: x + conv1x1(relu(conv3x3(relu(conv3x3(x)))))   (`.net.{0,2,4}`)
    encoder.10        Conv 1x1 128 -> D (no ReLU)
    _vq_vae._embedding  codebook [128, D] (D = 512 in AiT; read from the npz); nearest by squared L2
    decoder.0         Conv 1x1 D -> 128, ReLU
    decoder.2, .3     ResBlocks (128)
    decoder.4/6/8/10  ConvTranspose k4 s2 p1 (Flax padding 2, transpose_kernel) 128->128->64->32->16, ReLU
    decoder.12        Conv 1x1 16 -> 1: values nominally in [-1, 1] (not clipped); mask = value > 0

Encoder input is the mask in [0, 1] mapped to 2 * (m - 0.5). The 16 tokens are the 4x4 latent grid
in row-major order. Channel widths and kernel sizes are read from the array shapes on load.

Pasting (big_vision evaluator convention): the pixel box is floored with int(), the 64x64 decoder
output is resized to the box with PIL BILINEAR, thresholded at > 0.0 and pasted into an all-False
image. Encoding (`refcoco_mask2str`): crop the full-resolution mask to the rounded box, resize to
64x64 bilinear with antialias, encode.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_TOKENS = 16
NUM_CODES = 128
MASK_SIZE = 64


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding (asymmetric when needed), as big_vision's TF encoder."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride)


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int = 3, same: bool = False):
        super().__init__()
        conv = (lambda i, o, k: _SameConv2d(i, o, k)) if same else (lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2))
        self.net = nn.Sequential(conv(channels, channels, kernel), nn.ReLU(),
                                 conv(channels, channels, kernel), nn.ReLU(), conv(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class _Codebook(nn.Module):
    def __init__(self, num_codes: int, dim: int):
        super().__init__()
        self._embedding = nn.Parameter(torch.randn(num_codes, dim))


class MaskCodec(nn.Module):
    """VQ-VAE between 64x64 masks and 16 codes in 0..127 (see the module docstring for layers)."""

    def __init__(self, embed_dim: int = 512, enc_channels: Sequence[int] = (16, 32, 64, 128),
                 dec_channels: Sequence[int] = (128, 128, 64, 32, 16), enc_kernel: int = 4, res_kernel: int = 3,
                 dec_kernel: int = 4, num_codes: int = NUM_CODES):
        super().__init__()
        if len(enc_channels) != 4 or len(dec_channels) != 5:
            raise ValueError("MaskCodec needs 4 encoder widths and 5 decoder widths (64x64 <-> 4x4)")
        if dec_kernel % 2:
            raise ValueError(f"decoder transposed-conv kernel must be even to double the size, got {dec_kernel}")
        self.config = dict(embed_dim=embed_dim, enc_channels=tuple(enc_channels), dec_channels=tuple(dec_channels),
                           enc_kernel=enc_kernel, res_kernel=res_kernel, dec_kernel=dec_kernel, num_codes=num_codes)
        enc: list[nn.Module] = []
        c_in = 1
        for c in enc_channels:
            enc += [_SameConv2d(c_in, c, enc_kernel, stride=2), nn.ReLU()]
            c_in = c
        enc += [ResBlock(c_in, res_kernel, same=True), ResBlock(c_in, res_kernel, same=True),
                _SameConv2d(c_in, embed_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        d0, ups = dec_channels[0], dec_channels[1:]
        dec: list[nn.Module] = [nn.Conv2d(embed_dim, d0, 1), nn.ReLU(),
                                ResBlock(d0, res_kernel), ResBlock(d0, res_kernel)]
        c_in = d0
        for c in ups:
            dec += [nn.ConvTranspose2d(c_in, c, dec_kernel, stride=2, padding=(dec_kernel - 2) // 2), nn.ReLU()]
            c_in = c
        dec.append(nn.Conv2d(c_in, 1, 1))
        self.decoder = nn.Sequential(*dec)
        self._vq_vae = _Codebook(num_codes, embed_dim)

    @property
    def codebook(self) -> torch.Tensor:
        return self._vq_vae._embedding

    # -------------------------------------------------------------------------- core
    def encode_latents(self, masks: torch.Tensor) -> torch.Tensor:
        """[N, 64, 64] masks in [0, 1] -> continuous latents [N, 4, 4, D]."""
        x = masks.to(self.codebook.dtype).reshape(-1, 1, MASK_SIZE, MASK_SIZE)
        z = self.encoder(2.0 * (x - 0.5))  # [N, D, 4, 4]
        return z.permute(0, 2, 3, 1)  # [N, 4, 4, D]

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Nearest codebook index by squared L2: [..., D] -> [...]."""
        flat = latents.reshape(-1, latents.shape[-1])  # [M, D]
        e = self.codebook
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()  # [M, K]
        return dist.argmin(1).reshape(latents.shape[:-1])

    def decode_latents(self, q: torch.Tensor) -> torch.Tensor:
        """Latents [N, 4, 4, D] -> decoder output [N, 64, 64]."""
        return self.decoder(q.permute(0, 3, 1, 2))[:, 0]  # [N, 1, 64, 64] -> [N, 64, 64]

    @torch.no_grad()
    def encode(self, masks: torch.Tensor) -> torch.Tensor:
        """[N, 64, 64] masks in {0, 1} or [0, 1] -> LongTensor [N, 16] of codes (row-major 4x4 grid)."""
        masks = torch.as_tensor(masks)
        if masks.shape[-2:] != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must be [N, 64, 64], got {tuple(masks.shape)}")
        masks = masks.to(self.codebook.device)
        return self.quantize(self.encode_latents(masks)).reshape(-1, NUM_TOKENS)

    @torch.no_grad()
    def decode(self, seg_ids: torch.Tensor) -> torch.Tensor:
        """LongTensor [N, 16] of codes -> FloatTensor [N, 64, 64], nominally in [-1, 1] (mask = > 0)."""
        ids = torch.as_tensor(seg_ids, dtype=torch.long, device=self.codebook.device).reshape(-1, NUM_TOKENS)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook.shape[0]):
            raise ValueError(f"seg token ids must be in 0..{self.codebook.shape[0] - 1}")
        q = self.codebook[ids].reshape(-1, 4, 4, self.codebook.shape[1])  # [N, 16, D] -> [N, 4, 4, D]
        return self.decode_latents(q)

    def mask_from_tokens(self, seg_ids: Sequence[int], box_xyxy: Sequence[float], image_size: tuple[int, int],
                         threshold: float = 0.0) -> np.ndarray:
        return mask_from_tokens(self, seg_ids, box_xyxy, image_size, threshold)

    def tokens_from_mask(self, full_mask: np.ndarray, box_xyxy: Sequence[float]) -> list[int]:
        return tokens_from_mask(self, full_mask, box_xyxy)

    # -------------------------------------------------------------------------- npz
    @classmethod
    def from_npz(cls, path: str | os.PathLike) -> MaskCodec:
        """Load big_vision's `vae-oid.npz` (or our `to_npz` output). Widths come from the shapes;
        extra keys (EMA buffers) are ignored; missing keys or wrong shapes raise ValueError."""
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}

        def need(key: str, ndim: int, what: str) -> np.ndarray:
            if key not in arrays:
                raise ValueError(f"{path}: missing key {key!r} ({what}); is this a PaliGemma mask codec npz?")
            if arrays[key].ndim != ndim:
                raise ValueError(f"{path}: {key!r} has shape {arrays[key].shape}, expected {ndim} dims ({what})")
            return arrays[key]

        emb = need("_vq_vae._embedding", 2, "codebook [128, D]")
        if emb.shape[0] != NUM_CODES:
            raise ValueError(f"{path}: '_vq_vae._embedding' has shape {emb.shape}, expected [{NUM_CODES}, D]")
        enc = [need(f"encoder.{i}.weight", 4, "Conv2d weight [out, in, k, k]") for i in (0, 2, 4, 6)]
        d0 = need("decoder.0.weight", 4, "Conv2d weight [out, D, 1, 1]")
        ups = [need(f"decoder.{i}.weight", 4, "ConvTranspose2d weight [in, out, k, k]") for i in (4, 6, 8, 10)]
        res = need("encoder.8.net.0.weight", 4, "Conv2d weight [c, c, k, k]")
        codec = cls(embed_dim=int(emb.shape[1]), enc_channels=[int(w.shape[0]) for w in enc],
                    dec_channels=[int(d0.shape[0])] + [int(w.shape[1]) for w in ups], enc_kernel=int(enc[0].shape[-1]),
                    res_kernel=int(res.shape[-1]), dec_kernel=int(ups[0].shape[-1]))
        state = {}
        for key, ref in codec.state_dict().items():
            if key not in arrays:
                raise ValueError(f"{path}: missing key {key!r} (expected shape {list(ref.shape)})")
            if tuple(arrays[key].shape) != tuple(ref.shape):
                raise ValueError(f"{path}: {key!r} has shape {list(arrays[key].shape)}, expected {list(ref.shape)}")
            state[key] = torch.from_numpy(np.asarray(arrays[key], dtype=np.float32))
        codec.load_state_dict(state)
        return codec.eval()

    def to_npz(self, path: str | os.PathLike) -> Path:
        """Write the same key layout as vae-oid.npz (float32), atomically (temp file + os.replace)."""
        from ..fileio import atomic_write_bytes

        arrays = {k: v.detach().cpu().float().numpy() for k, v in self.state_dict().items()}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------ full resolution
def mask_from_tokens(codec: MaskCodec, seg_ids: Sequence[int], box_xyxy: Sequence[float],
                     image_size: tuple[int, int], threshold: float = 0.0) -> np.ndarray:
    """Bool [H, W] mask: decode 16 codes, resize into the floored pixel box (PIL bilinear), > threshold."""
    return masks_from_tokens(codec, [seg_ids], [box_xyxy], image_size, threshold)[0]


def masks_from_tokens(codec: MaskCodec, seg_ids: Sequence[Sequence[int]], boxes_xyxy: Sequence[Sequence[float]],
                      image_size: tuple[int, int], threshold: float = 0.0) -> list[np.ndarray]:
    """`mask_from_tokens` for the instances of one result: their codes decoded in ONE codec call."""
    from PIL import Image

    if not seg_ids:
        return []
    w, h = (int(v) for v in image_size)
    m64 = codec.decode(torch.as_tensor([list(s) for s in seg_ids], dtype=torch.long))  # [N, 64, 64]
    m64 = m64.detach().float().cpu().numpy()
    out = []
    for m, box in zip(m64, boxes_xyxy):
        mask = np.zeros((h, w), dtype=bool)
        x0, y0, x1, y1 = (int(v) for v in box)
        x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
        y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
        if x1 > x0 and y1 > y0:
            resized = np.asarray(Image.fromarray(m, mode="F").resize((x1 - x0, y1 - y0), Image.BILINEAR))
            mask[y0:y1, x0:x1] = resized > threshold
        out.append(mask)
    return out


def _resize64(crop: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(crop, dtype=torch.float32)[None, None]  # [1, 1, h, w]
    return F.interpolate(t, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", antialias=True, align_corners=False)[0, 0]


def tokens_from_mask(codec: MaskCodec, full_mask: np.ndarray, box_xyxy: Sequence[float]) -> list[int]:
    """16 codes for the part of a full-resolution mask inside a pixel box (big_vision refcoco_mask2str:
    round the box, crop, resize to 64x64 bilinear with antialias, encode)."""
    m = np.asarray(full_mask, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"full_mask must be [H, W], got shape {m.shape}")
    h, w = m.shape
    x0, y0, x1, y1 = (int(round(float(v))) for v in box_xyxy)
    x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
    y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"box {tuple(box_xyxy)} is empty inside a {w}x{h} mask")
    if m.max(initial=0) > 1:
        m = m / 255.0
    crop = _resize64(m[y0:y1, x0:x1]).clamp(0, 1)  # [64, 64]
    return [int(v) for v in codec.encode(crop[None])[0].tolist()]


# ------------------------------------------------------------------------------ construction
def make_random_codec(seed: int = 0, embed_dim: int = 512, **kwargs) -> MaskCodec:
    """A codec with random weights (deterministic by seed), for tests and shape checks."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskCodec(embed_dim=embed_dim, **kwargs).eval()
