"""The serving benchmark's harness on the bundled demo model with a tiny trace: every request is
accounted for with ordered stamps, the JSON line holds every figure, run-to-completion answers are
`pg.predict`'s, and backend (a)'s adapter works against the scheduler interface (`submit`,
`configure_scheduler`, pending stamps, `on_text`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from palikit import PaliGemma
from palikit.assets import bundled_demo_model
from palikit.weights.resolve import get_config
from palikit.bench import serve as sb
from palikit.cli import main
from palikit.testing import random_tokenizer


@pytest.fixture(scope="module")
def pg():
    folder = bundled_demo_model()
    assert folder is not None, "the package ships no demo model (src/palikit/assets/demo-model)"
    return PaliGemma.from_pretrained(str(folder), device="cpu", dtype="float32")


def test_the_trace_is_seeded_poisson_and_mixed(pg):
    pool = sb.image_pool(6, pg.model.config.vision.image_size)
    a, b = sb.make_trace(pool, 300, 50.0, seed=3), sb.make_trace(pool, 300, 50.0, seed=3)
    assert a == b and a != sb.make_trace(pool, 300, 50.0, seed=4)
    gaps = [y.arrival_s - x.arrival_s for x, y in zip(a, a[1:])]
    assert min(gaps) > 0 and 0.015 < sum(gaps) / len(gaps) < 0.025  # mean gap 1 / rate
    counts = {c: sum(r.cls == c for r in a) for c in sb.CLASSES}
    assert all(abs(counts[c] / 300 - w) < 0.1 for c, w in sb.DEFAULT_MIX.items()), counts
    assert {r.prompt for r in a if r.cls == "long"} == {sb.LONG_PROMPT}
    assert all(r.max_new_tokens == sb.MAX_NEW_TOKENS[r.cls] for r in a)
    with pytest.raises(ValueError, match="mix"):
        sb.make_trace(pool, 5, 1.0, mix={"huge": 1.0})


class NoScheduler:
    """A PaliGemma as before the continuous scheduler: no submit / configure_scheduler."""

    def __init__(self, pg):
        self._pg = pg

    def __getattr__(self, name):
        if name in ("submit", "configure_scheduler"):
            raise AttributeError(name)
        return getattr(self._pg, name)


def test_a_tiny_trace_through_every_backend(pg):
    report = sb.run_serve_bench(pg, n_requests=12, rate=40.0, seed=1, slots=4, n_images=4, progress=False,
                                keep_records=True, max_new_tokens={"long": 24})
    assert pg.engine.scheduler.max_slots == 4  # configure_scheduler(max_slots=) got the slot count
    trace = [sb.TraceRequest(**r) for r in report["trace_requests"]]
    assert {r.cls for r in trace} == set(sb.CLASSES)
    shorts = [r.index for r in trace if r.cls == "short"]
    for key in "abc":
        for phase, recs in report["records"][key].items():
            want = shorts if phase == "alone" else [r.index for r in trace]
            assert [r["index"] for r in recs] == want, (key, phase)  # every request accounted for, once
            for r in recs:
                assert r["status"] == "ok", (key, r)
                assert r["scheduled"] <= r["t_submit"] <= r["t_first_token"] <= r["t_done"], (key, r)
                assert r["t_done"] - r["scheduled"] > 0
    # run-to-completion answers are exactly pg.predict's for the same requests
    pool = sb.image_pool(4, pg.model.config.vision.image_size)
    for r, rec in zip(trace, report["records"]["b"]["mixed"]):
        assert rec["text"] == pg.predict(pool[r.image].image, r.prompt, max_new_tokens=r.max_new_tokens,
                                         constrained=False).text  # the backends run the raw model
    assert report["agree_with_b"] == {"a": 12, "c": 12}  # greedy: every backend gives the same answers
    assert sum(rec["n_tokens"] for rec in report["records"]["b"]["mixed"] if rec["cls"] == "long") > 0

    del report["records"], report["trace_requests"]
    text = sb.format_report(report) + "\n" + json.dumps(report)
    assert "(a) continuous scheduler" in text and "(c) transformers" in text
    last = json.loads(text.splitlines()[-1])
    for key in "abc":
        mixed = last["backends"][key]["mixed"]
        for fig in ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p99_s", "short_latency_p50_s",
                    "short_latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
            assert mixed[fig] > 0, (key, fig)
        assert mixed["latency_p50_s"] <= mixed["latency_p99_s"] and mixed["ttft_p99_s"] <= mixed["latency_p99_s"]
        assert mixed["completed"] == 12 and mixed["lost"] == mixed["failed"] == 0
        assert mixed["mean_tokens"]["long"] > mixed["mean_tokens"]["short"]
    for key in "ab":
        assert last["backends"][key]["short_alone"]["completed"] == len(shorts)
        assert last["backends"][key]["short_p99_mixed_vs_alone"] > 0
    st = last["stream"]
    assert st["impl"].startswith("continuous") and st["stream_text_equal"] and st["tokens"] > 1 and st["ratio"] > 0
    assert set(last["targets"]) == {"short_p99_mixed_vs_alone", "throughput_vs_b", "nothing_lost", "stream_vs_plain"}
    assert all(t["value"] is not None and t["pass"] in (True, False) for t in last["targets"].values())
    assert last["targets"]["nothing_lost"]["pass"] is True
    hw = last["hardware"]
    assert hw["cpu"] and hw["torch_threads"] >= 1 and hw["device"] == "cpu"


def test_without_a_scheduler_backend_a_is_reported_as_not_run(pg):
    report = sb.run_serve_bench(NoScheduler(pg), n_requests=4, rate=50.0, backends="ab", n_images=2, stream=False,
                                progress=False)
    assert set(report["backends"]) == {"b"} and "no continuous scheduler" in report["skipped"]["a"]
    assert report["targets"]["short_p99_mixed_vs_alone"]["pass"] is None
    assert report["targets"]["throughput_vs_b"]["pass"] is None
    assert "(a) not run: " in sb.format_report(report)


def test_cli_ends_with_the_json_line(capsys):
    assert main(["bench-serve", "--requests", "4", "--rate", "50", "--backends", "b", "--no-stream"]) == 0
    out = capsys.readouterr().out.splitlines()
    last = json.loads(out[-1])
    assert last["backends"]["b"]["mixed"]["completed"] == 4 and last["trace"]["requests"] == 4
    assert any(line.startswith("(b) run-to-completion batches") for line in out)


def test_bad_options_are_clear_errors(capsys):
    assert main(["bench-serve", "--mix", "short=lots"]) == 2
    assert "--mix must look like" in capsys.readouterr().err
    assert main(["bench-serve", "--backends", "xz"]) == 2
    assert "backends must be letters" in capsys.readouterr().err
    assert main(["bench-serve", "--model", "no-such-model"]) == 2
    assert "neither a local folder" in capsys.readouterr().err
    assert main(["bench-serve", "--layers", "2"]) == 2
    assert "--layers 2: needs a preset --model" in capsys.readouterr().err
    assert main(["bench-serve", "--model", "tiny-pg2", "--layers", "0"]) == 2
    assert "a count >= 1" in capsys.readouterr().err
    assert main(["bench-serve", "--adapters", "2", "--lora-ranks", "8,x"]) == 2
    assert "--lora-ranks must be positive integers" in capsys.readouterr().err
    assert main(["bench-serve", "--torch-threads", "-1"]) == 2
    assert "--torch-threads must be >= 0" in capsys.readouterr().err


def test_multi_lora_bench_on_a_preset_cut_to_fewer_layers(capsys):
    """`--layers N` on a preset: full width, N decoder and tower layers; `--lora-ranks` cycled over the adapters."""
    threads = torch.get_num_threads()
    try:
        code = main(["bench-serve", "--model", "tiny-pg2", "--layers", "1", "--adapters", "3", "--lora-ranks", "2,4",
                     "--requests", "6", "--rate", "100", "--slots", "4", "--max-new-tokens", "short=2,caption=3,long=4",
                     "--device", "cpu", "--torch-threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    last = json.loads(out[-1])
    assert last["model"] == "tiny-pg2 (1 + 1 layers, full head)-random" and last["ranks"] == [2, 4]
    assert last["agree_multi_swap"] == 6 and last["multi_lora"]["requests"] == 6
    assert "over 3 adapters (ranks 2/4)" in out[0] and last["hardware"]["torch_threads"] == 1


def test_random_full_size_tokenizer_spans_the_output_vocabulary(tmp_path: Path):
    cfg = get_config("pg2-3b-224")
    tok, fitted = random_tokenizer(cfg, tmp_path)
    assert tok.vocab_size == cfg.output_vocab_size + 1 == fitted.output_vocab_size + 1
    assert tok.token_to_id("<image>") == fitted.image_token_index == cfg.image_token_index
    assert fitted.text.vocab_size >= tok.vocab_size and fitted.text.hidden_size == cfg.text.hidden_size
    assert max(tok.loc_ids + tok.seg_ids) < fitted.output_vocab_size
    tok.decode([fitted.output_vocab_size - 1, 1000, 200_000])  # every id the model can emit decodes


def test_palikit_bench_serve_command(capsys):
    # a preset name: random weights of that shape (the GPU run's path), every request at its token budget
    assert main(["bench-serve", "--model", "tiny-pg2", "--requests", "3", "--rate", "50", "--backends", "bc",
                 "--max-new-tokens", "short=3,caption=4,long=6", "--no-stream", "--device", "cpu"]) == 0
    last = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert last["model"] == "tiny-pg2-random" and last["agree_with_b"] == {"c": 3}
    assert last["backends"]["b"]["mixed"]["completed"] == last["backends"]["c"]["mixed"]["completed"] == 3
    assert main(["bench-serve", "--rate", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
