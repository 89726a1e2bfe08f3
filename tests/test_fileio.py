"""fileio: atomic writes leave the whole file and plain permissions."""

import os
import stat

from palikit.fileio import atomic_write_json, umask


def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path):
    path = atomic_write_json(tmp_path / "config.json", {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask()  # mkstemp alone: 0o600
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
