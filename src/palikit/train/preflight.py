"""Pre-flight: what palikit can tell about a fine-tune before it runs, in one table and one verdict
line (the start of `palikit train`, and `palikit check DATA --model M` alone). Each row is one check:

| check          | what it looks at                                                                        |
|----------------|-----------------------------------------------------------------------------------------|
| prompts        | the task words the prefixes start with, against the prompts the model card lists        |
| labels         | class names: pieces per name in the base tokenizer, `<unk>`, classes the model knows     |
| answers        | the words of text answers: pieces, `<unk>`, words the model reads                        |
| reading        | answers seen once in training, for a model that reads words as wholes (card: `reading`) |
| model          | its card's `palikit_limits` (`weights.card`): resolution, summary                       |
| positions      | boxes against the grid the model's boxes lie on (card: `grid`)                          |
| box sizes      | boxes in model-input pixels against its patch size                                      |
| class balance  | instances per class; the most frequent text answer's share                              |
| epochs         | steps x batch size / examples                                                           |
| validation     | a validation split (val_data / val_fraction), its size                                  |
| lengths        | the longest example in tokens against max_len                                           |

Levels: ok, info, warn (something that makes the run likely to fail or mislead), fail (it cannot
run). `--strict` (`preflight=strict`) stops on a warning. The monitor repeats the warnings when a task
metric stays at 0 (`monitor.py`).
"""

from __future__ import annotations

import re
import warnings as _warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .data import Example
from .monitor import DETECT, EXACT, task_kind

LEVELS = ("ok", "info", "warn", "fail")
STYLE = {"ok": "green", "info": "cyan", "warn": "bold yellow", "fail": "bold red"}
EXAMPLES = 4  # words shown per finding
MAX_EPOCHS = 50  # more passes than this over the data: a warning (memorising)
SAMPLE = 2000  # examples looked at (spread over the set); lengths cover every file example
CODE = re.compile(r"^[A-Z0-9]{2,}$")  # an upper-case / digit code (OCR answers): spelled piece by piece by design


class PreflightFailed(ValueError):
    """The pre-flight found a failure, or a warning under --strict / preflight=strict."""


@dataclass
class Finding:
    check: str
    finding: str
    level: str = "ok"


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    def add(self, check: str, finding: str, level: str = "ok") -> None:
        self.findings.append(Finding(check, finding, level))

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warn"]

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "fail"]

    def verdict(self) -> str:
        if self.failures:
            return f"pre-flight: {len(self.failures)} failure(s): this run cannot work as set up ({self.failures[0].check})"
        if self.warnings:
            names = ", ".join(dict.fromkeys(w.check for w in self.warnings))
            return (f"pre-flight: {len(self.warnings)} warning(s) ({names}): expect this fine-tune to struggle for "
                    "the reasons above")
        return "pre-flight: ready, nothing found that would stop this fine-tune from learning"

    def table(self):
        from rich.table import Table

        t = Table(title="pre-flight", show_lines=False, expand=False)
        t.add_column("check", style="bold")
        t.add_column("finding", overflow="fold")
        t.add_column("", no_wrap=True)
        for f in self.findings:
            t.add_row(f.check, f.finding, f"[{STYLE[f.level]}]{f.level}[/]")
        return t

    def text_lines(self, width: int = 120) -> list[str]:
        """The table and the verdict as plain text lines (for a log)."""
        from rich.console import Console

        console = Console(width=width, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        return console.export_text().rstrip("\n").splitlines() + [self.verdict()]

    def raise_if_failed(self, strict: bool, how: str) -> None:
        """`PreflightFailed` on a failure, or on a warning when `strict` (`how`: what lets it run anyway)."""
        if self.failures:
            raise PreflightFailed(f"{self.verdict()}: {self.failures[0].finding}")
        if strict and self.warnings:
            w = self.warnings[0]
            raise PreflightFailed(f"{self.verdict()}; stopped before training (first: {w.check}: {w.finding}). "
                                  f"{how} lets it run anyway.")


class _Null:
    def write(self, s):
        return len(s)

    def flush(self):
        pass


# ------------------------------------------------------------------------------------ words
def pieces(tokenizer, word: str) -> list[str]:
    """How the tokenizer writes `word` inside a sentence (the fewer pieces of ' word' and 'word', the
    lone space piece left out)."""
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")  # unknown characters: reported by us as <unk>
        ways = []
        for text in (word, " " + word):
            ids = tokenizer.encode(text)
            names = [tokenizer.decode([i]) if i != tokenizer.unk_id else "<unk>" for i in ids]
            ways.append([n for n in names if n.strip() or n == "<unk>"] or names)
    return min(ways, key=len)


def _coverage(tokenizer, words: Counter, known: set[str] | None, what: str, closed: bool, report: Report,
              codes_ok: bool = False) -> None:
    """One row about `words` (word -> count): unknown characters, words in several pieces, new words."""
    if not words:
        return
    split = {w: pieces(tokenizer, w) for w in words}
    unk = [w for w, p in split.items() if "<unk>" in p]
    multi = [w for w, p in split.items() if len(p) > 1 and w not in unk]
    parts = [f"{len(words)} distinct"]
    level = "ok"
    if unk:
        parts.append(f"{len(unk)} hold characters the tokenizer cannot write (<unk>: the model can never answer "
                     f"them), e.g. {', '.join(repr(w) for w in unk[:EXAMPLES])}")
        level = "warn"
    if multi:
        shown = ", ".join(f"{w} -> {'·'.join(split[w])}" for w in sorted(multi, key=lambda w: -words[w])[:EXAMPLES])
        parts.append(f"{len(multi)} spelled in several pieces ({shown})")
        codes = all(CODE.match(w) for w in multi)
        if closed and not (codes_ok and codes):
            level = "warn" if level == "ok" else level
            parts[-1] += ": this model's tokenizer has whole pieces only for its own words, so it has never " \
                         "written these"
        elif level == "ok":
            level = "info"
    if known is not None:
        new = [w for w in words if w not in known and w.lower() not in known]
        if new:
            parts.append(f"{len(new)} the model card does not list (e.g. {', '.join(new[:EXAMPLES])})")
            level = "info" if level == "ok" else level
    report.add(what, "; ".join(parts), level)


def _labels(ex: Example) -> list[str]:
    """The class names a detect / segment prompt asks for."""
    rest = ex.prefix.strip().split(None, 1)
    return [x.strip() for x in rest[1].split(";") if x.strip()] if len(rest) > 1 else []


def _prompt_word(ex: Example) -> str:
    words = ex.prefix.strip().split()
    if not words:
        return ""
    return " ".join(words[:2]) if words[0].lower() in ("caption", "answer", "question", "describe") else words[0]


def _known_prompt(word: str, prompts: Sequence[str]) -> bool:
    return any(word == p or word.split()[0] == p.split()[0] and len(p.split()) == 1 for p in prompts)


# ------------------------------------------------------------------------------------ checks
def _check_prompts(examples: Sequence[Example], limits: dict, report: Report) -> None:
    prompts = limits.get("prompts")
    words = Counter(_prompt_word(ex) for ex in examples)
    if not prompts:
        report.add("prompts", ", ".join(f"{w!r} x{n}" for w, n in words.most_common(EXAMPLES)), "ok")
        return
    unknown = [w for w in words if not _known_prompt(w, prompts)]
    if not unknown:
        report.add("prompts", f"{', '.join(repr(w) for w in words)}: prompts the model was trained with", "ok")
        return
    close = {w: next((p for p in prompts if p.lower() == w.lower() or p.split()[0] == w.lower().split()[0]), None)
             for w in unknown}
    shown = ", ".join(f"{w!r}" + (f" (it knows {close[w]!r})" if close[w] else "") for w in unknown[:EXAMPLES])
    report.add("prompts", f"{sum(words[w] for w in unknown)} example(s) start with a prompt the model was not trained "
                          f"with: {shown}; it knows {', '.join(map(repr, prompts))}", "warn")


def _boxes(examples: Sequence[Example]):
    """(label, (y0, x0, y1, x1) in 0..1 of the image) of every box in the detect / segment targets."""
    from ..tasks.parse import parse_detections

    out = []
    for ex in examples:
        for d in parse_detections(ex.suffix, (1024, 1024)).detections:
            x0, y0, x1, y1 = d.box
            out.append((d.label, (y0 / 1024, x0 / 1024, y1 / 1024, x1 / 1024)))
    return out


def _check_reading(examples: Sequence[Example], limits: dict, report: Report) -> None:
    """Text answers that appear once in the training data have to be READ (character by character); a
    model whose card says it recognises words as wholes (`reading: words`) cannot learn that in a run."""
    answers = Counter(ex.suffix for ex in examples if task_kind(ex) == EXACT)
    total = sum(answers.values())
    if limits.get("reading") != "words" or total < 10:
        return
    once = sum(1 for n in answers.values() if n == 1)
    if once / total <= 0.5:
        report.add("reading", f"{total - once} of {total} text answers repeat in the training data: learnable as "
                              "wholes", "ok")
        return
    report.add("reading", f"{once} of {total} text answers appear once in the training data (e.g. "
                          f"{', '.join(repr(a) for a in list(answers)[:EXAMPLES])}): they must be read character by "
                          "character, and this model recognises words it saw many times as wholes; it will not "
                          "learn to read them in a fine-tune (expect exact match near 0)", "warn")


def _check_boxes(boxes, limits: dict, image_size: int, patch: int, report: Report) -> None:
    if not boxes:
        return
    grid = limits.get("grid")
    if grid:
        tol = 0.1  # of a cell
        on = sum(all(abs(v * grid - round(v * grid)) <= tol for v in b) for _, b in boxes)
        share = on / len(boxes)
        cell = image_size / grid
        level = "warn" if share < 0.5 else "ok"
        report.add("positions", f"{on} of {len(boxes)} boxes ({share:.0%}) lie on the model's {grid}x{grid} grid of "
                                f"{cell:g} px cells" + (": it has only ever placed boxes on that grid, so boxes at free "
                                                        "positions need far more training than a short fine-tune "
                                                        "(expect detect mAP near 0)" if level == "warn" else ""), level)
    sides = sorted(min(b[2] - b[0], b[3] - b[1]) * image_size for _, b in boxes)
    small = sum(s < patch / 2 for s in sides)
    median = sides[len(sides) // 2]
    text = (f"{len(boxes)} boxes at the model's {image_size} px input: shorter side median {median:.0f} px, "
            f"smallest {sides[0]:.0f} px; patch {patch} px")
    if small / len(sides) > 0.2:
        report.add("box sizes", text + f"; {small} boxes are under half a patch: too small to see at {image_size} px "
                                       "(crop or tile the images, or a higher-resolution model)", "warn")
    else:
        report.add("box sizes", text, "ok")


def _check_balance(examples: Sequence[Example], boxes, report: Report) -> None:
    if boxes:
        counts = Counter(label for label, _ in boxes)
        (top, n_top), (low, n_low) = counts.most_common(1)[0], counts.most_common()[-1]
        text = ", ".join(f"{k} {v}" for k, v in counts.most_common(6))
        bad = len(counts) > 1 and (n_top > 10 * n_low or n_low < 5)
        report.add("class balance", f"instances: {text}" + (f"; {low!r} has {n_low} against {top!r}'s {n_top}: "
                                                             "it may never be predicted" if bad else ""),
                   "warn" if bad else "ok")
    answers = Counter(ex.suffix for ex in examples if task_kind(ex) == EXACT)
    if len(answers) > 1:
        top, n = answers.most_common(1)[0]
        share = n / sum(answers.values())
        report.add("class balance", f"text answers: {len(answers)} distinct; the commonest ({top!r}) is {share:.0%}: "
                                    f"a model that always says it scores {share:.2f} exact match",
                   "info" if share > 0.5 else "ok")


def _check_steps(n: int, batch: int, steps: int, report: Report) -> None:
    epochs = steps * batch / max(n, 1)
    text = f"{steps} steps x {batch} = {steps * batch:,} examples over {n:,}: {epochs:.2f} epochs"
    if epochs > MAX_EPOCHS:
        report.add("epochs", text + f"; more than {MAX_EPOCHS} passes over the same examples: the model will memorise "
                                    "them (watch the validation split; early_stopping_patience)", "warn")
    elif epochs < 1:
        report.add("epochs", text + f"; {n - steps * batch:,} examples are never seen", "info")
    else:
        report.add("epochs", text, "ok")


def _check_validation(val: Sequence[Example], source: str, report: Report) -> None:
    if not val:
        report.add("validation", "none: no val loss, no task metric, no best checkpoint, no early stopping; set "
                                 "val_data, or val_fraction=0.1 to hold out a tenth of the training images", "warn")
    elif len(val) < 20:
        report.add("validation", f"{len(val)} examples ({source}): the task metric moves in steps of "
                                 f"{1 / len(val):.0%}", "info")
    else:
        report.add("validation", f"{len(val)} examples ({source})", "ok")


def _check_lengths(lengths: Sequence[int], max_len: int, why: str, long_rows: str, report: Report) -> None:
    if not lengths:
        return
    longest = max(lengths)
    over = sum(n > max_len for n in lengths)
    text = f"longest example {longest} text tokens; max_len {max_len} ({why})"
    if over:
        report.add("lengths", text + f"; {over} longer: " + ("their tails are cut (long_rows=truncate)"
                                                            if long_rows == "truncate" else "refused"), "warn")
    else:
        report.add("lengths", text, "ok")


# ------------------------------------------------------------------------------------ report
def preflight(train: Sequence[Example], val: Sequence[Example], tokenizer, *, limits: dict, image_size: int,
              patch: int, batch_size: int, steps: int, lengths: Sequence[int] = (), max_len: int | None = None,
              max_len_source: str = "", long_rows: str = "refuse", val_source: str = "val_data") -> Report:
    """The pre-flight `Report` of a fine-tune of the model (`limits`: its card's `palikit_limits`) on
    `train` / `val` for `steps` steps of `batch_size`."""
    from .monitor import spread_sample

    report = Report()
    sample = spread_sample(train, SAMPLE)
    closed = limits.get("vocabulary") == "closed"
    _check_prompts(sample, limits, report)
    detect = [ex for ex in sample if task_kind(ex) == DETECT]
    labels = Counter(label for ex in detect for label in _labels(ex))
    classes = set(limits["classes"]) if limits.get("classes") else None
    _coverage(tokenizer, labels, classes, "labels", closed, report)
    answers = Counter(w.strip(".,;:?!") for ex in sample if task_kind(ex) != DETECT for w in ex.suffix.split())
    answers.pop("", None)
    words = {w for w in limits.get("words", [])} | set(limits.get("classes", [])) | set(limits.get("colors", []))
    _coverage(tokenizer, answers, words or None, "answers", closed, report, codes_ok=True)
    _check_reading(train, limits, report)
    if limits:
        report.add("model", f"{image_size} px input, {patch} px patches. Its card: {limits.get('summary', '-')}",
                   "info")
    boxes = _boxes(detect)
    _check_boxes(boxes, limits, image_size, patch, report)
    _check_balance(sample, boxes, report)
    _check_steps(len(train), batch_size, steps, report)
    _check_validation(val, val_source, report)
    if max_len:
        _check_lengths(lengths, max_len, max_len_source, long_rows, report)
    return report


def check_run(tr) -> Report:
    """The pre-flight of a `Trainer` (its examples after the split and the length check)."""
    from .loading import model_limits

    cfg = tr.cfg
    vc = tr.model.config.vision
    train = tr.train_set if isinstance(tr.train_set, list) else [tr.train_set[i] for i in
                                                                 range(min(len(tr.train_set), 200))]
    source = "val_data" if cfg.val_data else f"val_fraction={cfg.val_fraction:g}" if cfg.val_fraction else "given"
    return preflight(train, tr.val_set, tr.collator.tokenizer, limits=model_limits(cfg.model),
                     image_size=vc.image_size, patch=vc.patch_size, batch_size=cfg.batch_size, steps=tr.total_steps,
                     lengths=tr.lengths, max_len=tr.max_len, max_len_source=tr.max_len_source,
                     long_rows=cfg.long_rows, val_source=source)

