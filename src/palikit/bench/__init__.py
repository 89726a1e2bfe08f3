"""Benchmarks, above the product they measure (they import `api`, `engine`, `train`, `testing`; nothing in
the product imports them): `inference.py` (`palikit bench`: prefill and decode step against transformers),
`serve.py` + `serve_backends.py` (`palikit bench-serve`: a mixed open-loop trace against continuous
batching, run-to-completion batches and transformers), `train.py` (`palikit bench-train`: LoRA training
against transformers + peft). Each prints a table and ends with one JSON line."""
