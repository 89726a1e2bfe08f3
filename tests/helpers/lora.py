"""LoRA adapters for the multi-LoRA tests, written by peft itself (`PeftModel.save_pretrained` on
transformers' PaliGemma built from a checkpoint folder), with random non-zero A and B."""

from __future__ import annotations

from pathlib import Path

import torch

# peft target_modules regexes over transformers 5's module names
DECODER = r".*language_model.*\.({})"
TOWER = r".*vision_tower.*\.({})"
PROJECTOR = r".*multi_modal_projector\.linear"


def targets(decoder: str = "", tower: str = "", projector: bool = False) -> str:
    parts = [DECODER.format(decoder)] if decoder else []
    parts += [TOWER.format(tower)] if tower else []
    parts += [PROJECTOR] if projector else []
    return "|".join(parts)


def write_peft_adapter(base_dir, folder, *, r: int, alpha: float, target_modules: str, seed: int = 0,
                       std: float = 0.15) -> Path:
    """A PEFT LoRA adapter folder for the checkpoint at `base_dir` with random weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import PaliGemmaForConditionalGeneration

    hf = PaliGemmaForConditionalGeneration.from_pretrained(base_dir, attn_implementation="eager")
    peft_model = get_peft_model(hf, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules,
                                               lora_dropout=0.0, bias="none"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    folder = Path(folder)
    peft_model.save_pretrained(folder)
    return folder
