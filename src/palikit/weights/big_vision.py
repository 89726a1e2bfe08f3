"""big_vision / Kaggle `.npz` checkpoints: flat `/`-joined Flax parameter paths (`params/img/...`,
`params/llm/...`), layers stacked on a leading axis (`scan=True`) or unrolled (`encoderblock_{i}`,
`layers_{i}`), bf16 stored as raw 2-byte values. Read with pickle disabled. The architecture is
inferred from the array shapes; the inverse (`state_dict_to_npz`) writes the same naming, so a
palikit model can go back to big_vision too.

Flax -> PyTorch transforms (those of transformers' conversion scripts):
patch kernel HWIO -> OIHW; Dense kernels (in, out) -> (out, in); SigLIP q/k/v kernels
(C, heads, hd) -> (heads*hd, C); out kernel (heads, hd, C) -> (C, heads*hd);
Gemma q_einsum (N, W, D) -> (N*D, W); kv_einsum[0|1] (K, W, D) -> (K*D, W);
attn_vec_einsum (N, D, W) -> (W, N*D); gating_einsum[0] = gate, [1] = up, (W, F) -> (F, W);
linear (F, W) -> (W, F). Norm scales copied as-is (both sides use 1 + scale).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import PRESETS, PaliGemmaConfig, TextConfig, VisionConfig
from .hf import CheckpointError

_IMG = "img/Transformer/encoderblock"
_LLM = "llm/layers"


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Flat dict of arrays, `params/` prefix stripped, bf16 kept as raw `V2` (see `to_torch`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({e}).") from None
    return {k.removeprefix("params/"): v for k, v in arrays.items()}


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype.kind == "V" and a.dtype.itemsize == 2:  # bf16 saved as raw bytes
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    if a.dtype.name == "bfloat16":  # ml_dtypes array
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


class _Params:
    """Uniform per-layer access to stacked or unrolled parameter trees."""

    def __init__(self, arrays: dict[str, np.ndarray], source: str):
        self.a, self.source = arrays, source

    def has(self, key: str) -> bool:
        return key in self.a

    def get(self, key: str) -> torch.Tensor:
        if key not in self.a:
            raise CheckpointError(f"{self.source}: missing tensor {key!r}.")
        return to_torch(self.a[key])

    def layer(self, base: str, i: int, rest: str) -> torch.Tensor:
        stacked = f"{base}/{rest}"
        if stacked in self.a:
            return to_torch(self.a[stacked][i])
        return self.get(f"{base}_{i}/{rest}")

    def depth(self, base: str, probe: str) -> int:
        if f"{base}/{probe}" in self.a:
            return self.a[f"{base}/{probe}"].shape[0]
        pat = re.compile(re.escape(base) + r"_(\d+)/")
        idx = {int(m.group(1)) for k in self.a if (m := pat.match(k))}
        if not idx:
            raise CheckpointError(f"{self.source}: no layers under {base!r}; is this a PaliGemma big_vision checkpoint?")
        return max(idx) + 1

    def shape(self, base: str, rest: str) -> tuple[int, ...]:
        """One layer's shape (from the array's shape alone: works on `read_npz_headers` too)."""
        stacked = f"{base}/{rest}"
        if stacked in self.a:
            return tuple(self.a[stacked].shape[1:])
        if f"{base}_0/{rest}" not in self.a:
            raise CheckpointError(f"{self.source}: missing tensor {base}_0/{rest!r}.")
        return tuple(self.a[f"{base}_0/{rest}"].shape)


def config_from_npz(arrays: dict[str, np.ndarray], source: str = "npz") -> PaliGemmaConfig:
    p = _Params(arrays, source)
    for key in ("img/embedding/kernel", "img/pos_embedding", "llm/embedder/input_embedding"):
        if not p.has(key):
            raise CheckpointError(f"{source}: missing tensor {key!r}; is this a PaliGemma big_vision checkpoint?")
    ph, _, ch, width = arrays["img/embedding/kernel"].shape
    n_img = arrays["img/pos_embedding"].shape[1]
    vision = VisionConfig(
        image_size=int(round(n_img**0.5)) * ph,
        patch_size=ph,
        hidden_size=width,
        intermediate_size=p.shape(_IMG, "MlpBlock_0/Dense_0/kernel")[1],
        num_hidden_layers=p.depth(_IMG, "LayerNorm_0/scale"),
        num_attention_heads=p.shape(_IMG, "MultiHeadDotProductAttention_0/query/kernel")[1],
        num_channels=ch,
    )
    vocab, W = arrays["llm/embedder/input_embedding"].shape
    N, _, D = p.shape(_LLM, "attn/q_einsum/w")
    K = p.shape(_LLM, "attn/kv_einsum/w")[1]
    F = p.shape(_LLM, "mlp/linear")[0]
    gemma2 = p.has(f"{_LLM}/post_attention_norm/scale") or p.has(f"{_LLM}_0/post_attention_norm/scale")
    # Gemma 2 27B (width 4608, 32 heads) scales queries by (width / heads) ** -0.5 instead of
    # head_dim ** -0.5 (big_vision's `rsqrt_emb_per_head`); the file does not say so, the shape does.
    q_scalar = W / N if gemma2 and (W, N) == (4608, 32) else float(D)
    text = TextConfig(
        vocab_size=vocab, hidden_size=W, intermediate_size=F,
        num_hidden_layers=p.depth(_LLM, "pre_attention_norm/scale"),
        num_attention_heads=N, num_key_value_heads=K, head_dim=D, query_pre_attn_scalar=q_scalar,
        post_norms=gemma2,
        attn_logit_softcapping=50.0 if gemma2 else None,
        final_logit_softcapping=30.0 if gemma2 else None,  # as stored; the load decides (conventions.py)
    )
    base = PRESETS["pg2-3b-224" if gemma2 else "pg1-3b-224"]
    return replace(base, vision=vision, text=text, name=Path(source).stem,
                   image_token_index=vocab if vocab <= 257_152 else 257_152)


def npz_to_state_dict(arrays: dict[str, np.ndarray], config: PaliGemmaConfig, source: str = "npz", dtype=None):
    p = _Params(arrays, source)
    v, t = config.vision, config.text
    sd: dict[str, torch.Tensor] = {}
    C = v.hidden_size
    sd["vision_tower.embeddings.patch_embedding.weight"] = p.get("img/embedding/kernel").permute(3, 2, 0, 1)
    sd["vision_tower.embeddings.patch_embedding.bias"] = p.get("img/embedding/bias")
    sd["vision_tower.embeddings.position_embedding.weight"] = p.get("img/pos_embedding").reshape(-1, C)
    for i in range(v.num_hidden_layers):
        pre = f"vision_tower.encoder.layers.{i}."
        for ours, theirs in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
            sd[pre + f"{ours}.weight"] = p.layer(_IMG, i, f"{theirs}/scale")
            sd[pre + f"{ours}.bias"] = p.layer(_IMG, i, f"{theirs}/bias")
        att = "MultiHeadDotProductAttention_0"
        for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            sd[pre + f"self_attn.{ours}.weight"] = p.layer(_IMG, i, f"{att}/{theirs}/kernel").reshape(C, C).T
            sd[pre + f"self_attn.{ours}.bias"] = p.layer(_IMG, i, f"{att}/{theirs}/bias").reshape(C)
        sd[pre + "self_attn.out_proj.weight"] = p.layer(_IMG, i, f"{att}/out/kernel").reshape(C, C).T
        sd[pre + "self_attn.out_proj.bias"] = p.layer(_IMG, i, f"{att}/out/bias")
        for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
            sd[pre + f"mlp.{ours}.weight"] = p.layer(_IMG, i, f"MlpBlock_0/{theirs}/kernel").T
            sd[pre + f"mlp.{ours}.bias"] = p.layer(_IMG, i, f"MlpBlock_0/{theirs}/bias")
    sd["vision_tower.post_layernorm.weight"] = p.get("img/Transformer/encoder_norm/scale")
    sd["vision_tower.post_layernorm.bias"] = p.get("img/Transformer/encoder_norm/bias")
    sd["multi_modal_projector.linear.weight"] = p.get("img/head/kernel").T
    sd["multi_modal_projector.linear.bias"] = p.get("img/head/bias")
    sd["language_model.embed_tokens.weight"] = p.get("llm/embedder/input_embedding")
    sd["language_model.norm.weight"] = p.get("llm/final_norm/scale")
    W = t.hidden_size
    for i in range(t.num_hidden_layers):
        pre = f"language_model.layers.{i}."
        q = p.layer(_LLM, i, "attn/q_einsum/w")  # [N, W, D]
        kv = p.layer(_LLM, i, "attn/kv_einsum/w")  # [2, K, W, D]
        o = p.layer(_LLM, i, "attn/attn_vec_einsum/w")  # [N, D, W]
        sd[pre + "self_attn.q_proj.weight"] = q.transpose(1, 2).reshape(-1, W)
        sd[pre + "self_attn.k_proj.weight"] = kv[0].transpose(1, 2).reshape(-1, W)
        sd[pre + "self_attn.v_proj.weight"] = kv[1].transpose(1, 2).reshape(-1, W)
        sd[pre + "self_attn.o_proj.weight"] = o.permute(2, 0, 1).reshape(W, -1)
        gating = p.layer(_LLM, i, "mlp/gating_einsum")  # [2, W, F]
        sd[pre + "mlp.gate_proj.weight"] = gating[0].T
        sd[pre + "mlp.up_proj.weight"] = gating[1].T
        sd[pre + "mlp.down_proj.weight"] = p.layer(_LLM, i, "mlp/linear").T
        sd[pre + "input_layernorm.weight"] = p.layer(_LLM, i, "pre_attention_norm/scale")
        if t.post_norms:
            sd[pre + "post_attention_layernorm.weight"] = p.layer(_LLM, i, "post_attention_norm/scale")
            sd[pre + "pre_feedforward_layernorm.weight"] = p.layer(_LLM, i, "pre_ffw_norm/scale")
            sd[pre + "post_feedforward_layernorm.weight"] = p.layer(_LLM, i, "post_ffw_norm/scale")
        else:  # Gemma 1: HF's post_attention_layernorm is the pre-MLP norm
            sd[pre + "post_attention_layernorm.weight"] = p.layer(_LLM, i, "pre_ffw_norm/scale")
    return {k: (x.to(dtype) if dtype is not None else x).contiguous() for k, x in sd.items()}


def state_dict_to_npz(sd: dict[str, torch.Tensor], config: PaliGemmaConfig) -> dict[str, np.ndarray]:
    """palikit state dict -> big_vision naming with layers stacked (scan layout), float32."""
    v, t = config.vision, config.text
    C, H, hd = v.hidden_size, v.num_attention_heads, v.head_dim
    W, N, K, D = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim

    def g(k):
        return sd[k].detach().float().cpu()

    out: dict[str, torch.Tensor] = {
        "img/embedding/kernel": g("vision_tower.embeddings.patch_embedding.weight").permute(2, 3, 1, 0),
        "img/embedding/bias": g("vision_tower.embeddings.patch_embedding.bias"),
        "img/pos_embedding": g("vision_tower.embeddings.position_embedding.weight")[None],
        "img/Transformer/encoder_norm/scale": g("vision_tower.post_layernorm.weight"),
        "img/Transformer/encoder_norm/bias": g("vision_tower.post_layernorm.bias"),
        "img/head/kernel": g("multi_modal_projector.linear.weight").T,
        "img/head/bias": g("multi_modal_projector.linear.bias"),
        "llm/embedder/input_embedding": g("language_model.embed_tokens.weight"),
        "llm/final_norm/scale": g("language_model.norm.weight"),
    }

    def stack(fn, n):
        return torch.stack([fn(i) for i in range(n)])

    vl = "vision_tower.encoder.layers.{}."
    att = f"{_IMG}/MultiHeadDotProductAttention_0"
    for ours, theirs in (("layer_norm1", "LayerNorm_0"), ("layer_norm2", "LayerNorm_1")):
        for a, b in (("weight", "scale"), ("bias", "bias")):
            out[f"{_IMG}/{theirs}/{b}"] = stack(lambda i: g(vl.format(i) + f"{ours}.{a}"), v.num_hidden_layers)
    for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
        out[f"{att}/{theirs}/kernel"] = stack(lambda i: g(vl.format(i) + f"self_attn.{ours}.weight").T.reshape(C, H, hd), v.num_hidden_layers)
        out[f"{att}/{theirs}/bias"] = stack(lambda i: g(vl.format(i) + f"self_attn.{ours}.bias").reshape(H, hd), v.num_hidden_layers)
    out[f"{att}/out/kernel"] = stack(lambda i: g(vl.format(i) + "self_attn.out_proj.weight").T.reshape(H, hd, C), v.num_hidden_layers)
    out[f"{att}/out/bias"] = stack(lambda i: g(vl.format(i) + "self_attn.out_proj.bias"), v.num_hidden_layers)
    for ours, theirs in (("fc1", "Dense_0"), ("fc2", "Dense_1")):
        out[f"{_IMG}/MlpBlock_0/{theirs}/kernel"] = stack(lambda i: g(vl.format(i) + f"mlp.{ours}.weight").T, v.num_hidden_layers)
        out[f"{_IMG}/MlpBlock_0/{theirs}/bias"] = stack(lambda i: g(vl.format(i) + f"mlp.{ours}.bias"), v.num_hidden_layers)

    tl = "language_model.layers.{}."
    L = t.num_hidden_layers
    out[f"{_LLM}/attn/q_einsum/w"] = stack(lambda i: g(tl.format(i) + "self_attn.q_proj.weight").reshape(N, D, W).transpose(1, 2), L)
    out[f"{_LLM}/attn/kv_einsum/w"] = stack(lambda i: torch.stack([
        g(tl.format(i) + f"self_attn.{x}_proj.weight").reshape(K, D, W).transpose(1, 2) for x in "kv"]), L)
    out[f"{_LLM}/attn/attn_vec_einsum/w"] = stack(lambda i: g(tl.format(i) + "self_attn.o_proj.weight").reshape(W, N, D).permute(1, 2, 0), L)
    out[f"{_LLM}/mlp/gating_einsum"] = stack(lambda i: torch.stack([
        g(tl.format(i) + "mlp.gate_proj.weight").T, g(tl.format(i) + "mlp.up_proj.weight").T]), L)
    out[f"{_LLM}/mlp/linear"] = stack(lambda i: g(tl.format(i) + "mlp.down_proj.weight").T, L)
    out[f"{_LLM}/pre_attention_norm/scale"] = stack(lambda i: g(tl.format(i) + "input_layernorm.weight"), L)
    if t.post_norms:
        for theirs, ours in (("post_attention_norm", "post_attention_layernorm"), ("pre_ffw_norm", "pre_feedforward_layernorm"),
                             ("post_ffw_norm", "post_feedforward_layernorm")):
            out[f"{_LLM}/{theirs}/scale"] = stack(lambda i: g(tl.format(i) + f"{ours}.weight"), L)
    else:
        out[f"{_LLM}/pre_ffw_norm/scale"] = stack(lambda i: g(tl.format(i) + "post_attention_layernorm.weight"), L)
    return {f"params/{k}": x.contiguous().numpy() for k, x in out.items()}


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]


def read_npz_headers(path: str | Path) -> dict[str, _Header]:
    """Every array's shape, `params/` prefix stripped, from the `.npy` headers alone (no data read)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such checkpoint: {path}")
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as f:
                    major, _ = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                    shape, _, _ = read(f)
                out[name.removesuffix(".npy").removeprefix("params/")] = _Header(tuple(shape))
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable .npz checkpoint ({e}).") from None
    return out


def npz_config(path: str | Path, *, final_logit_softcap="auto", sliding_window="auto") -> PaliGemmaConfig:
    """The architecture of a big_vision `.npz` and the conventions in force for it, from array shapes
    alone (cheap for a multi-GB file: `palikit info`, Ray's CPU stage)."""
    from .conventions import apply_conventions

    cfg = config_from_npz(read_npz_headers(path), str(path))
    return apply_conventions(cfg, path, fmt="npz", final_logit_softcap=final_logit_softcap,
                             sliding_window=sliding_window)


def npz_image_size(path: str | Path) -> int:
    """The input resolution of a big_vision `.npz`, from two array shapes (nothing else is read)."""
    h = read_npz_headers(path)
    if "img/embedding/kernel" not in h or "img/pos_embedding" not in h:
        raise CheckpointError(f"{path}: no img/embedding/kernel or img/pos_embedding; is this a PaliGemma "
                              "big_vision checkpoint?")
    return int(round(h["img/pos_embedding"].shape[1] ** 0.5)) * h["img/embedding/kernel"].shape[0]


def load_npz_checkpoint(path: str | Path, config: PaliGemmaConfig | None = None, device="cpu", dtype=None, *,
                        final_logit_softcap="auto", sliding_window="auto"):
    """Load a big_vision `.npz` into a PaliGemmaModel (architecture inferred unless `config`). The
    final soft-cap follows the checkpoint's stage, told from its name ("auto"; an `.npz` of unknown
    stage gets big_vision's no-cap, with one log line: see `weights/conventions.py`); full attention."""
    from ..model import build_model
    from .conventions import apply_conventions
    from .hf import load_state_dict_into

    arrays = read_npz(path)
    inferred = config_from_npz(arrays, str(path))
    if config is None:
        config = apply_conventions(inferred, path, fmt="npz", final_logit_softcap=final_logit_softcap,
                                   sliding_window=sliding_window)
    sd = npz_to_state_dict(arrays, config, str(path), dtype)
    sd = {k: x.to(device) for k, x in sd.items()}
    model = build_model(config, device="meta")
    return load_state_dict_into(model, sd, str(path)).eval()
