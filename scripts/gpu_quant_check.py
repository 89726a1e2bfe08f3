"""Quantized inference on a GPU machine (random full-size weights, no download): for PaliGemma 1 and 2
3B-224, ms per decode step of int8 and int4 against bf16 at 1 / 8 / 64 engine slots (compiled step,
CUDA graphs), time to first token, and the relative logit max-diff of each against bf16. One JSON line
per model. Issue 32's target: int4 <= 0.6x bf16's ms per step at 1 slot.

Not run on a GPU yet (none was lent when it was written): the CUDA kernels it exercises are
`model/quant.py`'s CUDA branch (int8: `F.linear(x, q.to(dtype)) * s` fused by torch.compile; int4:
tinygemm `torch._weight_int4pack_mm`).

    python scripts/gpu_quant_check.py [--models pg1-3b-224,pg2-3b-224] [--slots 1,8,64]
    python scripts/gpu_quant_check.py --device cpu --models tiny-pg2 --slots 1,2 --no-compile   # dry run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="pg1-3b-224,pg2-3b-224")
    ap.add_argument("--slots", default="1,8,64")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    from palikit.config import PRESETS
    from palikit.engine.bench import bench_palikit
    from palikit.model import quant as Q
    from palikit.testing import random_model

    slots = [int(s) for s in args.slots.split(",")]
    compile = not args.no_compile
    for name in args.models.split(","):
        cfg = PRESETS[name]
        model = random_model(cfg, args.device, torch.bfloat16, seed=0)
        g = torch.Generator().manual_seed(1)
        N = cfg.vision.num_image_tokens
        ids = torch.randint(3, min(1000, cfg.output_vocab_size - 1), (2, N + 8), generator=g)
        ids[:, :N] = cfg.image_token_index
        ids = ids.to(args.device)
        pv = (torch.rand(2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) * 2 - 1).to(args.device)
        with torch.no_grad():
            ref = model(ids, pv).float()
        out = {"model": name, "device": args.device, "compiled": compile, "rows": {}}
        out["rows"]["bf16"] = [vars(r) for r in bench_palikit(model, slots, args.new_tokens, 16, 2, compile)]
        for bits in (8, 4):
            qm = Q.quantize_model(copy.deepcopy(model), Q.plan(model, bits, args.group_size if bits == 4 else None))
            with torch.no_grad():
                diff = float((qm(ids, pv).float() - ref).abs().max() / ref.abs().max())
            rows = bench_palikit(qm, slots, args.new_tokens, 16, 2, compile)
            out["rows"][f"int{bits}"] = [{**vars(r), "vs_bf16": r.decode_step_ms / b["decode_step_ms"]}
                                         for r, b in zip(rows, out["rows"]["bf16"])]
            out[f"int{bits}_relative_logit_max_diff"] = diff
            del qm
            gc.collect()
            torch.cuda.is_available() and torch.cuda.empty_cache()
        out["int4_vs_bf16_at_1_slot"] = out["rows"]["int4"][0]["vs_bf16"]
        print(json.dumps(out), flush=True)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
