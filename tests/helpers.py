"""What the tests share: tiny offline models and tokenizers, plans, numeric asserts, device
markers and the per-op bad-input contracts. Fixtures live in conftest.py; tests import
plain helpers from here (`from helpers import ...`), never from another test file."""

from __future__ import annotations

import contextlib
import importlib
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimops import ops
from slimops.kernels.obs import reference as obs_reference
from slimops.plan import LayerPlan, PruningPlan

# --- devices -------------------------------------------------------------------------------

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"  # where the Triton tests run (interpreter on CPU)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


# the C++ kernels' own promises (exact symmetry, IEEE products); the Python fallback is the
# plain reference and makes neither
needs_cpp_ext = pytest.mark.skipif(
    not ops.backends()["cpu"].startswith("C++"), reason="needs the C++ extension slimops._C"
)


def needs_cuda_op(op: str):
    """Skip unless a GPU is present and the C++ extension serves `op` on CUDA."""
    return pytest.mark.skipif(
        not (HAS_CUDA and ops.has_kernel(op, "cuda")),
        reason=f"needs a CUDA GPU and a CUDA kernel for slimops::{op}",
    )


def triton_kernels(family: str):
    """(kernels/<family>/triton.py or None, a skip marker for tests that need it)."""
    try:
        module, reason = importlib.import_module(f"slimops.kernels.{family}.triton"), ""
    except ImportError as exc:
        module, reason = None, f"triton not importable: {exc}"
    return module, pytest.mark.skipif(module is None, reason=reason)


ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """Import benchmarks/<name>.py as a module (benchmarks are scripts, not a package: their
    folder goes on sys.path, as it is when they run, so their shared imports resolve)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


# --- numerics --------------------------------------------------------------------------------


def assert_rel_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max |expected| (kernels vs float64 maths)."""
    assert actual.shape == expected.shape, (
        f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    actual, expected = actual.double(), expected.double()
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= tol, f"{what} relative error {err:.2e} > {tol:.0e}"


def spd(d, gen, cond=10.0, device="cpu"):
    """A well-conditioned SPD matrix in float64 (eigenvalues in [1, cond])."""
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=gen).to(device))
    return Q @ torch.diag(torch.linspace(1.0, cond, d, dtype=torch.float64, device=device)) @ Q.T


# --- tiny models, tokenizers, text ------------------------------------------------------------

# family -> (config class, model class, config overrides). llama-mha has one query head per
# KV group, the others two (4 query / 2 KV heads); qwen2 has q/k/v biases, qwen3 q/k norms.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
}


def make_tiny_model(
    family: str = "llama", layers: int = 3, seed: int = 0, perturb: bool = False, **overrides
):
    """A tiny random model of `family`: hidden 64, head_dim 16, 4 query / 2 KV heads, FFN 160,
    vocab 256, untied lm_head. perturb=True adds noise to biases and norms, which HF's init
    leaves trivial (zeros / ones), so tests that compare masked and sliced models see them."""
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    kwargs = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kwargs)).eval()
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def make_tiny_bert(cls: str = "BertModel", seed: int = 0):
    """Tiny random BERT (hidden 64, 4 heads, FFN 96, 2 layers, vocab 128) whose layers
    matter: larger init than HF's 0.02 and random biases / LayerNorm affines."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=96,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets "
    "you work quickly and integrate systems more effectively. A list is a mutable sequence; "
    "a tuple is an immutable one. Dictionaries map keys to values. " * 8
)


def make_tiny_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def input_ids(seed: int = 0, length: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    return model(input_ids() if ids is None else ids).logits


def random_gqa_plan(model, seed: int = 0) -> PruningPlan:
    """Valid GQA plan: layer 0 drops a whole KV group, layer 1 drops one query head from
    every group (MHA: one head), the rest keep all heads; random FFN channels everywhere."""
    from slimops.models import get_adapter

    rng = random.Random(seed)
    a = get_adapter(model)
    nh, nkv, ffn = a.num_heads, a.num_kv_heads, a.intermediate_size
    rep = nh // nkv
    layers = []
    for i in range(len(a.layers())):
        kv = list(range(nkv))
        if i == 0 or (i == 1 and rep == 1):
            kv.remove(rng.randrange(nkv))
            heads = [h for h in range(nh) if h // rep in kv]
        elif i == 1:
            heads = sorted(
                h for g in kv for h in rng.sample(range(g * rep, (g + 1) * rep), rep - 1)
            )
        else:
            heads = list(range(nh))
        channels = sorted(rng.sample(range(ffn), rng.randrange(ffn // 4, ffn)))
        layers.append(LayerPlan(heads, kv, channels))
    return PruningPlan(layers)


# A checkpoint must load on a machine without slimops: child-process scripts start with this
# prelude, which makes `import slimops` fail there (only the folder and transformers remain).
BLOCK_SLIMOPS = r"""
import importlib.abc, json, sys
class BlockSlimops(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "slimops":
            raise ImportError("slimops is blocked here")
sys.meta_path.insert(0, BlockSlimops())
try:
    import slimops
    sys.exit("slimops is importable in the child")
except ImportError:
    pass
"""


# --- op contracts: bad inputs and the error each backend must raise ---------------------------

# What every op's torch.library.opcheck test runs: opcheck's autograd check needs inputs that
# require grad, and these ops mutate their inputs and are not differentiable.
OPCHECK_UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")

# Each `make(dev)` builds its tensors ON `dev`: moving a strided view to another device makes
# a contiguous copy, so a "must be contiguous" case built on the CPU never fires on a GPU.


def _on(dev, *tensors):
    return tuple(None if t is None else t.to(dev) for t in tensors)


def raised(fn, *args) -> str:
    """The message of the RuntimeError fn(*args) must raise (Python and C++ checks compare)."""
    with pytest.raises(RuntimeError) as exc:
        fn(*args)
    return str(exc.value)


HESSIAN_BAD_INPUTS = [
    (
        lambda dev: _on(dev, torch.zeros(1, 4, 4, dtype=torch.float64), torch.randn(3, 4), None),
        "H must be float32",
    ),
    (
        lambda dev: _on(dev, torch.zeros(4, 4), torch.randn(3, 4), None),
        r"H must have shape \(G, d, d\)",
    ),
    (
        lambda dev: _on(dev, torch.zeros(1, 4, 4), torch.randn(3, 5), None),
        "X has width 5 but H is 4 x 4",
    ),
    (
        lambda dev: _on(dev, torch.zeros(1, 4, 4), torch.ones(3, 4, dtype=torch.int32), None),
        "X must be float32, bfloat16",
    ),
    (lambda dev: _on(dev, torch.zeros(3, 4, 4), torch.randn(3, 4), None), "group_ids is None"),
    (
        lambda dev: _on(dev, torch.zeros(3, 4, 4), torch.randn(3, 4), torch.tensor([0, 3, 1])),
        r"must lie in \[0, G=3\)",
    ),
    (
        lambda dev: _on(dev, torch.zeros(3, 4, 4), torch.randn(3, 4), torch.tensor([0, -1, 1])),
        r"must lie in \[0, G=3\)",
    ),
    (
        lambda dev: _on(dev, torch.zeros(3, 4, 4), torch.randn(3, 4), torch.tensor([0, 1])),
        r"group_ids must have shape \(T,\)",
    ),
    (
        lambda dev: _on(
            dev, torch.zeros(2, 4, 4), torch.randn(3, 4), torch.tensor([0.0, 1.0, 1.0])
        ),
        "group_ids must be int64",
    ),
    (
        lambda dev: (
            torch.zeros(1, 4, 8, device=dev)[:, :, ::2],
            torch.randn(3, 4, device=dev),
            None,
        ),
        "H must be contiguous",
    ),
]

OBS_BAD_INPUTS = [
    (
        "obs_group_errors",
        lambda dev: _on(dev, torch.randn(3, 5), torch.eye(4), torch.zeros(1, 2, dtype=torch.long)),
        "Hinv",
    ),
    (
        "obs_group_errors",
        lambda dev: _on(
            dev,
            torch.randn(3, 4).double(),
            torch.eye(4).double(),
            torch.zeros(1, 2, dtype=torch.long),
        ),
        "must be float32",
    ),
    (
        "obs_group_errors",
        lambda dev: _on(dev, torch.randn(3, 4), torch.eye(4), torch.tensor([[0, 4]])),
        r"lie in \[0, d=4\)",
    ),
    (
        "obs_group_errors",
        lambda dev: _on(dev, torch.randn(3, 4), torch.eye(4), torch.tensor([0, 1])),
        r"shape \(B, s\)",
    ),
    (
        "obs_group_update",
        lambda dev: _on(dev, torch.randn(3, 4), torch.eye(4), torch.tensor([[0, 1]])),
        "1-D",
    ),
    (
        "obs_group_update",
        lambda dev: _on(dev, torch.randn(3, 4), torch.eye(4), torch.tensor([0.0, 1.0])),
        "int64",
    ),
    (
        "obs_group_update",
        lambda dev: _on(dev, torch.randn(3, 4), torch.eye(4), torch.tensor([-1])),
        r"lie in \[0, d=4\)",
    ),
]


def hessian_fp64(H0, X, group_ids, scale):
    """What hessian_accumulate must return, in float64."""
    H, X = H0.double().clone(), X.double()
    for g in range(H.shape[0]):
        rows = X if group_ids is None else X[group_ids == g]
        H[g] += scale * rows.T @ rows
    return H


def errors_fp64(W, Hinv, groups):
    """What obs_group_errors must return, by brute force: tr(W_S inv(Hinv_SS) W_S^T) with an
    explicit inverse, in float64."""
    W, Hinv = W.double(), Hinv.double()
    return torch.stack(
        [torch.trace(W[:, S] @ torch.linalg.inv(Hinv[S][:, S]) @ W[:, S].T) for S in groups]
    )


@contextlib.contextmanager
def matmul_precision(precision: str):
    """torch.set_float32_matmul_precision(precision) for a block, restored afterwards."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def check_obs_ieee(errors, update, precision, device):
    """The obs ops' contract under a reduced fp32 matmul precision ("high": TF32 on GPUs,
    "medium": bf16 through oneDNN on CPUs that have it, ~2e-3 relative): scores and three
    chained updates still match float64 maths to 1e-4, as IEEE fp32 products do."""
    gen = torch.Generator().manual_seed(8)
    d, s = 192, 16
    Hinv = torch.linalg.inv(spd(d, gen)).float()
    W, Hinv = torch.randn(64, d, generator=gen).to(device), ((Hinv + Hinv.T) / 2).to(device)
    groups = torch.randperm(d, generator=gen).view(-1, s).to(device)
    W64, Hinv64 = W.double(), Hinv.double()
    expected = errors_fp64(W, Hinv, groups)
    with matmul_precision(precision):
        err = errors(W, Hinv, groups)
        for idx in groups[:3]:
            assert int(update(W, Hinv, idx)) == 0
            obs_reference.group_update(W64, Hinv64, idx)
    assert_rel_close(err, expected, 1e-4, "errors")
    assert_rel_close(W, W64, 1e-4, "W")
    assert_rel_close(Hinv, Hinv64, 1e-4, "Hinv")


def make_hessian_case(T, d, G, empty_group=None, dtype=torch.float32, device="cpu", seed=0):
    """(H, X, group ids) for hessian_accumulate: random X (T x d), a random non-symmetric H
    start (the op must add, not overwrite), G groups with `empty_group` left without rows."""
    gen = torch.Generator().manual_seed(seed + T * 1000 + d)
    X = torch.randn(T, d, generator=gen).to(dtype)
    H = torch.randn(G, d, d, generator=gen)  # not symmetric: the op must add, not overwrite
    ids = None
    if G > 1:
        ids = torch.randint(0, G, (T,), generator=gen)
        if empty_group is not None:
            ids[ids == empty_group] = (empty_group + 1) % G
        ids = ids.to(device)
    return H.to(device), X.to(device), ids


def prune_argv(model, calib, ratio=0.3, nsamples: int = 8, seqlen: int = 32, *rest) -> list:
    """`slimops prune` arguments of a small CLI run, then `rest` (--out and the like);
    ratio None leaves --ratio at the CLI's default."""
    ratio_args = [] if ratio is None else ["--ratio", str(ratio)]
    size = ["--nsamples", str(nsamples), "--seqlen", str(seqlen)]
    return ["prune", str(model), *ratio_args, "--calib", str(calib), *size, *map(str, rest)]


def child_env(home) -> dict:
    """Environment of a fresh interpreter that loads checkpoints offline, with its own HF
    cache under `home` and no PYTHONPATH (so it cannot import this checkout's slimops)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HOME=str(home),
        HF_MODULES_CACHE=str(home / "modules"),
        TOKENIZERS_PARALLELISM="false",
    )
    return env


# --- torchrun -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    args: list[str], nproc: int = 2, rendezvous: bool = False, **kw
) -> subprocess.CompletedProcess:
    """`torchrun` on this machine; rendezvous=True joins as docs/cli.md's several-machine
    command does (c10d rendezvous at an endpoint), here with one node."""
    where = [f"--master_port={free_port()}"]
    if rendezvous:
        where = ["--nnodes=1", "--rdzv_backend=c10d", "--rdzv_id=slimops-test"]
        where.append(f"--rdzv_endpoint=localhost:{free_port()}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *where]
    cmd += args
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)


# --- sheared ---------------------------------------------------------------------------------


def tiny_domains():
    """Three domains of 16-token windows (12 train, 2 validation): arithmetic sequences
    mod 32 of stride 1, 2, 3 from random starts, so a tiny model can learn them."""
    from slimops.domains import Domain

    g = torch.Generator().manual_seed(0)

    def windows(n, stride):  # learnable: each domain counts up by its own stride, mod 32
        start = torch.randint(0, 32, (n, 1), generator=g)
        return (start + stride * torch.arange(16)) % 32

    return [Domain(name, windows(12, k + 1), windows(2, k + 1)) for k, name in enumerate("abc")]


def tiny_shear(state_dir=None, stop_after=None, steps: int = 6, fsdp: bool = False, save: int = 2):
    """The sheared pruning stage on a tiny LLaMA with dynamic batch loading over
    tiny_domains(): (model, plan, log, mixture)."""
    from slimops.domains import Mixture
    from slimops.methods.sheared.method import ShearedConfig, shear
    from slimops.trainer import TrainConfig

    model = make_tiny_model("llama", layers=2, perturb=True)
    doms = tiny_domains()
    mix = Mixture.make(doms, reference=torch.full((3,), 4.0, dtype=torch.float64), dynamic=True)
    cfg = ShearedConfig(target="hidden=48,heads=2,kv_heads=1,ffn=96", prune_steps=steps)
    train_cfg = TrainConfig(steps, 4, 1e-3, eval_interval=2, save_interval=save, fsdp=fsdp)
    model, plan, log = shear(model, doms, mix, cfg, train_cfg, state_dir, stop_after)
    return model, plan, log, mix
