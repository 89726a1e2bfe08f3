"""LoRA adapters on disk in PEFT's format: reading, writing, and merging one into a loaded model.

A saved adapter is a folder with
- `adapter_config.json`: peft's own `LoraConfig.save_pretrained` output (peft_type LORA, r, lora_alpha,
  lora_dropout, target_modules = the exact transformers module names that carry an adapter, ...),
- `adapter_model.safetensors`: `base_model.model.<transformers module>.lora_A.weight` / `lora_B.weight`,
  the keys `PeftModel.save_pretrained` writes for `PaliGemmaForConditionalGeneration` (transformers 5:
  `model.language_model.*`, `model.vision_tower.*`, `model.multi_modal_projector.*`).

So `PeftModel.from_pretrained(PaliGemmaForConditionalGeneration.from_pretrained(base), folder)` loads it,
and palikit loads it back, mapping every published key layout onto palikit's module names
(`weights.layouts.internal_key`): merged into the weights for inference (`merge_adapter`, no peft needed:
`PaliGemma.from_pretrained(adapter=...)`, `--adapter`), or injected as trainable LoRA layers
(`train.modes.load_lora_adapter`). palikit's earlier format (`adapter.safetensors` with palikit names)
still loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")


def hf_module_name(name: str) -> str:
    """palikit module name -> the module's name inside transformers 5's PaliGemmaForConditionalGeneration."""
    from ..weights.layouts import to_layout

    return to_layout(name, "transformers")


def palikit_module_name(name: str) -> str:
    """A module name of any published layout (transformers 4.x / 5.x, with or without PEFT's prefix)
    -> palikit's."""
    from ..weights.layouts import internal_key

    name = name.removeprefix(PEFT_PREFIX)
    return internal_key(name)


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def save_lora_adapter(model: nn.Module, folder: str | Path, lora_config: dict, base_model: str | None = None) -> Path:
    """Write the adapters of `model` (LoRA injected by `apply_mode`) in PEFT's format, atomically.
    `lora_config`: rank, alpha, dropout (as in TrainConfig)."""
    from peft import LoraConfig
    from safetensors.torch import save as st_save

    from ..fileio import atomic_dir

    layers = _lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA adapters to save (mode=lora or qlora injects them)")
    tensors = {}
    for name, layer in layers.items():
        for kind in ("lora_A", "lora_B"):
            w = getattr(layer, kind)["default"].weight
            tensors[f"{PEFT_PREFIX}{hf_module_name(name)}.{kind}.weight"] = w.detach().float().contiguous().cpu()
    cfg = LoraConfig(r=int(lora_config["rank"]), lora_alpha=float(lora_config["alpha"]),
                     lora_dropout=float(lora_config.get("dropout", 0.0)), bias="none",
                     target_modules=sorted(hf_module_name(n) for n in layers),
                     base_model_name_or_path=base_model)

    def fill(tmp: Path):
        cfg.save_pretrained(tmp)  # peft's own adapter_config.json
        (tmp / WEIGHTS_FILE).write_bytes(st_save(tensors, metadata={"format": "pt"}))

    return atomic_dir(Path(folder), fill)


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config dict, {palikit module name: {"lora_A": A, "lora_B": B}}) of a PEFT-format folder (or
    palikit's earlier `adapter.safetensors` format). Clear errors for what palikit cannot load."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"adapter={folder}: no {CONFIG_FILE} there (expected a PEFT LoRA adapter folder "
                                f"with {CONFIG_FILE} and {WEIGHTS_FILE}, e.g. OUTPUT_DIR/adapter)")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    legacy = folder / "adapter.safetensors"
    if "targets" in cfg and legacy.is_file():  # palikit's earlier format: palikit names, rank / alpha keys
        cfg = {"peft_type": "LORA", "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg.get("dropout", 0.0)}
        raw = load_file(legacy)
    else:
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{folder}: peft_type {cfg.get('peft_type')!r}; palikit loads LoRA adapters only")
        for key in ("use_dora", "use_rslora"):
            if cfg.get(key):
                raise ValueError(f"{folder}: {key}=true adapters are not supported by palikit; merge it with peft first")
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise ValueError(f"{folder}: per-module {key} is not supported by palikit; merge it with peft first")
        if cfg.get("modules_to_save"):
            raise ValueError(f"{folder}: modules_to_save {cfg['modules_to_save']} (fully trained modules) are not "
                             "supported; palikit loads LoRA A/B weights only")
        if not (folder / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"{folder}: {WEIGHTS_FILE} is missing")
        raw = load_file(folder / WEIGHTS_FILE)
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise ValueError(f"{folder}: unexpected tensor {key!r} (only lora_A / lora_B weights are supported)")
        layers.setdefault(palikit_module_name(m["module"]), {})[m["kind"]] = t
    bad = [n for n, d in layers.items() if set(d) != {"lora_A", "lora_B"}]
    if bad:
        raise ValueError(f"{folder}: modules with only one of lora_A / lora_B: {bad[:3]}")
    return cfg, layers


def adapted_linears(model: nn.Module, folder: str | Path, cfg: dict, layers: dict) -> dict[str, nn.Linear]:
    """{module name: the model's nn.Linear} for every module the adapter has weights for; ValueError
    when the adapter targets a module the model lacks or its A / B shapes do not fit (another base
    model, another rank)."""
    own = dict(model.named_modules())
    from ..model.quant import Int4Linear, Int8Linear

    unknown = [n for n in layers if n not in own or not isinstance(own[n], (nn.Linear, Int8Linear, Int4Linear))]
    if unknown:
        raise ValueError(f"{folder}: the adapter targets modules this model does not have as Linear layers: "
                         f"{unknown[:3]} (an adapter for another base model?)")
    r = int(cfg["r"])
    for name, d in layers.items():
        lin = own[name]
        want = {"lora_A": (r, lin.in_features), "lora_B": (lin.out_features, r)}
        for kind, t in d.items():
            if tuple(t.shape) != want[kind]:
                raise ValueError(f"{folder}: {name}.{kind} has shape {tuple(t.shape)}, the model expects "
                                 f"{want[kind]} (an adapter for another base model, or another rank?)")
    return {n: own[n] for n in layers}


class LoRADelta(nn.Module):
    """An adapter kept as an unmerged delta over a base layer whose weight cannot take it (an int8 /
    int4 `model.quant` layer): base(x) + scale * B(A(x)). `base` is any Linear-like module."""

    def __init__(self, base: nn.Module, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float):
        super().__init__()
        self.base, self.scale = base, scale
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.Parameter(lora_A, requires_grad=False)  # [r, in]
        self.lora_B = nn.Parameter(lora_B, requires_grad=False)  # [out, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = nn.functional.linear(nn.functional.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return self.base(x) + (delta * self.scale).to(x.dtype)


def merge_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Fold a LoRA adapter into the base weights, in place: W += lora_alpha / r * B @ A for every
    adapted Linear (peft's merge). The model keeps its plain modules: what inference wants. A
    quantized layer (`model.quant`) keeps the adapter as an unmerged `LoRADelta` instead (folding
    into integer weights would re-quantize it away)."""
    from ..model.quant import QUANT_MODULES

    cfg, layers = read_adapter(folder)
    linears = adapted_linears(model, folder, cfg, layers)
    scale = float(cfg["lora_alpha"]) / int(cfg["r"])
    with torch.no_grad():
        for name, lin in linears.items():
            A, B = layers[name]["lora_A"].float(), layers[name]["lora_B"].float()  # [r, in], [out, r]
            if isinstance(lin, QUANT_MODULES):
                dev = lin.device
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        LoRADelta(lin, A.to(dev), B.to(dev), scale))
                continue
            lin.weight.add_(((B @ A) * scale).to(lin.weight.device, lin.weight.dtype))
    return model
