"""Research probes of the demo v2 work (lab/demo-v2-log.md): does an image tower tell the shapes apart
(`tower_probe`), where the class is lost (`class_reading`), and the timed GPU run (`demo2_gpu.sh`)."""
