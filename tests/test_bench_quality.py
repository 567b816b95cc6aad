"""The quality harness end to end on a tiny saved model: every requested method x ratio runs,
and the table, JSON and plot are written with numbers that belong to the runs."""

import json

from helpers import SAMPLE_TEXT, load_benchmark

bench_quality = load_benchmark("bench_quality")


def test_harness_writes_table_json_plot(saved_tiny_model, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(SAMPLE_TEXT * 40)
    out = tmp_path / "quality"
    summary = bench_quality.main(
        [
            "--model",
            str(saved_tiny_model),
            "--data",
            str(text),
            "--ratios",
            "0.2",
            "0.5",
            "--methods",
            "slimgpt",
            "magnitude",
            "--schedules",
            "log",
            "uniform",
            "0,0.2,0.4",
            "--seqlens",
            "16",
            "32",
            "--eval-tokens",
            "0",
            "--nsamples",
            "8",
            "--calib-seqlen",
            "32",
            "--out",
            str(out),
        ]
    )
    labels = sorted((r["label"], r["ratio"]) for r in summary["results"])
    assert labels == [
        ("magnitude", 0.2),
        ("magnitude", 0.5),
        ("slimgpt (list)", 0.2),
        ("slimgpt (log)", 0.2),
        ("slimgpt (log)", 0.5),
        ("slimgpt (uniform)", 0.2),
        ("slimgpt (uniform)", 0.5),
    ]
    for r in summary["results"]:
        assert abs(r["achieved_ratio"] - r["ratio"]) <= 0.01
        assert r["ppl16"] > 1 and r["ppl32"] > 1 and r["prune_seconds"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["dense"] == summary["dense"] and len(saved["results"]) == 7
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 1 + 7 and "slimgpt (list)" in table
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_held_out_text_never_calibrates(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("a" * 900 + "b" * 100)
    calib, test = bench_quality.split_text(str(text))
    assert set(calib) == {"a"} and set(test) == {"b"}
