"""`TrainConfig`: every fine-tuning knob in one declarative dataclass, loaded from YAML with
`key=value` overrides (what `palikit train CONFIG.yaml lr=1e-4 mode=lora` passes through).

Each field's annotation is its whole contract: the type (`"1e-4"` -> float, `"true"` -> bool, `"none"`
-> None for optional fields, `"a,b"` -> list), `Literal[...]` choices and `Annotated[..., Range(...)]`
bounds. One validator (`TrainConfig.validate`, run on every construction) converts and checks every
field from its annotation, plus the one rule between fields (`pad_to_max_len` needs `max_len`).
Errors name the field and, from YAML, the file and line (`c.yaml line 3: batch_size: cannot use
'eight' as int`), or the override that set it; an unknown or repeated key is an error, never
silently ignored. YAML aliases (`*name`) are refused with their line: a 1 KB recipe of nested aliases
("billion laughs") would otherwise expand to gigabytes, and no recipe key needs one.

Why dataclasses and not pydantic: pydantic is in the `serve` extra only, and training is core; the
field comments are the generated recipe-keys table (`recipe_keys`), which reads the class source.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

Mode = Literal["full", "attention", "lora", "qlora"]
Loss = Literal["big_vision", "hf"]

# Gemma decoder attention projections (what the colab trains and the default LoRA target).
ATTENTION_REGEX = r"language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"


class ConfigError(ValueError):
    """A bad key or value in a training config; `key` is the field it is about (None: the whole file)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Range:
    """A bound on a numeric field, declared in its annotation: `Annotated[float, Range(ge=0, lt=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""  # said after the bound in the error

    def check(self, key: str, v: float) -> None:
        ok = ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
              and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))
        if not ok:
            note = f" ({self.note})" if self.note else ""
            raise ConfigError(f"{key} must be {self._text()}{note}, got {v}", key)

    def _text(self) -> str:
        lo = (self.ge, "[", ">=") if self.ge is not None else (self.gt, "(", ">")
        hi = (self.le, "]", "<=") if self.le is not None else (self.lt, ")", "<")
        if lo[0] is not None and hi[0] is not None:
            return f"in {lo[1]}{lo[0]:g}, {hi[0]:g}{hi[1]}"
        bound = lo if lo[0] is not None else hi
        return f"{bound[2]} {bound[0]:g}"


Count = Annotated[int, Range(ge=1)]


@dataclass
class TrainConfig:
    # ---- what to train, on what
    model: str = "demo"  # Hub-layout folder (config.json + safetensors), big_vision .npz, or demo (the bundled demo model)
    final_logit_softcap: str | float | None = None  # PaliGemma 2's final-logit soft-cap while training: None = off (the PaliGemma 2 report's transfer stage; the export records it), auto = the checkpoint's convention, or a number
    tokenizer: str | None = None  # tokenizer.json; default: <model folder>/tokenizer.json
    train_data: str = ""  # .jsonl (big_vision / Roboflow export) or COCO annotation .json
    train_source: str | None = None  # instead of train_data: "package.module:function" called as fn(config) -> the training examples (a sequence; lab.demo.stream:shapes2_source makes fresh shapes v2 images on the fly)
    val_data: str | None = None  # validation data (same formats): val_loss, the task metric and the best checkpoint come from it
    data_format: Literal["auto", "jsonl", "coco"] = "auto"  # auto | jsonl | coco
    coco_images: str | None = None  # image folder for COCO files (default: the json's folder)
    coco_task: Literal["detect", "segment"] = "detect"  # detect | segment
    coco_include_absent: bool = False  # list every category in the prefix (absent -> no boxes)
    mask_codec: str | None = None  # vae-oid.npz for coco_task=segment
    tasks: list[str] | None = None  # keep only examples of these tasks (JSONL "task" field; COCO: coco_task), train and val
    val_fraction: Annotated[float, Range(ge=0, lt=1)] = 0.0  # without val_data: hold out this fraction of train_data's images (seeded) as the validation split; 0 = none
    strict_data: bool = True  # True: a bad line or an unreadable image raises (found up front, or saved and stopped at run time); False: skipped and reported
    preflight: Literal["warn", "strict", "off"] = "warn"  # the pre-flight table at the start (palikit check): warn | strict (a warning stops the run) | off
    output_dir: str = "runs/finetune"  # checkpoints/, final/ (Hub layout), adapter/ (PEFT, LoRA modes), loss_curve.png
    # ---- what is trainable
    mode: Mode = "full"  # full | attention | lora | qlora (4-bit NF4 decoder + LoRA, needs bitsandbytes)
    freeze_vision: bool = False  # SigLIP tower + projector (big_vision's img/*)
    freeze_decoder: bool = False  # Gemma decoder incl. embeddings (big_vision's llm/*)
    lora_rank: Count = 8  # LoRA r
    lora_alpha: float = 16.0  # LoRA scale = lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the LoRA input
    lora_targets: str = ATTENTION_REGEX  # regex (full match on module names), comma-separated names, or all-linear (every Linear of the decoder; the vision tower is not included)
    # ---- optimisation
    optimizer: Literal["auto", "adamw", "sgd"] = "auto"  # auto (sgd for mode=attention, as the reference notebook; else adamw) | adamw | sgd
    lr: Annotated[float, Range(gt=0)] = 1e-5  # peak learning rate (linear warmup, then cosine decay to 0)
    weight_decay: float = 0.0  # decoupled (AdamW) / L2 (SGD) weight decay
    weight_decay_on: Literal["all", "kernels"] = "all"  # all | kernels (big_vision: Linear/Conv weights only, no norms/biases/embeddings)
    label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0  # training loss only; the reported val loss is the plain NLL
    beta1: float = 0.9  # AdamW
    beta2: float = 0.999  # AdamW
    momentum: float = 0.0  # sgd only
    batch_size: Count = 8  # global examples per optimizer step (all ranks, all accumulation steps)
    grad_accum: Count = 1  # micro-batches per step (same gradient as one big batch)
    epochs: float = 1.0  # passes over train_data (fractions allowed)
    max_steps: Count | None = None  # overrides epochs
    max_minutes: Annotated[float, Range(gt=0)] | None = None  # wall-clock budget of the training loop: at the first step past it the run ends as at its last step (eval, checkpoint, final export) though the LR schedule spans every step; the same command again resumes for another budget
    warmup: float = 0.05  # fraction of steps (< 1) or a number of steps (>= 1)
    grad_clip: float = 1.0  # global-norm clip; 0 disables
    max_nonfinite_steps: Count = 3  # a step whose loss or gradient is NaN/inf is skipped (no update); this many in a row stop the run (exit 3, last finite checkpoint kept, nothing exported)
    loss: Loss = "big_vision"  # big_vision (per-example mean, then batch mean) | hf (mean over tokens)
    max_len: Count | None = None  # text tokens per example ([BOS] .. [EOS]); none = the model's limit (its card's max_text_tokens, else its context minus the image tokens)
    long_rows: Literal["refuse", "truncate"] = "refuse"  # an example longer than max_len: refuse (a data problem with its file and line) | truncate (cut the tail, as big_vision)
    pad_to_max_len: bool = False  # pad every batch to max_len (fixed shapes) instead of the longest
    cache_images: bool = False  # keep preprocessed pixels in RAM after first use (3*S*S*4 bytes per image file)
    data_workers: Annotated[int, Range(ge=0)] = 0  # processes that prepare the next steps' batches (images decoded or generated, tokens, pixels) while this one trains; 0 = in the training process
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    fsdp: bool = False  # under torchrun: shard params, grads and optimizer state over the ranks (FSDP2)
    device: str = "auto"  # auto (cuda when present, else cpu) | cpu | cuda | cuda:1
    seed: int = 0  # data order and initialisation
    # ---- bookkeeping
    log_every: int = 10  # steps between loss lines
    eval_every: int = 0  # steps; 0 = only at the end (when val_data is set)
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: Count = 2  # step checkpoints kept (the best one is always kept too)
    keep_best: bool = True  # with a validation metric: final/ is the best checkpoint by best_metric and last/ the last step; false: final/ is the last step
    metric: str | None = None  # "package.module:function" called as fn(model, val_examples, trainer)
    task_metric: bool = True  # at every eval, answer a val sample and score it: exact_match (text), detect_map (detect/segment boxes), caption_cider
    task_metric_samples: Count = 64  # val examples answered for the task metric (spread over the val set)
    collapse_warn: Annotated[float, Range(ge=0, le=1, note="a fraction of the sample")] = 0.5  # warn when one answer is given for more than this fraction of a task's sample; 0 disables
    plateau_patience: Annotated[int, Range(ge=0, note="0 disables the warning")] = 3  # warn when val_loss has not improved (by 0.1%), or a task metric stayed at 0, for this many evals; 0 disables
    best_metric: str = "val_loss"  # what picks the best checkpoint (val_loss, exact_match, detect_map, ... or a metric hook's key)
    best_mode: Literal["min", "max"] = "min"  # min | max
    early_stopping_patience: Annotated[int, Range(ge=0)] = 0  # stop when best_metric has not improved for this many evals (then as a last step: saved, exported); 0 = off
    resume: bool | Literal["force"] = True  # continue from the newest intact checkpoint in output_dir; a changed recipe is refused (the changed keys listed) unless resume=force
    progress: bool = True  # rich progress bar
    plot: bool = True  # loss_curve.png in output_dir
    export_dtype: str | None = None  # dtype of the final Hub export (default: the training dtype)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """The one validator: every field converted to and checked against its annotation, then the
        rule between fields. Raises ConfigError naming the field."""
        hints = _hints()
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name), hints[f.name]))
        if self.pad_to_max_len and not self.max_len:
            raise ConfigError("pad_to_max_len=true needs max_len", "pad_to_max_len")
        if self.train_source and self.train_data:
            raise ConfigError("set train_data (files) or train_source (a hook that makes the examples), not both",
                              "train_source")
        if self.val_fraction and (self.val_data or self.train_source):
            raise ConfigError("val_fraction holds out part of train_data files: not with val_data (already a "
                              "validation split) or train_source", "val_fraction")

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
    def from_dict(cls, d: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "config",
                  lines: dict[str, int] | None = None) -> TrainConfig:
        """`d` (e.g. parsed YAML; `lines`: the line of each key in `source`) with `key=value` overrides
        on top. A bad value's error says where it was set: `source line N`, or the override."""
        values, where = dict(d or {}), {k: f"{source} line {n}" for k, n in (lines or {}).items()}
        hints = _hints()
        unknown = [k for k in values if k not in hints]
        if unknown:
            raise ConfigError(f"{source}: {', '.join(_unknown(k, lines) for k in unknown)}; "
                              f"known keys: {', '.join(cls.field_names())}")
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value")
            key, raw = (part.strip() for part in item.split("=", 1))
            if key not in hints:
                raise ConfigError(f"override {item!r}: {_unknown(key)}; known keys: {', '.join(cls.field_names())}")
            # text fields take the raw text (a regex like "[qv]_proj" must not become a YAML list)
            values[key], where[key] = (raw if _is_text(hints[key]) else _parse_scalar(raw)), f"override {item!r}"
        try:
            return cls(**values)
        except ConfigError as e:
            at = where.get(e.key, source if e.key in values else None)
            raise (ConfigError(f"{at}: {e}", e.key) if at else e) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
        path = Path(path)
        try:
            text = path.read_text()
            _refuse_aliases(text, path)
            d = yaml.safe_load(text) or {}
        except FileNotFoundError:
            raise ConfigError(f"No config file at {path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value, got {type(d).__name__}")
        return cls.from_dict(d, overrides, source=str(path), lines=_key_lines(text, path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


@functools.cache
def _hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig, include_extras=True)


def _unknown(key: str, lines: dict[str, int] | None = None) -> str:
    """`'lern_rate' (line 3; did you mean 'lr'?)` for an error about an unknown key."""
    close = difflib.get_close_matches(key, TrainConfig.field_names(), n=1)
    notes = ([f"line {lines[key]}"] if lines and key in lines else []) + ([f"did you mean {close[0]!r}?"] if close else [])
    return f"unknown key {key!r}" + (f" ({'; '.join(notes)})" if notes else "")


def _refuse_aliases(text: str, path: Path) -> None:
    """A YAML alias (`*name`) anywhere in the recipe is an error with its line, found from the event
    stream before anything is built (nested aliases expand exponentially: "billion laughs")."""
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(f"{path} line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not "
                              "allowed in a recipe; write the value out")


def _key_lines(text: str, path: Path) -> dict[str, int]:
    """The 1-based line of each top-level key; a key given twice is an error (YAML keeps the last)."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    lines: dict[str, int] = {}
    for k, _ in node.value if isinstance(node, yaml.MappingNode) else ():
        n = k.start_mark.line + 1
        if k.value in lines:
            raise ConfigError(f"{path} line {n}: {k.value} is already set on line {lines[k.value]}; keep one", k.value)
        lines[k.value] = n
    return lines


def _is_text(tp) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _parse_scalar(raw: str):
    try:
        return yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw


def _convert(key: str, value, tp):
    """`value` as the annotation `tp` says: Annotated bounds, Literal choices, Optional / Union,
    list[...], and bool / int / float / str from YAML values or override text."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        value = _convert(key, value, base)
        for rule in rules:
            rule.check(key, value)
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" if not value else "on") in choices:  # YAML reads `off` as false
            value = "on" if value else "off"
        if value not in choices:
            raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}", key)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))):
            return None
        errors = []
        for a in args:
            if a is not type(None):
                try:
                    return _convert(key, value, a)
                except ConfigError as e:
                    errors.append(e)
        if len(errors) > 1:  # say every form the value may take: "resume: use true, false or force, not 'forc'"
            forms = [", ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal
                     else getattr(a, "__name__", str(a)) for a in args if a is not type(None)]
            raise ConfigError(f"{key}: cannot use {value!r}; use {' or '.join(forms)}", key)
        raise errors[0] if errors else ConfigError(f"{key}: bad value {value!r}", key)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        return [_convert(key, v, inner) for v in (value if isinstance(value, (list, tuple)) else [value])]
    try:
        return _scalar(value, tp)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: cannot use {value!r} as {getattr(tp, '__name__', tp)}", key) from None


def _scalar(value, tp):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        s = str(value).strip().lower()
        if s in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return s in ("true", "yes", "on", "1")
        raise ValueError
    if tp in (int, float) and isinstance(value, bool):
        raise ValueError
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value) if isinstance(value, float) else int(str(value).strip())
    if tp is float:
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
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
