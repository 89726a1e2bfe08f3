"""Batches in big_vision's layout; the hf loss equals transformers' loss on the same weights and
batch; the big_vision loss equals a hand computation; padding never leaks into the loss."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers.models import TINY
from palikit.model import build_model
from palikit.train.collate import Collator, batch_loss, hf_labels, loss_denominator, loss_terms, token_nll
from palikit.train.data import load_jsonl
from palikit.weights.hf import internal_key, load_state_dict_into
from helpers.train import SimpleImageProcessor, WordTokenizer, write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(kind: str):
    """transformers and palikit models with the same random weights. `<image>` is out of the
    vocabulary (id == vocab_size, the big_vision-converted layout) so both predict the same
    vocabulary and transformers' own `.loss` is directly comparable."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    cfg = replace(TINY[kind], image_token_index=TINY[kind].text.vocab_size)
    hcfg = HFConfig(**cfg.to_hf_dict())
    for c in (hcfg, hcfg.text_config, hcfg.vision_config):
        c._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = PaliGemmaForConditionalGeneration(hcfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3 if p.ndim == 1 else 0.1)
    sd = {internal_key(k): v for k, v in hf.state_dict().items() if not k.endswith("lm_head.weight")}
    ours = load_state_dict_into(build_model(cfg), sd, "hf").eval()
    return hf, ours, cfg


def _batch(tmp_path, cfg, **kw):
    ds = load_jsonl(write_dataset(tmp_path))
    col = Collator(WordTokenizer(), SimpleImageProcessor(cfg.vision.image_size), cfg, **kw)
    return col(ds.examples), ds


def test_layout_is_big_vision(tmp_path):
    cfg = TINY["pg1"]
    batch, ds = _batch(tmp_path, cfg)
    tok = WordTokenizer()
    N = cfg.vision.num_image_tokens
    # row 1: "caption en blue" -> "a small blue circle"
    pre = [2] + tok.encode("caption en blue") + [4]
    suf = tok.encode("a small blue circle") + [1]
    n = N + len(pre) + len(suf)
    T = batch["input_ids"].shape[1]
    assert batch["input_ids"][1].tolist() == [cfg.image_token_index] * N + pre + suf + [0] * (T - n)
    assert batch["ar_mask"][1].tolist() == [0] * (N + len(pre)) + [1] * len(suf) + [1] * (T - n)
    assert batch["loss_mask"][1].tolist() == [0] * (N + len(pre)) + [1] * len(suf) + [0] * (T - n)
    assert batch["attention_mask"][1].tolist() == [1] * n + [0] * (T - n)
    assert batch["pixel_values"].shape == (4, 3, 28, 28)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    # longest row decides T; fixed length pads further; max_len cuts the tail (EOS lost)
    assert (batch["attention_mask"].sum(1) == T).any()
    fixed, _ = _batch(tmp_path, cfg, max_len=20, pad_to_max_len=True)
    assert fixed["input_ids"].shape[1] == N + 20
    cut, _ = _batch(tmp_path, cfg, max_len=6)
    assert cut["input_ids"].shape[1] == N + 6 and not (cut["input_ids"] == 1).any()


@pytest.mark.parametrize("kind", ["pg1", "pg2"])
def test_hf_loss_equals_transformers(tmp_path, kind):
    hf, ours, cfg = _pair(kind)
    batch, _ = _batch(tmp_path, cfg)
    with torch.no_grad():
        ref = hf(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                 attention_mask=batch["attention_mask"], token_type_ids=batch["ar_mask"] * batch["attention_mask"],
                 position_ids=torch.cumsum(batch["attention_mask"], 1), labels=hf_labels(batch))
        mine = batch_loss(ours, batch, "hf")
        bv = batch_loss(ours, batch, "big_vision")
    assert abs(mine.item() - ref.loss.item()) < 1e-5, (mine.item(), ref.loss.item())

    # big_vision: per-example mean over suffix + EOS (targets = next token), then batch mean
    logp = torch.log_softmax(ref.logits.double(), -1)
    ids, lm = batch["input_ids"], batch["loss_mask"]
    per_example = []
    for b in range(ids.shape[0]):
        terms = [-logp[b, t - 1, ids[b, t]] for t in range(1, ids.shape[1]) if lm[b, t]]
        per_example.append(sum(terms) / len(terms))
    hand = sum(per_example) / len(per_example)
    assert abs(bv.item() - hand.item()) < 1e-5
    assert abs(bv.item() - mine.item()) > 1e-4  # ragged suffixes: the two losses really differ


def test_padding_never_leaks(tmp_path):
    _, ours, cfg = _pair("pg1")
    batch, ds = _batch(tmp_path, cfg)
    padded, _ = _batch(tmp_path, cfg, max_len=40, pad_to_max_len=True)
    assert padded["input_ids"].shape[1] > batch["input_ids"].shape[1]
    with torch.no_grad():
        for kind in ("hf", "big_vision"):
            a, b = batch_loss(ours, batch, kind), batch_loss(ours, padded, kind)
            assert abs(a.item() - b.item()) < 1e-6
        # garbage in the padded slots changes nothing either
        junk = dict(padded)
        junk["input_ids"] = torch.where(padded["attention_mask"].bool(), padded["input_ids"], 7)
        assert abs(batch_loss(ours, junk).item() - batch_loss(ours, padded).item()) < 1e-6
        nll, w = token_nll(ours, padded)
        assert (nll[~w] == 0).all()
        # splitting a batch (accumulation / ranks) with the numerator/denominator split is exact
        col = Collator(WordTokenizer(), SimpleImageProcessor(28), cfg)
        for kind in ("hf", "big_vision"):
            parts = [col(ds.examples[:1]), col(ds.examples[1:])]
            num = sum(loss_terms(*token_nll(ours, p), kind) for p in parts)
            den = sum(loss_denominator(p, kind) for p in parts)
            assert abs((num / den).item() - batch_loss(ours, batch, kind).item()) < 1e-6


def test_label_smoothing_equals_the_smoothed_cross_entropy(tmp_path):
    _, ours, cfg = _pair("pg2")
    batch, _ = _batch(tmp_path, cfg)
    eps = 0.1
    with torch.no_grad():
        plain, w = token_nll(ours, batch)
        smooth, w2 = token_nll(ours, batch, label_smoothing=eps)
        hidden = ours(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                      ar_mask=batch["ar_mask"], return_hidden=True)
        logp = torch.log_softmax(ours.logits(hidden[:, :-1]).double(), -1)  # [B, T-1, V]
    assert torch.equal(w, w2) and w.any()
    expected = (1 - eps) * plain.double() + eps * (-logp.mean(-1))
    assert torch.allclose(smooth.double()[w], expected[w], atol=1e-5)
    assert (smooth[w] - plain[w]).abs().max() > 1e-3  # smoothing does change the loss


def test_kernel_only_weight_decay_spares_norms_biases_and_embeddings():
    from palikit.train.config import ConfigError, TrainConfig
    from palikit.train.optim import param_groups

    _, model, _ = _pair("pg2")
    trainable = list(model.parameters())
    decay, rest = param_groups(model, trainable, 0.1, "kernels")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in rest["params"]}
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert decayed and all(n.endswith(".weight") and "norm" not in n and "embed_tokens" not in n
                           and "position_embedding" not in n for n in decayed), decayed
    assert any("q_proj" in n for n in decayed) and any("patch_embedding" in n for n in decayed)  # Linear + Conv
    assert any("norm" in n for n in spared) and any("embed_tokens" in n for n in spared)
    assert any(n.endswith(".bias") for n in spared) and any("position_embedding" in n for n in spared)
    assert len(decayed) + len(spared) == sum(1 for _ in model.parameters())
    assert len(param_groups(model, trainable, 0.1, "all")) == 1

    # one AdamW step with zero gradients: only the decay term moves anything
    opt = torch.optim.AdamW([decay, rest], lr=0.5, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        factor = 1 - 0.5 * 0.1 if n in decayed else 1.0
        assert torch.allclose(p.detach(), before[n] * factor, atol=1e-7), n
    with pytest.raises(ConfigError, match="weight_decay_on"):
        TrainConfig(weight_decay_on="bias")
    with pytest.raises(ConfigError, match="label_smoothing"):
        TrainConfig(label_smoothing=1.0)


def test_image_cache_gives_the_same_batches_without_rereading(tmp_path):
    cfg = TINY["pg1"]
    ds = load_jsonl(write_dataset(tmp_path))
    plain = Collator(WordTokenizer(), SimpleImageProcessor(cfg.vision.image_size), cfg)
    cached = Collator(WordTokenizer(), SimpleImageProcessor(cfg.vision.image_size), cfg, cache_images=True)
    exs = list(ds.examples)
    doubled = exs[:2] + exs[:2]  # the same file twice in one batch, before it is cached
    first = cached(doubled)
    assert torch.equal(first["pixel_values"], plain(doubled)["pixel_values"])
    assert len(cached._pixels) == len({str(e.image) for e in doubled})
    full = cached(exs)
    for ex in exs:  # once cached, the files are not read again
        Path(ex.image).unlink(missing_ok=True)
    again = cached(exs)
    assert all(torch.equal(full[k], again[k]) for k in full)
    with pytest.raises(ValueError, match="cannot read image"):
        plain(exs)
