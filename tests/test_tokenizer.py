"""palikit.tokenizer on a built PaliGemma-style tokenizer.json and on a SentencePiece tokenizer.model
trained here (Gemma settings): prompt layout and masks, truncation, <loc>/<seg> lookup and errors,
per-token texts, round-trips, and agreement with transformers."""

from __future__ import annotations

import io
import json
import random
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from palikit.testing import CHARS, WORDS
from palikit.tokenizer import LOC_TOKENS, SEG_TOKENS, PromptTokens, Tokenizer, build_tokenizer

DETECTION = "<loc0012><loc0100><loc0500><loc0900> red circle ; <loc0001><loc0002><loc1023><loc0000> blue square"
SEGMENT = "<loc0010><loc0020><loc0030><loc0040>" + "".join(f"<seg{i:03d}>" for i in range(0, 128, 8)) + " cat"


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("built")
    build_tokenizer(WORDS + CHARS, folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def built(built_dir) -> Tokenizer:
    return Tokenizer.from_file(built_dir)


def train_sentencepiece(path, user_defined=("\n", "\n\n", *LOC_TOKENS, *SEG_TOKENS)):
    """A tiny Gemma-like SentencePiece BPE model: ids pad 0, eos 1, bos 2, unk 3, byte fallback, no dummy
    prefix, identity normalization, "\\n", "\\n\\n" (as in Gemma) and the <loc>/<seg> tokens as
    user-defined (atomic) pieces."""
    import sentencepiece as spm

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?! ")
              for _ in range(300)]
    corpus += ["Numbers 0123456789 (x, y) / z-w: ok; \"q\" 'r'", "caption en\na red circle"]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, model_type="bpe", vocab_size=len(user_defined) + 400,
        user_defined_symbols=list(user_defined), pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", byte_fallback=True,
        hard_vocab_limit=False, split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def sp(tmp_path_factory) -> Tokenizer:
    return Tokenizer.from_file(train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model"))


@pytest.fixture(params=["built", "sp"])
def tok(request, built, sp) -> Tokenizer:
    return {"built": built, "sp": sp}[request.param]


# ------------------------------------------------------------------------------------------ layout
def test_built_id_layout(built):
    assert (built.pad_id, built.eos_id, built.bos_id, built.unk_id, built.newline_id) == (0, 1, 2, 3, 4)
    assert built.id_to_token(5) == WORDS[0]
    first_loc = built.loc_ids[0]
    assert built.loc_ids == list(range(first_loc, first_loc + 1024))
    assert built.seg_ids == list(range(first_loc + 1024, first_loc + 1152))
    assert built.image_id == built.vocab_size - 1 == first_loc + 1152
    assert built.id_to_token(first_loc - 1) not in LOC_TOKENS  # nothing but pieces before the loc block


def _ids(tok: Tokenizer, *pieces: str) -> list[int]:
    out = [tok.token_to_id(p) for p in pieces]
    assert None not in out, pieces
    return out  # type: ignore[return-value]


# (prefix, suffix, max_len) -> (prefix pieces, suffix pieces, eos?, prefix_len) for the built tokenizer
PROMPT_CASES = [
    ("caption en", None, None, ["caption", "▁en"], [], False),
    ("caption en\n", "a red circle", None, ["caption", "▁en"], ["a", "▁red", "▁circle"], True),
    ("", None, None, [], [], False),
    ("", "", None, [], [], True),
    ("ocr\n\n", None, None, ["ocr", "\n"], [], False),  # exactly one trailing "\n" is stripped
    ("detect cat", "<loc0001> cat", None, ["detect", "▁cat"], ["<loc0001>", "▁cat"], True),
    ("caption en", "a red circle", 6, ["caption", "▁en"], ["a", "▁red"], False),  # EOS and a word cut
    ("caption en", "a red circle", 4, ["caption", "▁en"], [], False),  # only the prefix part fits
    ("caption en", "a red circle", 8, ["caption", "▁en"], ["a", "▁red", "▁circle"], True),
]


@pytest.mark.parametrize("prefix, suffix, max_len, pre, suf, eos", PROMPT_CASES)
def test_encode_prompt_layout(built, prefix, suffix, max_len, pre, suf, eos):
    p = built.encode_prompt(prefix, suffix, max_len=max_len)
    expected = [2, *_ids(built, *pre), 4, *_ids(built, *suf), *([1] if eos else [])]
    n_pre = len(pre) + 2
    assert p == PromptTokens(expected, [0] * n_pre + [1] * (len(expected) - n_pre),
                             [0] * n_pre + [1] * (len(expected) - n_pre), n_pre)
    assert len(p) == len(expected)


def test_encode_prompt_same_layout_on_sentencepiece(sp):
    p = sp.encode_prompt("answer en what color is the car\n", "blue")
    pre, suf = sp.encode("answer en what color is the car"), sp.encode("blue")
    assert p.ids == [sp.bos_id, *pre, sp.newline_id, *suf, sp.eos_id]
    assert p.prefix_len == len(pre) + 2
    assert p.ar_mask == p.loss_mask == [0] * p.prefix_len + [1] * (len(suf) + 1)
    assert sp.encode_prompt("ocr").ids == [sp.bos_id, *sp.encode("ocr"), sp.newline_id]


def test_separator_is_tokenized_on_its_own(sp):
    """Gemma has a "\\n\\n" piece: tokenizing prefix + "\\n" as one string would merge a newline ending the
    prefix text with the separator; big_vision tokenizes the separator alone."""
    nl, nlnl = sp.newline_id, sp.token_to_id("\n\n")
    assert sp.encode("ocr\n\n") == [*sp.encode("ocr"), nlnl]
    assert sp.encode_prompt("ocr\n\n").ids == [sp.bos_id, *sp.encode("ocr"), nl, nl]
    assert sp.encode_prompt("a\n", "b").ids == [sp.bos_id, *sp.encode("a"), nl, *sp.encode("b"), sp.eos_id]


def test_separator_is_never_merged(tok):
    for prefix in ["a", "the cat.", "what is this?", "a "]:
        ids = tok.encode_prompt(prefix).ids
        assert ids[-1] == tok.newline_id and ids[1:-1] == tok.encode(prefix)


def test_prompt_longer_than_max_len_is_an_error(tok):
    n = tok.encode_prompt("the red circle").prefix_len
    with pytest.raises(ValueError, match=f"prompt is {n} tokens .* max_len is {n - 1}"):
        tok.encode_prompt("the red circle", "a", max_len=n - 1)
    with pytest.raises(ValueError, match="positive"):
        tok.encode_prompt("a", max_len=0)
    with pytest.raises(TypeError):
        tok.encode_prompt(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ loc / seg
def test_loc_and_seg_lookup(tok):
    assert len(tok.loc_ids) == 1024 and len(tok.seg_ids) == 128
    for v in (0, 1, 511, 1023):
        i = tok.loc_ids[v]
        assert tok.encode(LOC_TOKENS[v]) == [i]
        assert tok.is_loc(i) and not tok.is_seg(i) and tok.loc_value(i) == v and tok.seg_value(i) is None
    for v in (0, 64, 127):
        i = tok.seg_ids[v]
        assert tok.encode(SEG_TOKENS[v]) == [i] and tok.is_seg(i) and tok.seg_value(i) == v
    word = tok.encode("cat")[0]
    assert not tok.is_loc(word) and tok.loc_value(word) is None and tok.seg_value(tok.bos_id) is None
    ids = tok.encode(DETECTION)
    assert [tok.loc_value(i) for i in ids[:4]] == [12, 100, 500, 900]
    assert len(set(ids[:4]) & set(tok.loc_ids)) == 4


@pytest.mark.parametrize("text", [DETECTION, SEGMENT, "<seg127><loc0000>x"])
def test_decode_keeps_loc_seg_and_drops_pad_bos_eos(tok, text):
    ids = tok.encode(text)
    full = [tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(full) == text
    assert tok.decode(torch.tensor(full)) == text and tok.decode(np.array(full)) == text
    raw = tok.decode(full, skip_special_tokens=False)
    assert raw.startswith("<bos>") and "<eos>" in raw and text in raw


def test_tokenizer_without_loc_tokens_is_refused(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, normalizers

    vocab = [(s, 0.0) for s in ("<pad>", "<eos>", "<bos>", "<unk>")]
    vocab += [(c, -1.0) for c in "\nabcdefghijklmnopqrstuvwxyz0123456789<>▁"]
    t = HFTok(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    t.normalizer = normalizers.Replace(" ", "▁")
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a PaliGemma tokenizer.*missing.*<loc0000>"):
        Tokenizer.from_file(tmp_path)
    plain = Tokenizer.from_file(tmp_path, require_loc_seg=False)
    assert plain.loc_ids == plain.seg_ids == [] and not plain.is_loc(5)
    assert len(plain.encode("<loc0001>")) == 9  # split into characters: why a PaliGemma tokenizer is needed
    # a SentencePiece model with the loc tokens but no seg tokens: also refused, even with require_loc_seg=False
    only_loc = train_sentencepiece(tmp_path / "loc_only.model", ("\n", *LOC_TOKENS))
    for req in (True, False):
        with pytest.raises(ValueError, match="not a PaliGemma tokenizer.*128 of the 1152"):
            Tokenizer.from_file(only_loc, require_loc_seg=req)


def test_loc_tokens_in_vocab_but_not_atomic_are_registered_like_transformers(built_dir, built, tmp_path):
    data = json.loads((built_dir / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if not t["content"].startswith(("<loc", "<seg"))]
    for entry in data["model"]["vocab"]:
        if entry[0].startswith(("<loc", "<seg")):
            entry[1] = -100.0  # the unigram now prefers spelling them out
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    from tokenizers import Tokenizer as HFTok

    assert len(HFTok.from_file(str(tmp_path / "tokenizer.json")).encode("<loc0001>").ids) > 1
    fixed = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert fixed.loc_ids == built.loc_ids and fixed.seg_ids == built.seg_ids
    assert fixed.encode(DETECTION) == built.encode(DETECTION)


def test_missing_special_token_and_file_errors(tmp_path, built_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="No tokenizer in folder"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tok.txt").write_text("x")
    with pytest.raises(ValueError, match="format"):
        Tokenizer.from_file(tmp_path / "tok.txt")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer.from_file(tmp_path / "tokenizer.model")
    data = json.loads((built_dir / "tokenizer.json").read_text())
    data["model"]["vocab"][2][0] = "<s>"
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<bos>"]
    (tmp_path / "nobos").mkdir()
    (tmp_path / "nobos" / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no <bos> token"):
        Tokenizer.from_file(tmp_path / "nobos")


def test_folder_prefers_tokenizer_json(tmp_path, built_dir):
    (tmp_path / "tokenizer.json").write_text((built_dir / "tokenizer.json").read_text())
    train_sentencepiece(tmp_path / "tokenizer.model")
    assert Tokenizer.from_file(tmp_path).path.name == "tokenizer.json"


def test_bad_ids_and_texts(tok):
    with pytest.raises(ValueError, match="outside this tokenizer's vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(ValueError, match="outside"):
        tok.token_texts([-1])
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ texts
TEXTS = ["a red circle", " the  cat\non a car.", DETECTION, SEGMENT, "", "?!", "caption en"]


@pytest.mark.parametrize("text", TEXTS)
def test_token_texts_join_to_decode(tok, text):
    ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
    texts = tok.token_texts(ids)
    assert len(texts) == len(ids) and texts[0] == texts[-1] == ""
    assert "".join(texts) == tok.decode(ids) == text
    assert tok.token_texts(ids[1:-1]) == texts[1:-1]
    raw = tok.token_texts(ids, skip_special_tokens=False)
    assert "".join(raw) == tok.decode(ids, skip_special_tokens=False) and raw[0] == "<bos>"


def test_token_texts_of_loc_tokens_and_spaces(built):
    ids = built.encode("<loc0012><loc0100> red circle")
    assert built.token_texts(ids) == ["<loc0012>", "<loc0100>", " red", " circle"]


def test_byte_fallback_characters_stream_cleanly(sp):
    text = "é€😀 ok 日本"
    ids = sp.encode(text)
    assert len(ids) > len(text)  # several byte tokens per character
    texts = sp.token_texts(ids)
    assert "".join(texts) == text and "\ufffd" not in "".join(texts)
    assert "😀" in texts  # the token completing a character carries all of it; its bytes before carry ""
    for k in range(1, len(ids) + 1):  # streaming: texts of a prefix never change later
        assert sp.token_texts(ids[:k], final=False) == texts[:k]
    dangling = ids[: ids.index(sp.token_to_id("<0x82>")) + 1]  # stops inside "€"
    assert sp.token_texts(dangling, final=False)[-1] == ""
    assert "".join(sp.token_texts(dangling)) == sp.decode(dangling)  # final: the remainder is flushed


def test_unknown_characters_warn_on_the_built_tokenizer(built):
    with pytest.warns(UserWarning, match="does not know"):
        ids = built.encode("a ü")
    assert built.unk_id in ids


# alphabet of the built tokenizer: its characters, space and "\n", plus whole <loc>/<seg> tokens
_ALPHABET = sorted(set("".join(WORDS + CHARS)) | {" ", "\n"})
_CHUNK = st.one_of(st.text(alphabet=_ALPHABET, max_size=12), st.sampled_from(list(LOC_TOKENS[::97]) + list(
    SEG_TOKENS[::17])), st.sampled_from(WORDS))


@settings(max_examples=150, deadline=None)
@given(parts=st.lists(_CHUNK, max_size=8))
def test_round_trip_built(built, parts):
    text = "".join(parts)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no <unk> for text over the alphabet
        ids = built.encode(text)
    assert built.decode(ids) == text
    assert "".join(built.token_texts(ids)) == text


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
                    max_size=30))
def test_round_trip_sentencepiece_any_unicode(sp, text):
    ids = sp.encode(text)
    assert sp.unk_id not in ids
    assert sp.decode(ids) == text
    assert "".join(sp.token_texts(ids)) == text


# ------------------------------------------------------------------------------------------ transformers
def test_transformers_loads_the_built_tokenizer_identically(built_dir, built):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(built_dir)
    assert (hf.pad_token_id, hf.eos_token_id, hf.bos_token_id, hf.unk_token_id) == (0, 1, 2, 3)
    assert hf.convert_tokens_to_ids("<image>") == built.image_id
    assert len(hf) == built.vocab_size
    for text in TEXTS + ["what color is the car?\n", "A-Z (0123) / x: 'q'"]:
        ids = built.encode(text)
        assert hf.encode(text, add_special_tokens=False) == ids, text
        assert hf(text)["input_ids"] == [2, *ids]  # Gemma-style: BOS when special tokens are asked for
        assert hf.decode(ids + [1], skip_special_tokens=True) == built.decode(ids + [1]) == text


def test_transformers_paligemma_processor_builds_the_same_sequence(built_dir, built, tmp_path):
    """transformers' PaliGemmaProcessor on the built tokenizer + our preprocessor_config.json gives the image
    tokens followed by exactly encode_prompt's ids, token_type_ids == ar_mask, and our pixel values."""
    import shutil

    from PIL import Image
    from transformers import PaliGemmaProcessor

    from palikit.preprocess import ImageProcessor

    for f in built_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    ImageProcessor(size=28).save(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proc = PaliGemmaProcessor.from_pretrained(tmp_path)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    n_img = (28 // 14) ** 2
    for prefix, suffix in [("caption en", "a red circle"), ("detect cat ; dog", DETECTION), ("", "ok")]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = proc(text=prefix, images=img, suffix=suffix, return_tensors="pt")
        ours = built.encode_prompt(prefix, suffix)
        assert out["input_ids"][0].tolist() == [built.image_id] * n_img + ours.ids
        assert out["token_type_ids"][0].tolist() == [0] * n_img + ours.ar_mask
        labels = [-100 if m == 0 else i for i, m in zip(ours.ids, ours.loss_mask)]
        assert out["labels"][0].tolist() == [-100] * n_img + labels
        torch.testing.assert_close(out["pixel_values"], ImageProcessor(size=28)(img), atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ building
@pytest.mark.parametrize("pieces, match", [(["a", "<loc0001>"], "reserved"), (["a", ""], "empty"),
                                           (["a\nb"], "newline"), ("abc", "list of strings")])
def test_build_tokenizer_rejects_bad_pieces(tmp_path, pieces, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build_tokenizer(pieces, tmp_path)


def test_build_tokenizer_into_folder_with_byte_fallback(tmp_path):
    tok = build_tokenizer(["hello", "world"], tmp_path / "out", byte_fallback=True)
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "tokenizer_config.json").is_file()
    assert tok.encode("hello world") == _ids(tok, "hello", "▁world")
    text = "hello ü€ world"
    assert tok.decode(tok.encode(text)) == text == "".join(tok.token_texts(tok.encode(text)))
    assert tok.loc_ids[0] == tok.token_to_id("<0xFF>") + 1
