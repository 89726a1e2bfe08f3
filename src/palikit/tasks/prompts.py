"""Prompt builders for PaliGemma's task syntax, and hints for free-form prompts.

This module owns the exact prefix text of every task keyword (`caption en`, `describe en`, `ocr`,
`answer en …`, `question en …`, `detect a ; b`, `segment a ; b`) and its validation. The "\\n"
separator that ends every PaliGemma prefix is NOT part of these strings: the tokenizer appends it.

`suggest_prompt` recognises free-form requests ("read the serial number", "find the dogs") that
mix checkpoints answer poorly because the task has a keyword, and returns a one-line hint naming
the prompt that works. It returns None for keyword prompts and ordinary questions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .labels import clean_labels, singular

# The 35 caption/VQA languages of COCO-35L / XM3600 (big_vision `transfers/coco35l.py`).
LANGUAGES: tuple[str, ...] = (
    "ar", "bn", "cs", "da", "de", "el", "en", "es", "fa", "fi", "fil", "fr", "he", "hi", "hr", "hu", "id",
    "it", "ja", "ko", "mi", "nl", "no", "pl", "pt", "ro", "ru", "sv", "sw", "te", "th", "tr", "uk", "vi", "zh",
)
KEYWORDS: tuple[str, ...] = ("cap", "caption", "describe", "ocr", "answer", "question", "detect", "segment")


def _lang(lang: str) -> str:
    code = lang.strip().lower() if isinstance(lang, str) else lang
    if code not in LANGUAGES:
        raise ValueError(f"unsupported language code {lang!r}; supported: {', '.join(LANGUAGES)}")
    return code


def _text(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if "\n" in value or "\r" in value:
        raise ValueError(f"{what} contains a newline; '\\n' ends the PaliGemma prompt, so remove it: {value!r}")
    text = value.strip()
    if not text:
        raise ValueError(f"{what} is empty")
    return text


def caption(lang: str = "en") -> str:
    """Short COCO-like caption: `caption en`."""
    return f"caption {_lang(lang)}"


def describe(lang: str = "en") -> str:
    """Longer description: `describe en`."""
    return f"describe {_lang(lang)}"


def ocr() -> str:
    """Read the text in the image: `ocr`."""
    return "ocr"


def answer(question: str, lang: str = "en") -> str:
    """Visual question answering: `answer en {question}`."""
    return f"answer {_lang(lang)} {_text(question, 'question')}"


def question(answer: str, lang: str = "en") -> str:
    """Question generation for a given answer: `question en {answer}`."""
    return f"question {_lang(lang)} {_text(answer, 'answer')}"


def detect(labels: str | Sequence[str]) -> str:
    """Boxes for one or more classes: `detect dog ; cat`."""
    return "detect " + " ; ".join(clean_labels(labels))


def segment(labels: str | Sequence[str]) -> str:
    """Masks for one or more classes: `segment dog ; cat`."""
    return "segment " + " ; ".join(clean_labels(labels))


# ------------------------------------------------------------------------------ suggestions
_ARTICLES = re.compile(r"^(?:the|a|an|all(?: of)?(?: the)?|every|each|any|some|my|this|that|these|those)\s+")
_TRAILING = re.compile(
    r"\s+(?:in|on|from|of|within)\s+(?:the|this|that|my)\s+(?:image|picture|photo|photograph|pic|frame|scene)\b.*$"
    r"|\s+(?:here|there|please)$"
)
_OCR = re.compile(
    r"\b(?:read|transcribe|ocr)\b|what(?:'s| is| does)? (?:the )?(?:text|sign|label|writing|caption) (?:say|read)"
    r"|what(?:'s| is) written|what does it say|text (?:in|on|of) (?:the|this) (?:image|picture|photo)"
    r"|extract (?:the |all )?text|serial number|license plate number"
)
_DETECT = re.compile(
    r"^(?:please\s+)?(?:can you\s+)?(?:find|locate|detect|spot|show me|point (?:to|at|out))\s+(?P<obj>.+)$"
    r"|^where(?:'s| is| are)\s+(?P<obj2>.+)$"
    r"|^(?:draw |give me |get )?(?:a )?(?:bounding )?box(?:es)? (?:around|for|of) (?P<obj3>.+)$"
)
_SEGMENT = re.compile(
    r"^(?:please\s+)?(?:can you\s+)?(?:outline|mask|cut out|trace|segment out)\s+(?P<obj>.+)$"
    r"|^(?:give me |draw |get )?(?:a |the )?(?:mask|segmentation|outline|silhouette)s? (?:of|for|around) (?P<obj2>.+)$"
)
_CAPTION = re.compile(
    r"^(?:please\s+)?(?:caption|describe|summari[sz]e|explain)\s+(?:this|the)\s+(?:image|picture|photo|scene)"
    r"|^what(?:'s| is) (?:in|on|happening in) (?:this|the) (?:image|picture|photo|scene)"
    r"|^what do you see"
)


def _object(raw: str) -> str | None:
    obj = raw.strip().rstrip("?.!").strip().lower()
    obj = _TRAILING.sub("", obj).strip()
    obj = _ARTICLES.sub("", obj).strip()
    if not obj or len(obj.split()) > 4 or re.search(r"[;<>\n]", obj):
        return None
    parts = [singular(p.strip()) for p in re.split(r"\s*,\s*|\s+and\s+", obj) if p.strip()]
    return " ; ".join(parts) if parts else None


_QUESTION = re.compile(
    r"^(?:how|what|what's|which|who|whom|whose|when|why|is|are|was|were|do|does|did|can|could|will|would|should"
    r"|has|have|am)\b|\?$"
)
_LEAD = re.compile(r"^(?:the|a|an|all(?: of)?(?: the)?|every|each|any|some|this|that|these|those)\s+")
_BARE = {"detect": 'name what to detect: "detect cat ; dog"', "segment": 'name what to segment: "segment cat"',
         "caption": 'use "caption en": caption needs a language code', "cap": 'use "cap en": cap needs a language code',
         "describe": 'use "describe en": describe needs a language code',
         "answer": 'use "answer en QUESTION": answer needs a language code and the question',
         "question": 'use "question en ANSWER": question needs a language code and the answer'}


def _labels_fix(rest: str) -> tuple[str, list[str]]:
    """The class names of a detect / segment prompt as PaliGemma's training data writes them (lower
    case, no article, " ; " between them), and what was changed."""
    why = []
    split = re.split(r"\s*;\s*", rest) if ";" in rest else re.split(r"\s*,\s*|\s+and\s+", rest)
    labels = [lbl for lbl in (x.strip() for x in split) if lbl]
    if " ; ".join(labels) != rest:
        why.append('class names are separated by " ; "')
    bare = [_LEAD.sub("", lbl) for lbl in labels]
    if bare != labels:
        why.append('no "the" / "a" before a class name')
    low = [lbl.lower() for lbl in bare]
    if low != bare:
        why.append("class names in lower case")
    return " ; ".join(low), why


def _keyword_hint(raw: str) -> str | None:
    """For a prompt that starts with a task keyword: a hint when it is written otherwise than the model
    was trained on (another case: "Detect circle", "OCR"; alone: "detect", "caption"; detect / segment
    class names with articles, capitals or other separators: "detect the Circle", "detect a, b"), ""
    when it is well formed, None when it does not start with a keyword."""
    words = raw.split(" ")
    first = words[0].lower()
    if first not in KEYWORDS:
        return None
    if len(words) == 1:
        return ('use "ocr": task keywords are lower case' if raw != "ocr" else "") if first == "ocr" else _BARE[first]
    why = [] if words[0] == first else ["task keywords are lower case"]
    rest = " ".join(words[1:])
    if first == "ocr":
        return 'use "ocr": ocr takes no text after it (it reads all the text in the image)'
    if first in ("detect", "segment"):
        rest, more = _labels_fix(rest)
        why += more
    elif words[1].lower() in LANGUAGES:
        if words[1] != words[1].lower():
            why.append("language codes are lower case")
        rest = words[1].lower() + raw[len(words[0]) + len(words[1]) + 1:]
    elif first in ("answer", "question"):  # keyword without a language code
        return f'use "{first} en {raw[len(words[0]) + 1:]}": {first} needs a language code after it'
    else:  # caption / cap / describe + something else than a language code
        return f'use "{first} en": {first} takes only a language code'
    return f'use "{first} {rest}": {", ".join(why)}' if why else ""


def _free_form_hint(p: str) -> str | None:
    """A hint for a free-form request (lower case) that has a task keyword, or a question without one."""
    why = "mix checkpoints need the task keyword for this task"
    for rx, task in ((_SEGMENT, "segment"), (_DETECT, "detect")):
        m = rx.match(p)
        if m:
            raw = next(g for g in m.groups() if g is not None)
            if task == "detect" and _OCR.search(p):
                break  # "where is the text" -> ocr below
            obj = _object(raw)
            if obj:
                return f'use "{task} {obj}": {why}'
    if _OCR.search(p):
        return f'use "ocr": {why}'
    if _CAPTION.search(p):
        kw = "describe" if p.startswith(("describe", "explain")) else "caption"
        return f'use "{kw} en" (or "{"caption" if kw == "describe" else "describe"} en"): {why}'
    if _QUESTION.search(p):
        return f'use "answer en {p}": mix checkpoints answer questions after "answer en"'
    return None


def unwritable_words(text: str, tokenizer) -> list[tuple[str, str]]:
    """(word, how the tokenizer writes it) for each word of `text` that `tokenizer` (a palikit
    `Tokenizer`) cannot write as a word: spelled piece by piece, one character each ("r i n g": a word
    it never learned), or with `<unk>` (characters it does not know)."""
    out = []
    for word in dict.fromkeys(text.split()):
        if word == ";":
            continue
        ids = tokenizer.encode(" " + word)
        pieces = [tokenizer.id_to_token(i).replace("\u2581", "") for i in ids]
        pieces = [pc for pc in pieces if pc]
        if tokenizer.unk_id in ids:
            out.append((word, "<unk>"))
        elif len(pieces) > 1 and all(len(pc) == 1 for pc in pieces):
            out.append((word, " ".join(pieces)))
    return out


def _vocabulary_hint(prompt: str, tokenizer) -> str | None:
    """For a detect / segment prompt: the class names the tokenizer cannot write (`unwritable_words`)."""
    words = prompt.split(" ", 1)
    if len(words) < 2 or words[0] not in ("detect", "segment"):
        return None
    bad = unwritable_words(words[1], tokenizer)
    if not bad:
        return None
    shown = ", ".join(f'"{w}" ({"<unk>: characters it does not know" if how == "<unk>" else "letter by letter: " + how})'
                      for w, how in bad[:3])
    return (f"the tokenizer cannot write {shown}: the model was likely never trained on "
            f"{'that name' if len(bad) == 1 else 'those names'}; fine-tune on it, or name the class as the model knows it")


def suggest_prompt(prompt: str, tokenizer=None) -> str | None:
    """A one-line hint when a prompt is unlikely to work as meant, else None: a free-form request for a
    task that has a keyword ("find the dogs"), a question without "answer en", a task keyword in
    another case, alone, or with class names written otherwise than the model was trained on ("Detect
    circle", "OCR", "detect", "detect the Circle"), and (given the model's `tokenizer`) class names
    the tokenizer cannot write.

    >>> suggest_prompt("find the dogs")
    'use "detect dog": mix checkpoints need the task keyword for this task'
    >>> suggest_prompt("Detect the circle")
    'use "detect circle": task keywords are lower case, no "the" / "a" before a class name'
    >>> suggest_prompt("detect dog ; cat") is None
    True
    """
    if not isinstance(prompt, str):
        return None
    raw = " ".join(prompt.strip().split())
    if not raw:
        return None
    hint = _keyword_hint(raw)
    if hint is None:
        hint = _free_form_hint(raw.lower())
    fixed = re.match(r'use "([^"]*)"', hint).group(1) if hint and hint.startswith('use "') else raw
    vocab = _vocabulary_hint(fixed, tokenizer) if tokenizer is not None else None
    return "; ".join(h for h in (hint, vocab) if h) or None
