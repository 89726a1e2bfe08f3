"""Training-throughput benchmark (`palikit bench-train`): palikit LoRA fine-tuning against transformers + peft with the
same LoRA config, the same random weights and the same batch, in one run. Each engine runs in its
own subprocess so its peak memory (GPU: max allocated; CPU: peak RSS) is its own. Prints a table;
the last stdout line is one JSON document.

    palikit bench-train --model tiny-pg2 --batch-size 8 --steps 10
    palikit bench-train --model pg2-3b-224 --device cuda --batch-size 8 --dtype bfloat16
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch(cfg, batch_size: int, prefix_len: int, suffix_len: int, device, dtype):
    import torch

    g = torch.Generator().manual_seed(0)
    N, S = cfg.vision.num_image_tokens, cfg.vision.image_size
    T = N + prefix_len + suffix_len
    ids = torch.randint(3, min(cfg.output_vocab_size, 256_000) - 1, (batch_size, T), generator=g)
    ids[:, N] = cfg.bos_token_id
    ids = torch.tensor([cfg.prompt_row(row[N:]) for row in ids.tolist()])  # [B, T]: <image> x N, then text
    ar = torch.zeros(batch_size, T, dtype=torch.long)
    ar[:, N + prefix_len:] = 1
    return {
        "input_ids": ids.to(device), "ar_mask": ar.to(device), "loss_mask": ar.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "pixel_values": (torch.rand(batch_size, 3, S, S, generator=g) * 2 - 1).to(device, dtype),
    }


def _run(engine: str, args: dict, queue) -> None:
    import torch

    from ..testing import hf_model_from, random_model
    from ..train.collate import batch_loss, hf_labels
    from ..train.modes import apply_mode
    from ..weights.resolve import get_config

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    dev = torch.device(args["device"])
    dtype = getattr(torch, args["dtype"])
    cfg = get_config(args["model"])
    model = random_model(cfg, dev, dtype)
    batch = _batch(cfg, args["batch_size"], args["prefix_len"], args["suffix_len"], dev, dtype)
    if engine == "palikit":
        apply_mode(model, "lora", lora_targets=TARGETS, lora_rank=args["rank"], lora_alpha=2 * args["rank"])
        net = model

        def loss_fn():
            return batch_loss(net, batch, kind="hf")
    else:
        from peft import LoraConfig, get_peft_model

        hf = hf_model_from(model)
        del model
        net = get_peft_model(hf, LoraConfig(r=args["rank"], lora_alpha=2 * args["rank"], target_modules=TARGETS,
                                            lora_dropout=0.0, bias="none"))
        labels = hf_labels(batch)

        def loss_fn():
            return net(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                       attention_mask=batch["attention_mask"], token_type_ids=batch["ar_mask"], labels=labels).loss
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2):  # warm-up
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args["steps"]):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    queue.put({"engine": engine, "samples_per_s": args["steps"] * args["batch_size"] / seconds,
               "step_ms": seconds / args["steps"] * 1e3, "peak_gib": peak,
               "peak_kind": "cuda max allocated" if cuda else "process peak RSS",
               "trainable_params": sum(p.numel() for p in params)})


def run_train_bench(*, model: str = "tiny-pg2", device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                    prefix_len: int = 8, suffix_len: int = 16, rank: int = 8, steps: int = 10, threads: int = 0) -> dict:
    """Both engines, each in its own spawned process, on `model`'s shape (a preset or a checkpoint's
    config; random weights); the report repeats the arguments and adds rows, speedup and memory_ratio."""
    args = dict(model=model, device=device, dtype=dtype, batch_size=batch_size, prefix_len=prefix_len,
                suffix_len=suffix_len, rank=rank, steps=steps, threads=threads)
    ctx = mp.get_context("spawn")
    rows = []
    for engine in ("palikit", "transformers+peft"):
        q = ctx.Queue()
        p = ctx.Process(target=_run, args=(engine, args, q))
        p.start()
        rows.append(q.get())
        p.join()
    ours, theirs = rows
    return {**args, "rows": rows, "speedup": ours["samples_per_s"] / theirs["samples_per_s"],
            "memory_ratio": ours["peak_gib"] / theirs["peak_gib"]}


def format_report(report: dict) -> str:
    """The human-readable lines (the JSON line is printed after them)."""
    lines = [f"{r['engine']:>18}: {r['samples_per_s']:8.1f} samples/s  {r['step_ms']:8.1f} ms/step  "
             f"peak {r['peak_gib']:.2f} GiB ({r['peak_kind']})  trainable {r['trainable_params']:,}" for r in report["rows"]]
    lines.append(f"palikit / transformers+peft: {report['speedup']:.2f}x samples/s, {report['memory_ratio']:.2f}x memory")
    return "\n".join(lines)
