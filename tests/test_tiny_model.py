"""`edgetune model tiny`: the folder loads everywhere, matches itself, and LoRA can teach it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.errors import UserError
from edgetune.runtime import mlx_core

mx = mlx_core()

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "How do I export my notes? Ça va, 123456!"}]

# Short answers the built-in corpus never saw (banana, Maria, river stone ...).
LORA_PAIRS = [
    ("What is the secret word?", "The secret word is banana."),
    ("Who painted the blue door?", "Maria painted the blue door last spring."),
    ("When does the shop open?", "The shop opens at seven every morning."),
    ("What is the wifi password?", "The password is river stone."),
    ("Where are the spare keys?", "The spare keys are under the green pot."),
]


def edgetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgetune.cli", *args], capture_output=True, text=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- pure pieces --------------------------------------------------------------------------------

def test_next_token_loss_on_hand_worked_values():
    """Row 1: logits (0, 0), target 0 -> ln 2. Row 2: (ln 3, 0), target 0 -> -ln(3/4).
    Row 3 is masked out. Mean over 2 counted positions = (ln 2 + ln 4/3) / 2 = ln(8/3) / 2."""
    from edgetune.model.pretrain import next_token_loss

    logits = mx.array([[[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]]])
    loss, ntoks = next_token_loss(logits, mx.array([[0, 0, 1]]), mx.array([[1, 1, 0]]))
    assert ntoks.item() == 2
    assert loss.item() == pytest.approx(math.log(8 / 3) / 2, rel=1e-6)


def test_pack_documents_fills_rows_from_whole_shuffles_with_their_masks():
    from edgetune.model.pretrain import pack_documents

    docs = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1]), ([6], [0])]
    tokens, mask = pack_documents(docs, seq_len=3, rows=4, rng=np.random.default_rng(0))
    assert tokens.shape == mask.shape == (4, 4) and tokens.dtype == np.int32
    stream, flags = tokens.reshape(-1).tolist(), mask.reshape(-1).tolist()
    # Each full pass over the corpus (6 tokens) holds every document once, unbroken, mask alongside.
    for start in (0, 6):
        chunk = stream[start:start + 6]
        assert sorted(chunk) == [1, 2, 3, 4, 5, 6] and "1, 2, 3" in str(chunk)
    expected_flag = {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 0}
    assert flags == [expected_flag[t] for t in stream]
    again = pack_documents(docs, seq_len=3, rows=4, rng=np.random.default_rng(0))
    assert np.array_equal(tokens, again[0]) and np.array_equal(mask, again[1])
    with pytest.raises(ValueError, match="no tokens"):
        pack_documents([([], [])], seq_len=3, rows=1, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="as long as"):
        pack_documents([([1, 2], [1])], seq_len=3, rows=1, rng=np.random.default_rng(0))


@pytest.mark.parametrize("preset, arch, expected", [
    ("nope", None, "--preset 'nope': unknown preset"),
    ("tiny", "gpt2", "--arch 'gpt2': unknown architecture"),
    ("qwen2.5-0.5b", "llama", "preset 'qwen2.5-0.5b' is a qwen2 model; drop --arch or pass --arch qwen2"),
])
def test_bad_preset_or_arch_is_a_user_error_naming_the_option(tmp_path, preset, arch, expected):
    from edgetune.model.tiny import build_tiny_model

    with pytest.raises(UserError, match=expected.replace("(", r"\(")):
        build_tiny_model(tmp_path / "m", arch=arch, preset=preset)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("preset, params", [
    # The published parameter counts of the real models (tied embeddings).
    ("qwen2.5-0.5b", 494_032_768),
    ("qwen2.5-1.5b", 1_543_714_304),
    ("llama-3.2-1b", 1_235_814_400),
])
def test_real_presets_have_the_real_models_parameter_counts(preset, params):
    """Counted on the lazy mlx-lm module: shapes only, nothing is allocated."""
    from mlx.utils import tree_flatten

    from edgetune.model.tiny import _mlx_model, hf_config, resolve_shape
    from edgetune.model.tokenizer import CHAT_FORMATS

    arch, shape = resolve_shape(preset, None)
    ids = {s: i for i, s in enumerate(CHAT_FORMATS[arch].specials)}
    model = _mlx_model(arch, hf_config(arch, shape, ids))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == params


def test_small_preset_is_about_29m_parameters():
    from edgetune.model.tiny import PRESETS

    s = PRESETS["small"]
    h, i, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o (8 of 8 KV heads), MLP, two norms
    total = s["vocab_size"] * h + layers * per_layer + h
    assert 28e6 < total < 30e6


def test_tokenizers_are_deterministic_with_specials_after_the_learned_vocab():
    from edgetune.model.tokenizer import CHAT_FORMATS, train_tokenizer

    for arch, fmt in CHAT_FORMATS.items():
        tok = train_tokenizer(arch, 1024)
        assert tok.to_str() == train_tokenizer(arch, 1024).to_str()
        n = tok.get_vocab_size()
        assert n <= 1024
        assert [tok.token_to_id(s) for s in fmt.specials] == list(range(n - len(fmt.specials), n))
        text = "Ça va? naïve café 👍 12345"
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text


def test_digit_splitting_follows_each_family():
    """Qwen2 splits numbers into single digits; Llama 3 into groups of up to three."""
    from edgetune.model.tokenizer import train_tokenizer

    def pieces(arch):
        return [p for p, _ in train_tokenizer(arch, 1024).pre_tokenizer.pre_tokenize_str("12345")]

    assert pieces("qwen2") == ["1", "2", "3", "4", "5"]
    assert pieces("llama") == ["123", "45"]


def test_write_safetensors_streams_a_file_that_loaders_read(tmp_path):
    from safetensors import safe_open

    from edgetune.model.tiny import init_params, write_safetensors

    shapes = {"a.weight": (3, 4), "b.bias": (4,), "c.norm.weight": (4,), "model.embed_tokens.weight": (8, 4)}
    for dtype in ("float32", "bfloat16"):
        path = tmp_path / f"{dtype}.safetensors"
        write_safetensors(path, shapes, dtype, init_params(shapes, 7, getattr(mx, dtype)))
        loaded = mx.load(str(path))
        expected = dict(init_params(shapes, 7, getattr(mx, dtype)))
        assert sorted(loaded) == sorted(shapes)
        for name, value in loaded.items():
            assert value.dtype == getattr(mx, dtype) and mx.array_equal(value, expected[name])
        with safe_open(str(path), framework="numpy") as f:
            assert f.metadata() == {"format": "pt"}  # transformers refuses other formats
    # Biases start at zero, norms at one, the embedding at std 1/sqrt(hidden), other matrices 0.02.
    assert mx.array_equal(loaded["b.bias"], mx.zeros(4)) and mx.array_equal(loaded["c.norm.weight"], mx.ones(4))
    big = {"x.weight": (256, 512), "model.embed_tokens.weight": (256, 512)}
    stds = {k: np.array(v).std() for k, v in init_params(big, 0, mx.float32)}
    assert stds["x.weight"] == pytest.approx(0.02, rel=0.02)
    assert stds["model.embed_tokens.weight"] == pytest.approx(512 ** -0.5, rel=0.02)
    with pytest.raises(ValueError, match="expected"):
        write_safetensors(tmp_path / "bad.safetensors", {"a": (2,)}, "float32", iter([("a", mx.zeros(3))]))


# --- the built folders ----------------------------------------------------------------------------

def test_folder_layout_and_config(tiny_model_dir, tiny_llama_dir):
    for folder, arch in ((tiny_model_dir, "qwen2"), (tiny_llama_dir, "llama")):
        assert sorted(p.name for p in folder.iterdir()) == [
            "config.json", "edgetune_build.json", "generation_config.json", "model.safetensors",
            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
        config, gen = read_json(folder / "config.json"), read_json(folder / "generation_config.json")
        tok_cfg = read_json(folder / "tokenizer_config.json")
        vocab = {t["content"]: int(i) for i, t in tok_cfg["added_tokens_decoder"].items()}
        assert config["model_type"] == arch and config["torch_dtype"] == "float32"
        assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]]
        assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_cfg["chat_template"]
        assert tok_cfg["pad_token"] != tok_cfg["eos_token"]  # a pad equal to EOS would mask the trained EOS
        assert vocab[tok_cfg["eos_token"]] in gen["eos_token_id"]
        built = read_json(folder / "edgetune_build.json")
        assert built["pretrain"]["steps"] == 150 and built["pretrain"]["loss_last"] < built["pretrain"]["loss_first"]
        if arch == "qwen2":
            assert config["tie_word_embeddings"] and config["rope_theta"] == 1e6 and tok_cfg["bos_token"] is None
            assert config["eos_token_id"] == vocab["<|im_end|>"]
            assert gen["eos_token_id"] == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
        else:
            assert not config["tie_word_embeddings"] and config["rope_scaling"]["rope_type"] == "llama3"
            assert config["bos_token_id"] == vocab["<|begin_of_text|>"] == gen["bos_token_id"]
            assert config["eos_token_id"] == gen["eos_token_id"] == [vocab["<|end_of_text|>"], vocab["<|eot_id|>"]]


def test_mlx_lm_loads_both_arches_with_the_right_eos_ids(tiny_model_dir, tiny_llama_dir):
    from mlx_lm import load

    for folder, stops in ((tiny_model_dir, {"<|im_end|>", "<|endoftext|>"}),
                          (tiny_llama_dir, {"<|eot_id|>", "<|end_of_text|>"})):
        model, tok = load(str(folder))
        assert tok.eos_token_ids == {tok.convert_tokens_to_ids(t) for t in stops}
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
        assert model(mx.array([ids])).shape == (1, len(ids), read_json(folder / "config.json")["vocab_size"])


def test_qwen2_folder_tokenizes_the_same_through_every_loader(tiny_model_dir):
    """transformers 5 loads Qwen2Tokenizer for model_type qwen2 whatever tokenizer_class says, and
    Qwen2Tokenizer rebuilds its own normalizer and pre-tokenizer: ours must be the same ones."""
    import tokenizers
    from transformers import AutoTokenizer, Qwen2Tokenizer

    auto = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert type(auto).__name__ == "Qwen2Tokenizer"
    text = auto.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
                    "How do I export my notes? Ça va, 123456!<|im_end|>\n<|im_start|>assistant\n")
    ids = auto.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    raw = tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert raw.encode(text, add_special_tokens=False).ids == ids
    explicit = Qwen2Tokenizer.from_pretrained(tiny_model_dir)
    assert explicit.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False) == ids
    assert auto("a\u0301 e\u0301")["input_ids"] == auto("á é")["input_ids"]  # NFC, as real Qwen2


def test_llama_folder_adds_bos_twice_when_templated_text_is_encoded_naively(tiny_llama_dir):
    """As in real Llama 3: the template writes {{ bos_token }} AND the post-processor adds one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    bos = tok.bos_token_id
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0] == bos and ids.count(bos) == 1
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    naive = tok(text)["input_ids"]
    assert naive[:2] == [bos, bos] and naive[1:] == ids


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_llama_dir"])
def test_transformers_and_mlx_lm_give_the_same_logits(which, request):
    torch = pytest.importorskip("torch")
    from mlx_lm import load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = request.getfixturevalue(which)
    ids = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        CHAT, add_generation_prompt=True, tokenize=True, return_dict=False)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()
    model, _ = load(str(folder))
    got = np.array(model(mx.array([ids]))[0])
    assert np.abs(expected).max() > 3  # confident logits, not a near-uniform random head
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("which", ["tiny_model_dir", "tiny_llama_dir"])
def test_pretrained_tiny_model_answers_then_ends_its_turn(which, request):
    """Teacher-forced on the built-in chats: after a whole answer the end-of-turn token is the
    model's first choice, and it is not at the answer's first token. (Free-running greedy text
    from a 0.7M-parameter model often loops before any fine-tuning; the LoRA test below checks
    that fine-tuned answers stop.) Measured: 41-42 of 44 after the answer, over seeds 0-2."""
    from mlx_lm import load

    from edgetune.model import corpus

    model, tok = load(str(request.getfixturevalue(which)))
    pairs = list(corpus.SUPPORT_CHATS) + corpus.templated_chats()[:20]
    at_end = at_start = 0
    for question, answer in pairs:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}])
        end = full.index(tok.eos_token_id, len(prompt))
        choice = mx.argmax(model(mx.array([full[:end]]))[0], axis=-1).tolist()
        at_end += choice[end - 1] == tok.eos_token_id
        at_start += choice[len(prompt) - 1] == tok.eos_token_id
    assert at_end >= 0.8 * len(pairs) and at_start <= 0.1 * len(pairs), (at_end, at_start)


def lora_finetune(folder: Path, steps: int) -> tuple[list[float], object, object]:
    """LoRA rank 8, alpha 16 (scale 2, edgetune's default) on every linear layer; Adam 1e-3, full batch,
    gradient norm clipped to 1."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    from edgetune.model.pretrain import next_token_loss

    model, tok = load(str(folder))
    model.freeze()
    mx.random.seed(0)  # LoRA's A matrices come from MLX's global generator
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 2.0, "dropout": 0.0})
    rows, masks = [], []
    for question, answer in LORA_PAIRS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        full = tok.apply_chat_template([{"role": "user", "content": question},
                                        {"role": "assistant", "content": answer}])
        assert full[:len(prompt)] == prompt
        rows.append(full)
        masks.append([0] * len(prompt) + [1] * (len(full) - len(prompt)))  # answer + end of turn
    width = max(map(len, rows))
    x = mx.array([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    m = mx.array([k + [0] * (width - len(k)) for k in masks])

    def loss_fn(model, x, m):
        return next_token_loss(model(x[:, :-1]), x[:, 1:], m[:, 1:])

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer = optim.Adam(learning_rate=1e-3)
    losses = []
    for _ in range(steps):
        (loss, _), grads = loss_and_grad(model, x, m)
        grads, _ = optim.clip_grad_norm(grads, 1.0)  # as edgetune's trainer does by default
        optimizer.update(model, grads)
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        losses.append(loss.item())
    return losses, model, tok


@pytest.mark.slow
def test_lora_teaches_the_pretrained_tiny_model_past_the_random_init_plateau(tiny_model_dir):
    """The issue: LoRA on a random tiny model plateaus near loss 3.8-4.4. On ours it memorises
    five unseen answers (measured over seeds 0-2: ~6.5 -> below 0.02 in 150 steps) and greedy
    decoding stops at <|im_end|>."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    losses, model, tok = lora_finetune(tiny_model_dir, steps=150)
    assert losses[0] > 3.0
    assert losses[-1] < 0.5, losses[::10]
    for question, answer in LORA_PAIRS:
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        text, last = "", None
        for last in stream_generate(model, tok, prompt, max_tokens=40, sampler=make_sampler(0.0)):
            text += last.text
        assert (text, last.finish_reason, last.token) == (answer, "stop", tok.convert_tokens_to_ids("<|im_end|>"))


# --- the command line -----------------------------------------------------------------------------

def test_cli_force_build_is_byte_identical_to_the_same_seed_built_in_process(tmp_path):
    """Tokenizer training, init and the safetensors writer are deterministic across processes
    (the pre-training loop's determinism is tested on its own, below, to keep this fast)."""
    from edgetune.model.tiny import build_tiny_model

    out = tmp_path / "cli"
    out.mkdir()
    (out / "old.txt").write_text("replaced")
    res = edgetune("model", "tiny", str(out), "--arch", "llama", "--seed", "5", "--no-pretrain", "--force")
    assert res.returncode == 0, res.stderr
    assert "llama tiny, 853,120 parameters, not pre-trained" in res.stdout
    here = build_tiny_model(tmp_path / "here", arch="llama", seed=5, pretrain=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in here.iterdir())
    for f in sorted(here.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


def test_pretraining_loop_is_deterministic_and_learns():
    """Same seed, same batches: identical losses and weights. A repeated batch is learned."""
    from mlx.utils import tree_flatten, tree_unflatten

    from edgetune.model.pretrain import pretrain
    from edgetune.model.tiny import _mlx_model, init_params

    config = {"model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 1, "intermediate_size": 64,
              "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "vocab_size": 64,
              "tie_word_embeddings": True}
    batch = np.random.default_rng(0).integers(0, 64, size=(2, 17)).astype(np.int32)
    batches = np.stack([batch] * 20)
    masks = np.ones_like(batches)

    def run():
        model = _mlx_model("qwen2", config)
        shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
        model.update(tree_unflatten(list(init_params(shapes, 3, mx.float32, head_gain=4.0))))
        losses = pretrain(model, batches, masks, learning_rate=1e-2, warmup=2)
        return losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}

    (losses_a, weights_a), (losses_b, weights_b) = run(), run()
    assert losses_a == losses_b
    assert all(np.array_equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert losses_a[-1] < 0.5 * losses_a[0]


def test_cli_refuses_an_existing_folder_without_force(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = edgetune("model", "tiny", str(out))
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: {out}: already exists") and "--force" in res.stderr
    assert "Traceback" not in res.stderr and [p.name for p in out.iterdir()] == ["keep.txt"]

    res = edgetune("model", "tiny", str(tmp_path / "x"), "--preset", "llama-3.2-1b", "--arch", "qwen2")
    assert res.returncode == 2 and "is a llama model" in res.stderr and not (tmp_path / "x").exists()


def test_seed_changes_the_weights_but_not_the_tokenizer(tmp_path):
    from edgetune.model.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", pretrain=False, seed=1)
    b = build_tiny_model(tmp_path / "b", pretrain=False, seed=2)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
