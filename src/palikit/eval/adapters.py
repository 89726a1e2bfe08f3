"""Several LoRA adapters in one `palikit eval` run (issue 34): the model loads once with its adapters
served unmerged (`PaliGemma.load_adapter`), and each adapter is evaluated as a model of its own
(`AdapterModel`: `predict_batch` with `adapter=`), one row / column of the combined report each,
beside the base model and any baselines.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class AdapterModel:
    """A PaliGemma seen through one of its loaded adapters: what `eval.evaluate` reads."""

    def __init__(self, pg, adapter: str, path: str | Path):
        self.pg, self.adapter, self.path = pg, adapter, Path(path)
        self.name = adapter

    def predict_batch(self, images, prompts, labels=None, **opts) -> list:
        return self.pg.predict_batch(images, prompts, labels=labels, adapter=self.adapter, **opts)

    def fingerprint(self) -> str:
        """The base weights' fingerprint plus the adapter file's: resuming never mixes two adapters."""
        h = hashlib.sha256(self.pg.fingerprint().encode())
        for f in sorted(self.path.iterdir()):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        return h.hexdigest()[:16]

    def __getattr__(self, name: str) -> Any:  # device, settings, ... as the PaliGemma's
        return getattr(self.pg, name)


def adapter_rank(path: str | Path) -> int:
    try:
        return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a PEFT LoRA adapter folder ({e})") from None


def adapter_models(pg, named: dict[str, str]) -> list[AdapterModel]:
    """Load `named` ({name: folder}) into `pg` unmerged, one slot each; their eval views."""
    if not named:
        return []
    pg.enable_adapters(max_loras=len(named), max_lora_rank=max(adapter_rank(p) for p in named.values()))
    for name, path in named.items():
        pg.load_adapter(name, path)
    return [AdapterModel(pg, name, path) for name, path in named.items()]
