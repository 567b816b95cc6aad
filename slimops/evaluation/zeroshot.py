"""Zero-shot accuracy (BoolQ, PIQA, HellaSwag, ...) through lm-evaluation-harness.

lm_eval is an optional extra (`pip install "slimops[eval]"`). We hand it the model slimops
already loaded, wrapped in its HFLM, instead of a name for lm_eval to load: a slimops
checkpoint with per-layer shapes only loads through `slimops.load` (no remote code), and
this way plain HF folders and pruned checkpoints are evaluated by the same code path.
"""

from __future__ import annotations

import difflib
import logging
import math
from pathlib import Path

INSTALL_HINT = "pip install 'slimops[eval]'"

# The seven tasks the pruning papers (LLM-Pruner, SlimGPT, FLAP, ...) report.
PAPER_TASKS = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

# The metric each paper task is reported with: LLM-Pruner's table (which SlimGPT and later
# papers copy) matches lm_eval's acc_norm on these three and acc on the other four (the
# reproduction in horseee/LLM-Pruner issue #25). Any other task: acc.
PAPER_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}

METRICS = ("acc", "acc_norm")


def require_lm_eval():
    """The lm_eval module, or an ImportError that names the install command."""
    try:
        import lm_eval
    except ImportError as exc:
        raise ImportError(
            f"--tasks needs lm-evaluation-harness, which is not importable ({exc}): {INSTALL_HINT}"
        ) from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    """'boolq, piqa,,hellaswag' -> ['boolq', 'piqa', 'hellaswag'] (order kept, no repeats)."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise ValueError(f"--tasks {text!r} names no task (comma-separated lm_eval task names)")
    return names


def task_manager(tasks: list[str], include_path: list[str] | None = None):
    """An lm_eval TaskManager that knows every name in `tasks`; ValueError otherwise.

    Indexing lm_eval's own ~15,000 task YAMLs takes seconds, so when --include-path alone
    defines every requested name as a plain task (e.g. the tests' local task) the defaults
    are skipped; a local group or tag may name lm_eval's own tasks, so it gets the defaults.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path or []]
    for path in paths:
        if not Path(path).exists():
            raise FileNotFoundError(f"--include-path {path}: no such file or folder")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = _unknown(tasks, manager)
    if unknown:
        raise ValueError(_unknown_message(unknown, manager))
    return manager


def _unknown(tasks: list[str], manager) -> list[str]:
    """Names neither registered (task, group or tag) nor a task YAML file."""
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not Path(t).is_file()]


def _unknown_message(unknown: list[str], manager) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, manager.all_tasks, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (
        f"unknown lm_eval task(s): {'; '.join(hints)}. `lm_eval ls tasks` lists them; "
        "--include-path DIR adds your own task YAMLs"
    )


def wrap_model(model, tokenizer, batch_size: int = 8):
    """lm_eval's HFLM around an already-loaded causal LM (on its current device)."""
    from lm_eval.models.huggingface import HFLM

    if tokenizer is None:
        raise ValueError("--tasks needs a tokenizer, and the model folder has none")
    if not model.can_generate():  # e.g. BertModel: zero-shot tasks score next tokens
        raise ValueError(f"--tasks needs a causal LM; {type(model).__name__} is not one")
    # HFLM warns that options are ignored when it gets a model object: that is the intent
    # here (slimops loaded it), so the warning would only mislead.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    finally:
        hf_logger.setLevel(level)


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    manager,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict:
    """Run `tasks` on the model; returns lm_eval's results, n-samples and versions."""
    from lm_eval import simple_evaluate

    out = simple_evaluate(
        model=wrap_model(model, tokenizer, batch_size),
        tasks=tasks,
        task_manager=manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=False,  # per-example records: large (HellaSwag), and unused here
    )
    return {key: out.get(key, {}) for key in ("results", "n-samples", "versions", "n-shot")}


def _number(value) -> float | None:
    """lm_eval writes 'N/A' for an undefined stderr (n = 1)."""
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def summarize(raw: dict) -> dict:
    """Rows {task, metric, value, stderr, n} for acc and acc_norm of every leaf task, the
    mean acc over tasks, and the mean of each task's paper metric (PAPER_METRIC)."""
    rows, paper = [], []
    for task, counts in raw["n-samples"].items():
        scores = raw["results"].get(task, {})
        for metric in METRICS:
            value = _number(scores.get(f"{metric},none"))
            if value is not None:
                stderr = _number(scores.get(f"{metric}_stderr,none"))
                n = int(counts["effective"])
                rows.append(dict(task=task, metric=metric, value=value, stderr=stderr, n=n))
        chosen = _number(scores.get(f"{PAPER_METRIC.get(task, 'acc')},none"))
        paper.append(chosen if chosen is not None else _number(scores.get("acc,none")))
    accs = [r["value"] for r in rows if r["metric"] == "acc"]
    paper = [v for v in paper if v is not None]
    return {
        "rows": rows,
        "mean_acc": sum(accs) / len(accs) if accs else None,
        "mean_paper_metric": sum(paper) / len(paper) if paper else None,
        "tasks_averaged": len(accs),
    }


def markdown(summary: dict) -> str:
    """The table users compare with the papers, then the means."""
    lines = ["| task | metric | value | stderr | n |", "|---|---|---:|---:|---:|"]
    for r in summary["rows"]:
        stderr = "-" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r['value']:.4f} | {stderr} | {r['n']} |")
    lines.append("")
    count = summary["tasks_averaged"]
    if summary["mean_acc"] is not None:
        lines.append(f"mean acc over {count} task{'s' * (count != 1)}: {summary['mean_acc']:.4f}")
    if summary["mean_paper_metric"] is not None:
        lines.append(
            f"mean as the papers report it (acc_norm for {', '.join(PAPER_METRIC)}; "
            f"acc otherwise): {summary['mean_paper_metric']:.4f}"
        )
    return "\n".join(lines)
