"""Training a segmentation-mask VQ-VAE (`palikit.tasks.mask_codec.MaskCodec`, the vae-oid.npz
architecture) on 64x64 masks: what the bundled demo codec is trained with (the checkout's `lab.demo.build`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..tasks.mask_codec import MASK_SIZE, MaskCodec


def _sample_rows(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    idx = torch.randint(0, len(x), (k,), generator=g).to(x.device)
    return x[idx] + 1e-3 * torch.randn(k, x.shape[1], generator=g).to(x.device)


class _EmaCodebook:
    """EMA k-means updates of `codebook` [K, D] in place (AiT's VectorQuantizerEMA), restarting codes
    unused for `restart_every` steps at random latents of the batch."""

    def __init__(self, codebook: torch.Tensor, decay: float, restart_every: int):
        k = codebook.shape[0]
        self.codebook, self.decay, self.restart_every = codebook, decay, restart_every
        self.count = torch.ones(k, device=codebook.device)  # [K]
        self.sum = codebook.detach().clone()  # [K, D]
        self.last_used = torch.zeros(k, dtype=torch.long, device=codebook.device)  # [K]

    @torch.no_grad()
    def update(self, flat_z: torch.Tensor, flat_c: torch.Tensor, step: int, g: torch.Generator) -> int:
        """One step from latents [M, D] and their codes [M]; returns how many codes the batch used."""
        decay, k = self.decay, self.codebook.shape[0]
        onehot = F.one_hot(flat_c, k).to(flat_z.dtype)  # [M, K]
        self.count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.sum.mul_(decay).add_(onehot.t() @ flat_z, alpha=1 - decay)
        n = self.count.sum()
        count = (self.count + 1e-5) / (n + k * 1e-5) * n
        self.codebook.copy_(self.sum / count[:, None])
        used = torch.zeros(k, dtype=torch.bool, device=flat_z.device)
        used[flat_c] = True
        self.last_used[used] = step
        dead = (step - self.last_used >= self.restart_every).nonzero().flatten()
        if len(dead):
            pick = flat_z[torch.randint(0, len(flat_z), (len(dead),), generator=g)]
            self.codebook[dead] = pick
            self.sum[dead] = pick
            self.count[dead] = 1.0
            self.last_used[dead] = step
        return int(used.sum())


def train_mask_codec(masks: torch.Tensor, steps: int = 1000, *, batch_size: int = 64, lr: float = 2e-3,
                     embed_dim: int = 64, enc_channels: Sequence[int] = (16, 32, 64, 128),
                     dec_channels: Sequence[int] = (128, 128, 64, 32, 16), commitment: float = 0.25,
                     ema_decay: float = 0.95, restart_every: int = 50, seed: int = 0,
                     device: str | torch.device = "cpu",
                     progress: Callable[[int, dict[str, float]], None] | None = None) -> MaskCodec:
    """Train a codec on masks [N, 64, 64] in [0, 1]. Loss = MSE(decoder output, 2m-1) + commitment *
    MSE(latent, sg(code)); the codebook follows EMA k-means updates (as AiT's VectorQuantizerEMA), is
    initialised from encoder outputs and codes unused for `restart_every` steps are restarted at random
    latents. Straight-through gradients; Adam with cosine decay. `progress(step, stats)` is optional."""
    masks = torch.as_tensor(masks, dtype=torch.float32)
    if masks.ndim != 3 or masks.shape[1:] != (MASK_SIZE, MASK_SIZE) or len(masks) == 0:
        raise ValueError(f"masks must be a non-empty [N, 64, 64] tensor, got {tuple(masks.shape)}")
    masks = masks.clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        codec = MaskCodec(embed_dim=embed_dim, enc_channels=enc_channels, dec_channels=dec_channels).to(device)
    codec.train()
    codec._vq_vae._embedding.requires_grad_(False)
    params = [p for n, p in codec.named_parameters() if not n.startswith("_vq_vae")]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0))))
    k = codec.codebook.shape[0]
    with torch.no_grad():  # codebook init: encoder outputs of a first batch
        idx = torch.randint(0, len(masks), (max(batch_size, 8),), generator=g)
        z0 = codec.encode_latents(masks[idx].to(device)).reshape(-1, embed_dim)  # [B*16, D]
        codec.codebook.copy_(_sample_rows(z0, k, g))
    ema = _EmaCodebook(codec.codebook, ema_decay, restart_every)
    for step in range(steps):
        idx = torch.randint(0, len(masks), (batch_size,), generator=g)
        x = masks[idx].to(device)  # [B, 64, 64]
        z = codec.encode_latents(x)  # [B, 4, 4, D]
        codes = codec.quantize(z.detach())  # [B, 4, 4]
        q = codec.codebook[codes]  # [B, 4, 4, D]
        out = codec.decode_latents(z + (q - z).detach())  # straight-through, [B, 64, 64]
        recon = F.mse_loss(out, 2 * x - 1)
        commit = F.mse_loss(z, q)
        loss = recon + commitment * commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        used = ema.update(z.detach().reshape(-1, embed_dim), codes.reshape(-1), step, g)  # [M, D], [M]
        if progress is not None:
            progress(step, {"loss": float(loss.detach()), "recon": float(recon.detach()),
                            "commit": float(commit.detach()), "codes_used": used})
    codec._vq_vae._embedding.requires_grad_(True)
    return codec.eval()
