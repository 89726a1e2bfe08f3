"""Test and benchmark helpers: random-weight models (`random_model`; `random_paligemma`, a whole
`PaliGemma` of a preset's shape with a tokenizer spanning its vocabulary, for full-size runs on a GPU),
the same weights in transformers (`hf_model_from`, the parity and benchmark reference), and tiny random
checkpoints in the real on-disk format (`make_tiny_checkpoint`: Hub-layout config.json + safetensors +
tokenizer.json + preprocessor_config.json) for tests, examples and smoke runs of the server and batch
jobs. None of them downloads anything. Their outputs are random text: they exercise the machinery, not
the model's skill (the bundled demo model is the trained one). torch and transformers are imported
inside the functions, so importing this module stays light."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from .config import PaliGemmaConfig
    from .model import PaliGemmaModel

__all__ = ["hf_model_from", "make_tiny_checkpoint", "random_linear", "random_model", "random_paligemma", "random_tokenizer",
           "stop_process"]

WORDS = ["a", "the", "red", "blue", "green", "circle", "square", "triangle", "cat", "dog", "car", "on", "in",
         "caption", "describe", "detect", "segment", "answer", "question", "ocr", "en", "how", "many", "what",
         "color", "is", "there", "are", "of", "picture", "text"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()/")


def random_model(config: PaliGemmaConfig, device: Any = "cpu", dtype: torch.dtype | None = None,
                 seed: int = 0) -> PaliGemmaModel:
    """Random weights of a given shape (full-size checks without downloading anything); dtype
    float32 unless given. Norm scales are N(0, 0.02) around 1 where the module adds no 1 itself. Values are
    drawn in fp32 and rounded into `dtype` one tensor at a time (a bf16 3B never exists in fp32 whole)."""
    import torch

    from .model import build_model

    model = build_model(config, "meta", dtype=torch.float32 if dtype is None else dtype).to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if "layer_norm" in name or name.startswith("vision") else 0.0))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def random_linear(n_out: int, n_in: int, seed: int = 0, bias: bool = False, std: float = 0.05):
    """A seeded float `nn.Linear` with N(0, std) weights (quantized-layer tests)."""
    import torch

    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, std)
    return lin


def hf_model_from(model: PaliGemmaModel):
    """transformers' PaliGemmaForConditionalGeneration holding exactly our weights (eager attention),
    keyed in whichever in-memory layout the installed transformers uses (`weights/layouts.py`)."""
    import torch
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    from .weights.layouts import LAYOUTS, detect_layout, to_layout

    w = model.language_model.embed_tokens.weight
    hcfg = HFConfig(**model.config.to_hf_dict())
    with torch.device(w.device):
        hf = PaliGemmaForConditionalGeneration._from_config(hcfg, attn_implementation="eager", torch_dtype=w.dtype)
    layout = detect_layout(hf.state_dict())
    sd = {to_layout(k, layout): t for k, t in model.state_dict().items()}
    if LAYOUTS[layout].head:
        sd[LAYOUTS[layout].head] = w  # tied
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"weight transfer to transformers failed: missing {missing} unexpected {unexpected}")
    return hf.eval()


def make_tiny_checkpoint(folder: str | Path, family: str = "pg1", seed: int = 0, image_size: int = 28,
                         extra_chars: str = "") -> Path:
    """Write a random tiny PaliGemma (family "pg1" or "pg2") with a PaliGemma-style tokenizer; `extra_chars`:
    characters its tokenizer writes besides CHARS (e.g. "{}[]" for JSON outputs)."""
    import torch

    from .config import PRESETS
    from .preprocess import ImageProcessor
    from .tokenizer import build_tokenizer
    from .weights.export import save_hub_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(WORDS + CHARS + [c for c in extra_chars if c not in CHARS], folder / "tokenizer.json")
    image_id = tok.vocab_size - 1  # build_tokenizer puts <image> last
    base = PRESETS[f"tiny-{family}"]
    cfg = replace(base, text=replace(base.text, vocab_size=tok.vocab_size), image_token_index=image_id,
                  name=f"tiny-{family}-random").with_image_size(image_size)
    torch.manual_seed(seed)
    model = random_model(cfg, "cpu", torch.float32, seed=seed)
    with torch.no_grad():  # make outputs less degenerate than N(0, 0.02) weights give
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(5.0)
    save_hub_checkpoint(model, folder)
    ImageProcessor(size=image_size, patch_size=cfg.vision.patch_size).save(folder)
    return folder


def random_tokenizer(cfg: PaliGemmaConfig, folder: Path):
    """A PaliGemma-style tokenizer whose ids span `cfg`'s output vocabulary (so every id a random model
    emits decodes), and the config it fits: a full-size preset keeps its vocabulary (filler words pad
    the tokenizer up to it; the embedding gets the checkpoints' 64-row padding past <image>), a tiny one
    takes the tokenizer's size, as `make_tiny_checkpoint` does."""
    from .tokenizer import build_tokenizer

    tok = build_tokenizer(WORDS + CHARS, folder / "tokenizer.json")
    want = cfg.output_vocab_size + 1  # the output ids, then <image> as the last id
    if want > tok.vocab_size:
        gap = want - tok.vocab_size
        filler = [f"zq{i}" for i in range(gap // 2)] + ([" zq"] if gap % 2 else [])  # 2 ids / 1 id each
        tok = build_tokenizer(WORDS + CHARS + filler, folder / "tokenizer.json")
        if tok.vocab_size != want or cfg.image_token_index != want - 1:
            raise ValueError(f"{cfg.name}: cannot build a tokenizer with <image> at id {cfg.image_token_index}")
        rows = max(cfg.text.vocab_size, (want + 63) // 64 * 64)
        return tok, replace(cfg, text=replace(cfg.text, vocab_size=rows))
    text = replace(cfg.text, vocab_size=tok.vocab_size)
    return tok, replace(cfg, text=text, image_token_index=tok.vocab_size - 1)


def random_paligemma(preset: str | PaliGemmaConfig, device: Any = "cpu", dtype: torch.dtype | None = None,
                     seed: int = 0, folder: str | Path | None = None):
    """A `PaliGemma` with random weights of `preset`'s shape (a preset name or a config; see
    `random_tokenizer`); the tokenizer is written to `folder` (a temp dir by default)."""
    import tempfile

    from .api import PaliGemma
    from .preprocess import ImageProcessor
    from .weights.resolve import get_config

    folder = Path(folder or tempfile.mkdtemp(prefix="palikit-serve-bench-"))
    tok, cfg = random_tokenizer(get_config(preset) if isinstance(preset, str) else preset, folder)
    model = random_model(cfg, device, dtype, seed=seed)
    proc = ImageProcessor(size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    return PaliGemma(model, tok, proc, name=f"{cfg.name}-random")


def stop_process(proc, grace_s: float = 10.0) -> None:
    """End a server process the tests or a probe started: SIGTERM (it drains), then SIGKILL after `grace_s`."""
    import signal
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
