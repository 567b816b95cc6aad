"""Shared fixtures: tiny randomly initialised models of every supported family and a tiny
byte-level BPE tokenizer, all built offline."""
import importlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():   # before any test imports triton: it reads this once
    os.environ.setdefault("TRITON_INTERPRET", "1")


def triton_kernels(family: str):
    """(kernels/<family>/triton.py or None, a skip marker for tests that need it)."""
    try:
        module, reason = importlib.import_module(f"slimops.kernels.{family}.triton"), ""
    except ImportError as exc:
        module, reason = None, f"triton not importable: {exc}"
    return module, pytest.mark.skipif(module is None, reason=reason)

# Prelude of child-process scripts that must run where slimops cannot be imported (only the
# checkpoint folder and transformers): proves a checkpoint loads on a machine without slimops.
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

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-mha": ("LlamaConfig", "LlamaForCausalLM", {"num_key_value_heads": 4}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
}


def make_tiny_model(family: str = "llama", layers: int = 3, seed: int = 0, **overrides):
    import transformers
    cfg_name, model_name, extra = FAMILIES[family]
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, tie_word_embeddings=False)
    kwargs.update(extra)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**kwargs))
    return model.eval()


def make_tiny_tokenizer(vocab_size: int = 256):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([SAMPLE_TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language that lets "
    "you work quickly and integrate systems more effectively. A list is a mutable sequence; "
    "a tuple is an immutable one. Dictionaries map keys to values. " * 8)


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def saved_tiny_model(tmp_path):
    """A tiny LLaMA GQA model + tokenizer saved as a HF folder; returns the path."""
    path = tmp_path / "tiny-llama"
    make_tiny_model("llama").save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return path


# Bad inputs and the error each op must raise, shared by every backend's tests (the C++ CPU
# op in test_ops.py, Triton and CUDA in test_hessian.py / test_obs.py): one contract.
HESSIAN_BAD_INPUTS = [
    (lambda: (torch.zeros(1, 4, 4, dtype=torch.float64), torch.randn(3, 4), None), "H must be float32"),
    (lambda: (torch.zeros(4, 4), torch.randn(3, 4), None), r"H must have shape \(G, d, d\)"),
    (lambda: (torch.zeros(1, 4, 4), torch.randn(3, 5), None), "X has width 5 but H is 4 x 4"),
    (lambda: (torch.zeros(1, 4, 4), torch.ones(3, 4, dtype=torch.int32), None), "X must be float32, bfloat16"),
    (lambda: (torch.zeros(3, 4, 4), torch.randn(3, 4), None), "group_ids is None"),
    (lambda: (torch.zeros(3, 4, 4), torch.randn(3, 4), torch.tensor([0, 3, 1])), r"must lie in \[0, G=3\)"),
    (lambda: (torch.zeros(3, 4, 4), torch.randn(3, 4), torch.tensor([0, -1, 1])), r"must lie in \[0, G=3\)"),
    (lambda: (torch.zeros(3, 4, 4), torch.randn(3, 4), torch.tensor([0, 1])), r"group_ids must have shape \(T,\)"),
    (lambda: (torch.zeros(2, 4, 4), torch.randn(3, 4), torch.tensor([0., 1., 1.])), "group_ids must be int64"),
    (lambda: (torch.zeros(1, 4, 8)[:, :, ::2], torch.randn(3, 4), None), "H must be contiguous"),
]

OBS_BAD_INPUTS = [
    ("obs_group_errors", lambda: (torch.randn(3, 5), torch.eye(4), torch.zeros(1, 2, dtype=torch.long)), "Hinv"),
    ("obs_group_errors", lambda: (torch.randn(3, 4).double(), torch.eye(4).double(),
                                  torch.zeros(1, 2, dtype=torch.long)), "must be float32"),
    ("obs_group_errors", lambda: (torch.randn(3, 4), torch.eye(4), torch.tensor([[0, 4]])), r"lie in \[0, d=4\)"),
    ("obs_group_errors", lambda: (torch.randn(3, 4), torch.eye(4), torch.tensor([0, 1])), r"shape \(B, s\)"),
    ("obs_group_update", lambda: (torch.randn(3, 4), torch.eye(4), torch.tensor([[0, 1]])), "1-D"),
    ("obs_group_update", lambda: (torch.randn(3, 4), torch.eye(4), torch.tensor([0., 1.])), "int64"),
    ("obs_group_update", lambda: (torch.randn(3, 4), torch.eye(4), torch.tensor([-1])), r"lie in \[0, d=4\)"),
]


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
