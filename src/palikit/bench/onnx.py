"""Edge benchmark: the ONNX export (`palikit export --format onnx`) run by onnxruntime on the CPU, each
variant (fp32, q8, q4, q4f16) beside palikit's own engine on the same weights in the same run, with the
files' sizes and the memory floor of a decode step (the bytes it must read / the read bandwidth measured
here). Batch 1, greedy, EOS ignored; prefill = image encoder + prompt; the ONNX side runs the graphs
as transformers.js does (`palikit.onnx.runtime`). Prints a table, then one JSON line.

    python -m palikit.bench.onnx --model demo
    python -m palikit.bench.onnx --model pg2-3b-224 --dtypes q4 --new-tokens 16   # random weights, ~20 GB disk
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")


def hardware() -> dict:
    from ..runtime import cpu_model

    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags"))
        info["flags"] = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
                         if f in flags]
    except (OSError, StopIteration):
        pass
    return info


def read_bandwidth(gib: float = 2.0, repeats: int = 3) -> float:
    """Bytes per second one `sum` over a `gib` GiB fp32 tensor reads (best of `repeats`)."""
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    best = min(_seconds(x.sum) for _ in range(repeats))
    del x
    return gib * 2**30 / best


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def build(model: str, work: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer.json, image processor, pixel_values [1, 3, S, S], prompt ids): the bundled demo
    model with one of its example images, or a preset's shape with random weights (the same for every
    dtype, seed 0) and a small tokenizer."""
    from ..config import PRESETS
    from ..preprocess import ImageProcessor
    from ..testing import CHARS, WORDS, random_model
    from ..tokenizer import build_tokenizer

    if model == "demo":
        from ..api import PaliGemma
        from ..demo import shapes
        from ..weights.resolve import resolve

        pg = PaliGemma.from_pretrained("demo", device="cpu", dtype=dtype)
        image = shapes.make_sample(0, seed=shapes.SPLIT_SEEDS["test"], size=pg.model.config.vision.image_size).image
        net, tok, proc, pixels = pg.model, pg.tokenizer, pg.processor, pg.processor(image)
        tok_file = resolve("demo").tokenizer
    else:
        if model not in PRESETS:
            raise ValueError(f"--model {model!r}: demo or a preset ({', '.join(PRESETS)})")
        cfg = PRESETS[model]
        tok = build_tokenizer(WORDS + CHARS, work / "tokenizer" / "tokenizer.json")
        net = random_model(cfg, "cpu", dtype, seed=0)
        S = cfg.vision.image_size
        proc = ImageProcessor(size=S, patch_size=cfg.vision.patch_size)
        pixels = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(0)) * 2 - 1
        tok_file = tok.path
    ids = [net.config.image_token_index] * net.config.vision.num_image_tokens + tok.encode_prompt("caption en").ids
    return net, tok_file, proc, pixels, ids


def decode_bytes_palikit(model) -> int:
    """Bytes one decode step reads: every decoder weight and the head's rows (the tied embedding)."""
    lm = model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    head = model.config.output_vocab_size * model.config.text.hidden_size * lm.embed_tokens.weight.element_size()
    return weights + head


def time_palikit(model, ids: list[int], pixels, new_tokens: int, repeats: int) -> dict:
    from ..engine import Engine, GenerationOptions, Request

    engine = Engine(model, max_slots=1, max_len=len(ids) + new_tokens)
    n_img = model.config.vision.num_image_tokens
    request = Request(ids[n_img:], pixel_values=pixels.to(model.language_model.embed_tokens.weight.dtype))
    engine.generate([request], GenerationOptions(4, ignore_eos=True))  # warm-up
    runs = [engine.generate([request], GenerationOptions(new_tokens, ignore_eos=True))[0].timings
            for _ in range(repeats)]
    engine.close()
    return {"prefill_ms": statistics.median(t["prefill_ms"] for t in runs),
            "decode_ms": statistics.median(t["decode_step_ms"] for t in runs)}


def time_onnx(folder: Path, dtype: str, ids: list[int], pixels, new_tokens: int, repeats: int, threads: int) -> dict:
    from ..onnx.runtime import OnnxPaliGemma

    rt = OnnxPaliGemma(folder, dtype=dtype, threads=threads)
    rt.generate(pixels.numpy(), ids, 4, ignore_eos=True)  # warm-up
    runs = [rt.generate(pixels.numpy(), ids, new_tokens, ignore_eos=True) for _ in range(repeats)]
    return {"prefill_ms": statistics.median(r.prefill_ms for r in runs),
            "decode_ms": statistics.median(statistics.median(r.decode_ms) for r in runs),
            "tokens": runs[0].tokens}


def file_sizes(folder: Path, dtype: str) -> dict[str, int]:
    from ..onnx.layout import suffix

    out = {}
    for g in GRAPHS:
        base = folder / "onnx" / f"{g}{suffix(dtype)}.onnx"
        out[g] = sum(p.stat().st_size for p in (base, Path(f"{base}_data")) if p.exists())
    return out


def run(model: str = "demo", dtypes=("fp32", "q8", "q4"), palikit_dtypes=("float32",), new_tokens: int = 32,
        repeats: int = 3, threads: int = 2, work: Path | None = None, log=print) -> dict:
    from ..onnx.export import export_onnx

    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="palikit-bench-onnx-") if work is None else None
    root = Path(tmp.name) if tmp else Path(work)
    root.mkdir(parents=True, exist_ok=True)
    log(f"measuring the read bandwidth ({threads} threads)")
    bandwidth = read_bandwidth()
    net, tok_file, proc, pixels, ids = build(model, root)
    name = net.config.name
    rows = []
    if "float32" in palikit_dtypes:
        log("palikit engine, float32")
        rows.append({"engine": "palikit float32", **time_palikit(net, ids, pixels, new_tokens, repeats),
                     "decode_bytes": decode_bytes_palikit(net)})
    quantized = tuple(d for d in dtypes if d != "fp32")
    folder = root / "export"
    log(f"exporting {name} (fp32 + {', '.join(quantized) or 'nothing else'}) to {folder}")
    t = time.perf_counter()
    export_onnx(net, folder, tokenizer_file=tok_file, processor=proc, quantize=quantized, overwrite=True,
                consume=True, log=log)  # the model is converted and freed part by part
    export_s = time.perf_counter() - t
    del net
    gc.collect()
    sizes = {d: file_sizes(folder, d) for d in ("fp32", *quantized)}
    for dt in dtypes:
        log(f"onnxruntime, {dt}")
        r = time_onnx(folder, dt, ids, pixels, new_tokens, repeats, threads)
        r.pop("tokens")
        rows.append({"engine": f"onnxruntime {dt}", **r, "decode_bytes": sizes[dt]["decoder_model_merged"]})
        gc.collect()
    for dt in (d for d in palikit_dtypes if d != "float32"):
        log(f"palikit engine, {dt} (the same weights, rebuilt)")
        net = build(model, root, getattr(torch, dt))[0]
        rows.append({"engine": f"palikit {dt}", **time_palikit(net, ids, pixels, new_tokens, repeats),
                     "decode_bytes": decode_bytes_palikit(net)})
        del net
        gc.collect()
    for row in rows:
        row["floor_ms"] = row["decode_bytes"] / bandwidth * 1e3
        row["x_floor"] = row["decode_ms"] / row["floor_ms"]
    report = {"model": name, "prompt_tokens": len(ids), "new_tokens": new_tokens, "threads": threads,
              "hardware": hardware(), "read_gb_per_s": bandwidth / 1e9, "export_s": export_s,
              "onnxruntime": _version("onnxruntime"), "torch": torch.__version__,
              "file_bytes": {d: {**s, "total": sum(s.values())} for d, s in sizes.items()}, "rows": rows}
    if tmp:
        tmp.cleanup()
    return report


def _version(module: str) -> str:
    import importlib

    return importlib.import_module(module).__version__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="demo, or a preset name (random weights of that shape)")
    p.add_argument("--dtypes", default="fp32,q8,q4", help="onnxruntime variants to time (fp32, q8, q4, q4f16)")
    p.add_argument("--palikit-dtypes", default="float32", help="palikit engine dtypes to time (float32, bfloat16)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="where the export is written (default: a temporary folder)")
    a = p.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    report = run(a.model, tuple(a.dtypes.split(",")), tuple(a.palikit_dtypes.split(",")), a.new_tokens, a.repeats,
                 a.threads, a.work, log=console.log)
    hw = report["hardware"]
    table = Table("engine", "prefill ms", "ms / token", "floor ms", "x floor", "decoder MB",
                  title=f"{report['model']}: {report['prompt_tokens']} prompt tokens, {report['new_tokens']} new, batch 1, "
                        f"{report['threads']} threads, {hw['cpu']} ({', '.join(hw['flags'])}), read "
                        f"{report['read_gb_per_s']:.1f} GB/s")
    for r in report["rows"]:
        table.add_row(r["engine"], f"{r['prefill_ms']:.1f}", f"{r['decode_ms']:.2f}", f"{r['floor_ms']:.2f}",
                      f"{r['x_floor']:.2f}", f"{r['decode_bytes'] / 1e6:,.1f}")
    console.print(table)
    for d, s in report["file_bytes"].items():
        console.print(f"{d}: " + ", ".join(f"{g} {b / 1e6:,.1f} MB" for g, b in s.items()))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
