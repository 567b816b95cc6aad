"""`slimops eval --tasks`: zero-shot accuracy through lm-evaluation-harness, offline, on a
tiny per-layer-shaped checkpoint and a local multiple-choice task written here; the scores
lm_eval reports are checked against scoring the same choices with the model directly."""

import json
import sys

import pytest
import torch

from helpers import make_tiny_model, make_tiny_tokenizer, random_gqa_plan
from slimops.checkpoint import load, save_pruned
from slimops.cli import main
from slimops.evaluation.zeroshot import PAPER_TASKS, markdown, summarize
from slimops.slicing import apply_plan

TASK = "slimops_tiny_mc"
DOCS = [
    {
        "question": f"Is the {animal} number {i} quick",
        "choices": ["yes", "no", "maybe"],
        "label": i % 3,
    }
    for i, animal in enumerate(["fox", "dog", "cat", "owl", "eel", "bee", "yak", "emu"])
]
LIMIT = 6  # of the 8 docs: --limit must be honoured

# lm_eval's multiple_choice protocol: context, then " " + choice as the continuation.
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {data}
  cache_dir: {cache}
output_type: multiple_choice
test_split: train
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata:
  version: 1.0
"""


@pytest.fixture
def lm_eval(monkeypatch):
    module = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local json dataset: no hub, ever
    return module


@pytest.fixture
def pruned_checkpoint(tmp_path):
    """A tiny LLaMA sliced to a GQA plan and saved: per-layer shapes (slimops_layers)."""
    model, tok = make_tiny_model("llama"), make_tiny_tokenizer()
    plan = random_gqa_plan(model)
    apply_plan(model, plan)
    out = save_pruned(model, tmp_path / "pruned", tokenizer=tok, plan=plan)
    assert "slimops_layers" in json.loads((out / "config.json").read_text())
    return out


@pytest.fixture
def task_dir(tmp_path):
    data = tmp_path / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    folder = tmp_path / "tasks"
    folder.mkdir()
    yaml = TASK_YAML.format(task=TASK, data=data, cache=tmp_path / "hf-datasets")
    (folder / f"{TASK}.yaml").write_text(yaml)
    return folder


@torch.no_grad()
def expected_acc(checkpoint, docs) -> float:
    """Accuracy from summed log-probs of each choice's tokens after the context."""
    model, tok = load(checkpoint)
    hits = 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        ctx = tok(context)["input_ids"]
        scores = []
        for choice in doc["choices"]:
            ids = tok(context + " " + choice)["input_ids"]
            assert ids[: len(ctx)] == ctx  # the continuation's tokens start after the context
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))))
        hits += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    return hits / len(docs)


def test_tasks_on_a_per_layer_checkpoint(lm_eval, pruned_checkpoint, task_dir, tmp_path, capsys):
    out = tmp_path / "zeroshot.json"
    argv = ["eval", str(pruned_checkpoint), "--tasks", TASK, "--include-path", str(task_dir)]
    rc = main(argv + ["--limit", str(LIMIT), "--batch-size", "4", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert (
        "| task | metric | value | stderr | n |" in printed and "mean acc over 1 task:" in printed
    )
    result = json.loads(out.read_text())
    rows = {r["metric"]: r for r in result["rows"]}
    assert set(rows) == {"acc", "acc_norm"}
    for row in rows.values():
        assert row["task"] == TASK and row["n"] == LIMIT and 0.0 <= row["value"] <= 1.0
    assert rows["acc"]["value"] == pytest.approx(expected_acc(pruned_checkpoint, DOCS[:LIMIT]))
    assert result["mean_acc"] == rows["acc"]["value"]
    assert result["lm_eval_version"] == lm_eval.__version__


def test_missing_extra_is_one_line_with_the_install_command(saved_tiny_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    assert main(["eval", str(saved_tiny_model), "--tasks", "boolq"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'slimops[eval]'" in err


def test_unknown_task_is_one_clear_line(lm_eval, saved_tiny_model, capsys):
    tasks = ",".join(PAPER_TASKS) + ",boolqq"  # the papers' seven exist in lm_eval; one typo
    assert main(["eval", str(saved_tiny_model), "--tasks", tasks]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown lm_eval task(s): 'boolqq' (did you mean boolq" in err


def test_summary_means_follow_the_papers():
    """acc for boolq (no acc_norm), acc_norm for hellaswag: the papers' average."""
    raw = {
        "results": {
            "boolq": {"acc,none": 0.6, "acc_stderr,none": 0.01},
            "hellaswag": {"acc,none": 0.4, "acc_stderr,none": "N/A", "acc_norm,none": 0.5},
        },
        "n-samples": {"boolq": {"effective": 10}, "hellaswag": {"effective": 20}},
    }
    summary = summarize(raw)
    assert [(r["task"], r["metric"], r["n"]) for r in summary["rows"]] == [
        ("boolq", "acc", 10),
        ("hellaswag", "acc", 20),
        ("hellaswag", "acc_norm", 20),
    ]
    assert summary["rows"][1]["stderr"] is None  # lm_eval's "N/A"
    assert summary["mean_acc"] == pytest.approx(0.5)
    assert summary["mean_paper_metric"] == pytest.approx(0.55)
    assert "| hellaswag | acc | 0.4000 | - | 20 |" in markdown(summary)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "boolq", "--seqlen", "64"], "--seqlen: only for perplexity"),
        (["--limit", "5"], "--limit: only for --tasks"),
    ],
)
def test_options_of_the_other_mode_are_refused(saved_tiny_model, capsys, args, message):
    assert main(["eval", str(saved_tiny_model), *args]) == 2
    assert message in capsys.readouterr().err
