"""palikit's lab: the demo-model factory (`lab.demo`), the research probes (`lab.probes`), the demo
recipes and the demo v2 log. Not part of the wheel; run from the checkout's root (lab/README.md)."""
