"""The task table: every PaliGemma task defined once, and looked up by every surface.

One `Task` entry says: its prompt builder (`tasks.prompts`), its arguments (what the API keyword,
the HTTP field, the CLI argument and the Ray row field are called; which are label lists, split by
`tasks.labels.split_labels` and passed on as the requested labels), whether it takes a language
code, how its output is read (`parser`: "text" = the answer is the text; "detections" = boxes and
masks parsed from `<loc>`/`<seg>` tokens) and which `Result` fields carry it, where it is exposed
(`api` method, `cli` command name, `http` endpoint `/v1/<name>`, `ray` batch task) and, when it can
be evaluated, its `EvalSpec` (metric key in `eval.metrics_tasks.METRICS`, default prompt template,
prompt variants, dataset aliases).

Readers: `api.PaliGemma` (task methods, `PaliGemma.task`), `serve/schemas.py` + `serve/parsing.py`
(request models and prompt building of the task endpoints), `cli/predict.py` (one command per
entry), `distributed/ray_batch.py` (`prompt_for`) and `eval/` (task names, aliases, templates,
metrics, variants). Adding a task = `register(Task(...))` + its tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .prompts import answer, caption, describe, detect, ocr, question, segment
from .labels import clean_labels, requested_labels, split_labels

__all__ = ["Arg", "EvalSpec", "Task", "TASKS", "register", "get_task", "tasks_where", "eval_task", "EVAL_ALIASES"]


@dataclass(frozen=True)
class Arg:
    """One task argument. `name` is the API keyword, the HTTP field, the CLI argument's metavar and the
    Ray row field / `--name` option. `kind="labels"`: a label list (the label rule) that is also passed
    on as the requested labels. `max_chars`: the server's cap on the field. `noun` names it in errors."""

    name: str
    kind: str = "text"  # "text" | "labels"
    required: bool = True
    help: str = ""
    max_chars: int | None = None
    noun: str = ""

    @property
    def what(self) -> str:
        return self.noun or self.name


@dataclass(frozen=True)
class EvalSpec:
    """How a task is evaluated: `metric` keys `eval.metrics_tasks.METRICS` (primary metric, per-sample
    score, corpus metrics); `template` is the default prompt (fields of `eval.runner.prompt_fields`);
    `variants` the prompt-sensitivity wordings; `aliases` other names accepted for the task;
    `needs_refs`: dataset rows must carry reference texts."""

    metric: str
    template: str
    variants: Mapping[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    needs_refs: bool = True


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[..., str]  # keyword arguments: each Arg's name, and `lang` when `lang`
    summary: str
    args: tuple[Arg, ...] = ()
    lang: bool = False
    # how the answer is read and where it lands; PaliGemma._result parses <loc>/<seg> in every output
    # (a free-form prompt may ask for boxes too), so these say which fields a caller should read
    parser: str = "text"  # "text" | "detections"
    result: tuple[str, ...] = ("text",)  # Result fields that carry the answer
    api: bool = True  # PaliGemma.<name>(image, *args, lang=..., **options)
    cli: str | None = None  # `palikit <cli> IMAGE [ARG]`
    http: bool = False  # POST /v1/<name>
    ray: bool = False  # `palikit batch --task <name>`
    eval: EvalSpec | None = None
    cli_help: str = ""  # the CLI command's help (default: summary)
    choices: bool = False  # takes `choices` (a closed set of answers, scored: `tasks.choices`) over HTTP

    def arg(self, name: str) -> Arg | None:
        return next((a for a in self.args if a.name == name), None)

    @property
    def main_arg(self) -> Arg | None:
        return self.args[0] if self.args else None

    def prompt(self, values: Mapping[str, Any], lang: str = "en",
               max_labels: int | None = None) -> tuple[str, list[str] | None]:
        """(prompt, requested labels or None) from argument values (missing optional args: None).
        Label arguments go through the label rule once (a `Labels`, which the builder, `PaliGemma` and
        the parser take as is); bad values raise ValueError saying what to fix."""
        kwargs: dict[str, Any] = {}
        labels: list[str] | None = None
        for a in self.args:
            v = values.get(a.name)
            if a.kind == "labels":
                if v is None and not a.required:
                    continue
                v = clean_labels(v, max_labels) if a.required else requested_labels(split_labels(v, max_labels))
                if v is None:
                    continue
                labels = v
            elif v is None and a.required:
                raise ValueError(f"task {self.name} needs {a.what}")
            kwargs[a.name] = v
        if self.lang:
            kwargs["lang"] = lang
        return self.build(**kwargs), labels


TASKS: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
    """Add a task to the table (`replace=True` to redefine one)."""
    if task.name in TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered; pass replace=True to redefine it")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> None:
    TASKS.pop(name, None)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


def tasks_where(surface: str) -> list[Task]:
    """Entries exposed on `surface`: "api", "cli", "http", "ray" or "eval" (table order)."""
    return [t for t in TASKS.values() if getattr(t, surface)]


EVAL_ALIASES = {"docvqa": "anls", "vqav2": "vqa", "captions": "caption", "cap": "caption", "counting": "count",
                "detection": "detect", "segmentation": "segment", "refcoco": "segment", "tallyqa": "count"}


def eval_task(name: str) -> Task:
    """The evaluable task called `name` or one of its aliases (case-insensitive)."""
    low = name.lower()
    evaluable = tasks_where("eval")
    aliases = {a: t.name for t in evaluable for a in t.eval.aliases}
    t = TASKS.get(aliases.get(low, low))
    if t is None or t.eval is None:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(t.name for t in evaluable)} "
                         f"(aliases: {', '.join(aliases)})")
    return t


# ------------------------------------------------------------------------------ the entries
_QA_VARIANTS = {"keyword": "answer {lang} {question}", "raw": "{question}", "keyword_no_lang": "answer {question}",
                "natural": "Answer the question: {question}"}
_LABELS_HELP = ("Object names: a JSON list ['cat', 'dog'], or one string 'cat ; dog' (commas also separate when "
                "there is no ';'). In a multipart form send a JSON list, labels='[\"cat\",\"dog\"]', or use curl's "
                "--form-string (curl -F cuts a value at ';').")
_LABELS = Arg("labels", "labels", help=_LABELS_HELP, noun="labels")
_QUESTION = Arg("question", help="The question.", max_chars=2000, noun="a question")


def _aliases(task: str) -> tuple[str, ...]:
    return tuple(a for a, t in EVAL_ALIASES.items() if t == task)


def _answer_only(metric: str, template: str) -> Task:
    """Eval-only tasks scored differently but asked like `answer` (VQAv2, DocVQA, counting, exact)."""
    return Task(metric, answer, f"Question answering scored by {metric}.", (_QUESTION,), lang=True,
                api=False, eval=EvalSpec(metric, template, dict(_QA_VARIANTS), _aliases(metric)))


for _t in (
    Task("predict", lambda prompt, labels=None: prompt, "Any prompt on one image.",
         (Arg("prompt", help="Any PaliGemma prompt, e.g. 'caption en' or 'detect cat ; dog'.", noun="a prompt"),
          Arg("labels", "labels", required=False, noun="labels",
              help="Labels asked for (marks detections as requested): a list, or one string 'cat ; dog' "
                   "(in a form also a JSON list).")),
         parser="detections", result=("text", "detections"), api=False, cli="predict", http=True, ray=True,
         cli_help="Run any prompt: palikit predict IMAGE 'answer en what is on the table'.", choices=True),
    Task("caption", caption, "Short caption ('caption {lang}').", lang=True, cli="caption", http=True,
         ray=True, eval=EvalSpec("caption", "caption {lang}",
                                 {"caption": "caption {lang}", "cap": "cap {lang}", "describe": "describe {lang}",
                                  "natural": "Describe the image in one sentence."}, _aliases("caption"))),
    Task("describe", describe, "Longer description ('describe {lang}').", lang=True, cli="describe",
         http=True, ray=True),
    Task("ocr", ocr, "Read the text in the image.", cli_help="Read the text in the image ('ocr').", cli="ocr",
         http=True, ray=True,
         eval=EvalSpec("ocr", "ocr", {"keyword": "ocr", "natural": "What does the text say?",
                                      "read": "Read the text."})),
    Task("answer", answer, "Answer a question about the image.",
         (_QUESTION,), cli_help="Answer a question about the image ('answer {lang} {question}').", lang=True,
         cli="ask", http=True, ray=True, choices=True),
    Task("question", question, "Write a question whose answer is given ('question {lang} {answer}').",
         (Arg("answer", help="The answer the question should have.", max_chars=2000, noun="an answer"),), lang=True),
    Task("detect", detect, "Boxes (pixels of the original image) for the given labels.", (_LABELS,),
         cli_help="Boxes for the given classes: palikit detect IMAGE 'dog ; car'.", parser="detections",
         result=("text", "detections"), cli="detect", http=True, ray=True,
         eval=EvalSpec("detect", "detect {labels}",
                       {"singular": "detect {labels_singular}", "plural": "detect {labels_plural}",
                        "natural": "find the {labels_natural}"}, _aliases("detect"), needs_refs=False)),
    Task("segment", segment, "Masks (COCO RLE, column-major) and boxes for the given labels.", (_LABELS,),
         cli_help="Masks for the given classes: palikit segment IMAGE cat.", parser="detections",
         result=("text", "detections"), cli="segment", http=True, ray=True,
         eval=EvalSpec("segment", "segment {labels}",
                       {"singular": "segment {labels_singular}", "plural": "segment {labels_plural}",
                        "natural": "outline the {labels_natural}"}, _aliases("segment"), needs_refs=False)),
    _answer_only("vqa", "answer {lang} {question}"),
    _answer_only("anls", "{question}"),  # DocVQA: the raw question, as big_vision's transfer
    _answer_only("count", "answer {lang} {question}"),
    _answer_only("exact", "answer {lang} {question}"),
):
    register(_t)
