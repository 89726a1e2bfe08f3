"""`palikit info`: architecture and exact parameter count of a preset or a checkpoint's config, and the
final soft-cap and sliding window in force for that checkpoint (with the reason)."""

from __future__ import annotations

import json

import typer

from . import app


@app.command()
def info(
    model: str = typer.Argument(None, help="Preset name (see --list), a checkpoint folder, a config.json or a big_vision .npz."),
    list_presets: bool = typer.Option(False, "--list", help="List the presets with their parameter counts."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    final_logit_softcap: str = typer.Option(
        "auto", "--final-logit-softcap", help="PaliGemma 2's final soft-cap: auto (from the checkpoint: 30 for pt, "
        "off for transfers), a number, or off."),
    sliding_window: str = typer.Option(
        "auto", "--sliding-window", help="Gemma 2 sliding window: auto (full attention, as big_vision trained it), "
        "a number of tokens, or off."),
):
    """Print the architecture and exact parameter count (counted on the meta device)."""
    from rich.console import Console
    from rich.table import Table

    from ..config import PRESETS
    from ..weights.resolve import get_config
    from ..model import count_parameters

    console = Console()
    if list_presets or model is None:
        table = Table("preset", "family", "image", "image tokens", "parameters")
        for name, cfg in PRESETS.items():
            table.add_row(name, cfg.family, f"{cfg.vision.image_size}px", str(cfg.vision.num_image_tokens),
                          f"{count_parameters(cfg):,}")
        console.print(table)
        return
    overrides = {k: v for k, v in (("final_logit_softcap", final_logit_softcap), ("sliding_window", sliding_window))
                 if v != "auto"}
    cfg = get_config(model, **overrides)
    n = count_parameters(cfg)
    if as_json:
        print(json.dumps({**cfg.describe(), "parameters": n}))
        return
    t, v = cfg.text, cfg.vision
    table = Table(title=f"{cfg.name}: {cfg.family}", show_header=False)
    rows = [
        ("parameters", f"{n:,}"),
        ("image encoder", f"SigLIP {v.hidden_size}w x {v.num_hidden_layers} layers, {v.num_attention_heads} heads, "
                          f"MLP {v.intermediate_size}, patch {v.patch_size}"),
        ("image", f"{v.image_size}px -> {v.num_image_tokens} tokens"),
        ("decoder", f"{t.model_type}: {t.hidden_size}w x {t.num_hidden_layers} layers, {t.num_attention_heads} heads / "
                    f"{t.num_key_value_heads} kv, head_dim {t.head_dim}, MLP {t.intermediate_size}"),
        ("vocabulary", f"{t.vocab_size:,} rows, predicts {cfg.output_vocab_size:,}"),
        ("query scale", f"1/sqrt({t.query_pre_attn_scalar:g})"),
        ("soft-caps", f"attention {t.attn_logit_softcapping or 'off'}, final {t.final_logit_softcapping or 'off'}"),
        ("post-norms", "yes" if t.post_norms else "no"),
        ("sliding window", str(t.sliding_window) if t.sliding_window else "off (full attention)"),
    ]
    rows += [("why", line) for line in cfg.conventions]
    for k, val in rows:
        table.add_row(k, val)
    console.print(table)
