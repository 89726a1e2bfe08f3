"""`TrainConfig`: every fine-tuning knob in one dataclass, loaded from YAML with `key=value`
overrides (what `palikit train CONFIG.yaml lr=1e-4 mode=lora` passes through).

Values are converted to the field's declared type (`"1e-4"` -> float, `"true"` -> bool,
`"none"` -> None for optional fields, `"a,b"` -> list); an unknown key is an error that lists the
known ones, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MODES = ("full", "attention", "lora", "qlora")
LOSSES = ("big_vision", "hf")

# Gemma decoder attention projections (what the colab trains and the default LoRA target).
ATTENTION_REGEX = r"language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


class ConfigError(ValueError):
    """A bad key or value in a training config."""


@dataclass
class TrainConfig:
    # ---- what to train, on what
    model: str = "demo"  # Hub-layout folder (config.json + safetensors), big_vision .npz, or demo (the bundled demo model)
    final_logit_softcap: str | float | None = None  # PaliGemma 2's final-logit soft-cap while training: None = off (the PaliGemma 2 report's transfer stage; the export records it), auto = the checkpoint's convention, or a number
    tokenizer: str | None = None  # tokenizer.json; default: <model folder>/tokenizer.json
    train_data: str = ""  # .jsonl (big_vision / Roboflow export) or COCO annotation .json
    val_data: str | None = None  # validation data (same formats): val_loss, the task metric and the best checkpoint come from it
    data_format: str = "auto"  # auto | jsonl | coco
    coco_images: str | None = None  # image folder for COCO files (default: the json's folder)
    coco_task: str = "detect"  # detect | segment
    coco_include_absent: bool = False  # list every category in the prefix (absent -> no boxes)
    mask_codec: str | None = None  # vae-oid.npz for coco_task=segment
    tasks: list[str] | None = None  # keep only examples of these tasks (JSONL "task" field; COCO: coco_task), train and val
    strict_data: bool = True  # True: a bad line raises; False: skipped and reported
    output_dir: str = "runs/finetune"  # checkpoints/, final/ (Hub layout), adapter/ (PEFT, LoRA modes), loss_curve.png
    # ---- what is trainable
    mode: str = "full"  # full | attention | lora | qlora (4-bit NF4 decoder + LoRA, needs bitsandbytes)
    freeze_vision: bool = False  # SigLIP tower + projector (big_vision's img/*)
    freeze_decoder: bool = False  # Gemma decoder incl. embeddings (big_vision's llm/*)
    lora_rank: int = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale = lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: str = ATTENTION_REGEX  # regex (full match on module names), comma-separated names, or all-linear (every Linear of the decoder; the vision tower is not included)
    # ---- optimisation
    optimizer: str = "auto"  # auto (sgd for mode=attention, as the reference notebook; else adamw) | adamw | sgd
    lr: float = 1e-5  # peak learning rate (linear warmup, then cosine decay to 0)
    weight_decay: float = 0.0  # decoupled (AdamW) / L2 (SGD) weight decay
    weight_decay_on: str = "all"  # all | kernels (big_vision: Linear/Conv weights only, no norms/biases/embeddings)
    label_smoothing: float = 0.0  # training loss only; the reported val loss is the plain NLL
    beta1: float = 0.9  # AdamW
    beta2: float = 0.999  # AdamW
    momentum: float = 0.0  # sgd only
    batch_size: int = 8  # global examples per optimizer step (all ranks, all accumulation steps)
    grad_accum: int = 1  # micro-batches per step (same gradient as one big batch)
    epochs: float = 1.0  # passes over train_data (fractions allowed)
    max_steps: int | None = None  # overrides epochs
    warmup: float = 0.05  # fraction of steps (< 1) or a number of steps (>= 1)
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    loss: str = "big_vision"  # big_vision (per-example mean, then batch mean) | hf (mean over tokens)
    max_len: int | None = None  # text tokens per example ([BOS] .. [EOS]); longer ones are cut
    pad_to_max_len: bool = False  # pad every batch to max_len (fixed shapes) instead of the longest
    cache_images: bool = False  # keep preprocessed pixels in RAM after first use (3*S*S*4 bytes per image file)
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    fsdp: bool = False  # under torchrun: shard params, grads and optimizer state over the ranks (FSDP2)
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:1
    seed: int = 0  # data order and initialisation
    # ---- bookkeeping
    log_every: int = 10  # steps between loss lines
    eval_every: int = 0  # steps; 0 = only at the end (when val_data is set)
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2  # step checkpoints kept (the best one is always kept too)
    metric: str | None = None  # "package.module:function" called as fn(model, val_examples, trainer)
    task_metric: bool = True  # at every eval, answer a val sample and score it: exact_match (text), detect_map (detect/segment boxes), caption_cider
    task_metric_samples: int = 64  # val examples answered for the task metric (spread over the val set)
    collapse_warn: float = 0.5  # warn when one answer is given for more than this fraction of a task's sample; 0 disables
    plateau_patience: int = 3  # warn when val_loss has not improved (by 0.1%) for this many evals; 0 disables
    best_metric: str = "val_loss"  # what picks the best checkpoint (val_loss, exact_match, detect_map, ... or a metric hook's key)
    best_mode: str = "min"  # min | max
    resume: bool = True  # continue from the latest complete checkpoint in output_dir
    progress: bool = True  # rich progress bar
    plot: bool = True  # loss_curve.png in output_dir
    export_dtype: str | None = None  # dtype of the final Hub export (default: the training dtype)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be one of {', '.join(allowed)}")

        one_of("mode", MODES)
        one_of("loss", LOSSES)
        one_of("optimizer", ("auto", "adamw", "sgd"))
        one_of("data_format", ("auto", "jsonl", "coco"))
        one_of("coco_task", ("detect", "segment"))
        one_of("precision", ("auto", "fp32", "bf16"))
        one_of("best_mode", ("min", "max"))
        one_of("weight_decay_on", ("all", "kernels"))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.collapse_warn <= 1.0:
            raise ConfigError(f"collapse_warn must be in [0, 1] (a fraction of the sample), got {self.collapse_warn}")
        if self.plateau_patience < 0:
            raise ConfigError(f"plateau_patience must be >= 0 (0 disables the warning), got {self.plateau_patience}")
        for name in ("batch_size", "grad_accum", "lora_rank", "keep_last", "task_metric_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.pad_to_max_len and not self.max_len:
            raise ConfigError("pad_to_max_len=true needs max_len")

    @property
    def optimizer_reason(self) -> str:
        """One line for the log: which optimizer and why."""
        if self.optimizer != "auto":
            return f"optimizer {self.optimizer} (optimizer={self.optimizer})"
        if self.mode == "attention":
            return ("optimizer sgd: mode=attention uses plain SGD, the reference fine-tuning notebook's choice "
                    "(optimizer=adamw to change)")
        return f"optimizer adamw (the default for mode={self.mode})"

    @property
    def optimizer_name(self) -> str:
        if self.optimizer != "auto":
            return self.optimizer
        return "sgd" if self.mode == "attention" else "adamw"

    # ------------------------------------------------------------------ loading
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config") -> TrainConfig:
        d = dict(d or {})
        hints = typing.get_type_hints(cls)
        unknown = [k for k in d if k not in hints]
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(cls.field_names())}")
        values = {k: _coerce(k, v, hints[k]) for k, v in d.items()}
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, raw = item.split("=", 1)
            key = key.strip()
            if key not in hints:
                raise ConfigError(f"override {item!r}: unknown key {key!r}; known keys: {', '.join(cls.field_names())}")
            tp = hints[key]
            stringy = tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                    and str in typing.get_args(tp))
            # text fields take the raw text (a regex like "[qv]_proj" must not become a YAML list)
            values[key] = _coerce(key, raw.strip() if stringy else _parse_scalar(raw), tp)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        path = Path(path)
        try:
            d = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"No config file at {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(d).__name__}")
        return cls.from_dict(d, overrides, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _parse_scalar(raw: str):
    raw = raw.strip()
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def _coerce(key: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(key, v, inner) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            s = str(value).strip().lower()
            if s in ("true", "yes", "on", "1"):
                return True
            if s in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(str(value).strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if value is None or isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot use {value!r} as {getattr(tp, '__name__', tp)}") from None
    return value


# ------------------------------------------------------------------------------------ docs
def recipe_keys() -> list[dict[str, str]]:
    """Every TrainConfig key with its type, default, description and section, read from the class
    itself (field defaults + the comment on the field's line + the `# ----` header above it), so
    `palikit train --help`, `--keys` and the README never drift from the code."""
    import inspect
    import io
    import tokenize

    try:
        src = inspect.getsource(TrainConfig)
    except (OSError, TypeError):  # no source shipped: defaults and types only
        src = ""
    lines = src.splitlines()
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    where, section = {}, ""
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("# ----"):
            section = stripped.lstrip("#- ").strip()
        elif (name := stripped.split(":", 1)[0]) in TrainConfig.field_names() and line.startswith("    " + name):
            where[name] = (comments.get(i, ""), section)
    rows = []
    for f in dataclasses.fields(TrainConfig):
        desc, sec = where.get(f.name, ("", ""))
        rows.append({"key": f.name, "type": str(f.type), "default": _show(f.default), "help": desc, "section": sec})
    return rows


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else '""'


def recipe_keys_text() -> str:
    """The keys as plain text (for `palikit train --keys` and the --help epilog)."""
    out, section = [], None
    for r in recipe_keys():
        if r["section"] != section:
            section = r["section"]
            out.append(f"{section}:" if section else "")
        out.append(f"  {r['key']}={r['default']}  {r['help']}".rstrip())
    return "\n".join(out)


def recipe_keys_markdown() -> str:
    """The keys as a Markdown table per section (README, notes/recipe-keys.md)."""
    out, section = [], None
    for r in recipe_keys():
        if r["section"] != section:
            section = r["section"]
            out += ["", f"**{section}**", "", "| key | default | meaning |", "|---|---|---|"]
        default = r["default"].replace("|", "\\|")
        out.append(f"| `{r['key']}` | `{default}` | {r['help'].replace('|', '/')} |")
    return "\n".join(out).strip() + "\n"


if __name__ == "__main__":  # python -m palikit.train.config > notes/recipe-keys.md
    print(recipe_keys_markdown(), end="")
