"""ServerSettings' pure rules (fast): the served name of a trainer's output (issue 37: every full
fine-tune was served as `final`) and the Host allowlist of a loopback bind (issue 38 S4)."""

from __future__ import annotations

from palikit.serve.settings import ServerSettings, default_served_name


def test_the_served_name_of_a_run_is_the_runs_name(tmp_path):
    run = tmp_path / "runs" / "shapes"
    for sub in ("final", "last", "checkpoints/step-00000100", "exported"):
        (run / sub).mkdir(parents=True)
    assert default_served_name(str(run / "final"), "final") == "shapes"
    assert default_served_name(str(run / "last"), "last") == "shapes"
    assert default_served_name(str(run / "checkpoints" / "step-00000100"), "step-00000100") == "shapes"
    assert default_served_name(str(run / "exported"), "exported") == "exported"
    assert default_served_name("google/paligemma2-3b-mix-224", "pg2-3b-224") == "pg2-3b-224"  # a Hub id
    assert default_served_name(None, "demo-model") == default_served_name("demo", "demo-model") == "demo"


def test_a_loopback_bind_serves_its_own_address():
    for host in ("127.0.0.2", "127.1.2.3", "::1", "[::1]", "127.0.0.1", "localhost"):
        allowed = ServerSettings.default_allowed_hosts(host)
        assert allowed is not None and host.strip("[]") in allowed and "localhost" in allowed
    assert ServerSettings.default_allowed_hosts("0.0.0.0") is None and ServerSettings.default_allowed_hosts("10.0.0.5") is None
