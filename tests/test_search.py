"""search (Search for Efficient LLMs): every candidate GQA-valid and in budget, Alg. 1's
overlap, fitness on virtual (slice_gemm) layers equal to the materialised model's, reformation
lowering each layer's output error, determinism, and the end-to-end checkpoint."""

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import make_tiny_bert, make_tiny_model
from slimops.methods.saliency import dense_pass
from slimops.methods.search import method as search
from slimops.methods.search.fitness import Evaluator, refit
from slimops.methods.search.reformation import admm, refit_columns
from slimops.methods.search.space import Space
from slimops.models import get_adapter
from slimops.pipeline import prune_model
from slimops.slicing import apply_plan

FAST = dict(generations=2, population=6, mutations=3, crossovers=1, parents=3, fitness_samples=4)


def calib(n=8, seqlen=24, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def space_and_model():
    model = make_tiny_model("llama", layers=3, perturb=True)
    adapter = get_adapter(model)
    stats, _ = dense_pass(model, adapter, calib(), 0.01, context=24)
    return model, adapter, stats


@pytest.mark.parametrize("budget", ["params", "macs"])
def test_every_candidate_is_gqa_valid_and_in_budget(space_and_model, budget):
    model, adapter, stats = space_and_model
    space = Space([s.space for s in stats], 0, budget, 0.4)
    rng = random.Random(0)
    pop, _ = search.initial_population(space, search.SearchConfig(ratio=0.4, **FAST), rng)
    for _ in range(30):
        a, b = rng.sample(pop, 2)
        pop.append(space.repair(space.mutate(a, rng, 0.5, 0.5), rng))
        pop.append(space.repair(space.crossover(a, b, rng), rng))
    for cand in pop:
        assert space.in_budget(cand) and abs(space.removed(cand) - 0.4) <= 0.01
        for layer, gene in zip(adapter.layers(), cand):
            gene.plan().validate(*adapter.layer_shape(layer))


def test_mask_mutation_keeps_alpha_overlap(space_and_model):
    _, _, stats = space_and_model
    space = Space([s.space for s in stats], 0, "params", 0.3)
    gene = space.top(0, 2, 1, 100)
    rng = random.Random(1)
    for _ in range(20):
        new = space.redraw(0, gene, rng, alpha=0.8)
        assert len(new.channels) == 100 and len(set(new.channels) & set(gene.channels)) >= 80
        assert new.kv == gene.kv and len(new.heads) == len(gene.heads)


def test_top_keeps_the_most_salient(space_and_model):
    _, _, stats = space_and_model
    ls = stats[1].space
    gene = Space([s.space for s in stats], 0, "params", 0.3).top(1, 2, 2, 10)
    assert set(gene.channels) == set(
        sorted(range(ls.dense.ffn), key=lambda c: -ls.channel_scores[c])[:10]
    )


@torch.no_grad()
def test_the_refit_cache_is_bounded_and_changes_no_result(space_and_model):
    from slimops.methods.search.fitness import Compensator

    model, adapter, stats = space_and_model
    space = Space([s.space for s in stats], 0, "params", 0.35)
    pop, _ = search.initial_population(
        space, search.SearchConfig(ratio=0.35, **FAST), random.Random(3)
    )
    genes = [(i, g) for cand in pop for i, g in enumerate(cand)]
    free, small = Compensator(adapter, stats, "cpu"), Compensator(adapter, stats, "cpu", 0.05)
    for i, g in genes + genes:
        for role, W in free(i, g).items():
            torch.testing.assert_close(small(i, g)[role], W, rtol=0, atol=0)
        assert small.cache.bytes <= 0.05 * 2**20 or len(small.cache) == 1
    assert len(small.cache) < len(free.cache)


@torch.no_grad()
@pytest.mark.parametrize("compensate", [False, True])
def test_fitness_equals_the_materialised_model(space_and_model, compensate):
    """ppl from slice_gemm views with prefix reuse == ppl of a sliced copy (compensated
    copies get the same least-squares refit of o/down)."""
    model, adapter, stats = space_and_model
    space = Space([s.space for s in stats], 0, "params", 0.35)
    tokens = calib(4, 24, seed=5)
    from slimops.methods.search.fitness import Compensator

    comp = Compensator(adapter, stats, "cpu") if compensate else None
    ev = Evaluator(model, adapter, tokens, "ppl", "cpu", batch_size=2, compensator=comp)
    rng = random.Random(3)
    first, _ = search.initial_population(space, search.SearchConfig(ratio=0.35, **FAST), rng)
    cand = first[1]
    for _ in range(2):  # second call: from the prefix cache
        got = ev(cand)
        sliced = copy.deepcopy(model)
        if compensate:
            for i, (layer, g) in enumerate(zip(get_adapter(sliced).layers(), cand)):
                for role, W in comp(i, g).items():
                    lin = get_adapter(sliced).linear(layer, role)
                    cols = torch.zeros(lin.in_features, dtype=torch.bool)
                    keep = (
                        torch.as_tensor(g.channels)
                        if role == "down"
                        else torch.cat([torch.arange(h * 16, h * 16 + 16) for h in g.heads])
                    )
                    cols[keep] = True
                    lin.weight[:, cols] = W
        from slimops.plan import PruningPlan

        apply_plan(sliced, PruningPlan([g.plan() for g in cand]))
        out = sliced(tokens).logits
        want = math.exp(F.cross_entropy(out[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))
        assert got == pytest.approx(want, rel=1e-4)
    mutated = list(cand)
    mutated[2] = space.resize(2, cand[2], d_ffn=-1)
    before = ev.layers_run
    ev(tuple(mutated))
    assert ev.layers_run - before == len(ev.inputs)  # only layer 2, per batch: 0-1 reused


def test_reformation_lowers_each_layers_output_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(512, 48, generator=g) @ torch.randn(48, 48, generator=g)
    W = torch.randn(32, 48, generator=g)
    H = X.T @ X / 512
    drop = torch.tensor([3, 7, 8, 20, 21, 40])
    err = {
        how: ((X @ refit_columns(W, H, drop, how, 0.01, 1.0, 50).T - X @ W.T) ** 2).mean()
        for how in ("none", "admm", "obs")
    }
    assert err["obs"] < err["none"] and err["admm"] < err["none"]
    assert err["obs"] <= err["admm"] * 1.01  # the closed form is the optimum
    keep = torch.ones(48, dtype=torch.bool)
    keep[drop] = False
    Z = admm(W, H, keep, rho=1.0, iters=200)
    assert torch.all(Z[:, drop] == 0)
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(48)
    torch.testing.assert_close(
        refit(W, Hd, torch.nonzero(keep).squeeze(1)),
        refit_columns(W, H, drop, "obs", 0.01, 1, 1)[:, keep],
        rtol=1e-3,
        atol=1e-3,
    )


def test_same_seed_same_result_and_checkpoint_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    from slimops.checkpoint import save_pruned

    plans = []
    for _ in range(2):
        model = make_tiny_model("qwen2", layers=2, perturb=True)
        plan, report = prune_model(model, calib(), "search", 0.3, **FAST)
        plans.append(plan)
    assert plans[0].layers == plans[1].layers and abs(report.achieved_ratio - 0.3) <= 0.01
    info = plans[1].info
    assert info["candidates_evaluated"] >= FAST["population"] and info["pareto_params"]
    out = save_pruned(model, tmp_path / "ckpt", plan=plans[1])
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = calib(2, 10, seed=9)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "llama-mha", "mistral", "qwen3"])
def test_search_end_to_end_on_each_family(family, tmp_path):
    """prune_model(..., "search") on every causal-LM family (qwen2: the test above; BERT:
    below): in budget, GQA-valid, saved and reloaded by stock transformers with the same
    logits."""
    from transformers import AutoModelForCausalLM

    from slimops.checkpoint import save_pruned

    model = make_tiny_model(family, layers=2, perturb=True)
    cfg = model.config
    shape = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    plan, report = prune_model(model, calib(), "search", 0.3, **FAST)
    assert abs(report.achieved_ratio - 0.3) <= 0.01
    for lp in plan.layers:
        lp.validate(*shape)
    out = save_pruned(model, tmp_path / "ckpt", plan=plan)
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = calib(2, 10, seed=9)
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_encoder_search_uses_embedding_distance():
    model = make_tiny_bert()
    plan, report = prune_model(model, calib(), "search", 0.3, fitness="kl", **FAST)
    assert abs(report.achieved_ratio - 0.3) <= 0.01
    with pytest.raises(ValueError, match="needs a causal LM"):
        prune_model(make_tiny_bert(), calib(), "search", 0.3, fitness="ppl", **FAST)


def test_depth_moves_and_dropped_layers_reload(space_and_model, tmp_path):
    """--search-depth: depth mutations drop and restore whole layers (always in budget, never
    all of them); a plan with a dropped layer is reformed, sliced (fewer layers, renumbered
    KV cache) and reloads with stock transformers."""
    from transformers import AutoModelForCausalLM

    from slimops.checkpoint import save_pruned
    from slimops.methods.search.reformation import reform
    from slimops.plan import PruningPlan

    _, _, stats = space_and_model
    space = Space([s.space for s in stats], 0, "params", 0.45, depth=True)
    rng = random.Random(0)
    cand = space.repair(space.uniform(0.6), rng)
    drops = 0
    cfg = search.SearchConfig(ratio=0.45, search_depth=True, p_depth=0.3, **FAST)
    for _ in range(40):
        cand = search.mutant(space, cand, cfg, rng)
        assert space.in_budget(cand) and not all(g.dropped for g in cand)
        drops += sum(g.dropped for g in cand)
    assert drops > 0

    model = make_tiny_model("qwen3", layers=3, perturb=True)
    adapter = get_adapter(model)
    stats3, _ = dense_pass(model, adapter, calib(), 0.01, context=24)
    space3 = Space([s.space for s in stats3], 0, "params", 0.5, depth=True)
    genes = list(space3.uniform(0.7))
    genes[1] = genes[1].__class__(genes[1].kv, genes[1].heads, genes[1].channels, True)
    plan = PruningPlan([g.plan() for g in genes])
    reform(model, adapter, calib(), plan)
    apply_plan(model, plan)
    assert model.config.num_hidden_layers == 2
    ids = calib(2, 10, seed=9)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(model(out[:, :-1]).logits[:, 9:].argmax(-1), out[:, 10:])
    reloaded = AutoModelForCausalLM.from_pretrained(
        save_pruned(model, tmp_path / "d", plan=plan), trust_remote_code=True
    ).eval()
    torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    model = make_tiny_model("llama", layers=3)
    _, report = prune_model(model, calib(), "search", 0.4, search_depth=True, **FAST)
    assert abs(report.achieved_ratio - 0.4) <= 0.01
