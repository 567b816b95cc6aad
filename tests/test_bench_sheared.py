"""The Sheared-LLaMA evidence harness end to end on a tiny saved model and two tiny domains:
every comparison runs at equal training tokens and the JSON and tables hold its numbers."""

import json

from helpers import SAMPLE_TEXT, load_benchmark

bench_sheared = load_benchmark("bench_sheared")


def test_every_run_and_the_tables(saved_tiny_model, tmp_path, capsys):
    for k, name in enumerate(("alpha", "beta")):
        for i in range(30):  # crc32 puts about 3 of each domain's 30 files in the test split
            (tmp_path / "doms" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "doms" / name / f"f{i}.txt").write_text(f"{name} {i} " + SAMPLE_TEXT[k:])
    out = tmp_path / "r.json"
    argv = [
        "--model",
        str(saved_tiny_model),
        "--domains",
        str(tmp_path / "doms"),
        "--target",
        "hidden=48,heads=2,kv_heads=1,ffn=96",
        "--prune-steps",
        "2",
        "--cpt-steps",
        "2",
        "--batch-size",
        "2",
        "--seqlen",
        "16",
        "--eval-interval",
        "2",
        "--split",
        "test",
        "--test-windows",
        "2",
        "--out",
        str(out),
    ]
    bench_sheared.main(argv)
    result = json.loads(out.read_text())
    assert list(result["runs"]) == list(bench_sheared.RUNS)
    target = result["runs"]["scratch"]["decoder_params"]  # the target shape, built directly
    for name, run in result["runs"].items():  # slimgpt: the same count within its rounding
        assert abs(run["decoder_params"] / target - 1) < 0.02, name
        assert set(run["score"]["per_domain"]) == {"alpha", "beta"}
        assert run["tokens_per_s"] > 0 and run["cpt_wall_s"] > 0
    printed = capsys.readouterr().out
    assert "| sheared-dynamic |" in printed and "| domain | dense |" in printed
