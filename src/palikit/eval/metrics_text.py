"""Text metrics: OCR accuracy / CER / exact match, ANLS (DocVQA), VQAv2 accuracy, CIDEr-D, counting.

Every function is pure (strings in, floats out). Definitions, with their sources:

- OCR accuracy   = 1 - lev(pred, ref) / max(len(pred), len(ref)) per sample (1.0 when both are empty),
  averaged. This is 1 - maestro's normalised edit distance and lies in [0, 1]. Levenshtein distance
  with unit insert / delete / substitute costs (rapidfuzz `Levenshtein.distance`).
- CER            = lev(pred, ref) / len(ref) (edits per reference character; can exceed 1), corpus CER
  = sum of edits / sum of reference lengths (as jiwer / most OCR papers report it).
- exact match    = pred == ref, optionally after lower-casing and collapsing whitespace.
- ANLS           = Biten et al. 2019 "Scene Text Visual Question Answering" (arXiv 1907.00490, Eq. 1):
  per question max over ground truths of (1 - NL) if NL < tau else 0, NL = lev / max(len), tau = 0.5.
  big_vision `evaluators/proj/paligemma/transfers/vqa.py::anls_metric` (an empty target scores
  1 only for an empty prediction). DocVQA transfers lower-case both sides first (`lowercase=True`).
- VQAv2 accuracy = official `vqaEval.py` (GT-Vision-Lab/VQA), as re-implemented by big_vision
  `transfers/vqav2.py`: strip newlines/tabs; IF the ground truths disagree, normalise answer and
  ground truths (punctuation, full stops not in numbers, lower case, number words -> digits, drop
  articles, restore contractions); score = mean over the 10 leave-one-out subsets of
  min(#matches in the 9 remaining / 3, 1).
- CIDEr-D        = Vedantam et al. 2015, as in pycocoevalcap `cider/cider_scorer.py`: n-grams 1..4,
  tf-idf with document frequency over the REFERENCES of the whole corpus (idf = log(#images) -
  log(max(1, df))), per-n cosine with the hypothesis tf clipped to the reference tf, Gaussian length
  penalty exp(-d^2 / (2 sigma^2)) with sigma = 6 where the "length" is the number of bigrams (a quirk
  of the reference code, kept), mean over n and over references, times 10. Tokenisation: pycocoevalcap
  uses the Stanford PTB tokenizer (Java) then drops punctuation tokens; `caption_tokenize` is a
  Java-free approximation (lower case, split off punctuation, drop it). Scores here are on the raw
  pycocoevalcap scale (papers print x100, e.g. 1.419 -> 141.9).
- counting       = exact match of the integer, number words ("three", "twenty one") parsed too
  (big_vision `transfers/tallyqa.py` compares the decoded string to the digit string).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence


def _lev(a: str, b: str) -> int:
    try:
        from rapidfuzz.distance import Levenshtein
    except ImportError:  # small pure-python fallback (O(len(a) * len(b)))
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]
    return int(Levenshtein.distance(a, b))


def normalize_text(s: str, *, lowercase: bool = True, collapse_whitespace: bool = True) -> str:
    """Lower-case and collapse runs of whitespace (strip ends) -- the normalisation applied to every
    model alike when `normalize=True` is passed to the OCR metrics."""
    if lowercase:
        s = s.lower()
    if collapse_whitespace:
        s = " ".join(s.split())
    return s


# ------------------------------------------------------------------------------ OCR
def edit_distance(pred: str, ref: str) -> int:
    """Levenshtein distance (unit costs for insertion, deletion, substitution)."""
    return _lev(pred, ref)


def normalized_edit_distance(pred: str, ref: str) -> float:
    """lev(pred, ref) / max(len(pred), len(ref)); 0.0 when both are empty. In [0, 1]."""
    n = max(len(pred), len(ref))
    return 0.0 if n == 0 else _lev(pred, ref) / n


def ocr_accuracy(pred: str, ref: str, *, normalize: bool = False) -> float:
    """Per-sample OCR accuracy = 1 - normalized_edit_distance(pred, ref) in [0, 1] (Roboflow-style
    Levenshtein accuracy, flavour (a) of peers.md section 3)."""
    if normalize:
        pred, ref = normalize_text(pred), normalize_text(ref)
    return 1.0 - normalized_edit_distance(pred, ref)


def cer(pred: str, ref: str, *, normalize: bool = False) -> float:
    """Character error rate of one sample: lev(pred, ref) / len(ref). An empty reference gives 0.0
    for an empty prediction and len(pred) otherwise (every character is an insertion)."""
    if normalize:
        pred, ref = normalize_text(pred), normalize_text(ref)
    d = _lev(pred, ref)
    return d / len(ref) if ref else float(d)


def corpus_cer(preds: Sequence[str], refs: Sequence[str], *, normalize: bool = False) -> float:
    """Corpus CER = total edits / total reference characters."""
    _same_len(preds, refs)
    if normalize:
        preds, refs = [normalize_text(p) for p in preds], [normalize_text(r) for r in refs]
    total = sum(len(r) for r in refs)
    edits = sum(_lev(p, r) for p, r in zip(preds, refs))
    return edits / total if total else float(edits)


def exact_match(pred: str, ref: str, *, normalize: bool = False) -> float:
    """1.0 when pred == ref (after `normalize_text` when normalize=True), else 0.0."""
    if normalize:
        pred, ref = normalize_text(pred), normalize_text(ref)
    return float(pred == ref)


# ------------------------------------------------------------------------------ ANLS
def anls(pred: str, refs: str | Sequence[str], *, threshold: float = 0.5, lowercase: bool = True) -> float:
    """ANLS of one question: max over ground truths of s(pred, gt), s = 1 - NL if NL < threshold else
    0, NL = lev / max(len(gt), len(pred)); an empty gt scores pred == "". Whitespace at the ends is
    stripped; both sides lower-cased when `lowercase` (DocVQA convention)."""
    refs = [refs] if isinstance(refs, str) else list(refs)
    if not refs:
        raise ValueError("anls needs at least one ground-truth answer")
    p = pred.strip().lower() if lowercase else pred.strip()
    best = 0.0
    for gt in refs:
        g = gt.strip().lower() if lowercase else gt.strip()
        if not g:
            s = float(p == "")
        else:
            nl = _lev(g, p) / max(len(g), len(p))
            s = 1.0 - nl if nl < threshold else 0.0
        best = max(best, s)
    return best


# ------------------------------------------------------------------------------ VQAv2
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!"]
_VQA_ARTICLES = {"a", "an", "the"}
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official regex (a no-op lookbehind typo), kept


def vqa_normalize(answer: str) -> str:
    """The official VQA answer normalisation (`processPunctuation` then `processDigitArticle`).
    Quirks kept on purpose: a digit-comma-digit anywhere makes every punctuation mark vanish instead of
    becoming a space; the full-stop regex `(?!<=\\d)(\\.)(?!\\d)` strips every '.' not followed by a
    digit; 'none' maps to '0'; the contraction table maps words (not case-folded for 'Im', 'Ive')."""
    has_digit_comma = _DIGIT_COMMA.search(answer) is not None
    out = answer
    for p in _VQA_PUNCT:
        if has_digit_comma or f"{p} " in answer or f" {p}" in answer:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = []
    for w in out.lower().split():
        w = _VQA_NUMBERS.get(w, w)
        if w not in _VQA_ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def _vqa_strip(s: str) -> str:
    return s.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(pred: str, answers: Sequence[str]) -> float:
    """VQAv2 accuracy of one question against its (usually 10) human answers: mean over the
    leave-one-out subsets of min(#matching answers among the others / 3, 1). Normalisation is applied
    only when the human answers disagree (as the official script does)."""
    gts = [_vqa_strip(a) for a in answers]
    if not gts:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    ans = _vqa_strip(pred)
    if len(set(gts)) > 1:
        ans = vqa_normalize(ans)
        gts = [vqa_normalize(a) for a in gts]
    matches = [a == ans for a in gts]
    total = sum(matches)
    if len(gts) == 1:
        return min(1.0, total / 3)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(gts)


# ------------------------------------------------------------------------------ CIDEr-D
_PTB_PUNCT = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--",
              "...", ";", "(", ")", "{", "}", "[", "]", '"'}
_TOKEN = re.compile(r"\.\.\.|--|\w+(?=n't\b)|n't\b|'\w+|\w+(?:-\w+)*|[^\w\s]")


def caption_tokenize(text: str) -> list[str]:
    """Java-free approximation of pycocoevalcap's PTBTokenizer: lower case, split words and
    punctuation ("dog's" -> "dog", "'s"), drop punctuation tokens."""
    toks = _TOKEN.findall(text.replace("\n", " ").lower())
    return [t for t in toks if t not in _PTB_PUNCT]


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    c: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            c[tuple(tokens[i:i + k])] += 1
    return c


def cider_d(preds: Sequence[str], refs: Sequence[Sequence[str]], *, n: int = 4, sigma: float = 6.0,
            tokenize: bool = True) -> tuple[float, list[float]]:
    """CIDEr-D over a corpus: returns (mean, per-image scores), the pycocoevalcap `Cider` scale.
    `tokenize=False` splits on whitespace only (for pre-tokenised text, e.g. to cross-check with
    pycocoevalcap's scorer fed the same strings)."""
    _same_len(preds, refs)
    tok = caption_tokenize if tokenize else str.split
    hyps = [_ngrams(tok(p), n) for p in preds]
    crefs = [[_ngrams(tok(r), n) for r in rs] for rs in refs]
    if not preds:
        return 0.0, []
    df: Counter = Counter()
    for rs in crefs:
        for g in {g for r in rs for g in r}:
            df[g] += 1
    log_n = math.log(float(len(crefs)))

    def vec(cnts: Counter):
        v: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in cnts.items():
            k = len(g) - 1
            w = float(tf) * (log_n - math.log(max(1.0, df[g])))
            v[k][g] = w
            norm[k] += w * w
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for hyp, rs in zip(hyps, crefs):
        vh, nh, lh = vec(hyp)
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            delta = float(lh - lr)
            val = 0.0
            for k in range(n):
                s = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    s /= nh[k] * nr[k]
                val += s * math.e ** (-(delta ** 2) / (2 * sigma ** 2))
            total += val
        scores.append(total / max(1, len(rs)) / n * 10.0)
    return sum(scores) / len(scores), scores


# ------------------------------------------------------------------------------ counting
_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()) if i > 1}
_EXTRA = {"no": 0, "none": 0, "a": 1, "an": 1, "single": 1, "once": 1, "twice": 2, "pair": 2, "couple": 2,
          "dozen": 12, "hundred": 100}


def parse_count(text: str) -> int | None:
    """The first integer in `text`: digits ("12", "1,000") or English number words ("twenty one",
    "twenty-one", "no", "a dozen"); None when there is none."""
    t = text.lower().replace("-", " ")
    m = re.search(r"\d[\d,]*", t)
    words = re.findall(r"[a-z]+|\d[\d,]*", t)
    for i, w in enumerate(words):
        if w[0].isdigit():
            return int(m.group(0).replace(",", "")) if m else None
        if w in _TENS:
            nxt = words[i + 1] if i + 1 < len(words) else ""
            return _TENS[w] + (_UNITS[nxt] if nxt in _UNITS and 0 < _UNITS[nxt] < 10 else 0)
        if w in _UNITS:
            return _UNITS[w]
        if w in ("dozen", "hundred") or (w in _EXTRA and w not in ("a", "an")):
            return _EXTRA[w]
        if w in ("a", "an") and i + 1 < len(words) and words[i + 1] in ("dozen", "hundred", "pair", "couple"):
            return _EXTRA[words[i + 1]]
    return None


def count_accuracy(pred: str, ref: str | int) -> float:
    """1.0 when the integer parsed from `pred` equals `ref` (an int or text parsed the same way)."""
    want = ref if isinstance(ref, int) else parse_count(str(ref))
    got = parse_count(pred)
    return float(got is not None and got == want)


# ------------------------------------------------------------------------------ helpers
def mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else float("nan")


def _same_len(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
