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


def _is_keyword_form(p: str) -> bool:
    words = p.split(" ")
    if words[0] == "ocr":
        return True
    if words[0] in ("detect", "segment"):
        return len(words) > 1
    return words[0] in KEYWORDS and len(words) > 1 and words[1] in LANGUAGES


def suggest_prompt(prompt: str) -> str | None:
    """A one-line hint when a free-form prompt asks for a task that has a keyword, else None.

    >>> suggest_prompt("find the dogs")
    'use "detect dog": mix checkpoints need the task keyword for this task'
    >>> suggest_prompt("how many dogs are there") is None
    True
    """
    if not isinstance(prompt, str):
        return None
    p = " ".join(prompt.strip().split()).lower()
    if not p or _is_keyword_form(p):
        return None
    why = "mix checkpoints need the task keyword for this task"
    first, _, rest = p.partition(" ")
    if first in ("answer", "question") and rest:  # keyword without a language code
        return f'use "{first} en {rest}": {first} needs a language code after it'
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
    return None
