"""Where a model's files are: a local Hub-layout folder, a big_vision `.npz` (plus a tokenizer), or a
Hub id resolved through `huggingface_hub` (its cache and offline mode honoured). Returns paths only;
loading is `hf.py` / `big_vision.py`'s job."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..assets import default_model
from ..config import PRESETS, PaliGemmaConfig
from ..tokenizer import TOKENIZER_FILES

CODEC_FILES = ("vae-oid.npz", "mask_codec.npz")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "vae-oid.npz"]


@dataclass
class ModelFiles:
    weights: Path  # folder (Hub layout) or .npz file
    format: str  # "hf" | "npz"
    tokenizer: Path | None
    preprocessor: Path | None  # folder holding preprocessor_config.json
    mask_codec: Path | None


def _first_existing(folder: Path, names) -> Path | None:
    for n in names:
        if (folder / n).exists():
            return folder / n
    return None


def resolve(model: str | os.PathLike | None, tokenizer=None, mask_codec=None, revision: str | None = None, *,
            need_tokenizer: bool = True) -> ModelFiles:
    """The files of `model`: a local folder / `.npz`, a Hub id, or None / "demo" for the bundled demo
    model (`assets.default_model`). `need_tokenizer=False`: no tokenizer found is `tokenizer=None`
    (training with its own tokenizer), not an error."""
    model = default_model(model)
    path = Path(model).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
    elif _looks_like_hub_id(str(model)):
        folder = path = _download(str(model), revision)
    else:
        raise FileNotFoundError(
            f"Model {str(model)!r} is neither a local folder/file nor a Hub id like 'google/paligemma2-3b-mix-224'."
        )
    if path.is_dir():
        if not (path / "config.json").exists():
            npz = sorted(path.glob("*.npz"))
            npz = [p for p in npz if p.name not in CODEC_FILES]
            if len(npz) == 1:
                path = npz[0]
            else:
                raise FileNotFoundError(_not_a_model(path))
    fmt = "npz" if path.suffix == ".npz" else "hf"
    tok = Path(tokenizer) if tokenizer else _first_existing(folder, TOKENIZER_FILES)
    if tok is None and need_tokenizer:
        raise FileNotFoundError(
            f"No tokenizer found next to {path} (looked for {', '.join(TOKENIZER_FILES)}); pass tokenizer=... / "
            "--tokenizer with the PaliGemma tokenizer.json or tokenizer.model."
        )
    codec = Path(mask_codec) if mask_codec else _first_existing(folder, CODEC_FILES)
    pre = folder if (folder / "preprocessor_config.json").exists() else None
    return ModelFiles(path, fmt, tok, pre, codec)


def _not_a_model(path: Path) -> str:
    """What to do with a folder that holds no model: a trainer checkpoint, a run folder, anything else."""
    if (path / "trainable.safetensors").is_file() and (path / "state.json").is_file():
        run = path.parent.parent
        return (f"{path} is a training checkpoint (the trained parameters and optimizer state only), not a model "
                f"folder: turn it into one with `palikit export {path} --out DIR`"
                + (f", or use the run's exported model {run / 'final'}" if (run / "final").is_dir() else "") + ".")
    if (path / "checkpoints").is_dir() or (path / "final" / "config.json").is_file():
        return (f"{path} is a training run folder: point --model at {path / 'final'} (its exported model), or turn a "
                f"checkpoint into a model with `palikit export {path} --out DIR`.")
    return (f"{path} has no config.json (Hub layout) and no single big_vision .npz; point --model at the checkpoint "
            "folder or the .npz file.")


def image_size_of(files: ModelFiles) -> int:
    """The checkpoint's input resolution, from its config.json or its `.npz` array shapes (no weights read)."""
    if files.format == "npz":
        from .big_vision import npz_image_size

        return npz_image_size(files.weights)
    return PaliGemmaConfig.from_json_file(files.weights).vision.image_size


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError("Loading by Hub id needs huggingface_hub: pip install huggingface_hub") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one actionable message
        try:  # a cached copy may exist even when the network is down
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True))
        except Exception:  # noqa: BLE001
            pass
        raise FileNotFoundError(
            f"Could not get {repo_id!r}: it is not in the local Hugging Face cache and the Hub could not be reached "
            f"({type(e).__name__}). Download it where there is network (`hf download {repo_id}`; Google's PaliGemma "
            "repos are gated: accept the license on the Hub and log in first), then copy the folder here and pass "
            "its path, or set HF_HOME to a cache that has it."
        ) from None


def get_config(name_or_path: str | Path, **conventions: Any) -> PaliGemmaConfig:
    """A preset name (`palikit info --list`), a folder / config.json of a Hub-layout checkpoint, or a
    big_vision `.npz` (read from its array headers); `conventions`: final_logit_softcap= /
    sliding_window= overrides (see `apply_conventions`)."""
    from .conventions import apply_conventions, config_from_json_file

    key = str(name_or_path)
    if key in PRESETS:
        cfg = PRESETS[key]
        return apply_conventions(cfg, key, fmt="preset", **conventions) if conventions else cfg
    path = Path(key)
    if path.suffix == ".npz" and path.is_file():
        from .big_vision import npz_config

        return npz_config(path, **conventions)
    if path.exists():
        return config_from_json_file(path, **conventions)
    raise ValueError(
        f"Unknown model {key!r}: not a preset ({', '.join(sorted(PRESETS))}) and no such file or folder."
    )
