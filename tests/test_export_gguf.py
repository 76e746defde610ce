"""GGUF export: real files read back with gguf's own reader, then (opt-in) run in llama.cpp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from edgetune.errors import UserError
from edgetune.export import gguf as export_gguf
from edgetune.export.gguf import write_gguf
from edgetune.export.modelfile import write_modelfile
from edgetune.runtime import mlx_core

mx = mlx_core()

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I export my notes? 123456!"}]

LAYER_WEIGHTS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                 "ffn_down")


def export(model_dir: Path, out_dir: Path, quant: str, echo=None):
    out = out_dir / f"{model_dir.name}-{quant}.gguf"
    result = write_gguf(model_dir, out, quant, echo=echo or (lambda _: None))
    return result, gguf.GGUFReader(out)


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    assert f is not None, f"{key} missing"
    return f.contents()


def source_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32, read by MLX (not by the exporter's reader)."""
    out = {}
    for file in sorted(model_dir.glob("model*.safetensors")):
        out.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(file)).items()})
    return out


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute`, verbatim in numpy."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_names(config: dict) -> dict[str, str]:
    """Expected GGUF name of each Hugging Face tensor, written out independently of the exporter's table."""
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not config["tie_word_embeddings"]:
        names["lm_head.weight"] = "output.weight"
    hf = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(config["num_hidden_layers"]):
        for g in LAYER_WEIGHTS:
            names[f"model.layers.{i}.{hf[g]}.weight"] = f"blk.{i}.{g}.weight"
        if config["model_type"] == "qwen2":
            for g in ("attn_q", "attn_k", "attn_v"):
                names[f"model.layers.{i}.{hf[g]}.bias"] = f"blk.{i}.{g}.bias"
    return names


def expected_values(hf_name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if config["model_type"] == "llama" and ".q_proj." in hf_name:
        return converter_permute(w, config["num_attention_heads"])
    if config["model_type"] == "llama" and ".k_proj." in hf_name:
        return converter_permute(w, config["num_key_value_heads"])
    return w


def check_error_bound(got: np.ndarray, want: np.ndarray, qtype: QType, name: str) -> None:
    """Per 32-value block with scale d: f16 within 1e-3 relative; q8_0 (d = absmax/127) within half a step
    d/2; q4_0 (d = absmax/8) within one step d, as the block's far side clips at +7 of [-8, 7]. The scale is
    stored as float16 (relative error <= 2^-11), which moves a value at level q by up to |q| d 2^-11 more."""
    if qtype == QType.F32:
        np.testing.assert_array_equal(got, want, err_msg=name)
        return
    if qtype == QType.F16:
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-7, err_msg=name)
        return
    blocks_got, blocks_want = got.reshape(-1, 32), want.reshape(-1, 32)
    absmax = np.abs(blocks_want).max(axis=1, keepdims=True)
    d = absmax / {QType.Q8_0: 127, QType.Q4_0: 8}[qtype]
    bound = {QType.Q8_0: d * (0.5 + 127 / 2048), QType.Q4_0: d * (1 + 8 / 2048)}[qtype]
    assert (np.abs(blocks_got - blocks_want) <= bound + 1e-7).all(), name
    rel_rms = np.sqrt(((got - want) ** 2).mean() / (want ** 2).mean())
    assert rel_rms < {QType.Q8_0: 0.01, QType.Q4_0: 0.15}[qtype], (name, rel_rms)


# --- tensors and values ------------------------------------------------------------------------

@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_every_tensor_named_typed_and_valued_like_the_source(arch, quant, tiny_model_dir, tiny_llama_dir, tmp_path):
    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    config = json.loads((model_dir / "config.json").read_text())
    result, reader = export(model_dir, tmp_path, quant)
    tensors = {t.name: t for t in reader.tensors}
    names = hf_to_gguf_names(config)

    expected = set(names.values()) | ({"rope_freqs.weight"} if arch == "llama" else set())
    assert set(tensors) == expected
    assert ("output.weight" in tensors) == (arch == "llama")  # tied qwen2: llama.cpp reuses token_embd
    assert result["n_tensors"] == len(expected) and result["arch"] == arch and result["quant"] == quant
    assert result["size_bytes"] == (tmp_path / f"{model_dir.name}-{quant}.gguf").stat().st_size
    assert sum(result["tensor_types"].values()) == len(expected)

    requested = {"f16": QType.F16, "q8_0": QType.Q8_0, "q4_0": QType.Q4_0}[quant]
    head = "output.weight" if arch == "llama" else "token_embd.weight"
    source = source_weights(model_dir)
    for hf_name, name in names.items():
        t, want = tensors[name], expected_values(hf_name, source[hf_name], config)
        assert tuple(int(d) for d in reversed(t.shape)) == want.shape, name  # GGUF lists dims innermost first
        if want.ndim == 1:
            assert t.tensor_type == QType.F32, name
        elif name == head and quant == "q4_0":
            assert t.tensor_type == QType.Q8_0, name  # the head stays at 8 bits in a q4_0 file
        else:
            assert t.tensor_type == requested, name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        check_error_bound(got, want, t.tensor_type, name)


def test_llama_qk_permutation_undone_gives_back_hugging_face_rows(tiny_llama_dir, tmp_path):
    """Un-permuting (the inverse reshape) the exported q/k gives the checkpoint's rows exactly (f32 export)."""
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    _, reader = export(tiny_llama_dir, tmp_path, "f32")
    tensors = {t.name: t for t in reader.tensors}
    source = source_weights(tiny_llama_dir)
    for proj, heads in (("q", config["num_attention_heads"]), ("k", config["num_key_value_heads"])):
        w = source[f"model.layers.2.self_attn.{proj}_proj.weight"]
        got = np.array(tensors[f"blk.2.attn_{proj}.weight"].data).reshape(w.shape)
        assert not np.array_equal(got, w)  # the permutation is not a no-op at this shape
        unpermuted = got.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(unpermuted, w)


def test_llama3_rope_freqs_match_mlx_lm_scaled_frequencies(tiny_llama_dir, tmp_path):
    """llama.cpp divides each rotary frequency by rope_freqs[i]; mlx-lm's Llama3RoPE stores the scaled
    wavelengths/(2 pi) directly, so rope_freqs must equal mlx's scaled / unscaled per dimension."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    _, reader = export(tiny_llama_dir, tmp_path, "f16")
    factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    assert factors.tensor_type == QType.F32
    dim = config["head_dim"]
    rope = Llama3RoPE(dim, base=config["rope_theta"], scaling_config=config["rope_scaling"])
    unscaled = config["rope_theta"] ** (np.arange(0, dim, 2) / dim)
    np.testing.assert_allclose(np.array(factors.data), np.array(rope._freqs) / unscaled, rtol=1e-5)
    assert np.array(factors.data).max() == pytest.approx(config["rope_scaling"]["factor"])


def test_writing_in_small_chunks_gives_byte_identical_files(tiny_llama_dir, tmp_path, monkeypatch):
    """Memory is bounded by streaming row chunks: 1,000-value chunks (dozens per matrix, q/k permuted chunk
    by chunk in whole heads) must write exactly the bytes of whole-tensor conversion."""
    whole = tmp_path / "whole.gguf"
    write_gguf(tiny_llama_dir, whole, "q4_0", echo=lambda _: None)
    monkeypatch.setattr(export_gguf, "CHUNK_ELEMENTS", 1000)
    chunked = tmp_path / "chunked.gguf"
    write_gguf(tiny_llama_dir, chunked, "q4_0", echo=lambda _: None)
    assert whole.read_bytes() == chunked.read_bytes()


def test_bfloat16_checkpoint_is_read_exactly(tiny_llama_dir, tmp_path):
    """bf16 weights (the real presets' dtype) widen to float32 without loss: an f32 export equals them bit for bit."""
    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_llama_dir, bf16_dir)
    weights = mx.load(str(bf16_dir / "model.safetensors"))
    mx.save_safetensors(str(bf16_dir / "model.safetensors"), {k: v.astype(mx.bfloat16) for k, v in weights.items()},
                        metadata={"format": "pt"})
    _, reader = export(bf16_dir, tmp_path, "f32")
    tensors = {t.name: t for t in reader.tensors}
    source = source_weights(bf16_dir)
    for hf_name in ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight"):
        name = export_gguf.gguf_name(hf_name)
        np.testing.assert_array_equal(np.array(tensors[name].data).reshape(source[hf_name].shape), source[hf_name])


def custom_qwen2(folder: Path, tokenizer_from: Path, **shape) -> Path:
    """A qwen2 folder with an arbitrary shape and random weights (shapes from mlx-lm's own model)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from safetensors.numpy import save_file

    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_from / name, folder / name)
    config = {**json.loads((tokenizer_from / "config.json").read_text()), **shape}
    (folder / "config.json").write_text(json.dumps(config))
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    rng = np.random.default_rng(0)
    weights = {k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in tree_flatten(model.parameters())}
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_rows_not_a_multiple_of_the_block_fall_back_to_f16(tiny_model_dir, tmp_path):
    """intermediate_size 80: ffn_down's rows hold 80 values, not a multiple of Q4_0's 32-value block."""
    model_dir = custom_qwen2(tmp_path / "odd", tiny_model_dir, hidden_size=64, intermediate_size=80,
                             num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    lines = []
    result, reader = export(model_dir, tmp_path, "q4_0", echo=lines.append)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == QType.F16
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == QType.Q4_0
    assert result["tensor_types"] == {"F16": 1, "F32": 6, "Q4_0": 6, "Q8_0": 1}
    assert any("blk.0.ffn_down.weight" in line and "F16" in line for line in lines)
    source = source_weights(model_dir)["model.layers.0.mlp.down_proj.weight"]
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    check_error_bound(gguf.quants.dequantize(down.data, QType.F16).reshape(source.shape), source, QType.F16, "down")


# --- metadata ----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_metadata_carries_hyperparameters_tokenizer_and_template(arch, tiny_model_dir, tiny_llama_dir, tmp_path):
    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    _, reader = export(model_dir, tmp_path, "q8_0")

    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.name") == model_dir.name
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert field(reader, f"{arch}.embedding_length") == config["hidden_size"]
    assert field(reader, f"{arch}.block_count") == config["num_hidden_layers"]
    assert field(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert field(reader, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert field(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert field(reader, f"{arch}.rope.freq_base") == config["rope_theta"]
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])

    by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {t["id"]: t["content"] for t in tok["added_tokens"]}
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == {"qwen2": "qwen2", "llama": "llama-bpe"}[arch]
    assert field(reader, "tokenizer.ggml.tokens") == [by_id[i] for i in range(config["vocab_size"])]
    types = field(reader, "tokenizer.ggml.token_type")
    specials = {t["id"] for t in tok["added_tokens"]}
    assert {i for i, k in enumerate(types) if k == gguf.TokenType.CONTROL} == specials
    assert {k for i, k in enumerate(types) if i not in specials} == {gguf.TokenType.NORMAL}
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(pair) for pair in tok["model"]["merges"]]

    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert field(reader, "tokenizer.ggml.eos_token_id") == ids[tok_config["eos_token"]]
    assert field(reader, "tokenizer.ggml.padding_token_id") == ids[tok_config["pad_token"]]
    assert field(reader, "tokenizer.chat_template") == tok_config["chat_template"]
    # Llama 3's tokenizer prepends <|begin_of_text|>; Qwen2.5's adds nothing (its bos id is nominal).
    assert field(reader, "tokenizer.ggml.add_bos_token") is (arch == "llama")
    assert field(reader, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]

    write_gguf(model_dir, tmp_path / "named.gguf", "f16", echo=lambda _: None, name="support-bot-v2")
    assert field(gguf.GGUFReader(tmp_path / "named.gguf"), "general.name") == "support-bot-v2"


def test_token_list_padded_to_embedding_rows_like_llama_cpp(tiny_model_dir, tmp_path):
    """vocab_size 1056 > 1024 tokens (as Qwen2.5: 151,936 rows, 151,665 tokens): one [PAD{i}] UNUSED per spare row."""
    model_dir = tmp_path / "padded"
    shutil.copytree(tiny_model_dir, model_dir)
    from safetensors.numpy import load_file, save_file

    weights = load_file(model_dir / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    weights["model.embed_tokens.weight"] = np.concatenate([embed, np.zeros((32, embed.shape[1]), embed.dtype)])
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 1056}))

    _, reader = export(model_dir, tmp_path, "f16")
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 1056
    assert tokens[1024:] == [f"[PAD{i}]" for i in range(1024, 1056)]
    assert set(types[1024:]) == {gguf.TokenType.UNUSED}
    assert tokens[1023] == "<|im_end|>"
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert [int(d) for d in embd.shape] == [config["hidden_size"], 1056]


# --- errors and atomicity ------------------------------------------------------------------------

def test_unsupported_architecture_names_it_and_the_supported_ones(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "gemma"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "model_type": "gemma2"}))
    with pytest.raises(UserError, match=r"config.json: model_type 'gemma2'.*supported: llama, qwen2"):
        write_gguf(model_dir, tmp_path / "out.gguf", "f16", echo=lambda _: None)
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("quant, message", [
    ("q3", r"quant 'q3': unknown; choose one of f32, f16, q8_0, q4_0"),
    ("q4_k_m", r"quant 'q4_k_m': K-quants .* f32, f16, q8_0, q4_0.*llama-quantize"),
])
def test_unsupported_quant_lists_the_supported_ones(quant, message, tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match=message):
        write_gguf(tiny_model_dir, tmp_path / "out.gguf", quant, echo=lambda _: None)


def test_missing_and_unknown_tensors_are_named_together(tiny_llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.o_proj.bias"] = np.zeros(128, np.float32)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError) as err:
        write_gguf(model_dir, tmp_path / "out.gguf", "f16", echo=lambda _: None)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "no GGUF mapping for llama: model.layers.0.self_attn.o_proj.bias" in str(err.value)


def test_qwen2_without_qkv_biases_is_refused(tiny_model_dir, tmp_path):
    """llama.cpp's qwen2 requires attn_q/k/v biases (llama's are optional): a file without them would not load."""
    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "nobias"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    del weights["model.layers.2.self_attn.k_proj.bias"]
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"missing tensors: model.layers.2.self_attn.k_proj.bias"):
        write_gguf(model_dir, tmp_path / "out.gguf", "f16", echo=lambda _: None)


def test_failure_mid_write_leaves_no_partial_file_and_keeps_the_old_one(tiny_model_dir, tmp_path):
    """A NaN in the last layer is found while tensors stream out, after the header is on disk."""
    from safetensors.numpy import load_file, save_file

    model_dir = tmp_path / "nan"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.3.mlp.down_proj.weight"][5, 7] = np.nan
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "model.gguf").write_bytes(b"previous export")
    with pytest.raises(UserError, match=r"model.layers.3.mlp.down_proj.weight: contains NaN"):
        write_gguf(model_dir, out_dir / "model.gguf", "q8_0", echo=lambda _: None)
    assert [p.name for p in out_dir.iterdir()] == ["model.gguf"]
    assert (out_dir / "model.gguf").read_bytes() == b"previous export"


# --- Modelfile -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch, template_marker, stops", [
    ("qwen2", "<|im_start|>user\n{{ .Content }}<|im_end|>", ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]),
    ("llama", "<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>",
     ["<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"]),
])
def test_modelfile_translates_the_chat_template_and_lists_stops(arch, template_marker, stops, tiny_model_dir,
                                                                tiny_llama_dir, tmp_path):
    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    echoed = []
    path = write_modelfile(tmp_path, "model-q4_0.gguf", model_dir, echo=echoed.append)
    text = path.read_text()
    assert path == tmp_path / "Modelfile" and echoed == []
    assert "\nFROM ./model-q4_0.gguf\n" in text
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template_marker in template
    assert "<|begin_of_text|>" not in template  # llama.cpp adds the BOS itself (add_bos_token)
    assert [line for line in text.splitlines() if line.startswith("PARAMETER")] == [
        f'PARAMETER stop "{s}"' for s in stops]


def test_modelfile_for_an_unknown_template_asks_for_one_and_warns(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "other"
    shutil.copytree(tiny_model_dir, model_dir)
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_config["chat_template"] = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_config))
    echoed = []
    text = write_modelfile(tmp_path, "m.gguf", model_dir, echo=echoed.append).read_text()
    directives = [line.split()[0] for line in text.splitlines() if line and not line.startswith("#")]
    assert directives == ["FROM", "PARAMETER", "PARAMETER"] and "# TEMPLATE:" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert len(echoed) == 1 and echoed[0].startswith("warning:") and "neither ChatML nor Llama 3" in echoed[0]


# Renders a Modelfile TEMPLATE with Go's text/template, given the values Ollama passes: System (the
# system messages joined) and Messages (every message; Ollama's templates skip the system ones).
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

func main() {
	// Messages as Ollama's api.Message: a struct, so the template reads .Role and .Content.
	var in struct {
		Template string
		System   string
		Messages []struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		}
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("m").Parse(in.Template))
	if err := t.Execute(os.Stdout, map[string]any{"System": in.System, "Messages": in.Messages}); err != nil {
		panic(err)
	}
}
"""


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_modelfile_template_renders_like_the_jinja_template(arch, tiny_model_dir, tiny_llama_dir, tmp_path):
    """Go renders the TEMPLATE to the same prompt text as the model's own chat template (BOS aside:
    llama.cpp adds it). Needs the `go` toolchain (apt-get install golang-go); skipped without it."""
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("no `go` on PATH (apt-get install golang-go); Go rendering of the Modelfile TEMPLATE skipped")
    from transformers import AutoTokenizer

    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = write_modelfile(tmp_path, "m.gguf", model_dir, echo=lambda _: None).read_text()
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    (tmp_path / "render.go").write_text(GO_RENDER)
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        CHAT,
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Name a fruit."},
         {"role": "assistant", "content": "An apple."}, {"role": "user", "content": "Another one?"}],
    ]
    for messages in conversations:
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        rendered = subprocess.run([go, "run", str(tmp_path / "render.go")], check=True, capture_output=True,
                                  text=True, input=json.dumps({"Template": template, "System": system,
                                                               "Messages": messages})).stdout
        expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert rendered == expected.removeprefix(tok.bos_token or ""), messages


# --- llama.cpp (opt-in: pip install llama-cpp-python, ~10 min to compile) ---------------------------

def llama_cpp_or_skip():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgetune"
                                                    "[llamacpp]', ~10 min compile); GGUF runtime check skipped")


def chat_prompt(tok, with_answer: bool = False) -> list[int]:
    """A built-in corpus chat, as the model's tokenizer renders it (with the answer: teacher forcing)."""
    from edgetune.model import corpus

    conv = next(iter(corpus.conversations()))
    first_answer = next(i for i, m in enumerate(conv) if m["role"] == "assistant")
    messages = conv[:first_answer + 1] if with_answer else conv[:first_answer]
    return list(tok.apply_chat_template(messages, add_generation_prompt=not with_answer, tokenize=True,
                                        return_dict=False))


def mlx_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, _ = load(str(model_dir))
    steps = generate_step(mx.array(prompt), model, max_tokens=n, sampler=lambda logits: mx.argmax(logits, axis=-1))
    return [int(token) for token, _ in steps]


def mlx_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from mlx_lm import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


def tied_llama(src: Path, dst: Path) -> Path:
    """The tiny llama with its lm_head dropped and tie_word_embeddings on (Llama 3.2 1B/3B are tied)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return dst


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant, atol", [("f32", 1e-3), ("f16", 5e-3)])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "llama-tied"])
def test_llama_cpp_logits_match_mlx_lm_at_every_position(arch, quant, atol, tiny_model_dir, tiny_llama_dir, tmp_path):
    """All logits of a ~45-token chat (prompt and answer; f32: within 1e-3 of the largest logit, measured
    ~1e-4): q/k layout, rope (llama3 factors included), norms, biases and the tied/untied head all enter every
    position. The tiny model's greedy answers are short and repetitive, so this is the stronger check."""
    llama_cpp = llama_cpp_or_skip()
    from transformers import AutoTokenizer

    model_dir = {"qwen2": tiny_model_dir, "llama": tiny_llama_dir}.get(arch) or tied_llama(tiny_llama_dir,
                                                                                          tmp_path / "tied")
    ids = chat_prompt(AutoTokenizer.from_pretrained(model_dir), with_answer=True)
    write_gguf(model_dir, tmp_path / "m.gguf", quant, echo=lambda _: None)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    got, want = np.array(llm.scores[:len(ids)]), mlx_logits(model_dir, ids)
    diff = np.abs(got - want).max()
    assert diff <= atol * np.abs(want).max(), (diff, np.abs(want).max())
    # Same next token wherever the top two logits are further apart than the numerical difference
    # (the untrained tied head of llama-tied has near-ties that either side may break).
    top2 = np.sort(want, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 2 * diff
    assert decided.mean() > 0.5
    assert (got.argmax(axis=1) == want.argmax(axis=1))[decided].all()


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_llama_cpp_tokenizes_and_greedy_decodes_like_mlx_lm(arch, tiny_model_dir, tiny_llama_dir, tmp_path):
    llama_cpp = llama_cpp_or_skip()
    from transformers import AutoTokenizer

    from edgetune.model import corpus

    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    tok = AutoTokenizer.from_pretrained(model_dir)
    write_gguf(model_dir, tmp_path / "m.gguf", "f16", echo=lambda _: None)
    # logits_all: llama-cpp-python fills `scores` (read by the greedy loop) only then.
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, n_threads=2, logits_all=True, verbose=False)

    # The pre-tokenizer name decides how llama.cpp splits text: same ids as the model's own tokenizer.
    prompt_text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    prompt = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert llm.tokenize(prompt_text.encode(), add_bos=False, special=True) == prompt
    for text in corpus.tokenizer_texts():
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text, add_special_tokens=False)
    # BOS: llama.cpp adds one exactly when the tokenizer does.
    assert llm.tokenize(b"Hi", add_bos=True, special=False) == tok.encode("Hi", add_special_tokens=True)

    for ids in (prompt, chat_prompt(tok)):
        assert llama_cpp_greedy(llm, ids, 32) == mlx_greedy(model_dir, ids, 32)

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    generation_config = json.loads((model_dir / "generation_config.json").read_text())
    for stop in generation_config["eos_token_id"]:
        assert llama_cpp.llama_vocab_is_eog(vocab, stop), tok.convert_ids_to_tokens(stop)


def with_extra_merges(src: Path, dst: Path, pairs: list[tuple[str, str]]) -> Path:
    """A copy of `src` whose tokenizer has extra merges (new ids 1024+, embedding rows padded to 1056).

    The tiny 1,024-token vocabulary has no merge across the places where
    pre-tokenizer regexes differ (digit runs, newline runs, "'M", "(h"), so on
    it every pre-tokenizer name gives the same ids; these merges make the
    choice visible.
    """
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in weights:
            weights[name] = np.concatenate([weights[name], np.zeros((32, weights[name].shape[1]), np.float32)])
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "vocab_size": 1056}))
    tok = json.loads((dst / "tokenizer.json").read_text())
    for i, (a, b) in enumerate(pairs):
        tok["model"]["vocab"][a + b] = 1024 + i
        tok["model"]["merges"].append([a, b])
    (dst / "tokenizer.json").write_text(json.dumps(tok))
    return dst


@pytest.mark.llamacpp
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_llama_cpp_pre_tokenizer_splits_text_like_the_tokenizer(arch, tiny_model_dir, tiny_llama_dir, tmp_path,
                                                                  monkeypatch):
    """The recognised name (qwen2 / llama-bpe) gives the tokenizer's own ids; the fallback 'default' does not."""
    llama_cpp = llama_cpp_or_skip()
    from transformers import AutoTokenizer

    model_dir = with_extra_merges(tiny_model_dir if arch == "qwen2" else tiny_llama_dir, tmp_path / "extra",
                                  [("Ċ", "Ċ"), ("1", "2"), ("'", "M"), ("(", "h")])
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = ["a\n\nb", "x 12 y", "I'M OK", "f (hello) (h", "12345", "\n\n\nHi"]

    def mismatches() -> list[str]:
        llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
        return [t for t in texts
                if llm.tokenize(t.encode(), add_bos=False, special=False) != tok.encode(t, add_special_tokens=False)]

    result = write_gguf(model_dir, tmp_path / "m.gguf", "f16", echo=lambda _: None)
    assert result["pre_tokenizer"] == {"qwen2": "qwen2", "llama": "llama-bpe"}[arch]
    assert mismatches() == []

    monkeypatch.setattr(export_gguf, "pre_tokenizer_name", lambda tok: None)  # as for an unknown regex
    echoed = []
    result = write_gguf(model_dir, tmp_path / "m.gguf", "f16", echo=echoed.append)
    assert result["pre_tokenizer"] == "default" and any("pre-tokenizer not recognised" in e for e in echoed)
    assert mismatches()  # newline runs and "'M" split differently under llama.cpp's 'default' regexes


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_llama_cpp_runs_quantized_files(arch, quant, tiny_model_dir, tiny_llama_dir, tmp_path):
    llama_cpp = llama_cpp_or_skip()
    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    write_gguf(model_dir, tmp_path / "m.gguf", quant, echo=lambda _: None)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, n_threads=2, verbose=False)
    reply = llm.create_chat_completion(messages=CHAT, max_tokens=24, temperature=0.0)
    assert reply["choices"][0]["message"]["content"].strip()
