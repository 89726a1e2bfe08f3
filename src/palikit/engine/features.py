"""Image features for the engine: the vision tower run once per distinct image, as one batch per
admission, behind an LRU cache keyed by the image's content and bounded in bytes.

A request brings either ready `image_features` or `pixel_values` [F, 3, S, S] plus a content key
(`pixel_key`: a hash of exactly those pixels, so the same picture sent as a path, bytes or a PIL
image hits the same entry). A request on a LoRA adapter that touches the tower or projector runs
the tower on its adapter slot and is cached under (image, adapter): `feature_key`. The cache is dropped whenever the vision weights change (their tensor
version counters move on every in-place update, e.g. an optimizer step), so a model being trained
never gets stale features.
"""

from __future__ import annotations

import collections
import hashlib

import torch

from ..model.lora import lora_rows


def pixel_key(pixel_values: torch.Tensor) -> str:
    """Content hash of a preprocessed image (or frames) tensor."""
    t = pixel_values.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes())
    return h.hexdigest()


class FeatureCache:
    """LRU of image features [F*N, H] by content key, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._weights_version: tuple | None = None

    def get(self, key: str) -> torch.Tensor | None:
        feats = self._items.get(key)
        if feats is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return feats

    def put(self, key: str, feats: torch.Tensor) -> None:
        size = feats.numel() * feats.element_size()
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = feats
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def check_weights(self, model) -> None:
        """Drop everything if the vision tower or projector changed since the last call."""
        version = tuple(p._version for p in (*model.vision_tower.parameters(), *model.multi_modal_projector.parameters()))
        if version != self._weights_version:
            self.clear()
            self._weights_version = version


def feature_key(request) -> str | None:
    """The feature-cache key of a request's image: its content, plus its tower adapter if any."""
    if not request.pixel_key:
        return None
    return request.pixel_key if request.lora_key is None else f"{request.pixel_key}|{request.lora_key}"


def encode_requests(model, requests, cache: FeatureCache | None) -> None:
    """Fill `image_features` of every request that has only pixels: cache hits first, then the
    misses through the vision tower, one batch per frame count. Runs on the engine's thread."""
    todo = [r for r in requests if r.image_features is None and r.pixel_values is not None]
    if not todo:
        return
    if cache is not None:
        cache.check_weights(model)
    misses: dict[str, list] = {}
    for r in todo:
        key = feature_key(r)
        hit = cache.get(key) if cache is not None and key else None
        if hit is not None:
            r.image_features = hit
        else:
            misses.setdefault(key or str(id(r)), []).append(r)
    by_frames: dict[int, list[str]] = collections.defaultdict(list)
    for key, rs in misses.items():
        by_frames[rs[0].pixel_values.shape[0]].append(key)
    w = model.vision_tower.embeddings.patch_embedding.weight
    for keys in by_frames.values():
        pv = torch.stack([misses[k][0].pixel_values for k in keys]).to(w.device, w.dtype)  # [n, F, 3, S, S]
        slots = [misses[k][0].lora_slot for k in keys for _ in range(pv.shape[1])]  # one per frame
        with lora_rows(model, slots):
            feats = model.embed_images(pv)  # [n, F*N, H]
        for key, f in zip(keys, feats):
            f = f.clone()  # its own storage: the cache must not keep the whole batch alive
            for r in misses[key]:
                r.image_features = f
            if cache is not None and feature_key(misses[key][0]):
                cache.put(key, f)
