"""Model configuration: plain frozen dataclasses, the named presets of every released PaliGemma
shape, and conversion from/to a Hugging Face `config.json`.

Architecture choices are explicit flags (post-norms, soft-caps, query scale, sliding window), never
inferred from a model-type string at run time. Presets use the real 257,152-token vocabulary
(256,000 Gemma pieces + 1,024 `<loc>` + 128 `<seg>`), so their parameter counts equal the published
ones; checkpoints from the Hub carry 257,216 embedding rows (HF adds `<image>` and 63 padding rows),
which `from_hf_dict` keeps as rows but never lets the model predict (see `output_vocab_size`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

PALIGEMMA_VOCAB = 257_152  # 256000 + 1024 <loc> + 128 <seg>


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT image encoder (So400m/14 for every released PaliGemma)."""

    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    num_channels: int = 3

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class TextConfig:
    """Gemma 1 / Gemma 2 decoder. Gemma 2 = `post_norms=True` plus soft-caps."""

    vocab_size: int = PALIGEMMA_VOCAB  # rows of the (tied) embedding
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    query_pre_attn_scalar: float = 256.0  # q is scaled by query_pre_attn_scalar ** -0.5
    post_norms: bool = False  # Gemma 2: norms after attention and MLP too
    attn_logit_softcapping: float | None = None  # Gemma 2: 50
    # Gemma 2: 30 where a checkpoint was trained with it (pt), None for transfers: weights/conventions.py
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None  # None = full attention (big_vision's training); see weights/conventions.py
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" / "full_attention" per layer

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers"
            )

    @property
    def model_type(self) -> str:
        return "gemma2" if self.post_norms else "gemma"

    def is_sliding(self, layer: int) -> bool:
        if not self.sliding_window:
            return False
        if self.layer_types is None:
            return layer % 2 == 0  # Gemma 2 convention: even layers slide
        return self.layer_types[layer] == "sliding_attention"


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_index: int = PALIGEMMA_VOCAB
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2
    name: str = "custom"
    # why the final soft-cap and sliding window in force were chosen (weights/conventions.py)
    conventions: tuple[str, ...] = field(default=(), compare=False)

    @property
    def output_vocab_size(self) -> int:
        """Ids the model may predict: the real vocabulary, never `<image>` or HF's padding rows."""
        if 0 < self.image_token_index < self.text.vocab_size:
            return self.image_token_index
        return self.text.vocab_size

    @property
    def family(self) -> str:
        return "PaliGemma 2" if self.text.post_norms else "PaliGemma 1"

    def with_image_size(self, image_size: int) -> PaliGemmaConfig:
        return replace(self, vision=replace(self.vision, image_size=image_size))

    def prompt_row(self, text_ids: Sequence[int], image_tokens: int | None = None) -> list[int]:
        """The model's input row: `image_tokens` `<image>` placeholders (default: one image's
        `num_image_tokens`; frames x that for several), then the text ids ([BOS] prefix "\n" ...)."""
        n = self.vision.num_image_tokens if image_tokens is None else image_tokens
        return [self.image_token_index] * n + list(text_ids)

    # ---------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "custom") -> PaliGemmaConfig:
        if d.get("model_type") not in (None, "paligemma"):
            raise ValueError(
                f"config.json has model_type={d.get('model_type')!r}; palikit loads 'paligemma' "
                "checkpoints (PaliGemma 1 and 2)."
            )
        t = dict(d.get("text_config") or {})
        v = dict(d.get("vision_config") or {})
        gemma2 = t.get("model_type", "gemma") == "gemma2"
        base = PRESETS["pg2-3b-224" if gemma2 else "pg1-3b-224"].text
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        rope_theta = t.get("rope_theta", rope.get("rope_theta", base.rope_theta))
        n_layers = t.get("num_hidden_layers", base.num_hidden_layers)
        head_dim = t.get("head_dim") or base.head_dim
        sliding = t.get("sliding_window") if gemma2 else None
        layer_types = tuple(t["layer_types"]) if gemma2 and t.get("layer_types") else None
        text = TextConfig(
            vocab_size=t.get("vocab_size", 257_216),
            hidden_size=t.get("hidden_size", base.hidden_size),
            intermediate_size=t.get("intermediate_size", base.intermediate_size),
            num_hidden_layers=n_layers,
            num_attention_heads=t.get("num_attention_heads", base.num_attention_heads),
            num_key_value_heads=t.get("num_key_value_heads", base.num_key_value_heads),
            head_dim=head_dim,
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            query_pre_attn_scalar=float(t.get("query_pre_attn_scalar", 256)) if gemma2 else float(head_dim),
            post_norms=gemma2,
            attn_logit_softcapping=(t.get("attn_logit_softcapping", 50.0) or None) if gemma2 else None,
            final_logit_softcapping=(t.get("final_logit_softcapping", 30.0) or None) if gemma2 else None,
            sliding_window=sliding or None,
            layer_types=layer_types,
        )
        patch = v.get("patch_size", 14)
        # a config without image_size still says how many image tokens it has: side = sqrt(n) * patch
        n_img = v.get("num_image_tokens") or t.get("num_image_tokens")
        vision = VisionConfig(
            image_size=v.get("image_size") or (int(round(n_img**0.5)) * patch if n_img else 224),
            patch_size=patch,
            hidden_size=v.get("hidden_size", 1152),
            intermediate_size=v.get("intermediate_size", 4304),
            num_hidden_layers=v.get("num_hidden_layers", 27),
            num_attention_heads=v.get("num_attention_heads", 16),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            num_channels=v.get("num_channels", 3),
        )
        # HF's own default for a missing image_token_index is 256000 (= <loc0000>): never use it.
        image_token = d.get("image_token_index", d.get("image_token_id"))
        if image_token is None:
            image_token = PALIGEMMA_VOCAB if text.vocab_size > PALIGEMMA_VOCAB else text.vocab_size
        return cls(
            vision=vision,
            text=text,
            image_token_index=int(image_token),
            pad_token_id=d.get("pad_token_id", t.get("pad_token_id", 0)) or 0,
            eos_token_id=_first(d.get("eos_token_id", t.get("eos_token_id", 1))),
            bos_token_id=d.get("bos_token_id", t.get("bos_token_id", 2)),
            name=name,
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> PaliGemmaConfig:
        """A checkpoint's config.json (or its folder) as written. The final soft-cap and sliding
        window in force for that checkpoint are decided in `weights/conventions.py`
        (`config_from_json_file`), which every loader uses."""
        d, path = read_config_json(path)
        return cls.from_hf_dict(d, name=path.parent.name)

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers' PaliGemmaForConditionalGeneration loads."""
        t, v = self.text, self.vision
        text = {
            "model_type": t.model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "head_dim": t.head_dim,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "hidden_activation": "gelu_pytorch_tanh",
            "num_image_tokens": v.num_image_tokens,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if t.post_norms:
            text |= {
                "query_pre_attn_scalar": _int_if_whole(t.query_pre_attn_scalar),
                "attn_logit_softcapping": t.attn_logit_softcapping,
                "final_logit_softcapping": t.final_logit_softcapping,
                "sliding_window": t.sliding_window,
                "layer_types": list(t.layer_types) if t.layer_types
                else ["sliding_attention" if t.is_sliding(i) else "full_attention" for i in range(t.num_hidden_layers)],
            }
        vision = {
            "model_type": "siglip_vision_model",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps,
            "num_image_tokens": v.num_image_tokens,
            "projection_dim": t.hidden_size,
            "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False,
        }
        return {
            "architectures": ["PaliGemmaForConditionalGeneration"],
            "model_type": "paligemma",
            "text_config": text,
            "vision_config": vision,
            "projection_dim": t.hidden_size,
            "hidden_size": t.hidden_size,
            "image_token_index": self.image_token_index,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            # the conventions this model ran / was trained with, so a reload keeps them (conventions.py)
            **({"palikit": {"final_logit_softcap": t.final_logit_softcapping, "sliding_window": t.sliding_window}}
               if t.post_norms else {}),
        }

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["family"] = self.family
        d["num_image_tokens"] = self.vision.num_image_tokens
        d["output_vocab_size"] = self.output_vocab_size
        return d


def _int_if_whole(x: float):
    return int(x) if float(x).is_integer() else x


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------- presets
_GEMMA_2B = TextConfig()  # PaliGemma 1 decoder (Gemma 2B, MQA)
_GEMMA2 = dict(post_norms=True, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
_TEXT = {
    "pg1-3b": _GEMMA_2B,
    "pg2-3b": TextConfig(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=256, **_GEMMA2),
    "pg2-10b": TextConfig(hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                          num_attention_heads=16, num_key_value_heads=8, head_dim=256, **_GEMMA2),
    "pg2-28b": TextConfig(hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                          num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                          query_pre_attn_scalar=4608 / 32, **_GEMMA2),
}

PRESETS: dict[str, PaliGemmaConfig] = {
    f"{family}-{res}": PaliGemmaConfig(vision=VisionConfig(image_size=res), text=text, name=f"{family}-{res}")
    for family, text in _TEXT.items()
    for res in (224, 448, 896)
}

# Tiny shapes for tests and the demo model: every architectural feature switched on.
PRESETS["tiny-pg1"] = PaliGemmaConfig(
    vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4),
    text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16),
    image_token_index=319, name="tiny-pg1",
)
PRESETS["tiny-pg2"] = PaliGemmaConfig(
    vision=VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4),
    text=TextConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                    post_norms=True, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    image_token_index=319, name="tiny-pg2",
)


def read_config_json(path: str | Path) -> tuple[dict, Path]:
    """(the parsed config.json, its path) of a checkpoint folder or file, with clear errors."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        return json.loads(path.read_text()), path
    except FileNotFoundError:
        raise FileNotFoundError(f"No config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
