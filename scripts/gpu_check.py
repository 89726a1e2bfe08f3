"""Full-size check on a GPU machine (random weights, no download): for PaliGemma 1 3B-224 and
PaliGemma 2 3B-224 in bf16, palikit's logits against transformers' on the same weights (max abs
diff, argmax agreement), checkpoint load time (palikit vs transformers from the same safetensors
folder) and peak memory. Prints one JSON line per model.

transformers < 5.23 does not apply PaliGemma 2's final-logit soft-cap: with such a version the
comparison runs palikit with that cap switched off and says so in the output ("final_softcap").
Eager attention is used on the transformers side (its SDPA path drops the attention soft-cap).

    python scripts/gpu_check.py [--models pg1-3b-224,pg2-3b-224] [--workdir /tmp/pk]
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="pg1-3b-224,pg2-3b-224")
    ap.add_argument("--workdir", default="/tmp/palikit-gpu-check")
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run the script with tiny presets")
    args = ap.parse_args()

    import transformers
    from transformers import PaliGemmaForConditionalGeneration

    from palikit.config import PRESETS
    from palikit.testing import hf_model_from, random_model
    from palikit.weights.export import save_hub_checkpoint
    from palikit.weights.hf import load_hf_checkpoint

    hf_version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for name in args.models.split(","):
        cfg = PRESETS[name]
        final_cap_in_hf = hf_version >= (5, 23) or not cfg.text.post_norms
        if not final_cap_in_hf:
            cfg = replace(cfg, text=replace(cfg.text, final_logit_softcapping=None))
        model = random_model(cfg, dev, torch.bfloat16, seed=0)
        folder = Path(args.workdir) / name
        shutil.rmtree(folder, ignore_errors=True)
        save_hub_checkpoint(model, folder, max_shard_bytes=2 << 30)
        del model
        gc.collect()
        cuda and torch.cuda.empty_cache()

        sync()
        cuda and torch.cuda.reset_peak_memory_stats()  # the load's own peak, not the random model's
        t = time.perf_counter()
        ours = load_hf_checkpoint(folder, config=cfg, device=dev, dtype=torch.bfloat16)
        sync()
        load_ours = time.perf_counter() - t
        mem_ours = torch.cuda.max_memory_allocated() / 2**30 if cuda else None

        t = time.perf_counter()
        hf_loaded = PaliGemmaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                                      attn_implementation="eager").to(dev)
        sync()
        load_hf = time.perf_counter() - t
        del hf_loaded
        gc.collect()
        cuda and torch.cuda.empty_cache()
        hf = hf_model_from(ours)  # same tensors, eager attention

        g = torch.Generator(device="cpu").manual_seed(0)
        S = cfg.vision.image_size
        text = [2] + torch.randint(3, min(256000, cfg.output_vocab_size), (30,), generator=g).tolist() + [108]
        ids = torch.tensor([cfg.prompt_row(text)] * 2, device=dev)
        ar = torch.zeros_like(ids)
        ar[:, -10:] = 1
        pv = (torch.rand(2, 3, S, S, generator=g) * 2 - 1).to(dev, torch.bfloat16)
        with torch.inference_mode():
            mine = ours(ids, pv, ar_mask=ar).float()
            ref = hf(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids), token_type_ids=ar,
                     position_ids=torch.arange(1, ids.shape[1] + 1, device=dev)[None].expand(2, -1)).logits
            ref = ref[..., : cfg.output_vocab_size].float()
        diff = (mine - ref).abs()
        report = {
            "model": name,
            "gpu": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "dtype": "bfloat16",
            "final_softcap": "compared with cap" if final_cap_in_hf else "off on both sides (transformers < 5.23 skips it)",
            "max_abs_logit_diff": diff.max().item(),
            "mean_abs_logit_diff": diff.mean().item(),
            "logit_scale": ref.abs().mean().item(),
            "argmax_agreement": (mine.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "load_s_palikit": load_ours,
            "load_s_transformers": load_hf,
            "peak_gib_palikit_load": mem_ours,
        }
        print(json.dumps(report), flush=True)
        del ours, hf
        gc.collect()
        cuda and torch.cuda.empty_cache()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
