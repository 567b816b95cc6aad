"""--resume: a prune killed by a signal mid-way and resumed gives bit-identical weights and
plan to an unbroken run; progress from other settings is refused; unsupported methods say so."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from helpers import SAMPLE_TEXT, make_tiny_model, make_tiny_tokenizer, prune_argv
from slimops.cli import main

# The child prunes with --resume and kills itself (SIGKILL: no cleanup runs) right after
# layer 1 is saved, as a user's Ctrl-\\ or an OOM killer would.
KILLED_CHILD = """
import os, signal, sys
from slimops import progress
from slimops.cli import main
save = progress.Progress.save_layer
def save_then_die(self, index, layer):
    save(self, index, layer)
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
progress.Progress.save_layer = save_then_die
main(sys.argv[1:])
"""


@pytest.fixture
def setup(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_model("llama", layers=4, perturb=True).save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text(SAMPLE_TEXT * 20)

    def args(out, *extra):
        return prune_argv(model_dir, text, 0.4) + ["--out", str(out), "--resume", *extra]

    return tmp_path, args


def test_killed_and_resumed_equals_unbroken(setup, capsys):
    tmp, args = setup
    assert main(args(tmp / "unbroken")) == 0
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, *args(tmp / "resumed")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    progress = json.loads((tmp / "resumed.progress" / "progress.json").read_text())
    assert progress["done"] == 2 and not (tmp / "resumed").exists()
    capsys.readouterr()
    assert main(args(tmp / "resumed")) == 0
    assert "2 layers already pruned" in capsys.readouterr().err
    assert not (tmp / "resumed.progress").exists()  # cleared once the checkpoint is saved
    a = load_file(tmp / "unbroken" / "model.safetensors")
    b = load_file(tmp / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical
    plan_a = json.loads((tmp / "unbroken" / "slimops_plan.json").read_text())
    plan_b = json.loads((tmp / "resumed" / "slimops_plan.json").read_text())
    assert plan_a["layers"] == plan_b["layers"]


def test_progress_of_other_settings_is_refused(setup, capsys):
    tmp, args = setup
    folder = tmp / "out.progress"
    folder.mkdir()
    (folder / "fingerprint.json").write_text(json.dumps({"ratio": 0.9}))
    (folder / "progress.json").write_text(json.dumps({"done": 1, "state": {}}))
    assert main(args(tmp / "out")) == 2
    assert "other settings" in capsys.readouterr().err


def test_resume_needs_a_resumable_method(setup, capsys):
    tmp, args = setup
    assert main(args(tmp / "out", "--method", "flap")) == 2
    assert "--resume is implemented for slimgpt only" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fingerprint.json", "progress.json"])
def test_corrupt_progress_is_one_line_naming_the_file(setup, capsys, monkeypatch, name):
    """A progress folder damaged outside slimops (a full disk, a copy cut short): the file and
    what is wrong, no traceback, nothing written."""
    from slimops import progress

    class Killed(Exception):
        pass

    def save_then_die(self, index, layer):
        save(self, index, layer)
        raise Killed

    tmp, args = setup
    save = progress.Progress.save_layer
    monkeypatch.setattr(progress.Progress, "save_layer", save_then_die)
    with pytest.raises(Killed):
        main(args(tmp / "out"))
    monkeypatch.setattr(progress.Progress, "save_layer", save)
    folder = tmp / "out.progress"
    (folder / name).write_text('{"done": 1, "st')  # cut short
    capsys.readouterr()
    assert main(args(tmp / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"{folder / name}: not valid JSON" in err[-1] and sum("error" in x for x in err) == 1
    assert not (tmp / "out").exists()
