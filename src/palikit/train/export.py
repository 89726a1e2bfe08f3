"""Trained weights out as loadable models: the end of a fine-tuning run and `palikit export CHECKPOINT`.

- `export_run(trainer)`: `output_dir/final` in the Hub layout (LoRA merged; the adapter saved beside it
  in PEFT format as `output_dir/adapter`), with the tokenizer, preprocessor and mask-codec files copied
  so the folder is a complete palikit / transformers checkpoint. With a validation metric and
  `keep_best` (the default), `final/` is the BEST checkpoint by `best_metric` and `last/` the last step
  (a link to `final` when they are the same step).
- `export_checkpoint(step_folder, out)`: any trainer checkpoint (`checkpoints/step-N`: only the
  trainable parameters, plus the recipe it was written with) -> the same Hub folder, the base model
  read again from the recipe's `model`.
Every folder is written atomically; NaN / inf weights are never exported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..fileio import atomic_dir
from ..tokenizer import TOKENIZER_FILES
from . import checkpoint as ck
from .loading import load_model
from .modes import apply_mode, has_lora, merge_lora


def export_run(tr) -> Path:
    """The end of `Trainer.fit`: `final/` (the best checkpoint when `keep_best` and a validation metric
    picked one at another step than the last) and `last/`. Returns `final/`."""
    final, last = tr.out / "final", tr.out / "last"
    best = tr.best
    best_dir = tr.out / ck.CKPT_DIR / f"{ck.PREFIX}{best['step']:08d}" if best else None
    if tr.cfg.keep_best and best and best["step"] != tr.step and best_dir.is_dir():
        given = getattr(tr, "model_given", False) and not tr.fsdp
        best_model = _copy_at(tr, best_dir) if given and tr.is_main else None  # before last/ merges LoRA in place
        _remove(last)
        _export_live(tr, last, adapter_dir=None)
        if tr.is_main:
            tr.log(f"last/: the last step ({tr.step})")
            if best_model is not None:
                write_model(best_model, final, tr.cfg, tokenizer=getattr(tr.collator.tokenizer, "path", None),
                            adapter_dir=tr.out / "adapter", log=tr.log, device=tr.device)
            else:
                export_checkpoint(best_dir, final, adapter_dir=tr.out / "adapter", log=tr.log,
                                  dtype=tr.cfg.export_dtype, model=tr.cfg.model)
            tr.log(f"final/: the best checkpoint by {best['metric']} ({best['value']:.5g} at step {best['step']}; "
                   "keep_best=false exports the last step instead)")
        return final
    _export_live(tr, final, adapter_dir=tr.out / "adapter")
    if tr.cfg.keep_best and tr.is_main:
        _remove(last)
        os.symlink("final", last)  # the last step is the best one (or nothing picked a best): one copy
    return final


def _copy_at(tr, checkpoint: Path):
    """A copy of the trainer's model (built from an object, not a path) holding `checkpoint`'s weights."""
    import copy

    model = copy.deepcopy(tr.model)
    ck.load_checkpoint(checkpoint, model, restore_rng=False)
    return model


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _export_live(tr, dest: Path, adapter_dir: Path | None) -> None:
    """The trainer's current weights to `dest` (LoRA merged in place; the adapter first saved to
    `adapter_dir`). Under FSDP the full weights are gathered (a collective) and rank 0 writes."""
    model = tr.model
    cfg = tr.cfg
    if tr.fsdp:  # gather the full weights (collective), then export an unsharded copy on rank 0
        from .fsdp import full_model_state

        full = full_model_state(tr.model)
        if not tr.is_main:
            return
        model = load_model(cfg.model, final_logit_softcap=cfg.final_logit_softcap)
        _apply(model, cfg)
        model.load_state_dict(full, strict=True)
    if not tr.is_main:
        return
    write_model(model, dest, cfg, tokenizer=getattr(tr.collator.tokenizer, "path", None), adapter_dir=adapter_dir,
                log=tr.log, device=tr.device)


def _apply(model, cfg) -> None:
    apply_mode(model, cfg.mode, freeze_vision=cfg.freeze_vision, freeze_decoder=cfg.freeze_decoder,
               lora_targets=cfg.lora_targets, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
               lora_dropout=cfg.lora_dropout)


def write_model(model, dest: Path, cfg, *, tokenizer=None, adapter_dir: Path | None = None, log=print,
                device=None) -> Path:
    """`model` (LoRA folded in, in place; the adapter saved to `adapter_dir` first) as a complete
    Hub-layout folder at `dest`. Refuses NaN / inf weights (`checkpoint.NonFiniteError`)."""
    from ..weights.export import save_hub_checkpoint

    bad = ck.nonfinite_names({n: p.detach() for n, p in model.named_parameters()})
    if bad:
        raise ck.NonFiniteError(f"not exporting {dest}: {len(bad)} weight tensor(s) hold NaN or inf ({bad[0]} ...)")
    if has_lora(model) and adapter_dir is not None:
        from ..weights.adapter import save_lora_adapter

        path = save_lora_adapter(model, adapter_dir, {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                                                      "dropout": cfg.lora_dropout}, base_model=cfg.model)
        log(f"saved the LoRA adapter in PEFT format to {path} (palikit --adapter, "
            "PaliGemma.from_pretrained(adapter=...), peft.PeftModel.from_pretrained)")
    if has_lora(model):
        merge_lora(model)
    dtype = None
    if cfg.export_dtype:
        from ..runtime import resolve_dtype

        dtype = resolve_dtype(cfg.export_dtype, device or "cpu")

    def fill(tmp: Path):
        save_hub_checkpoint(model, tmp, dtype=dtype)
        copy_side_files(cfg, tokenizer, tmp, model.config.vision.num_image_tokens, log)

    atomic_dir(dest, fill)
    log(f"exported {dest}")
    return dest


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, *, model: str | None = None,
                      dtype: str | None = None, adapter_dir: Path | None = None, log=print) -> Path:
    """A trainer checkpoint folder (`output_dir/checkpoints/step-N`) -> a loadable Hub-layout folder at
    `out`: the base model (`model`, default: the recipe's) with the checkpoint's trainable parameters
    (LoRA merged; `adapter_dir`: also saved there in PEFT format). The checkpoint is verified first."""
    from .config import TrainConfig

    path = Path(checkpoint)
    ck.verify_checkpoint(path)
    recipe = ck.saved_config(path)
    if recipe is None and (path.parent.parent / ck.CONFIG).is_file():  # a checkpoint older than its own recipe
        recipe = json.loads((path.parent.parent / ck.CONFIG).read_text())
    if recipe is None:
        raise FileNotFoundError(f"{path} has no {ck.CONFIG}, nor has its run folder: cannot tell the base model "
                                "and mode it was trained with")
    known = set(TrainConfig.field_names())
    cfg = TrainConfig.from_dict({k: v for k, v in recipe.items() if k in known}, source=str(path / ck.CONFIG))
    if model:
        cfg.model = model
    if dtype:
        cfg.export_dtype = dtype
    if not Path(cfg.model).exists():
        raise FileNotFoundError(f"the base model {cfg.model!r} the checkpoint was trained from is not there any "
                                "more; pass the base model folder (palikit export CHECKPOINT --base-model PATH)")
    net = load_model(cfg.model, final_logit_softcap=cfg.final_logit_softcap)
    _apply(net, cfg)
    state = ck.load_checkpoint(path, net, restore_rng=False)
    log(f"{path.name}: step {state['step']} of a {cfg.mode} run on {cfg.model}")
    tokenizer = Path(cfg.tokenizer) if cfg.tokenizer else None
    return write_model(net, Path(out), cfg, tokenizer=tokenizer, adapter_dir=adapter_dir, log=log)


def is_trainer_checkpoint(path: str | os.PathLike) -> bool:
    """A `checkpoints/step-N` folder (trainable parameters + trainer state), not a model folder."""
    p = Path(path)
    return p.is_dir() and (p / "trainable.safetensors").is_file() and (p / "state.json").is_file()


def trainer_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint `palikit export PATH` means: a step folder as given, a run folder's best checkpoint
    (best.json) or else its newest; None when PATH is neither (a model folder, a Hub id...)."""
    p = Path(path)
    if is_trainer_checkpoint(p):
        return p
    if (p / ck.CKPT_DIR).is_dir():
        best = p / "best.json"
        if best.is_file():
            chosen = p / json.loads(best.read_text())["checkpoint"]
            if chosen.is_dir():
                return chosen
        found = ck.step_folders(p)
        if found:
            return found[-1]
    return None


def copy_side_files(cfg, tokenizer, dst: Path, image_tokens: int, log=print) -> None:
    """Tokenizer and preprocessor files next to the exported weights, so the folder is a complete
    palikit / transformers checkpoint."""
    model_dir = Path(cfg.model) if cfg.model and Path(cfg.model).is_dir() else None
    tok = tokenizer or (Path(cfg.tokenizer) if cfg.tokenizer else None)
    files = []
    if tok is not None and Path(tok).is_file():
        files.append(Path(tok))
    for d in filter(None, (model_dir, Path(tok).parent if tok else None)):
        files += [d / n for n in (*TOKENIZER_FILES, "tokenizer_config.json", "special_tokens_map.json",
                                  "preprocessor_config.json", "vae-oid.npz")]
    for f in files:
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy(f, dst / f.name)
    if cfg.mask_codec and Path(cfg.mask_codec).is_file() and not (dst / "vae-oid.npz").exists():
        shutil.copy(cfg.mask_codec, dst / "vae-oid.npz")  # so the exported model can decode <seg> tokens
    fix_image_seq_length(image_tokens, dst / "preprocessor_config.json", log)


def fix_image_seq_length(n: int, path: Path, log=print) -> None:
    """transformers' PaliGemmaProcessor inserts `image_seq_length` <image> tokens: a copied file that
    disagrees with the model (a stale base folder) would make transformers feed the wrong count."""
    if not path.is_file():
        return
    d = json.loads(path.read_text())
    if d.get("image_seq_length") not in (None, n):
        log(f"{path.name}: image_seq_length {d['image_seq_length']} -> {n} (the model's image tokens)")
        d["image_seq_length"] = n
        path.write_text(json.dumps(d, indent=2) + "\n")
