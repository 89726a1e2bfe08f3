"""Constrained detect / segment output: a token grammar the decoder cannot leave.

What the decoder may write (the layout `parse.py` reads; paligemma.md: `<locY0><locX0><locY1><locX1>
label ; ...`; segment adds 16 `<seg>` after the 4 `<loc>`):

    output := EOS | object (" ; " object)* [" ;" [" "]] EOS
    object := <loc y0> <loc x0> <loc y1> <loc x1> [<seg>x16 for segment] " " label
    with y1 > y0 and x1 > x0 (the parser drops degenerate boxes), y0, x0 <= 1022

`label` is one of the requested labels in any of its forms: as requested or lower-cased, each as is,
singular or plural ("circles" also accepts "circle"; "Circle" also "circle" / "circles"). Text is
matched byte by byte, so any tokenization of the text is accepted (the model's own pieces, a label
spelled letter by letter, byte-fallback pieces) and a valid raw greedy output passes unchanged.
The separator may be " ; " or " ;" / ";" / "; " (what the parser reads). `fold_labels` then gives every
detection the requested spelling ("circle" written for "circles" comes back as "circles").

A token budget (the request's max_new_tokens) is honoured exactly: a new object starts only when there
is room to finish it (4 locs, 16 segs, the fewest pieces that write a label), and near the end of the
budget a label continues only with pieces after which it can still be finished; so the output never
ends inside an object, and an object that fits is never refused: like the raw model's, the output may
stop at the budget right after a label (5 tokens hold `<loc>x4 circle`).

`DetectGrammar` holds the tables (one per tokenizer, labels and task; cached); `start()` gives a fresh
per-request cursor implementing the engine's constraint interface (engine/constraints.py:
`allowed()`, `advance(token_id)`), duck-typed: this layer imports nothing from the engine.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from .labels import Labels, normalize_label, plural, requested_labels, singular

__all__ = ["DetectGrammar", "DetectCursor", "grammar_for", "grammar_for_prompt", "prompt_kind", "fold_labels",
           "label_spellings"]

SEPARATORS = (" ; ", " ;", ";", "; ")
_PROMPT = re.compile(r"^\s*(detect|segment)\b\s*(.*)$", re.IGNORECASE | re.DOTALL)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_TOKEN_BYTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (bytes -> ids, max length)


def prompt_kind(prompt: str) -> tuple[str | None, str]:
    """("detect" | "segment" | None, the text after the task word) of a prompt."""
    m = _PROMPT.match(prompt or "")
    return (m.group(1).lower(), m.group(2).strip()) if m else (None, "")


def label_spellings(label: str) -> list[str]:
    """The forms the decoder may write for `label`: as requested and lower-cased, each as is, singular
    and plural (first = the label itself)."""
    out = []
    for v in dict.fromkeys((label, label.lower())):
        for f in (v, singular(v), plural(singular(v))):
            if f and f not in out:
                out.append(f)
    return out


def fold_labels(detections, labels: Sequence[str]) -> None:
    """Give each detection the requested spelling of its label (in place): an exact (case-insensitive)
    match first, else the first requested label whose forms hold it."""
    exact = {normalize_label(lbl): lbl for lbl in reversed(labels)}
    forms: dict[str, str] = {}
    for lbl in reversed(labels):
        forms.update({normalize_label(f): lbl for f in label_spellings(lbl)})
    for d in detections:
        n = normalize_label(d.label)
        hit = exact.get(n) or forms.get(n)
        if hit is not None:
            d.label, d.requested = hit, True


def _token_bytes(tokenizer) -> tuple[dict[bytes, list[int]], int]:
    """bytes -> ids of the tokenizer's text pieces ("▁" is a space, "<0xNN>" one byte); special, <loc>
    and <seg> tokens excluded. Cached per tokenizer."""
    hit = _TOKEN_BYTES.get(tokenizer)
    if hit is not None:
        return hit
    special = set(tokenizer.loc_ids) | set(tokenizer.seg_ids) | set(tokenizer._skip) | {
        tokenizer.unk_id, tokenizer.newline_id}
    table: dict[bytes, list[int]] = {}
    for i in range(tokenizer.vocab_size):
        if i in special:
            continue
        piece = tokenizer.id_to_token(i)
        m = _BYTE_PIECE.match(piece)
        b = bytes([int(m.group(1), 16)]) if m else piece.replace("\u2581", " ").encode("utf-8")
        if b:
            table.setdefault(b, []).append(i)
    out = (table, max(map(len, table), default=1))
    _TOKEN_BYTES[tokenizer] = out
    return out


@dataclass(eq=False)
class _Node:
    """A node of the byte trie of the text after an object's tokens (" label" + separator)."""

    children: dict[int, _Node] = field(default_factory=dict)
    end_label: bool = False  # a whole label was written: EOS or the separator may follow
    end_sep: bool = False  # label + separator: the next object's <loc> (or EOS) may follow
    moves: dict[int, _Node] | None = None  # text token id -> node, live targets only (lazy)
    live: bool | None = None
    fewest: int | None = None  # fewest text tokens from here to a whole label (0 at one; lazy)
    need: int | None = None  # budget left at which every move here can still end in a label (lazy)
    allowed: dict[bool, torch.Tensor] = field(default_factory=dict)  # room for another object? -> ids


class DetectGrammar:
    """The grammar of detect (`segment=False`) or segment output for `labels` with `tokenizer`.
    ValueError when no label is given or a label cannot be written with the tokenizer's pieces."""

    def __init__(self, tokenizer, labels: Sequence[str], segment: bool = False):
        labels = [str(x) for x in labels]
        if not labels:
            raise ValueError("constrained detect/segment needs at least one label, e.g. 'detect cat ; dog' "
                             "(or constrained=False for the raw model)")
        self.labels = Labels(labels)  # the requested ones, already through the label rule (not re-split)
        self.segment, self.eos_id = segment, tokenizer.eos_id
        self._bytes, self._max_piece = _token_bytes(tokenizer)
        self.loc = torch.tensor(tokenizer.loc_ids, dtype=torch.int64)  # [1024] id of each bin
        self.seg = torch.tensor(tokenizer.seg_ids, dtype=torch.int64)  # [128]
        self.loc_value = {int(i): v for v, i in enumerate(tokenizer.loc_ids)}
        self.root = _Node()
        for label in labels:
            forms = [f for f in label_spellings(label) if self._writable(f" {f}")]
            if not forms:
                raise ValueError(f"label {label!r} cannot be written with this checkpoint's tokenizer (no pieces "
                                 "for some of its characters); spell it differently or pass constrained=False")
            for f in forms:
                text = f" {f}".encode()
                self._insert(text).end_label = True
                for sep in SEPARATORS:
                    self._insert(text + sep.encode()).end_sep = True
        # the fewest tokens a whole object takes (the budget may end right after it, as the raw model's does)
        self.object_tokens = 4 + (16 if segment else 0) + self.fewest(self.root)
        self._start_ids = torch.cat([self.loc[:1023], torch.tensor([self.eos_id])])
        self._eos = torch.tensor([self.eos_id])

    def _insert(self, text: bytes) -> _Node:
        node = self.root
        for b in text:
            node = node.children.setdefault(b, _Node())
        return node

    def _writable(self, text: bytes | str) -> bool:
        """Whether some sequence of text pieces spells `text` exactly."""
        data = text.encode() if isinstance(text, str) else text
        reach = [True] + [False] * len(data)
        for i in range(len(data)):
            if reach[i]:
                for j in range(i + 1, min(len(data), i + self._max_piece) + 1):
                    if data[i:j] in self._bytes:
                        reach[j] = True
        return reach[-1]

    def moves(self, node: _Node) -> dict[int, _Node]:
        """Text tokens allowed at `node` -> the node they lead to (only nodes a label can be finished from)."""
        if node.moves is None:
            out: dict[int, _Node] = {}
            stack = [(node, b"")]
            while stack:
                cur, path = stack.pop()
                for b, child in cur.children.items():
                    p = path + bytes([b])
                    for i in self._bytes.get(p, ()):
                        if self._live(child):
                            out[i] = child
                    if len(p) < self._max_piece:
                        stack.append((child, p))
            node.moves = out
        return node.moves

    def _live(self, node: _Node) -> bool:
        if node.live is None:
            node.live = node.end_label or node.end_sep or bool(self.moves(node))
        return node.live

    def fewest(self, node: _Node) -> int:
        """The fewest text tokens that take `node` to a whole label (where EOS may follow)."""
        if node.fewest is None:
            if node.end_label or node.end_sep:
                node.fewest = 0
            else:  # moves() keeps live nodes only, so there is a way on; the trie's depth bounds the recursion
                node.fewest = 1 + min(self.fewest(child) for child in self.moves(node).values())
        return node.fewest

    def need(self, node: _Node) -> int:
        """Tokens left at which any move from `node` can still end in a whole label."""
        if node.need is None:
            node.need = max((1 + self.fewest(c) for c in self.moves(node).values()), default=0)
        return node.need

    def start(self, max_new_tokens: int | None = None) -> DetectCursor:
        """A fresh per-request cursor (the engine's constraint) with the request's token budget."""
        return DetectCursor(self, max_new_tokens)


class DetectCursor:
    """One request's position in a `DetectGrammar` (engine/constraints.py's interface)."""

    def __init__(self, grammar: DetectGrammar, max_new_tokens: int | None):
        self.g, self.budget = grammar, max_new_tokens
        self.written = 0
        self.phase = "start"  # start | loc | seg | text
        self.locs: list[int] = []
        self.segs = 0
        self.node: _Node | None = None

    def _room(self) -> bool:
        """Whether a whole new object still fits in the token budget."""
        return self.budget is None or self.budget - self.written >= self.g.object_tokens

    def allowed(self) -> torch.Tensor:
        g = self.g
        if self.phase == "start":
            return g._start_ids if self._room() else g._eos
        if self.phase == "loc":
            k = len(self.locs)
            if k < 2:
                return g.loc[:1023]  # y0, x0: room for a larger y1, x1
            return g.loc[self.locs[k - 2] + 1:]  # y1 > y0, x1 > x0
        if self.phase == "seg":
            return g.seg
        return self._text_allowed(self.node)

    def _text_allowed(self, node: _Node) -> torch.Tensor:
        room = self._room()
        left = None if self.budget is None else self.budget - self.written
        if left is not None and left < self.g.need(node):  # the budget's end: only moves that still finish
            return self._with_ends([i for i, c in self.g.moves(node).items() if 1 + self.g.fewest(c) <= left],
                                   node, room)
        hit = node.allowed.get(room)
        if hit is None:  # shared by every request of the grammar
            hit = node.allowed[room] = self._with_ends(sorted(self.g.moves(node)), node, room)
        return hit

    def _with_ends(self, text_ids: list[int], node: _Node, room: bool) -> torch.Tensor:
        """`text_ids`, then EOS where a label (or label + separator) ends at `node`, and the next object's
        <loc> after a separator when one still fits."""
        parts = [torch.tensor(sorted(text_ids), dtype=torch.int64)]
        if node.end_label or node.end_sep:
            parts.append(self.g._eos)
        if node.end_sep and room:
            parts.append(self.g.loc[:1023])
        return torch.cat(parts)

    def advance(self, token_id: int) -> None:
        g, token_id = self.g, int(token_id)
        self.written += 1
        phase = self.phase
        if phase in ("start", "text"):
            if token_id == g.eos_id:
                self.phase = "done"
                return
            if token_id in g.loc_value and (phase == "start" or self.node.end_sep):
                self.phase, self.locs, self.segs = "loc", [g.loc_value[token_id]], 0
                return
            nxt = g.moves(self.node).get(token_id) if phase == "text" else None
            if nxt is None:
                raise ValueError(f"token {token_id} is outside the detect grammar here")
            self.node = nxt
        elif phase == "loc":
            self.locs.append(g.loc_value[token_id])
            if len(self.locs) == 4:
                self.phase, self.node = ("seg", None) if g.segment else ("text", g.root)
        elif phase == "seg":
            self.segs += 1
            if self.segs == 16:
                self.phase, self.node = "text", g.root
        else:
            raise ValueError("the detect grammar already ended (EOS)")

    def is_done(self) -> bool:
        return self.phase == "done"


@lru_cache(maxsize=64)
def _cached(tokenizer_ref, labels: tuple[str, ...], segment: bool) -> DetectGrammar:
    return DetectGrammar(tokenizer_ref(), labels, segment)


def grammar_for(tokenizer, labels: Sequence[str], segment: bool) -> DetectGrammar:
    """The (cached) grammar for a tokenizer, a label list and the task."""
    return _cached(weakref.ref(tokenizer), tuple(labels), bool(segment))


def grammar_for_prompt(tokenizer, prompt: str, labels: Sequence[str] | None, constrained: bool | str | None = None,
                       num_beams: int = 1) -> DetectGrammar | None:
    """The grammar a prediction runs under (None: the raw model), by `PredictOptions.constrained`:
    None = detect/segment prompts with num_beams=1; True = the prompt must be one; "detect" /
    "segment" = that grammar for any wording; False = none. Labels: the requested ones, else those
    the prompt names ("detect cat ; dog"). ValueError when none is given or one cannot be written."""
    if constrained is False or (constrained is None and (num_beams > 1 or not tokenizer.loc_ids)):
        return None
    kind, rest = prompt_kind(prompt)
    if constrained in ("detect", "segment"):
        kind, rest = constrained, "" if kind is None else rest
    elif kind is None:
        if constrained is True:
            raise ValueError("constrained=true needs a detect/segment prompt ('detect cat ; dog'); for other "
                             "wordings pass constrained='detect' or 'segment' with labels")
        return None
    names = list(labels) if labels else list(requested_labels(rest) or [])
    return grammar_for(tokenizer, names, kind == "segment")
