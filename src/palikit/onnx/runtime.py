"""A small reference generation loop over an export folder with onnxruntime (Python), feeding the three
graphs exactly what transformers.js feeds them (`PaliGemmaForConditionalGeneration` 4.x):

1. `vision_encoder(pixel_values)` -> image features; `embed_tokens(input_ids)` -> embeddings, whose
   `<image>` rows are overwritten by the features as they are;
2. `decoder_model_merged(inputs_embeds, attention_mask, position_ids, past_key_values.*)` with an empty
   past (0 slots) on the first call; position ids = the running count of real tokens (1-based, pads 1);
3. then one token per call: its embedding, the mask grown by one, the next position, the presents of the
   previous call as the past. Greedy (argmax) until EOS or `max_new_tokens`. num_logits_to_keep = 1:
   only the last position's logits are computed.

Token ids come from palikit's tokenizer (`[<image> x N, <bos>, prompt, "\\n"]`) and pixels from palikit's
image processor, so differences from palikit are the graphs' alone. The tests compare its logits with
palikit's at every step; the README and `palikit.bench.onnx` use it to run and time an export.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .layout import SUFFIXES

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class OnnxGeneration:
    tokens: list[int]  # generated ids, EOS excluded
    text: str
    logits: list[np.ndarray] = field(default_factory=list)  # [V] fp32 per step (prefill first), when asked
    prefill_ms: float = 0.0  # vision encoder + prompt through the decoder
    decode_ms: list[float] = field(default_factory=list)  # per generated token after the first


class OnnxPaliGemma:
    """An export folder (`palikit export --format onnx`) loaded in onnxruntime. `dtype`: fp32, q8, q4 or
    q4f16 (which files to load, as transformers.js's option); `threads`: intra-op threads (None: all)."""

    def __init__(self, folder: str | Path, dtype: str = "fp32", threads: int | None = None):
        import onnxruntime as ort

        from ..preprocess import ImageProcessor
        from ..tokenizer import Tokenizer

        self.folder = Path(folder)
        if dtype not in SUFFIXES:
            raise ValueError(f"dtype {dtype!r}: choose from {', '.join(SUFFIXES)}")
        config = json.loads((self.folder / "config.json").read_text())
        self.image_token_index = int(config["image_token_index"])
        self.eos_token_id = int(config["eos_token_id"])
        self.tokenizer = Tokenizer.from_file(self.folder / "tokenizer.json")
        self.processor = ImageProcessor.from_pretrained(self.folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.sessions = {}
        for name in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
            path = self.folder / "onnx" / f"{name}{SUFFIXES[dtype]}.onnx"
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: this export has no {dtype} variant (export it with "
                                        f"--quantize {dtype}) or is not a palikit ONNX export.")
            self.sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        decoder = self.sessions["decoder_model_merged"]
        self._past = [(i.name, _ORT_TYPES[i.type], i.shape) for i in decoder.get_inputs() if i.name.startswith("past_")]
        self._keep = {"num_logits_to_keep": np.array(1, np.int64)} if any(
            i.name == "num_logits_to_keep" for i in decoder.get_inputs()) else {}
        self.num_image_tokens = self.processor.to_dict()["image_seq_length"]

    def prompt_ids(self, prompt: str) -> list[int]:
        """palikit's layout: `<image>` x N, BOS, the prompt, "\\n"."""
        return [self.image_token_index] * self.num_image_tokens + self.tokenizer.encode_prompt(prompt).ids

    def generate(self, image, prompt: str | list[int], max_new_tokens: int = 64, *, keep_logits: bool = False,
                 ignore_eos: bool = False) -> OnnxGeneration:
        """Greedy generation for one image (path, PIL image, array... or pixel_values [1, 3, S, S]) and one prompt
        (text, or the full id list of `prompt_ids`)."""
        pixel_values = image if _is_pixels(image) else self.processor(image).numpy()
        ids = self.prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
        t0 = time.perf_counter()
        (features,) = self.sessions["vision_encoder"].run(None, {"pixel_values": np.asarray(pixel_values, np.float32)})
        embeds = self._embed(ids)
        slots = np.flatnonzero(np.asarray(ids) == self.image_token_index)
        embeds[0, slots] = features.reshape(-1, features.shape[-1])[: len(slots)].astype(embeds.dtype)
        mask = np.ones((1, len(ids)), np.int64)
        past = {name: np.zeros([1 if d == "batch_size" else d if isinstance(d, int) else 0 for d in shape], dtype)
                for name, dtype, shape in self._past}
        out = OnnxGeneration([], "")
        logits, past = self._step(embeds, mask, past)
        out.prefill_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(max_new_tokens):
            if keep_logits:
                out.logits.append(logits)
            token = int(np.argmax(logits))
            if token == self.eos_token_id and not ignore_eos:
                break
            out.tokens.append(token)
            if len(out.tokens) == max_new_tokens:
                break
            t = time.perf_counter()
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits, past = self._step(self._embed([token]), mask, past)
            out.decode_ms.append((time.perf_counter() - t) * 1e3)
        out.text = self.tokenizer.decode(out.tokens)
        return out

    def _embed(self, ids: list[int]) -> np.ndarray:
        (embeds,) = self.sessions["embed_tokens"].run(None, {"input_ids": np.asarray([ids], np.int64)})
        return embeds

    def _step(self, embeds: np.ndarray, mask: np.ndarray, past: dict) -> tuple[np.ndarray, dict]:
        """One decoder call; positions as transformers.js computes them (cumsum of the mask, 1-based)."""
        positions = np.cumsum(mask, axis=1)[:, -embeds.shape[1]:]  # [1, T]
        feed = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **self._keep, **past}
        logits, *presents = self.sessions["decoder_model_merged"].run(None, feed)
        names = [name for name, _, _ in self._past]
        return logits[0, -1].astype(np.float32), dict(zip(names, presents))


def _is_pixels(x) -> bool:
    return isinstance(x, np.ndarray) and x.ndim == 4 or type(x).__name__ == "Tensor"
