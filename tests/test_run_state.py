"""run_state: durable writes, a folder tied to its settings, and a resume on nodes that do not
share the folder refused in one line instead of hanging."""

import json

import pytest
import torch

from helpers import torchrun
from slimops.run_state import FINGERPRINT, RunState, durable_write


def test_a_durable_write_replaces_the_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.json"
    durable_write(path, lambda tmp: tmp.write_text("old"))
    durable_write(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    def killed(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        durable_write(path, killed)
    assert path.read_text() == "new"  # the complete old file survives a kill mid-write


def test_a_folder_is_tied_to_its_settings(tmp_path):
    run = RunState(tmp_path / "run", {"ratio": 0.5, "path": tmp_path})
    assert not run.check()
    run.claim()
    assert json.loads((tmp_path / "run" / FINGERPRINT).read_text())["ratio"] == 0.5
    assert RunState(tmp_path / "run", {"ratio": 0.5, "path": tmp_path}).check()
    with pytest.raises(ValueError, match="other settings"):
        RunState(tmp_path / "run", {"ratio": 0.4, "path": tmp_path}).check()


def test_the_trainer_refuses_other_settings_before_loading_anything(tmp_path, monkeypatch):
    from helpers import tiny_shear

    tiny_shear(tmp_path / "state", stop_after=2)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("state loaded"))
    with pytest.raises(ValueError, match="other settings"):
        tiny_shear(tmp_path / "state", steps=8)


def test_a_corrupt_trainer_state_is_named(tmp_path):
    from helpers import tiny_shear
    from slimops.trainer import STATE_FILE

    tiny_shear(tmp_path / "state", stop_after=2)
    state = tmp_path / "state" / STATE_FILE
    state.write_bytes(state.read_bytes()[:100])  # cut short outside slimops
    with pytest.raises(ValueError, match=f"{state}: unreadable .*truncated or corrupt"):
        tiny_shear(tmp_path / "state")


SCRIPT = """
from pathlib import Path
from slimops import distributed
from slimops.run_state import RunState
distributed.init_from_env()
rank = distributed.world()[0]
folder = Path({tmp!r}) / f"node{{rank}}"  # two nodes, no shared filesystem
if rank == 0:
    RunState(folder, {{}}).record()
try:
    RunState(folder, {{}}).check()
except ValueError as e:
    print(e)
"""


def test_a_resume_without_a_shared_folder_says_so(tmp_path):
    script = tmp_path / "nodes.py"
    script.write_text(SCRIPT.format(tmp=str(tmp_path)))
    proc = torchrun([str(script)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = "exists on rank(s) [0] only: resuming under torchrun needs a folder every node sees"
    assert proc.stdout.count(line) == 2  # both ranks stop, in one line, instead of hanging
