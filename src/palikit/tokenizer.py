"""Text side of PaliGemma: the `Tokenizer` (a HF `tokenizer.json` or a SentencePiece `tokenizer.model`),
the big_vision prompt layout `[BOS] prefix ["\\n"] suffix [EOS]` with its masks (`encode_prompt`),
`<locNNNN>`/`<segNNN>` lookup, per-token texts for confidence scores, and `build_tokenizer`, which writes
small PaliGemma-style tokenizers for tests and the bundled demo model.

Image placeholder tokens are not handled here: the model code prepends the image features.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOC_TOKENS = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_TOKENS = tuple(f"<seg{i:03d}>" for i in range(128))
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")
IMAGE_TOKEN = "<image>"
SPACE = "\u2581"  # "▁", SentencePiece's visible space
_RESERVED = re.compile(r"^(<loc\d{4}>|<seg\d{3}>|<pad>|<eos>|<bos>|<unk>|<image>)$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "paligemma_tokenizer.model")


@dataclass
class PromptTokens:
    """Text part of one PaliGemma example (image tokens are prepended by the model).

    `ar_mask` is 0 on BOS, prefix and the "\\n" separator (full attention) and 1 on suffix + EOS
    (causal); `loss_mask` is 1 only on suffix tokens and EOS; `prefix_len` counts BOS..."\\n"."""

    ids: list[int]
    ar_mask: list[int]
    loss_mask: list[int]
    prefix_len: int

    def __len__(self) -> int:
        return len(self.ids)


# ------------------------------------------------------------------------------------------ backends
class _HFBackend:
    """`tokenizers.Tokenizer` from a tokenizer.json."""

    kind = "tokenizer.json"

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tok

        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust error text is cryptic; say what file and why
            raise ValueError(f"{path} is not a valid tokenizer.json ({e}); give the PaliGemma tokenizer.json "
                             "from the checkpoint folder or its tokenizer.model.") from None
        self._special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def piece_to_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self.tok.id_to_token(i) or ""

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def special_ids(self) -> set[int]:
        return set(self._special)

    def decode_batch(self, seqs: list[list[int]], render_control: bool) -> list[str]:
        return self.tok.decode_batch(seqs, skip_special_tokens=False)  # specials were filtered by the caller

    def make_atomic(self, pieces: Sequence[str]) -> None:
        """Register pieces that exist in the vocab as added tokens (what `PaliGemmaProcessor` does)."""
        from tokenizers import AddedToken

        self.tok.add_tokens([AddedToken(p, normalized=False, special=False) for p in pieces])


class _SPBackend:
    """`sentencepiece.SentencePieceProcessor` from a tokenizer.model."""

    kind = "tokenizer.model"

    def __init__(self, path: Path) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is not a valid SentencePiece model ({type(e).__name__}: {e}); give the "
                             "PaliGemma tokenizer.model or tokenizer.json.") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts, out_type=int)

    def special_ids(self) -> set[int]:
        return set()  # control ids are found per call (scanning 257k pieces would be slow)

    def decode_batch(self, seqs: list[list[int]], render_control: bool) -> list[str]:
        if not render_control:
            return self.sp.decode(seqs)  # drops control pieces (pad/bos/eos/...)
        out = []
        for seq in seqs:
            parts, run = [], []
            for i in seq:
                if self.sp.is_control(i):
                    parts.append(self.sp.decode(run) if run else "")
                    parts.append(self.sp.id_to_piece(i))
                    run = []
                else:
                    run.append(i)
            parts.append(self.sp.decode(run) if run else "")
            out.append("".join(parts))
        return out

    def make_atomic(self, pieces: Sequence[str]) -> None:
        raise ValueError("a SentencePiece model cannot be changed here")


# ------------------------------------------------------------------------------------------ tokenizer
class Tokenizer:
    """PaliGemma tokenizer; build with `Tokenizer.from_file(path)`.

    Attributes: `bos_id`, `eos_id`, `pad_id`, `unk_id`, `newline_id`, `image_id` (None when absent),
    `vocab_size`, `loc_ids` (1024 ids of `<loc0000>`..`<loc1023>`), `seg_ids` (128 ids of `<seg000>`..)."""

    def __init__(self, backend: _HFBackend | _SPBackend, path: Path, require_loc_seg: bool = True) -> None:
        self._b = backend
        self.path = path
        ids = {}
        for s in SPECIAL_TOKENS:
            i = backend.piece_to_id(s)
            if i is None:
                raise ValueError(f"{path} has no {s} token, so it is not a Gemma/PaliGemma tokenizer; use the "
                                 "tokenizer.json or tokenizer.model that ships with the PaliGemma checkpoint.")
            ids[s] = i
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = (ids[s] for s in SPECIAL_TOKENS)
        nl = backend.encode("\n")
        if len(nl) != 1 or nl[0] == self.unk_id:
            raise ValueError(f"{path} encodes '\\n' as {nl}, not as one token; PaliGemma needs a single newline "
                             "token as the prompt separator. Use the PaliGemma tokenizer.")
        self.newline_id: int = nl[0]
        self.image_id: int | None = backend.piece_to_id(IMAGE_TOKEN)
        self.vocab_size: int = backend.vocab_size
        self.loc_ids, self.seg_ids = self._find_loc_seg(require_loc_seg)
        self._loc_value = {i: v for v, i in enumerate(self.loc_ids)}
        self._seg_value = {i: v for v, i in enumerate(self.seg_ids)}
        # dropped by decode(skip_special_tokens=True): special tokens, never <loc>/<seg>
        self._skip = (backend.special_ids() | {self.pad_id, self.bos_id, self.eos_id}) - set(self._loc_value) - set(
            self._seg_value)

    # ---------------------------------------------------------------------------------- loading
    @classmethod
    def from_file(cls, path: str | Path, *, require_loc_seg: bool = True) -> Tokenizer:
        """`path`: a tokenizer.json, a SentencePiece tokenizer.model, or a folder holding one (tokenizer.json
        preferred). `require_loc_seg=False` accepts a tokenizer without any `<loc>`/`<seg>` tokens."""
        p = Path(path).expanduser()
        if p.is_dir():
            found = next((p / n for n in TOKENIZER_FILES if (p / n).is_file()), None)
            if found is None:
                raise FileNotFoundError(f"No tokenizer in folder {p} (looked for {', '.join(TOKENIZER_FILES)}); "
                                        "point at the checkpoint folder or the tokenizer file itself.")
            p = found
        elif not p.is_file():
            raise FileNotFoundError(f"Tokenizer file {p} does not exist; give a tokenizer.json, a tokenizer.model "
                                    "or the folder holding one.")
        if p.suffix == ".json":
            backend: _HFBackend | _SPBackend = _HFBackend(p)
        elif p.suffix == ".model":
            backend = _SPBackend(p)
        else:
            raise ValueError(f"Don't know the tokenizer format of {p}: expected a .json (Hugging Face tokenizers) "
                             "or a .model (SentencePiece) file.")
        return cls(backend, p, require_loc_seg)

    def _find_loc_seg(self, required: bool) -> tuple[list[int], list[int]]:
        names = list(LOC_TOKENS + SEG_TOKENS)
        vocab_ids = [self._b.piece_to_id(s) for s in names]
        if not required and all(i is None for i in vocab_ids):
            return [], []
        missing = [s for s, i in zip(names, vocab_ids) if i is None]
        if missing:
            raise ValueError(
                f"{self.path} is not a PaliGemma tokenizer: {len(missing)} of the 1152 <locNNNN>/<segNNN> tokens "
                f"are missing from its vocabulary (e.g. {missing[0]}). Use the PaliGemma tokenizer (not the plain "
                "Gemma one), or Tokenizer.from_file(..., require_loc_seg=False) for text-only use.")
        encoded = self._b.encode_batch(names)
        split = [s for s, i, e in zip(names, vocab_ids, encoded) if e != [i]]
        if split and isinstance(self._b, _HFBackend):
            self._b.make_atomic(split)  # the fix transformers' PaliGemmaProcessor applies (same ids)
            encoded = self._b.encode_batch(names)
            split = [s for s, i, e in zip(names, vocab_ids, encoded) if e != [i]]
        if split:
            raise ValueError(
                f"{self.path} is not a usable PaliGemma tokenizer: {len(split)} <loc>/<seg> tokens do not encode to "
                f"a single token (e.g. {split[0]!r} -> {self._b.encode(split[0])}), so boxes and masks would be "
                "garbled. Use the PaliGemma tokenizer.json/tokenizer.model, or one built with build_tokenizer().")
        ids = [int(i) for i in vocab_ids]  # type: ignore[arg-type]
        return ids[:1024], ids[1024:]

    def __repr__(self) -> str:
        return f"Tokenizer({self.path.name}, {self._b.kind}, vocab_size={self.vocab_size})"

    # ---------------------------------------------------------------------------------- lookup
    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary piece given by its exact string (e.g. "<loc0012>", "▁cat"), or None."""
        return self._b.piece_to_id(token)

    def id_to_token(self, i: int) -> str:
        """The vocabulary piece of an id (SentencePiece form, e.g. "▁cat")."""
        return self._b.id_to_piece(self._check_ids([i])[0])

    def is_loc(self, i: int) -> bool:
        return int(i) in self._loc_value

    def is_seg(self, i: int) -> bool:
        return int(i) in self._seg_value

    def loc_value(self, i: int) -> int | None:
        """0..1023 for a `<locNNNN>` id, else None."""
        return self._loc_value.get(int(i))

    def seg_value(self, i: int) -> int | None:
        """0..127 for a `<segNNN>` id, else None."""
        return self._seg_value.get(int(i))

    # ---------------------------------------------------------------------------------- encode / decode
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no BOS/EOS added. `<locNNNN>`/`<segNNN>` in the text become their token. With a
        tokenizer.json, other special strings such as "<bos>" do too (as in transformers); SentencePiece
        spells those out. Warns when characters had to become `<unk>`."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        ids = self._b.encode(text)
        if self.unk_id in ids and "<unk>" not in text:
            warnings.warn(f"Text {text[:60]!r} has characters the tokenizer does not know; they became <unk>.",
                          stacklevel=2)
        return ids

    def _check_ids(self, ids: Iterable[Any]) -> list[int]:
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Token id {bad[0]} is outside this tokenizer's vocabulary (0..{self.vocab_size - 1}); "
                             "the ids come from a model whose vocabulary does not match this tokenizer.")
        return out

    def _decode_many(self, seqs: list[list[int]], skip_special_tokens: bool) -> list[str]:
        if skip_special_tokens:
            seqs = [[i for i in s if i not in self._skip] for s in seqs]
        return self._b.decode_batch(seqs, render_control=not skip_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. `<locNNNN>`/`<segNNN>` are always kept (they are parsed later); with
        `skip_special_tokens` pad/bos/eos and other special tokens are dropped."""
        return self._decode_many([self._check_ids(ids)], skip_special_tokens)[0]

    def token_texts(self, ids: Iterable[int], skip_special_tokens: bool = True, final: bool = True) -> list[str]:
        """The text each token adds, so that `"".join(token_texts(ids)) == decode(ids)`: the bytes of an
        unfinished character (byte fallback) give "" and the token completing it gets the character.
        `final=False` is for streaming: an unfinished character at the end is held back too, so the
        texts of a prefix never change when more tokens arrive. Linear in len(ids) (`TextStream`)."""
        stream = TextStream(self, skip_special_tokens)
        texts = [stream.push(i) for i in self._check_ids(ids)]
        if final and texts:
            texts[-1] += stream.flush()
        return texts

    # ---------------------------------------------------------------------------------- prompt layout
    def encode_prompt(self, prefix: str, suffix: str | None = None, max_len: int | None = None) -> PromptTokens:
        """big_vision's text layout `[BOS] prefix ["\\n"] suffix [EOS]` (`combine_and_keep_train/eval`).

        The "\\n" separator is its own token, never merged with the prefix. One trailing "\\n" on `prefix`
        is stripped first (prompts are often written as "caption en\\n"); a second one stays as text.
        Without `suffix` the result ends at "\\n" (inference). `max_len` cuts the tail (suffix/EOS may be
        lost, as big_vision does); a prefix part longer than `max_len` is a ValueError."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if suffix is not None and not isinstance(suffix, str):
            raise TypeError(f"suffix must be a str or None, got {type(suffix).__name__}")
        if prefix.endswith("\n"):
            prefix = prefix[:-1]
        ids = [self.bos_id, *(self.encode(prefix) if prefix else []), self.newline_id]
        prefix_len = len(ids)
        ar, loss = [0] * prefix_len, [0] * prefix_len
        if suffix is not None:
            tail = [*(self.encode(suffix) if suffix else []), self.eos_id]
            ids += tail
            ar += [1] * len(tail)
            loss += [1] * len(tail)
        if max_len is not None:
            if max_len < 1:
                raise ValueError(f"max_len must be positive, got {max_len}")
            if prefix_len > max_len:
                raise ValueError(f"The prompt is {prefix_len} tokens (BOS + prefix + '\\n') but max_len is "
                                 f"{max_len}; shorten the prompt or raise max_len.")
            ids, ar, loss = ids[:max_len], ar[:max_len], loss[:max_len]
        return PromptTokens(ids, ar, loss, prefix_len)


# ------------------------------------------------------------------------------------------ building
def build_tokenizer(pieces: Sequence[str], path: str | Path, *, byte_fallback: bool = False) -> Tokenizer:
    """Write a small PaliGemma-style tokenizer.json (plus tokenizer_config.json and
    special_tokens_map.json, so `transformers.AutoTokenizer.from_pretrained(folder)` loads it) and
    return it loaded.

    `path`: the tokenizer.json to write, or a folder (then `folder/tokenizer.json`).
    Ids: 0 `<pad>`, 1 `<eos>`, 2 `<bos>`, 3 `<unk>`, 4 "\\n", then the pieces (a multi-character piece also
    gets a "▁piece" variant for the word after a space; spaces are written "▁" as in Gemma, no dummy
    prefix), then every single character of the pieces plus "▁" not yet present, then (with
    `byte_fallback`) the 256 `<0xNN>` byte pieces, then `<loc0000>`..`<loc1023>`, `<seg000>`..`<seg127>`
    and finally `<image>`. Text made of the pieces' characters, spaces and "\\n" round-trips exactly;
    other characters become `<unk>` unless `byte_fallback=True`. The model is a Unigram whose pieces all
    score the same, so encoding uses the fewest tokens."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as _Tok

    if isinstance(pieces, str) or not all(isinstance(p, str) for p in pieces):
        raise TypeError("pieces must be a list of strings (words and/or single characters)")
    vocab: dict[str, None] = dict.fromkeys([*SPECIAL_TOKENS, "\n"])
    chars: dict[str, None] = {SPACE: None}
    for raw in pieces:
        if raw == "" or _RESERVED.match(raw):
            raise ValueError(f"Piece {raw!r} is empty or a reserved token name; pass ordinary words/characters.")
        if "\n" in raw and raw != "\n":
            raise ValueError(f"Piece {raw!r} contains '\\n'; the newline must stay a separate token.")
        p = raw.replace(" ", SPACE)
        vocab.setdefault(p, None)
        if len(p) > 1 and not p.startswith(SPACE):
            vocab.setdefault(SPACE + p, None)
        chars.update(dict.fromkeys(p))
    for c in chars:
        vocab.setdefault(c, None)
    if byte_fallback:
        for b in range(256):
            vocab.setdefault(f"<0x{b:02X}>", None)
    for s in (*LOC_TOKENS, *SEG_TOKENS, IMAGE_TOKEN):
        vocab[s] = None
    model = models.Unigram([(p, 0.0 if p in SPECIAL_TOKENS else -1.0) for p in vocab], unk_id=3,
                           byte_fallback=byte_fallback)
    tok = _Tok(model)
    tok.normalizer = normalizers.Replace(" ", SPACE)
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in (*SPECIAL_TOKENS, IMAGE_TOKEN)])
    tok.add_tokens([AddedToken(s, normalized=False, special=False) for s in (*LOC_TOKENS, *SEG_TOKENS)])
    # like Gemma's tokenizer.json: callers asking for special tokens get <bos> first (palikit never does)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B", special_tokens=[
        ("<bos>", 2)])

    p = Path(path)
    if p.is_dir() or p.suffix != ".json":
        p = p / "tokenizer.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(p))
    special_map = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                   "additional_special_tokens": [IMAGE_TOKEN]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_map, "add_bos_token": True,
              "add_eos_token": False, "clean_up_tokenization_spaces": False, "padding_side": "left",
              "model_max_length": 1_000_000}
    (p.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (p.parent / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return Tokenizer.from_file(p)


class TextStream:
    """Incremental detokenizer: `push(id)` returns the text that token adds (cost independent of
    the length so far). It decodes a small window, from the token before the last emitted one, with
    and without the new token and emits the difference (TGI's and vLLM's method), so SentencePiece's
    "▁" spaces and multi-token byte-fallback characters come out right; an unfinished character is
    held back until its last byte arrives (`flush()` returns what is still held at the end)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer._decode_many([ids], self.skip_special_tokens)[0]

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(done):
            return ""  # unfinished character, or a token that adds no text (yet)
        if not text.startswith(done):
            raise RuntimeError(f"This tokenizer's decoder is not incremental (decode of {self.ids[self._prefix:]} "
                               f"does not extend {done!r}); per-token texts are not defined.")
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]

    def flush(self) -> str:
        """Text still held back (an unfinished character at the end), as the full decode has it."""
        done = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(done):] if text.startswith(done) else ""
