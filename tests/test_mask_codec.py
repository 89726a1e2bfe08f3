"""Mask VQ-VAE: layer layout vs big_vision's conventions, npz load/save, a small trained codec's
reconstructions, and full-resolution mask <-> token conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from palikit.tasks.mask_codec import MaskCodec, make_random_codec, mask_from_tokens, masks_from_tokens, tokens_from_mask
from palikit.train.mask_codec import train_mask_codec


def shapes(n: int, seed: int, size: int = 64) -> torch.Tensor:
    """Rectangles and ellipses at random positions and sizes, [n, size, size] in {0, 1}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.zeros((n, size, size), np.float32)
    s = size / 64
    for i in range(n):
        cx, cy = rng.uniform(12 * s, 52 * s, 2)
        rx, ry = rng.uniform(5 * s, 20 * s, 2)
        if rng.random() < 0.5:
            out[i] = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        else:
            out[i] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    return torch.from_numpy(out)


def iou(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def trained() -> MaskCodec:
    # ~10 s on 2 idle cores. One thread: tiny convs gain nothing from two, and lose a lot on a busy machine.
    # Held-out mean IoU after 300 steps was 0.84-0.86 over seeds 0-2, hence the 0.8 bar below.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_mask_codec(shapes(2000, 0), steps=300, batch_size=16, lr=5e-3, embed_dim=32,
                                enc_channels=(8, 16, 32, 64), dec_channels=(64, 64, 32, 16, 8), seed=0)
    finally:
        torch.set_num_threads(threads)


def test_shapes_names_and_ranges():
    codec = make_random_codec(0, embed_dim=512)
    names = set(codec.state_dict())
    assert "_vq_vae._embedding" in names and codec.codebook.shape == (128, 512)
    for key in ["encoder.0.weight", "encoder.6.bias", "encoder.8.net.0.weight", "encoder.9.net.4.weight",
                "encoder.10.weight", "decoder.0.weight", "decoder.2.net.2.weight", "decoder.3.net.4.bias",
                "decoder.4.weight", "decoder.10.weight", "decoder.12.weight"]:
        assert key in names, key
    assert tuple(codec.state_dict()["encoder.10.weight"].shape) == (512, 128, 1, 1)
    assert tuple(codec.state_dict()["decoder.4.weight"].shape) == (128, 128, 4, 4)  # ConvTranspose [in, out, k, k]
    assert tuple(codec.state_dict()["decoder.10.weight"].shape) == (32, 16, 4, 4)
    ids = torch.randint(0, 128, (3, 16))
    out = codec.decode(ids)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    codes = codec.encode(shapes(5, 1))
    assert codes.shape == (5, 16) and codes.dtype == torch.long and 0 <= int(codes.min()) and int(codes.max()) < 128
    with pytest.raises(ValueError, match="0..127"):
        codec.decode(torch.tensor([[128] * 16]))
    with pytest.raises(ValueError, match=r"\[N, 64, 64\]"):
        codec.encode(torch.zeros(2, 32, 32))


def test_layers_match_big_vision_conventions():
    """Recompute the codec with explicit big_vision semantics: TF 'SAME' k4/s2 encoder convs (pad 1+1),
    2*(m-0.5) input, row-major 4x4 token grid, and Flax ConvTranspose(k4, s2, padding=2,
    transpose_kernel=True) = conv over the 2x zero-dilated input, padded by 2, with the flipped kernel."""
    codec = make_random_codec(1, embed_dim=24)
    sd = {k: v.detach() for k, v in codec.state_dict().items()}
    m = shapes(3, 2)

    def res(x, name):
        h = F.relu(F.conv2d(x, sd[f"{name}.net.0.weight"], sd[f"{name}.net.0.bias"], padding=1))
        h = F.relu(F.conv2d(h, sd[f"{name}.net.2.weight"], sd[f"{name}.net.2.bias"], padding=1))
        return x + F.conv2d(h, sd[f"{name}.net.4.weight"], sd[f"{name}.net.4.bias"])

    x = 2 * (m[:, None] - 0.5)
    for i in (0, 2, 4, 6):
        x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), sd[f"encoder.{i}.weight"], sd[f"encoder.{i}.bias"], stride=2))
    x = res(res(x, "encoder.8"), "encoder.9")
    z = F.conv2d(x, sd["encoder.10.weight"], sd["encoder.10.bias"]).permute(0, 2, 3, 1).reshape(3, 16, 24)  # row-major
    emb = sd["_vq_vae._embedding"]
    ref_codes = torch.cdist(z, emb[None].expand(3, -1, -1)).argmin(-1)  # [3, 16]
    assert torch.equal(codec.encode(m), ref_codes)

    ids = torch.randint(0, 128, (2, 16))
    y = emb[ids].reshape(2, 4, 4, 24).permute(0, 3, 1, 2)  # token t -> row t // 4, column t % 4
    y = F.relu(F.conv2d(y, sd["decoder.0.weight"], sd["decoder.0.bias"]))
    y = res(res(y, "decoder.2"), "decoder.3")
    for i in (4, 6, 8, 10):
        wt = sd[f"decoder.{i}.weight"]  # [in, out, 4, 4]
        dil = torch.zeros(y.shape[0], y.shape[1], 2 * y.shape[2] - 1, 2 * y.shape[3] - 1)
        dil[:, :, ::2, ::2] = y
        kernel = wt.flip(-1, -2).transpose(0, 1)  # [out, in, 4, 4]
        y = F.relu(F.conv2d(F.pad(dil, (2, 2, 2, 2)), kernel, sd[f"decoder.{i}.bias"]))
    y = F.conv2d(y, sd["decoder.12.weight"], sd["decoder.12.bias"])[:, 0]
    assert y.shape == (2, 64, 64)
    torch.testing.assert_close(codec.decode(ids), y, rtol=1e-4, atol=1e-5)


def test_npz_round_trip_and_extra_keys(tmp_path):
    codec = make_random_codec(3, embed_dim=40, enc_channels=(4, 8, 8, 16), dec_channels=(16, 12, 8, 8, 4))
    path = codec.to_npz(tmp_path / "sub" / "vae.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae.npz"]  # no temp file left
    with np.load(path) as z:
        arrays = dict(z)
    arrays["_vq_vae._ema_w"] = np.zeros((128, 40), np.float32)  # EMA buffers as in vae-oid.npz: ignored
    arrays["_vq_vae._ema_cluster_size"] = np.zeros(128, np.float32)
    np.savez(tmp_path / "extra.npz", **arrays)
    for p in (path, tmp_path / "extra.npz"):
        loaded = MaskCodec.from_npz(p)
        assert loaded.config == codec.config
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(loaded.decode(ids), codec.decode(ids))
        m = shapes(4, 5)
        assert torch.equal(loaded.encode(m), codec.encode(m))


def test_npz_errors_name_the_key_and_shape(tmp_path):
    codec = make_random_codec(0, embed_dim=16, enc_channels=(4, 4, 4, 8), dec_channels=(8, 8, 4, 4, 4))
    with np.load(codec.to_npz(tmp_path / "ok.npz")) as z:
        arrays = dict(z)
    missing = {k: v for k, v in arrays.items() if k != "decoder.3.net.2.bias"}
    np.savez(tmp_path / "missing.npz", **missing)
    with pytest.raises(ValueError, match=r"missing key 'decoder.3.net.2.bias' \(expected shape \[8\]\)"):
        MaskCodec.from_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "nocodebook.npz", **{k: v for k, v in arrays.items() if not k.startswith("_vq_vae")})
    with pytest.raises(ValueError, match="missing key '_vq_vae._embedding'"):
        MaskCodec.from_npz(tmp_path / "nocodebook.npz")
    wrong = dict(arrays, **{"encoder.9.net.4.weight": np.zeros((8, 8, 3, 3), np.float32)})
    np.savez(tmp_path / "wrong.npz", **wrong)
    with pytest.raises(ValueError, match=r"'encoder.9.net.4.weight' has shape \[8, 8, 3, 3\], expected \[8, 8, 1, 1\]"):
        MaskCodec.from_npz(tmp_path / "wrong.npz")
    np.savez(tmp_path / "codes.npz", **dict(arrays, **{"_vq_vae._embedding": np.zeros((64, 16), np.float32)}))
    with pytest.raises(ValueError, match=r"expected \[128, D\]"):
        MaskCodec.from_npz(tmp_path / "codes.npz")


def test_train_rejects_bad_masks():
    with pytest.raises(ValueError, match=r"\[N, 64, 64\]"):
        train_mask_codec(torch.zeros(4, 32, 32), steps=1)
    with pytest.raises(ValueError, match="non-empty"):
        train_mask_codec(torch.zeros(0, 64, 64), steps=1)


@pytest.mark.slow  # trains a codec (the `trained` fixture)
def test_trained_codec_reconstructs_held_out_shapes(trained):
    held_out = shapes(200, 123)
    rec = trained.decode(trained.encode(held_out)) > 0.0
    ious = [iou(r, h) for r, h in zip(rec, held_out > 0.5)]
    assert float(np.mean(ious)) >= 0.8, np.mean(ious)
    assert len(torch.unique(trained.encode(held_out))) > 32  # the codebook is actually used


def test_the_masks_of_a_result_decode_in_one_call_equal_to_one_by_one(monkeypatch):
    from PIL import Image

    codec = make_random_codec(seed=3, embed_dim=32)
    rng = np.random.default_rng(0)
    seg_ids = [rng.integers(0, 128, 16).tolist() for _ in range(4)]
    boxes = [(3.7, 5.2, 60.9, 40.1), (0, 0, 80, 50), (10, 10, 10.5, 40), (50.5, 20.2, 79.9, 49.9)]
    size = (80, 50)
    expected = []
    for ids, (x0, y0, x1, y1) in zip(seg_ids, boxes):  # the per-instance reference, written out
        m64 = codec.decode(torch.tensor([ids]))[0].numpy()
        mask = np.zeros((50, 80), dtype=bool)
        x0, y0, x1, y1 = int(x0), int(y0), int(x1), int(y1)
        if x1 > x0 and y1 > y0:
            mask[y0:y1, x0:x1] = np.asarray(Image.fromarray(m64, mode="F").resize((x1 - x0, y1 - y0),
                                                                                 Image.BILINEAR)) > 0
        expected.append(mask)
    calls = []
    real = codec.decode
    monkeypatch.setattr(codec, "decode", lambda ids: calls.append(tuple(ids.shape)) or real(ids))
    got = masks_from_tokens(codec, seg_ids, boxes, size)
    assert calls == [(4, 16)]  # one codec call for the whole result
    assert all(np.array_equal(g, e) for g, e in zip(got, expected)) and len(got) == 4
    assert expected[0].any() and not expected[2].any()  # a real mask, and an empty box
    assert masks_from_tokens(codec, [], [], size) == []


@pytest.mark.slow  # trains a codec (the `trained` fixture)
def test_mask_from_tokens_pastes_inside_the_box(trained):
    full = torch.ones(1, 64, 64)
    ids = trained.encode(full)[0].tolist()
    box = (40.7, 30.2, 140.9, 90.6)  # x0, y0, x1, y1; floored to 40, 30, 140, 90 as big_vision does
    m = mask_from_tokens(trained, ids, box, (200, 120))
    assert m.shape == (120, 200) and m.dtype == bool
    assert not m[:30].any() and not m[90:].any() and not m[:, :40].any() and not m[:, 140:].any()
    assert m[30:90, 40:140].mean() > 0.9
    assert not mask_from_tokens(trained, ids, (10, 10, 10.5, 50), (200, 120)).any()  # empty after flooring
    assert np.array_equal(trained.mask_from_tokens(ids, box, (200, 120)), m)


@pytest.mark.slow  # trains a codec (the `trained` fixture)
def test_tokens_from_mask_round_trip_full_resolution(trained):
    h, w = 240, 320
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    full = ((xx - 170) / 90) ** 2 + ((yy - 110) / 60) ** 2 <= 1  # ellipse, bbox x 80..260, y 50..170
    box = (80.0, 50.0, 260.0, 170.0)
    ids = tokens_from_mask(trained, full, box)
    assert len(ids) == 16 and all(0 <= i < 128 for i in ids)
    back = mask_from_tokens(trained, ids, box, (w, h))
    assert iou(back, full) >= 0.8
    assert ids == trained.tokens_from_mask(full.astype(np.uint8) * 255, box)  # uint8 0/255 masks work too
    with pytest.raises(ValueError, match="empty"):
        tokens_from_mask(trained, full, (10, 10, 10, 40))
