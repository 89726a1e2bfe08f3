"""`palikit predict | caption | describe | ocr | ask | detect | segment`: thin commands over `PaliGemma`,
one per CLI entry of the task table (`tasks/registry.py`).

Several IMAGE arguments are frames of one example (video, NLVR2-style pairs); a video file is
sampled into `--frames` frames.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

from .. import assets
from . import app


def default_model(model: str | None) -> str:
    """The given model, or the bundled demo model, said in one line on stderr (`assets.default_model`)."""
    return assets.default_model(model, log=lambda line: print(line, file=sys.stderr))


def load_model(model: str | None, device: str, dtype: str, tokenizer: str | None, compile: bool = False,
               adapter: str | None = None, final_logit_softcap: str = "auto", quantize: str | None = None):
    from ..api import PaliGemma
    from ..weights.conventions import parse_override

    return PaliGemma.from_pretrained(default_model(model), device=device, dtype=dtype, tokenizer=tokenizer,
                                     compile=compile, adapter=adapter, quantize=quantize,
                                     final_logit_softcap=parse_override(final_logit_softcap, "final_logit_softcap"))


def _frames(images: list[str], frames: int):
    from ..video import VIDEO_SUFFIXES, read_frames

    if len(images) == 1 and Path(images[0]).suffix.lower() in VIDEO_SUFFIXES:
        return read_frames(images[0], frames)
    return images if len(images) > 1 else images[0]


def _run(images, make_result, *, model, device, dtype, tokenizer, as_json, out, max_new_tokens, temperature,
         top_k, top_p, seed, num_beams, frames, adapter=None, final_logit_softcap="auto", quantize=None,
         constrained="auto"):
    from rich.console import Console

    from ..tasks.options import PredictOptions

    opts = PredictOptions(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          num_beams=num_beams, constrained=_constrained(constrained))  # the CLI edge's one conversion
    pg = load_model(model, device, dtype, tokenizer, adapter=adapter, final_logit_softcap=final_logit_softcap,
                    quantize=quantize)
    example = _frames(images, frames)
    result = make_result(pg, example, opts.as_kwargs())
    if out is not None:
        from ..preprocess import load_image
        from ..tasks.draw import draw, save_png

        first = example[0] if isinstance(example, list) else example
        save_png(draw(load_image(first), result.detections), out)
    if as_json:
        print(result.to_json())
        return
    console = Console()
    console.print(f"[bold]{result.prompt}[/bold] -> {result.text!r}")
    for c in result.choices or ():
        console.print(f"  {c.text!r}: probability {c.probability:.3f}  (logprob {c.logprob:.3f})")
    for d in result.detections:
        score = "" if d.score is None else f"  score {d.score:.2f}"
        mask = "" if d.mask is None else f"  mask {int(d.mask.sum())} px"
        flag = "" if d.requested else "  (label not asked for)"
        console.print(f"  {d.label or '?'}: box x0={d.box[0]:.0f} y0={d.box[1]:.0f} x1={d.box[2]:.0f} y1={d.box[3]:.0f}"
                      f"{score}{mask}{flag}")
    for e in result.errors:
        console.print(f"  [yellow]note:[/yellow] {e}")
    if result.hint:
        console.print(f"  [cyan]hint:[/cyan] {result.hint}")
    t = result.timings
    work = (f"{t['score_ms']:.0f} ms scoring {len(result.choices)} choices" if "score_ms" in t else
            f"{t.get('prefill_ms', 0):.0f} ms prefill, {t.get('decode_step_ms', 0):.1f} ms/token")
    console.print(f"  [dim]{t.get('image_ms', 0):.0f} ms image, {work}[/dim]")
    if out is not None:
        console.print(f"  annotated image written to {out}")


CONSTRAINED_FLAGS = {"auto": None, "on": True, "off": False}


def _constrained(flag: str):
    """`--constrained auto|on|off` as PredictOptions.constrained (auto: on for detect/segment prompts)."""
    if flag not in CONSTRAINED_FLAGS:
        raise ValueError(f"--constrained must be one of {', '.join(CONSTRAINED_FLAGS)}, got {flag!r}")
    return CONSTRAINED_FLAGS[flag]


MODEL = typer.Option(None, "--model", "-m", help="Checkpoint folder, big_vision .npz or Hub id (default: bundled demo).")
DEVICE = typer.Option("auto", help="cpu, cuda, cuda:1 or auto.")
DTYPE = typer.Option("auto", help="float32, bfloat16, float16 or auto (bf16 on GPU).")
TOKENIZER = typer.Option(None, help="Tokenizer file when it is not next to the weights.")
ADAPTER = typer.Option(None, "--adapter", help="LoRA adapter folder (PEFT format, e.g. palikit train's OUTPUT_DIR/adapter).")
SOFTCAP = typer.Option("auto", "--final-logit-softcap",
                       help="PaliGemma 2's final-logit soft-cap: auto (the checkpoint's convention), off, or a number.")
QUANTIZE = typer.Option(None, "--quantize", help="int8 or int4: quantize the weights at load (a folder written by "
                                                  "`palikit quantize` loads quantized without it).")
JSON = typer.Option(False, "--json", help="Print the Result as JSON.")
OUT = typer.Option(None, "--out", "-o", help="Write the image with boxes and masks drawn (PNG).")
MAX_NEW = typer.Option(64, help="Maximum tokens to generate.")
TEMP = typer.Option(0.0, help="0 = greedy; > 0 samples.")
TOPK = typer.Option(None, help="Sample from the k most likely tokens.")
TOPP = typer.Option(None, help="Nucleus sampling mass.")
SEED = typer.Option(None, help="Seed for sampling.")
BEAMS = typer.Option(1, help="Beam search width.")
FRAMES = typer.Option(8, help="Frames sampled from a video file.")
IMAGES = typer.Argument(..., help="Image path(s); several = frames of one example; or one video file.")


CHOICES = typer.Option(None, "--choices", help="Score these answers instead of generating: 'yes ; no' (the "
                                                "label rule; a JSON list works too). Prints each one's probability.")
CONSTRAINED = typer.Option("auto", "--constrained", help="auto (detect/segment prompts write only the task's format "
                                                         "and the requested labels), on, or off (the raw model).")
LANG = typer.Option("en", help="Language code.")
_COMMON = {"model": (str, MODEL), "device": (str, DEVICE), "dtype": (str, DTYPE), "tokenizer": (str, TOKENIZER),
           "as_json": (bool, JSON), "out": (Path, OUT), "max_new_tokens": (int, MAX_NEW),
           "temperature": (float, TEMP), "top_k": (int, TOPK), "top_p": (float, TOPP), "seed": (int, SEED),
           "num_beams": (int, BEAMS), "frames": (int, FRAMES), "lang": (str, LANG), "adapter": (str, ADAPTER),
           "final_logit_softcap": (str, SOFTCAP), "quantize": (str, QUANTIZE)}


def _parameters(task, arg) -> list[inspect.Parameter]:
    """The command's parameters: IMAGES, the task's main argument, the common options, `--choices` where the
    task takes a closed set, `--constrained` where it writes detections."""
    def kw(name, annotation, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    params = [kw("images", list[str], IMAGES)]
    if arg is not None:
        params.append(kw("text", str, typer.Argument(..., metavar=arg.name.upper(), help=task.cli_help or task.summary)))
    params += [kw(name, ann, default) for name, (ann, default) in _COMMON.items()]
    if task.choices:
        params.append(kw("choices", str, CHOICES))
    if task.parser == "detections":
        params.append(kw("constrained", str, CONSTRAINED))
    return params


def _register(app, task) -> None:
    """One command for a task of the task table: `palikit <task.cli> IMAGE... [ARG]`, the argument
    being the task's first required one (question, labels, prompt)."""
    arg = task.main_arg if task.main_arg is not None and task.main_arg.required else None

    def command(images, text=None, lang="en", choices=None, **options):
        from ..tasks.labels import split_labels

        args = [text] if arg is not None else []
        closed = None if choices is None else split_labels(choices)
        _run(images, lambda pg, example, opts: pg.task(task.name, example, *args, lang=lang, choices=closed, **opts),
             **options)

    command.__signature__ = inspect.Signature(_parameters(task, arg))
    command.__doc__ = task.cli_help or task.summary
    app.command(task.cli)(command)


def add_task_commands(target, tasks=None) -> None:
    """Register one command per CLI task of the task table (or of `tasks`) on the typer app `target`."""
    from ..tasks.registry import tasks_where

    for task in tasks if tasks is not None else tasks_where("cli"):
        _register(target, task)


add_task_commands(app)
