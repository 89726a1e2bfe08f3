"""Adapter residency for multi-LoRA serving: names -> PEFT folders on disk -> CPU copies (LRU,
`max_cpu_loras`) -> device slots (LRU, `max_loras`; `model.lora.LoRASlots`).

`load(name, path)` reads and checks an adapter (any thread) and keeps its tensors on the CPU;
`acquire(name)` (the engine thread, at admission) gives it a device slot, evicting the least
recently used adapter no live row uses, or returns None when every slot is busy (the request
waits in the queue); `release` when a request ends. `unload(name)` refuses new requests at once and
drops the adapter when the requests that already hold it have finished. An adapter evicted from the
CPU cache is read from disk again on its next use.
"""

from __future__ import annotations

import collections
import itertools
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.lora import LoRASlots, touches_tower


class AdapterError(ValueError):
    """An adapter that cannot be loaded (bad file, rank over the limit, another base model)."""


class UnknownAdapter(KeyError):
    """A request names an adapter that is not loaded."""

    def __init__(self, name: str, loaded: list[str]):
        self.name, self.loaded = name, loaded
        super().__init__(f"unknown adapter {name!r}; loaded adapters: {', '.join(loaded) or '(none)'}")

    def __str__(self) -> str:
        return self.args[0]


@dataclass(eq=False)
class Adapter:
    name: str
    path: Path
    uid: str  # name + load number: feature-cache keys never mix two loads of one name
    rank: int
    scale: float
    modules: tuple[str, ...]
    tower: bool  # touches the vision tower or projector: image features depend on it
    refs: int = 0  # submitted requests not finished yet
    live: int = 0  # of which admitted (their rows read the slot)
    slot: int = 0  # device slot, 0 = none
    unloading: bool = False


class AdapterSlots:
    def __init__(self, model, reader, max_loras: int = 4, max_lora_rank: int = 16, max_cpu_loras: int | None = None,
                 targets=None, max_rows: int = 64):
        """`reader(path) -> (config dict, {module: {"lora_A": [r, in], "lora_B": [out, r]}})`: how a
        PEFT folder is read (`weights.adapter.read_adapter`, handed down by the API layer)."""
        self.model, self.reader = model, reader
        self.lora = LoRASlots(model, max_loras, max_lora_rank, targets, max_rows)
        self.max_cpu_loras = max(max_cpu_loras or 0, max_loras)
        self.adapters: dict[str, Adapter] = {}
        self._cpu: collections.OrderedDict[str, dict] = collections.OrderedDict()  # name -> layers (LRU)
        self._slots: collections.OrderedDict[int, str | None] = collections.OrderedDict(
            (s, None) for s in range(1, max_loras + 1))  # slot -> adapter name, least recently used first
        self._lock = threading.RLock()
        self._loads = itertools.count(1)
        self._retired: list[Adapter] = []  # replaced loads whose requests still run
        self.requests: collections.Counter[str] = collections.Counter()  # finished requests per adapter

    # ------------------------------------------------------------------------------ loading
    def read(self, name: str, path: str | Path) -> tuple[dict, dict]:
        """(config, layers) of a PEFT folder, checked against this model: AdapterError says why not."""
        try:
            cfg, layers = self.reader(path)
        except Exception as e:  # noqa: BLE001 - OSError, JSON, safetensors header errors: all "cannot read"
            raise AdapterError(f"adapter {name!r}: cannot read it ({type(e).__name__}: {e})") from e
        rank = int(cfg["r"])
        if rank > self.lora.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {rank}, over the engine's limit of {self.lora.max_rank}; "
                               f"raise --max-lora-rank (max_lora_rank=) to at least {rank}")
        missing = sorted(set(layers) - set(self.lora.modules))
        if missing:
            raise AdapterError(f"adapter {name!r} targets module {missing[0]!r}, which is not a LoRA target of this "
                               "model (an adapter for another base model?)")
        for module, d in layers.items():
            lin = self.lora.modules[module]
            want = {"lora_A": (rank, lin.in_features), "lora_B": (lin.out_features, rank)}
            for kind, t in d.items():
                if tuple(t.shape) != want[kind]:
                    raise AdapterError(f"adapter {name!r}: {module}.{kind} has shape {tuple(t.shape)}, this model "
                                       f"expects {want[kind]} (an adapter for another base model?)")
        return cfg, layers

    def load(self, name: str, path: str | Path) -> Adapter:
        if not name or not isinstance(name, str):
            raise AdapterError("an adapter needs a non-empty name")
        cfg, layers = self.read(name, path)
        with self._lock:
            old = self.adapters.get(name)
            if old is not None and not old.unloading:
                raise AdapterError(f"adapter {name!r} is already loaded (from {old.path.name}); unload it first")
            rank = int(cfg["r"])
            a = Adapter(name, Path(path), f"{name}#{next(self._loads)}", rank, float(cfg["lora_alpha"]) / rank,
                        tuple(sorted(layers)), touches_tower(layers))
            if old is not None:  # an old load still finishing its requests: it keeps its slot until then
                self._retire(old)
            self.adapters[name] = a
            self._cache(name, layers)
            return a

    def unload(self, name: str) -> None:
        """New requests for `name` are refused now; the ones already submitted finish first."""
        with self._lock:
            a = self.get(name)
            a.unloading = True
            if a.refs == 0:
                self._drop(a)

    def names(self) -> list[str]:
        with self._lock:
            return sorted(n for n, a in self.adapters.items() if not a.unloading)

    def get(self, name: str) -> Adapter:
        a = self.adapters.get(name)
        if a is None or a.unloading:
            raise UnknownAdapter(name, self.names())
        return a

    # ------------------------------------------------------------------------------ requests
    def hold(self, name: str) -> Adapter:
        """A request for `name` was submitted (UnknownAdapter if not loaded)."""
        with self._lock:
            a = self.get(name)
            a.refs += 1
            return a

    def acquire(self, a: Adapter) -> int | None:
        """The device slot of `a` for an admitted row (written now if it has none); None if every slot
        is used by live rows. Engine thread only (slot writes never race a forward)."""
        with self._lock:
            if not a.slot:
                slot = next((s for s, owner in self._slots.items() if owner is None or self._idle(owner)), None)
                if slot is None:
                    return None
                owner = self._slots[slot]
                if owner is not None:
                    self._evict_slot(slot)
                layers = self._cpu.get(a.name) if self.adapters.get(a.name) is a else None
                if layers is None:
                    _, layers = self.read(a.name, a.path)
                    self._cache(a.name, layers)
                self.lora.write(slot, layers, a.scale)
                a.slot = slot
                self._slots[slot] = a.uid
            self._slots.move_to_end(a.slot)
            if a.name in self._cpu:
                self._cpu.move_to_end(a.name)
            a.live += 1
            return a.slot

    def release(self, a: Adapter, admitted: bool) -> None:
        """A request of `a` ended (admitted: it held a row, so a slot)."""
        with self._lock:
            a.refs -= 1
            a.live -= admitted
            self.requests[a.name] += 1
            if a.unloading and a.refs == 0:
                self._drop(a)

    def stats(self) -> dict:
        with self._lock:
            by_uid = {a.uid: a.name for a in self.adapters.values()}
            return {"max_loras": self.lora.max_loras, "max_lora_rank": self.lora.max_rank,
                    "loaded": self.names(), "on_device": sorted(by_uid[u] for u in self._slots.values() if u in by_uid),
                    "on_cpu": list(self._cpu), "requests": dict(self.requests)}

    # ------------------------------------------------------------------------------ internals
    def _idle(self, uid: str) -> bool:
        a = next((a for a in self._all() if a.uid == uid), None)
        return a is None or a.live == 0

    def _all(self):
        return [*self.adapters.values(), *self._retired]

    def _evict_slot(self, slot: int) -> None:
        uid = self._slots[slot]
        for a in self._all():
            if a.uid == uid:
                a.slot = 0
        self._slots[slot] = None

    def _cache(self, name: str, layers: dict) -> None:
        self._cpu[name] = {m: {k: t.detach().to("cpu", torch.float32) for k, t in d.items()} for m, d in layers.items()}
        self._cpu.move_to_end(name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)

    def _retire(self, a: Adapter) -> None:
        """A replaced load whose requests still run: kept aside until they finish."""
        self._retired.append(a)

    def _drop(self, a: Adapter) -> None:
        if a.slot:
            self._slots[a.slot] = None
            a.slot = 0
        if self.adapters.get(a.name) is a:
            del self.adapters[a.name]
            self._cpu.pop(a.name, None)
        self._retired = [r for r in self._retired if r is not a]
