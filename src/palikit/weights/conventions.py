"""Per-checkpoint conventions where PaliGemma 2's two references disagree: the final-logit soft-cap
and Gemma 2's sliding window. Each is decided at load time from what the checkpoint says and set as
a plain config value (`TextConfig.final_logit_softcapping`, `TextConfig.sliding_window`); the model
code only reads the config.

Final soft-cap (`tanh(logits / 30) * 30`), the evidence:
- The PaliGemma 2 report (arXiv 2412.03555, training stages, as public summaries state it) applies
  Gemma 2's logit soft-capping in pretraining stages 1 and 2 and not in stage 3, the transfers, where
  it hurts. So `pt` checkpoints were trained with the cap; `mix` and `ft-*` transfers without it.
- big_vision's PaliGemma path never applies it (`compute_logits` in
  `big_vision/models/proj/paligemma/gemma_bv.py` returns before the cap of `models/ppp/gemma.py`), and
  its PaliGemma 2 transfer configs and fine-tune notebook set `final_logits_softcap=0.0`.
- transformers >= 5.23 applies 30 to every PaliGemma 2 checkpoint (4.52-5.22 applied none).
Greedy text is unaffected (the cap is monotonic); probabilities, confidence scores, beam search and
sampling are.

The rule ("auto"), first match wins:
1. PaliGemma 1: no cap (Gemma 1 has none).
2. palikit's own export metadata (`"palikit"` block of config.json): the value it ran or trained with.
3. config.json sets `final_logit_softcapping` to null/0: off (a deliberate choice; HF's default is 30).
4. The checkpoint's name (Hub id, folder or file name): a fine-tune marker (`mix`, `ft`, `finetune`,
   `lora`, ...) -> off; `pt` -> 30.
5. Otherwise: a Hub-layout config.json's own value (what transformers applies); a big_vision `.npz`
   (which carries no config): off, big_vision's behaviour, with one log line saying so.

Sliding window: big_vision, which trained every released PaliGemma 2, has no sliding window (full
attention in every layer, every stage); HF configs carry `sliding_window=4096` inherited from Gemma 2,
which only bites past 4,096 tokens (896 px: 4,096 image tokens + text). "auto" = full attention unless
palikit's own metadata records a window. Both are overridable: a number, or None for off.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import PaliGemmaConfig, read_config_json

log = logging.getLogger("palikit.weights")

AUTO = "auto"
PT_FINAL_SOFTCAP = 30.0  # Gemma 2's value, what pretraining used
META_KEY = "palikit"  # config.json block written by palikit's export
_TRANSFER_MARKERS = {"mix", "ft", "finetune", "finetuned", "fine", "sft", "lora", "qlora", "transfer"}
_PT_MARKERS = {"pt", "pretrained", "pretrain"}
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")


def checkpoint_names(source: str | Path, hf_dict: dict[str, Any] | None = None) -> list[str]:
    """The names a checkpoint goes by, nearest first: the `.npz` stem or folder name (its parent's when
    that is a trainer's `final/` or a cache snapshot), the Hub repo of a Hugging Face cache snapshot
    (`models--google--paligemma2-3b-pt-224/snapshots/<sha>`), and config.json's `_name_or_path`."""
    p = Path(source)
    names = [p.stem if p.suffix in (".npz", ".json", ".safetensors") else p.name]
    if p.is_file() or names[0] in ("final", "") or _SNAPSHOT.match(names[0]):
        names.append(p.parent.name)
    names += [q.name.split("--")[-1] for q in p.parents if q.name.startswith("models--")]
    if hf_dict and isinstance(hf_dict.get("_name_or_path"), str):
        names.append(Path(hf_dict["_name_or_path"]).name)
    return [n for n in names if n and n not in ("final", "snapshots") and not _SNAPSHOT.match(n)]


def stage_from_names(names: list[str]) -> tuple[str | None, str | None]:
    """("pt" | "transfer" | None, the name that told). A name with both markers (a fine-tune of a
    `pt` checkpoint) is a transfer."""
    for name in names:
        tokens = set(re.split(r"[-_.\s]+", name.lower()))
        if tokens & _TRANSFER_MARKERS:
            return "transfer", name
        if tokens & _PT_MARKERS:
            return "pt", name
    return None, None


def parse_override(value: Any, what: str) -> str | float | None:
    """"auto" | a positive number | None/"none"/"off"/0 (off): the user's choice, as CLI text or Python."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "off", "0", "null")):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be 'auto', a positive number or None (off), got {value!r}") from None
    if x < 0:
        raise ValueError(f"{what} must be 'auto', a positive number or None (off), got {value!r}")
    return x or None


def _final_softcap(cfg: PaliGemmaConfig, fmt: str, names: list[str], hf_dict: dict | None,
                   override: Any) -> tuple[float | None, str]:
    choice = parse_override(override, "final_logit_softcap")
    if choice != AUTO:
        return choice, "set by the caller"
    if not cfg.text.post_norms:
        return None, "PaliGemma 1 has no final soft-cap"
    if fmt == "preset":
        return cfg.text.final_logit_softcapping, "the preset's value (an architecture, not a checkpoint)"
    meta = (hf_dict or {}).get(META_KEY) or {}
    if "final_logit_softcap" in meta:
        return meta["final_logit_softcap"] or None, "recorded by palikit's export (what it ran or trained with)"
    text = (hf_dict or {}).get("text_config") or {}
    if "final_logit_softcapping" in text and not text["final_logit_softcapping"]:
        return None, "config.json turns it off"
    stage, name = stage_from_names(names)
    if stage == "transfer":
        return None, f"transfer checkpoint ({name!r}): PaliGemma 2 transfers were trained without it"
    if stage == "pt":
        return text.get("final_logit_softcapping") or PT_FINAL_SOFTCAP, \
            f"pretrained checkpoint ({name!r}): trained with it"
    if fmt == "npz":
        log.warning("%s: cannot tell whether this PaliGemma 2 .npz is pretrained (pt) or a transfer; using "
                    "big_vision's convention, no final logit soft-cap (pass final_logit_softcap=30 for a pt "
                    "checkpoint)", names[0] if names else "npz")
        return None, "stage unknown: big_vision's default for an .npz (no cap)"
    return cfg.text.final_logit_softcapping, "stage unknown: config.json's value (what transformers applies)"


def _sliding_window(cfg: PaliGemmaConfig, fmt: str, hf_dict: dict | None, override: Any) -> tuple[int | None, str]:
    choice = parse_override(override, "sliding_window")
    if choice != AUTO:
        return (int(choice) if choice else None), "set by the caller"
    if not cfg.text.post_norms:
        return None, "PaliGemma 1 has none"
    if fmt == "preset":
        return cfg.text.sliding_window, "the preset's value"
    meta = (hf_dict or {}).get(META_KEY) or {}
    if "sliding_window" in meta:
        return meta["sliding_window"] or None, "recorded by palikit's export"
    if cfg.text.sliding_window:
        return None, (f"big_vision trained PaliGemma 2 with full attention; config.json's window "
                      f"{cfg.text.sliding_window} (inherited from Gemma 2) not applied")
    return None, "as big_vision trained PaliGemma 2"


def apply_conventions(cfg: PaliGemmaConfig, source: str | Path, *, fmt: str, hf_dict: dict | None = None,
                      final_logit_softcap: Any = AUTO, sliding_window: Any = AUTO) -> PaliGemmaConfig:
    """`cfg` with the final soft-cap and sliding window in force for this checkpoint (`fmt` "hf", "npz"
    or "preset"), and the reasons recorded in `cfg.conventions` (shown by `palikit info` and the
    export's model card)."""
    names = checkpoint_names(source, hf_dict)
    cap, cap_why = _final_softcap(cfg, fmt, names, hf_dict, final_logit_softcap)
    window, window_why = _sliding_window(cfg, fmt, hf_dict, sliding_window)
    text = replace(cfg.text, final_logit_softcapping=cap, sliding_window=window,
                   layer_types=cfg.text.layer_types if window else None)
    notes = (f"final logit soft-cap: {cap:g} ({cap_why})" if cap else f"final logit soft-cap: off ({cap_why})",
             f"sliding window: {window} ({window_why})" if window else f"sliding window: off, full attention ({window_why})")
    return replace(cfg, text=text, conventions=notes)


def config_from_json_file(path: str | Path, *, final_logit_softcap: Any = AUTO,
                          sliding_window: Any = AUTO) -> PaliGemmaConfig:
    """A checkpoint's config.json (or its folder) with the final soft-cap and sliding window in force
    for that checkpoint ("auto": decided from what it says; a number; None = off)."""
    d, path = read_config_json(path)
    cfg = PaliGemmaConfig.from_hf_dict(d, name=path.parent.name)
    return apply_conventions(cfg, path.parent, fmt="hf", hf_dict=d, final_logit_softcap=final_logit_softcap,
                             sliding_window=sliding_window)

