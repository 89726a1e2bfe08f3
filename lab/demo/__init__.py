"""The demo-model factory: data build (`build`), scene-text crops (`scenetext`), the fine-tuning set
(`finetune_set`), shapes v2 made on the fly for a recipe (`stream`), the hand-made test images
(`handmade`), the split writer (`splits`) and the scorecard + install (`evaluate`). The generators they
draw with (`palikit.demo.shapes`, `shapes2`) stay in the package: `palikit demo` and the benchmarks use them."""
