"""SlimGPT: fast path vs the paper-faithful reference, ratio contract, GQA validity, OBS."""

import copy

import pytest
import torch

from helpers import make_tiny_model
from slimops.methods.obs_solver import ObsSolver, damp_hessian
from slimops.methods.slimgpt import method as slimgpt
from slimops.methods.slimgpt.reference import ReferenceSolver
from slimops.models import get_adapter
from slimops.pipeline import prune_model
from slimops.schedules import layer_ratios
from slimops.slicing import apply_plan


def calib(n=16, seqlen=32, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_fast_path_matches_reference(family):
    model = make_tiny_model(family)
    tokens = calib()
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    plan_f = slimgpt.prune(fast, tokens, slimgpt.SlimGPTConfig(ratio=0.35))
    plan_r = slimgpt.prune(ref, tokens, slimgpt.SlimGPTConfig(ratio=0.35, reference=True))
    assert plan_f.layers == plan_r.layers
    for (name, a), b in zip(fast.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3, msg=name)
    assert plan_f.shapes() != plan_f.dense(3, 4, 2, 160).shapes()


@pytest.mark.parametrize("schedule", ["log", "linear", "uniform", [0.1, 0.3, 0.5]])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_ratio_contract_and_gqa(schedule, ratio):
    model = make_tiny_model(
        "llama",
        layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        hidden_size=128,
        intermediate_size=344,
    )
    if isinstance(schedule, list):
        ratio = sum(schedule) / len(schedule)
    plan, report = prune_model(model, calib(), "slimgpt", ratio, schedule)
    assert abs(report.achieved_ratio - ratio) <= 0.01, report.summary()
    adapter = get_adapter(model)
    for layer, shape in zip(adapter.layers(), plan.shapes()):
        nh, nkv, ffn = adapter.layer_shape(layer)
        assert (nh, nkv, ffn) == tuple(shape.values())
        assert nh % nkv == 0  # still valid GQA
    assert torch.isfinite(model(calib(2)).logits).all()


def _layer_problem(seed=0, d_in=64, d_out=48, tokens=512):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g) * 0.3
    W = torch.randn(d_out, d_in, generator=g)
    return X, W, X.T @ X / tokens


def test_obs_compensation_beats_plain_masking():
    X, W, H = _layer_problem()
    Hd, _ = damp_hessian(H, W.clone())
    solver = ObsSolver(W.clone(), Hd)
    kept, kv, removed = slimgpt.prune_heads(solver, 4, 4, 16, {"head": 1, "kv_head": 1}, 4)
    assert len(kept) == 2 and removed == 4
    masked = W.clone()
    dropped = sorted(
        set(range(64)) - set(torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept]).tolist())
    )
    masked[:, dropped] = 0
    ref_out = X @ W.T
    err_obs = (X @ solver.W.T - ref_out).pow(2).sum()
    err_mask = (X @ masked.T - ref_out).pow(2).sum()
    assert err_obs < 0.8 * err_mask


def test_gqa_whole_group_removed_when_it_is_useless():
    X, W, H = _layer_problem(seed=1)
    W[:, 32:] = 0  # KV group 1 (heads 2, 3) contributes nothing
    Hd, _ = damp_hessian(H, W)
    costs = {"head": 2, "kv_head": 2}
    kept, kv, _ = slimgpt.prune_heads(ObsSolver(W.clone(), Hd), 4, 2, 16, costs, 6)
    assert kv == [0] and kept == [0, 1]


def test_gqa_one_head_per_group_when_cheaper():
    X, W, H = _layer_problem(seed=2)
    W[:, 16:32] *= 1e-3  # head 1 (group 0) and head 3 (group 1) nearly useless
    W[:, 48:64] *= 1e-3
    Hd, _ = damp_hessian(H, W)
    kept, kv, _ = slimgpt.prune_heads(
        ObsSolver(W.clone(), Hd), 4, 2, 16, {"head": 2, "kv_head": 2}, 4
    )
    assert kv == [0, 1] and kept == [0, 2]


def test_dynamic_group_size_matches_reference_channels():
    X, W, H = _layer_problem(seed=3, d_in=96)
    Hd, _ = damp_hessian(H, W)
    a = slimgpt.prune_channels(ObsSolver(W.clone(), Hd), 40, min_group=4)
    b = slimgpt.prune_channels(ReferenceSolver(W.clone(), Hd), 40, min_group=4)
    assert a == b and len(a) == 56


def test_damping_grows_on_indefinite_hessian(caplog):
    H = torch.diag(torch.tensor([1.0, 1.0, -1.5, 1.0]))
    W = torch.ones(2, 4)
    damped, damping = damp_hessian(H, W, percdamp=0.01)
    assert damping.grown >= 1
    assert torch.linalg.cholesky_ex(damped)[1] == 0
    assert "grown" in caplog.text


def test_nonfinite_hessian_is_a_clear_error():
    with pytest.raises(FloatingPointError, match="non-finite"):
        damp_hessian(torch.full((3, 3), float("nan")), torch.ones(2, 3))


def test_schedules():
    for kind in ("log", "linear", "uniform"):
        r = layer_ratios(kind, 0.3, 8)
        assert abs(sum(r) / 8 - 0.3) < 1e-9 and all(0 <= x < 1 for x in r)
    log = layer_ratios("log", 0.3, 8)
    assert log == sorted(log) and log[0] == 0.0  # early layers keep more
    high = layer_ratios("log", 0.7, 8)
    assert max(high) <= 0.9 + 1e-9 and abs(sum(high) / 8 - 0.7) < 1e-9
    with pytest.raises(ValueError, match="layers"):
        layer_ratios([0.1, 0.2], 0.2, 3)
    with pytest.raises(ValueError, match="outside"):
        layer_ratios("log", 1.0, 3)


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="supports .*llama.*qwen3"):
        get_adapter(model)


def test_sliced_equals_masked_after_pruning():
    model = make_tiny_model("qwen2")
    tokens = calib()
    plan = slimgpt.prune(model, tokens, slimgpt.SlimGPTConfig(ratio=0.3))
    masked = model(tokens[:2]).logits
    apply_plan(model, plan)
    torch.testing.assert_close(model(tokens[:2]).logits, masked, atol=1e-5, rtol=1e-5)
