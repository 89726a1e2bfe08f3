"""The synthetic "shapes" data behind the bundled demo model: the generators `palikit demo` and the
benchmarks draw from (`shapes`, v1; `shapes2`, v2 with `backgrounds` and `fonts`) and `splits.write_split`,
a labelled split on disk. The factory that trains the demo model is the checkout's `lab/`."""
