"""The backend interface: the torch backend against the MLX one on the same tiny model folders.

Both libraries load the same Hugging Face folder and give the same logits, so for the same batch
and the same LoRA weights the losses and every LoRA gradient must agree (float32, CPU), and the
same recipe must follow the same loss trajectory on both. Skipped cleanly without torch/peft.
"""

import json
import math
import types
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from edgetune.backends import choose_backend, get_backend  # noqa: E402
from edgetune.backends import torch_losses as TL  # noqa: E402
from edgetune.backends.torch_backend import (AdamW, lr_at, positions_from_segments,  # noqa: E402
                                             target_logprobs_head)
from edgetune.errors import UserError  # noqa: E402
from edgetune.lora import LoraSpec  # noqa: E402
from edgetune.runtime import mlx_core  # noqa: E402
from edgetune.sft_data import TokenizedExample, collate, pad_rows  # noqa: E402

mx = mlx_core()
from edgetune import losses as ML  # noqa: E402


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# --- losses: the same hand-worked numbers as tests/test_losses.py, and equal to MLX's --------------

def test_torch_losses_reproduce_the_hand_worked_examples():
    loss, n = TL.sft_loss(t([[0.0, math.log(3.0)], [0.0, math.log(3.0)], [0.0, 0.0]]), torch.tensor([1, 0, 1]),
                          t([1.0, 0.0, 1.0]))
    assert abs(float(loss) - (-math.log(0.75) - math.log(0.5))) < 1e-6 and float(n) == 2
    pc, pr, rc, rr = t([-1.0, -2.0, -3.0]), t([-2.0, -2.0, -1.0]), t([-1.0, -2.0, -2.0]), t([-1.0, -1.0, -2.0])
    loss, n, aux = TL.dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert abs(float(loss) - 2.261416) < 1e-5 and float(n) == 3
    assert [float(aux[k]) for k in ("reward_chosen", "reward_rejected", "accuracy", "margin")] == [-0.5, -0.5, 2, 0]
    loss, n, aux = TL.kto_loss(t([-1.0, -2.0, -3.0]), t([-2.0, -2.0, -2.0]), t([1.0, 1.0, 0.0]), beta=1.0)
    assert abs(float(loss) - 1.037883) < 1e-5
    assert abs(float(aux["reward_desirable"]) - 1.5) < 1e-6 and abs(float(aux["reward_undesirable"]) + 3) < 1e-6
    half, quarter = math.log(0.5), math.log(0.25)
    loss, n, aux = TL.orpo_loss(t([half, half, quarter]), t([half, quarter, half]), t([1.0] * 3), t([1.0] * 3), 1.0)
    assert abs(float(loss) - 5.139712) < 1e-5 and float(aux["accuracy"]) == 1


@pytest.mark.parametrize("kind", ["dpo_sigmoid", "dpo_ipo", "dpo_hinge", "dpo_smoothed", "kto", "orpo"])
def test_each_preference_loss_is_the_same_function_on_both_backends(kind):
    rng = np.random.default_rng(3)
    a, b, c, d = (rng.uniform(-3, -0.1, 6).astype(np.float32) for _ in range(4))
    flags = np.array([1, 0, 1, 1, 0, 0], np.float32)

    def run(L, conv):
        if kind.startswith("dpo"):
            loss_kind = {"dpo_smoothed": "sigmoid"}.get(kind, kind[4:])
            return L.dpo_loss(*map(conv, (a, b, c, d)), 0.3, loss_kind, 0.1 if kind == "dpo_smoothed" else 0.0)
        if kind == "kto":
            return L.kto_loss(conv(a), conv(c), conv(flags), 0.7, 1.2, 0.8)
        return L.orpo_loss(conv(a), conv(b), conv(np.full(6, 3.0, np.float32)), conv(np.full(6, 5.0, np.float32)), 0.4)

    m_loss, m_n, m_aux = run(ML, mx.array)
    t_loss, t_n, t_aux = run(TL, torch.from_numpy)
    assert abs(float(m_loss) - float(t_loss)) < 1e-5 and float(m_n) == float(t_n)
    assert set(m_aux) == set(t_aux)
    for k in m_aux:
        assert abs(float(m_aux[k]) - float(t_aux[k])) < 1e-5, k


def test_chunked_head_values_and_gradient_equal_plain_autograd():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g, dtype=torch.float64)
    import edgetune.backends.torch_backend as tb

    chunk = tb.HEAD_CHUNK
    tb.HEAD_CHUNK = 8  # several chunks, the last one partial
    try:
        out = target_logprobs_head(h, w, y)
    finally:
        tb.HEAD_CHUNK = chunk
    (out.double() * up).sum().backward()
    fused = h.grad.clone()
    h.grad = None
    ref = torch.log_softmax(h @ w.T, dim=-1).gather(1, y[:, None])[:, 0]
    (ref * up).sum().backward()
    # The head computes its logits in float32 (as on a GPU), hence float32 tolerances.
    assert torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(fused, h.grad, atol=1e-5)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_head_chunk_gives_the_eager_head_values_and_gradient(compiled):
    """EDGETUNE_TORCH_FUSED_HEAD's `softmax_minus_onehot` is the eager chunk loop's math as one
    expression: same log-probs and d log p / d h, also compiled (here by inductor on the CPU), over
    chunks of two lengths (a full one and the partial last one, which recompiles)."""
    import edgetune.backends.torch_backend as tb

    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    y = torch.randint(0, 50, (37,), generator=g)
    up = torch.randn(37, generator=g)
    fused = torch.compile(tb.softmax_minus_onehot) if compiled else tb.softmax_minus_onehot
    chunk = tb.HEAD_CHUNK
    tb.HEAD_CHUNK = 16
    try:
        results = []
        for chunk_grad in (None, fused):
            h.grad = None
            out = target_logprobs_head(h, w, y, chunk_grad)
            (out * up).sum().backward()
            results.append((out.detach(), h.grad.clone()))
    finally:
        tb.HEAD_CHUNK = chunk
    (eager_out, eager_grad), (fused_out, fused_grad) = results
    assert torch.allclose(fused_out, eager_out, atol=1e-5)
    assert torch.allclose(fused_grad, eager_grad, atol=1e-5)


def test_positions_restart_for_each_packed_example():
    seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    assert positions_from_segments(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_learning_rate_schedule_is_the_same_on_both_backends(kind):
    from edgetune.backends.mlx_backend import make_schedule

    mlx_schedule = make_schedule(kind, 1e-3, 20, 4, 0.1)
    for step in range(25):
        assert abs(float(mlx_schedule(mx.array(step))) - lr_at(step, kind, 1e-3, 20, 4, 0.1)) < 1e-9, step


def test_adamw_follows_mlx_adamw_step_for_step():
    import mlx.optimizers as optim

    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    grads = [rng.normal(size=(3, 4)).astype(np.float32) for _ in range(5)]
    schedule = lambda s: 1e-2 * (s + 1) / 5  # noqa: E731
    m_opt = optim.AdamW(learning_rate=lambda s: 1e-2 * (s + 1) / 5, weight_decay=0.1)
    params = {"w": mx.array(w0)}
    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    t_opt = AdamW([("w", p)], schedule, 0.1)
    for g in grads:
        params = m_opt.apply_gradients({"w": mx.array(g)}, params)
        p.grad = torch.from_numpy(g)
        t_opt.step()
    np.testing.assert_allclose(p.detach().numpy(), np.array(params["w"]), atol=1e-6)


# --- the same tiny model on both backends ------------------------------------------------------------

def recipe_for(model_dir: Path, backend: str) -> types.SimpleNamespace:
    return types.SimpleNamespace(model=str(model_dir), revision=None, trust_remote_code=False, quantize=None,
                                 backend=backend)


def examples(vocab: int, n: int = 4, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(8, 24))
        out.append(TokenizedExample(f"ex{i}", rng.integers(3, vocab - 1, length).astype(np.int32),
                                    int(rng.integers(2, length - 3))))
    return out


def both_backends(model_dir: Path, tmp_path: Path):
    """MLX and torch models of `model_dir` with identical LoRA weights (B made non-zero, so that
    gradients reach A as well)."""
    spec = LoraSpec(rank=4, alpha=8.0)
    out = {}
    for name in ("mlx", "torch"):
        b = get_backend(name)
        loaded = b.load(recipe_for(model_dir, name), echo=lambda m: None)
        cfg = b.attach_lora(loaded.model, spec, seed=0)
        out[name] = (b, loaded.model, cfg)
    b, model, cfg = out["mlx"]
    from edgetune.lora import adapter_weights

    weights = adapter_weights(model)
    rng = np.random.default_rng(1)
    model.load_weights([(k, mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32)) if k.endswith("lora_b") else v)
                        for k, v in weights.items()], strict=False)
    b.save_adapter(model, cfg, tmp_path / "shared-adapter")
    tb, tmodel, _ = out["torch"]
    tb.load_adapter(tmodel, tmp_path / "shared-adapter")
    return out


def lora_grads_torch(model) -> dict:
    from edgetune.backends.torch_backend import TorchBackend

    return {k: p.grad.detach().numpy().T for k, p in TorchBackend()._lora_params(model).items()}


@pytest.mark.parametrize("arch,packed", [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_same_batch_and_lora_give_the_same_sft_loss_and_gradients(tmp_path, tiny_model_dir, tiny_llama_dir,
                                                                   arch, packed):
    from mlx.utils import tree_flatten

    from edgetune.sft import make_sft_loss_fn
    from edgetune.sft_data import make_batches

    model_dir = tiny_model_dir if arch == "qwen2" else tiny_llama_dir
    models = both_backends(model_dir, tmp_path)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    batch = make_batches(examples(vocab), 4, 64, packed, 0, 0)[0]
    assert (batch.segment_ids.max(axis=1) > 1).any() == packed
    results = {}
    for name, (b, model, _) in models.items():
        mb = b.micro_batch(batch)
        step = b.make_grad_step(model, make_sft_loss_fn(b), compile=False)
        loss, n, _, grads = step(*mb.arrays)
        if name == "mlx":
            grads = {k: np.array(v) for k, v in tree_flatten(grads)}
        else:
            grads = lora_grads_torch(model)
        results[name] = (float(loss), float(n), grads)
    (m_loss, m_n, m_g), (t_loss, t_n, t_g) = results["mlx"], results["torch"]
    assert m_n == t_n > 0
    assert abs(m_loss - t_loss) / m_n < 1e-4
    assert set(m_g) == set(t_g) and len(m_g) > 0
    for k in m_g:
        np.testing.assert_allclose(t_g[k], m_g[k], atol=1e-4, err_msg=k)
    assert any(np.abs(g).max() > 1e-4 for k, g in m_g.items() if k.endswith("lora_a"))


def _accumulated_lora_grads(tiny_model_dir, micro_batches: int, packing: bool = False) -> tuple:
    """Loss, tokens and LoRA gradients of one step over 4 examples in `micro_batches` micro-batches."""
    from edgetune.sft import make_sft_loss_fn

    b = get_backend("torch")
    loaded = b.load(recipe_for(tiny_model_dir, "torch"), echo=lambda m: None)
    b.attach_lora(loaded.model, LoraSpec(rank=4, alpha=8.0), seed=0)
    with torch.no_grad():  # non-zero B, so that gradients reach A too
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    exs = examples(97, 4)
    per = len(exs) // micro_batches
    batches = [b.micro_batch(collate([[e] for e in exs[i:i + per]]), packing=packing)
               for i in range(0, len(exs), per)]
    step = b.make_grad_step(loaded.model, make_sft_loss_fn(b), compile=False)
    for _ in range(2):  # the second step replays what the first recorded (CUDA graphs)
        loss, ntoks, params, _ = b.accumulate(step, batches, None, None)
    return loss, ntoks, [p.grad.float().clone() for p in params]


def test_torch_accumulation_sums_the_micro_batches_gradients(tiny_model_dir):
    """Batch 4 x accumulation 1 == batch 1 x accumulation 4 on the torch backend, whose micro-batches'
    gradients are summed in buffers of their own (see `TorchBackend.accumulate`)."""
    loss_a, n_a, grads_a = _accumulated_lora_grads(tiny_model_dir, 1)
    loss_b, n_b, grads_b = _accumulated_lora_grads(tiny_model_dir, 4)
    assert n_a == n_b > 0 and math.isclose(loss_a, loss_b, rel_tol=1e-5)
    assert any(g.abs().max() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 1e6])
def test_torch_update_normalises_then_clips_with_the_norm_read_with_the_loss(tiny_model_dir, max_grad_norm):
    """`accumulate` reads the gradients' global norm in the same transfer as the loss (one device
    sync a step) and returns it; `update`, given it back, scales by 1/n and mlx's clip factor
    min(max / (norm / n + 1e-6), 1) in one multiply. Same weights as normalising, measuring the
    normalised norm and clipping in separate passes (the clip active at 1e-3, idle at 1e6)."""
    from edgetune.recipe import SftConfig
    from edgetune.sft import make_sft_loss_fn

    b = get_backend("torch")
    loaded = b.load(recipe_for(tiny_model_dir, "torch"), echo=lambda m: None)
    b.attach_lora(loaded.model, LoraSpec(rank=4, alpha=8.0), seed=0)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)
    mb = b.micro_batch(collate([[e] for e in examples(97, 4)]))
    step = b.make_grad_step(loaded.model, make_sft_loss_fn(b), compile=False)
    loss, ntoks, params, read_norm = b.accumulate(step, [mb], None, None)
    grads = [p.grad.clone() for p in params]
    fresh = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert ntoks > 0 and math.isclose(read_norm, fresh, rel_tol=1e-5)
    # The reference update: normalise, measure, clip, then the same AdamW step.
    normalised = [g / ntoks for g in grads]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in normalised])))
    factor = min(max_grad_norm / (norm + 1e-6), 1.0) if max_grad_norm else 1.0
    assert (factor < 1.0) == (max_grad_norm == 1e-3)
    before = [p.detach().clone() for p in params]
    cfg = SftConfig(learning_rate=1e-2)
    reference_opt = b.make_optimizer(loaded.model, cfg, steps=10)
    for p, g in zip(params, normalised):
        p.grad = g * factor
    reference_opt.step()
    expected = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, w in zip(params, before):
            p.copy_(w)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    update = b.make_update(loaded.model, b.make_optimizer(loaded.model, cfg, steps=10), max_grad_norm, False)
    update(params, ntoks, read_norm)
    assert any(not torch.equal(e, w) for e, w in zip(expected, before))
    for got, want in zip(params, expected):
        torch.testing.assert_close(got.detach(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3, 1e6])
def test_mlx_accumulate_reads_the_norm_and_update_normalises_then_clips(tiny_model_dir, max_grad_norm):
    """MLX's `accumulate` returns the gradients' global norm (what the loop logs and checks), and
    `update` normalises and clips as `optim.clip_grad_norm` does, in its compiled graph."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map

    from edgetune.recipe import SftConfig
    from edgetune.sft import make_sft_loss_fn

    b = get_backend("mlx")
    loaded = b.load(recipe_for(tiny_model_dir, "mlx"), echo=lambda m: None)
    model = loaded.model
    b.attach_lora(model, LoraSpec(rank=4, alpha=8.0), seed=0)
    mb = b.micro_batch(collate([[e] for e in examples(97, 4)]))
    step = b.make_grad_step(model, make_sft_loss_fn(b), compile=False)
    loss, ntoks, grads, read_norm = b.accumulate(step, [mb], None, None)
    fresh = float(np.sqrt(sum((np.array(g, np.float64) ** 2).sum() for _, g in tree_flatten(grads))))
    assert ntoks > 0 and math.isclose(read_norm, fresh, rel_tol=1e-5)
    before = model.trainable_parameters()
    cfg = SftConfig(learning_rate=1e-2)
    normalised = tree_map(lambda g: g / ntoks, grads)
    if max_grad_norm:
        normalised, total = optim.clip_grad_norm(normalised, max_grad_norm)
        assert (float(total) > max_grad_norm) == (max_grad_norm == 1e-3)  # clipping active, then idle
    b.make_optimizer(model, cfg, steps=10).update(model, normalised)
    expected = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    model.update(before)
    b.make_update(model, b.make_optimizer(model, cfg, steps=10), max_grad_norm, False)(grads, ntoks, read_norm)
    got = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    assert any(not np.array_equal(got[k], np.array(v)) for k, v in tree_flatten(before))
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=1e-5, err_msg=k)


def test_same_pairs_give_the_same_dpo_loss_and_gradients(tmp_path, tiny_model_dir):
    from mlx.utils import tree_flatten

    from edgetune.preference import make_loss_fn

    models = both_backends(tiny_model_dir, tmp_path)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    rows = examples(vocab, 6, seed=5)  # three pairs: chosen, rejected, ...
    batch = collate([[r] for r in rows])
    ref = np.array([-30.0, -31.0, -25.0, -24.5, -40.0, -41.0], np.float32)
    cfg = types.SimpleNamespace(beta=0.2, loss="sigmoid", label_smoothing=0.0)
    results = {}
    for name, (b, model, _) in models.items():
        mb = b.micro_batch(batch)
        step = b.make_grad_step(model, make_loss_fn("dpo", cfg, b), compile=False)
        loss, n, aux, grads = step(*mb.arrays[:4], b.array(ref))
        grads = {k: np.array(v) for k, v in tree_flatten(grads)} if name == "mlx" else lora_grads_torch(model)
        results[name] = (float(loss), {k: float(v) for k, v in aux.items()}, grads)
    (m_loss, m_aux, m_g), (t_loss, t_aux, t_g) = results["mlx"], results["torch"]
    assert abs(m_loss - t_loss) < 1e-4
    for k in m_aux:
        assert abs(m_aux[k] - t_aux[k]) < 1e-4, k
    for k in m_g:
        np.testing.assert_allclose(t_g[k], m_g[k], atol=1e-4, err_msg=k)


@pytest.mark.parametrize("stage", ["dpo", "orpo"])
def test_packed_pairs_give_the_plain_rows_loss_and_gradients_on_both_backends(tmp_path, tiny_model_dir, stage):
    """`packing: true` for preference stages: pairs laid padding-free into shared rows (a pair's two
    sequences possibly in different rows) give the loss, metrics and LoRA gradients of one
    sequence per row, on each backend, and the backends agree."""
    from mlx.utils import tree_flatten

    from edgetune.pref_data import pack_items
    from edgetune.preference import make_loss_fn, sequence_members

    models = both_backends(tiny_model_dir, tmp_path)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    rows = examples(vocab, 10, seed=7)  # five pairs: chosen, rejected, ...
    ref = np.random.default_rng(2).uniform(-45, -20, 10).astype(np.float32)
    [spec] = pack_items([[rows[2 * i].n_positions, rows[2 * i + 1].n_positions] for i in range(5)], 4, 64, 0, 0)
    order = [2 * i + j for i in spec.items for j in range(2)]  # sequences in the packed batch's loss order
    # Padded to 6 rows of 64, as on CUDA (one static shape): the padding rows hold no sequence.
    packed = pad_rows(collate([[rows[2 * i + j] for i, j in row] for row in spec.rows], 64, 64), 6)
    assert packed.tokens.shape == (6, 64) and len(spec.rows) < 6
    assert (packed.segment_ids.max(axis=1) > 2).any()  # rows really are shared
    assert any({i for i, _ in row} != {i for i, _ in spec.rows[0]} for row in spec.rows[1:])
    members = sequence_members(spec, 2, packed)
    assert members.shape[0] == 10 and members.sum() == packed.n_supervised  # every supervised position, once
    cfg = types.SimpleNamespace(beta=0.2, loss="sigmoid", label_smoothing=0.0)
    results = {}
    for name, (b, model, _) in models.items():
        extra = () if stage == "orpo" else (b.array(ref[order]),)
        got = []
        for batch, layout, fn in ((collate([[rows[r]] for r in order]), (), make_loss_fn(stage, cfg, b)),
                                  (packed, (b.packed_layout(packed.segment_ids), b.array(members)),
                                   make_loss_fn(stage, cfg, b, packed=True))):
            if name == "torch":
                for p in model.parameters():
                    p.grad = None
            step = b.make_grad_step(model, fn, compile=False)
            loss, n, aux, grads = step(*b.micro_batch(batch).arrays[:4], *layout, *extra)
            grads = {k: np.array(v) for k, v in tree_flatten(grads)} if name == "mlx" else lora_grads_torch(model)
            got.append((float(loss), float(n), {k: float(v) for k, v in aux.items()}, grads))
        (p_loss, p_n, p_aux, p_g), (k_loss, k_n, k_aux, k_g) = got
        assert p_n == k_n == 5
        assert abs(p_loss - k_loss) < 1e-5, name
        for k in p_aux:
            assert abs(p_aux[k] - k_aux[k]) < 1e-4, (name, k)
        for k in p_g:
            np.testing.assert_allclose(k_g[k], p_g[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
        results[name] = got[1]
    assert abs(results["mlx"][0] - results["torch"][0]) < 1e-4
    for k in results["mlx"][3]:
        np.testing.assert_allclose(results["torch"][3][k], results["mlx"][3][k], atol=1e-4, err_msg=k)


def test_adapters_cross_over_between_backends(tmp_path, tiny_model_dir):
    """An adapter saved by torch is the MLX adapter format: mlx_lm.load takes it and gives the
    logits the torch model gives; and torch continues from an MLX-saved adapter."""
    from mlx_lm import load as mlx_load

    models = both_backends(tiny_model_dir, tmp_path)
    tb, tmodel, cfg = models["torch"]
    with torch.no_grad():
        for p in tb._lora_params(tmodel).values():
            p.add_(0.01)  # torch-side weights that MLX has never seen
    tb.save_adapter(tmodel, cfg, tmp_path / "from-torch")
    assert (tmp_path / "from-torch" / "adapters.safetensors").is_file()
    ids = np.array([[5, 17, 42, 8, 99, 3, 27, 64]], np.int32)
    model, _ = mlx_load(str(tiny_model_dir), adapter_path=str(tmp_path / "from-torch"))
    mlx_logits = np.array(model(mx.array(ids)).astype(mx.float32))
    tb.set_training(tmodel, False)
    with torch.no_grad():
        torch_logits = tmodel(input_ids=torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(torch_logits, mlx_logits, atol=1e-4)


def test_torch_fuse_and_save_gives_the_model_mlx_lm_gives_with_the_adapter(tmp_path, tiny_model_dir):
    from mlx_lm import load as mlx_load
    from transformers import AutoTokenizer

    models = both_backends(tiny_model_dir, tmp_path)
    tb, tmodel, _ = models["torch"]
    tb.fuse_and_save(tmodel, AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path / "fused")
    ids = mx.array([[5, 17, 42, 8, 99, 3, 27, 64]])
    fused, _ = mlx_load(str(tmp_path / "fused"))
    with_adapter, _ = mlx_load(str(tiny_model_dir), adapter_path=str(tmp_path / "shared-adapter"))
    np.testing.assert_allclose(np.array(fused(ids)), np.array(with_adapter(ids)), atol=1e-4)


def test_resuming_with_the_other_backend_is_refused(tmp_path, tiny_model_dir):
    models = both_backends(tiny_model_dir, tmp_path)
    mb, mmodel, _ = models["mlx"]
    tb, tmodel, _ = models["torch"]
    cfg = types.SimpleNamespace(lr_schedule="constant", learning_rate=1e-3, warmup_steps=0, min_lr_ratio=0.0,
                                weight_decay=0.0)
    m_opt, t_opt = mb.make_optimizer(mmodel, cfg, 4), tb.make_optimizer(tmodel, cfg, 4)
    (tmp_path / "ck").mkdir()
    tb.save_optimizer(t_opt, tmp_path / "ck")
    with pytest.raises(UserError, match="backend: torch"):
        mb.load_optimizer(mmodel, m_opt, tmp_path / "ck")


def test_empty_rows_pad_a_short_batch_without_supervising_anything():
    from edgetune.sft_data import pad_rows

    batch = collate([[r] for r in examples(97, 3)])
    padded = pad_rows(batch, 5)
    assert padded.tokens.shape == (5, batch.tokens.shape[1]) and padded.loss_mask[3:].sum() == 0
    assert (padded.segment_ids[3:] == 0).all() and padded.example_ids == batch.example_ids
    assert pad_rows(batch, 3) is batch


def test_static_packed_layout_gives_the_same_logprobs_as_the_plain_one(tmp_path, tiny_model_dir):
    """With compiled steps every packed-recipe batch carries positions and a block mask, also one
    whose rows hold one example each; the log-probs must not change."""
    b = get_backend("torch")
    loaded = b.load(recipe_for(tiny_model_dir, "torch"), echo=lambda m: None)
    b.attach_lora(loaded.model, LoraSpec(rank=4, alpha=8.0), seed=0)
    batch = collate([[r] for r in examples(97, 3)])
    plain = b.micro_batch(batch, packing=True)
    assert len(plain.arrays) == 4  # not compiling: the batch keeps its own layout
    b.static_packed_rows = True
    forced = b.micro_batch(batch, packing=True)
    assert len(forced.arrays) == 5
    with torch.no_grad():
        a = b.target_logprobs(loaded.model, *plain.arrays[:3])
        c = b.target_logprobs(loaded.model, *forced.arrays[:3], forced.arrays[4])  # arrays[3]: loss weights
    np.testing.assert_allclose(c.numpy(), a.numpy(), atol=1e-5)


def test_cuda_graphs_only_for_one_static_shape_on_cuda_in_the_measured_setting():
    from edgetune.backends.torch_backend import compile_mode

    measured = dict(static=True, cuda=True, attn="sdpa", checkpointing=False, dropout=0.0, override=None)
    # Packed rows on CUDA, whatever the micro-batches per step (summed outside the graphs' pool).
    assert compile_mode(**measured) == "reduce-overhead"
    for change in ({"static": False},  # preference pairs: many shapes
                   {"cuda": False},  # a CPU
                   {"attn": "flash_attention_2"},  # varlen: cu_seqlens change length with each batch
                   {"checkpointing": True}, {"dropout": 0.1}):  # not measured with graphs
        assert compile_mode(**{**measured, **change}) == "default", change
    assert compile_mode(**{**measured, "static": False, "override": "max-autotune"}) == "max-autotune"


def test_compiled_blocks_are_compiled_once_per_model_on_the_first_forward(tmp_path, tiny_model_dir, monkeypatch):
    """With compiling on (here forced on a CPU), the blocks compile lazily, once per model, in the
    mode `compile_mode` picks (the default on a CPU), and give the eager log-probs."""
    monkeypatch.setenv("EDGETUNE_TORCH_COMPILE", "1")
    b = get_backend("torch")
    loaded = b.load(recipe_for(tiny_model_dir, "torch"), echo=lambda m: None)
    b.attach_lora(loaded.model, LoraSpec(rank=4, alpha=8.0), seed=0)
    assert not hasattr(loaded.model, "_edgetune_compiled")
    calls = []
    compile_blocks = b._compile_blocks
    b._compile_blocks = lambda model, static: (calls.append(static), compile_blocks(model, static))
    mb = b.micro_batch(collate([[r] for r in examples(97, 3)]), packing=True)
    with b.no_grad():  # forward-only passes run eager, even where compiling is on
        b.target_logprobs(loaded.model, *mb.arrays[:3])  # plain rows, as the DPO reference pass
        eager = b.target_logprobs(loaded.model, *mb.arrays[:3], *mb.arrays[4:])
    # ... and compile nothing: the first training forward's layout (here packed rows: one static
    # shape, which gets CUDA graphs on a GPU) picks the mode.
    assert not hasattr(loaded.model, "_edgetune_compiled") and calls == []
    compiled = b.target_logprobs(loaded.model, *mb.arrays[:3], *mb.arrays[4:])
    assert loaded.model._edgetune_compiled == "default" and calls == [True]
    b.target_logprobs(loaded.model, *mb.arrays[:3], *mb.arrays[4:])
    assert calls == [True]  # once per model
    np.testing.assert_allclose(compiled.detach().numpy(), eager.numpy(), atol=1e-4)


def test_fused_head_is_on_by_default_only_where_the_blocks_compile_on_cuda(monkeypatch):
    """EDGETUNE_TORCH_FUSED_HEAD=auto: compiled on CUDA (measured faster there), the eager passes on
    a CPU, compiled or not; 1 and 0 force it."""
    monkeypatch.setenv("EDGETUNE_TORCH_COMPILE", "1")
    assert (get_backend("torch").head_chunk_grad is not None) == torch.cuda.is_available()
    monkeypatch.setenv("EDGETUNE_TORCH_COMPILE", "0")
    assert get_backend("torch").head_chunk_grad is None
    monkeypatch.setenv("EDGETUNE_TORCH_FUSED_HEAD", "1")
    assert get_backend("torch").head_chunk_grad is not None
    monkeypatch.setenv("EDGETUNE_TORCH_COMPILE", "1")
    monkeypatch.setenv("EDGETUNE_TORCH_FUSED_HEAD", "0")
    assert get_backend("torch").head_chunk_grad is None


def test_fused_head_setting_gives_the_same_logprobs_and_lora_gradients(tiny_model_dir, monkeypatch):
    """EDGETUNE_TORCH_FUSED_HEAD=1 reaches the head of a training forward (here uncompiled, on a CPU)."""
    results = []
    for fused in ("0", "1"):
        monkeypatch.setenv("EDGETUNE_TORCH_FUSED_HEAD", fused)
        b = get_backend("torch")
        assert (b.head_chunk_grad is not None) == (fused == "1")
        loaded = b.load(recipe_for(tiny_model_dir, "torch"), echo=lambda m: None)
        b.attach_lora(loaded.model, LoraSpec(rank=4, alpha=8.0), seed=0)
        mb = b.micro_batch(collate([[r] for r in examples(97, 3)]), packing=True)
        out = b.target_logprobs(loaded.model, *mb.arrays[:3], *mb.arrays[4:])
        out.sum().backward()
        grads = [p.grad.clone() for p in loaded.model.parameters() if p.requires_grad]
        results.append((out.detach(), grads))
    (plain, plain_grads), (fused, fused_grads) = results
    assert torch.allclose(fused, plain, atol=1e-5)
    assert len(fused_grads) == len(plain_grads) and all(torch.allclose(a, b, atol=1e-5)
                                                         for a, b in zip(fused_grads, plain_grads))


def test_plain_row_buckets_give_static_shapes_compiled_once_each(tmp_path, tiny_model_dir, monkeypatch):
    """EDGETUNE_TORCH_PLAIN_BUCKETS: plain rows round up to multiples of 256 positions and the blocks
    compile one static graph per bucket (here on a CPU: no CUDA graphs), with unchanged log-probs."""
    from edgetune.backends.torch_backend import PLAIN_BUCKET

    monkeypatch.setenv("EDGETUNE_TORCH_COMPILE", "1")
    monkeypatch.setenv("EDGETUNE_TORCH_PLAIN_BUCKETS", "1")
    b = get_backend("torch")
    assert b.plain_buckets and b.pad_multiple == PLAIN_BUCKET
    loaded = b.load(recipe_for(tiny_model_dir, "torch"), echo=lambda m: None)
    b.attach_lora(loaded.model, LoraSpec(rank=4, alpha=8.0), seed=0)
    batch = collate([[r] for r in examples(97, 3)], b.pad_multiple)
    assert batch.tokens.shape[1] == PLAIN_BUCKET
    mb = b.micro_batch(batch)
    with b.no_grad():
        eager = b.target_logprobs(loaded.model, *mb.arrays[:3])
    compiled = b.target_logprobs(loaded.model, *mb.arrays[:3])
    assert loaded.model._edgetune_compiled == "default"
    np.testing.assert_allclose(compiled.detach().numpy(), eager.numpy(), atol=1e-4)


@pytest.mark.parametrize("name,value", [("EDGETUNE_TORCH_COMPILE", "yes"), ("EDGETUNE_TORCH_COMPILE_MODE", "fast"),
                                        ("EDGETUNE_TORCH_ACTIVATION_BUDGET", "half"),
                                        ("EDGETUNE_TORCH_ACTIVATION_BUDGET", "1.5"),
                                        ("EDGETUNE_TORCH_PLAIN_BUCKETS", "on"), ("EDGETUNE_TORCH_DEVICE", "gpu"),
                                        ("EDGETUNE_TORCH_FUSED_HEAD", "yes")])
def test_a_bad_torch_backend_setting_is_named_not_a_traceback(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=f"{name}='{value}': expected"):
        get_backend("torch")


def test_torch_backend_caps_the_openblas_threads_it_shares_the_cpu_with():
    import ctypes

    from edgetune.runtime import blas_info

    path = blas_info()["blas"]
    if not path or path.startswith("openblas (LD_PRELOAD"):
        pytest.skip("edgetune loaded no OpenBLAS here")
    lib = ctypes.CDLL(path)
    get_backend("mlx")  # undoes what earlier torch tests in this process capped
    before = lib.openblas_get_num_threads()
    get_backend("torch")
    assert lib.openblas_get_num_threads() == 1
    # An MLX stage (or evaluation) after it in the same process gets them back.
    get_backend("mlx")
    assert lib.openblas_get_num_threads() == before


def test_torch_backend_refuses_qlora_and_mlx_quantized_bases_by_name(tmp_path, tiny_model_dir):
    b = get_backend("torch")
    r = recipe_for(tiny_model_dir, "torch")
    r.quantize = "q4"
    with pytest.raises(UserError, match="QLoRA is available on the MLX backend only"):
        b.load(r, echo=lambda m: None)


def test_doctor_names_the_backends_and_the_auto_choice():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "edgetune.cli", "doctor", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["backends"]["mlx"]["available"] and report["backends"]["torch"]["available"]
    assert report["auto"]["backend"] == choose_backend("auto")[0] and report["auto"]["why"]
    text = subprocess.run([sys.executable, "-m", "edgetune.cli", "doctor"], capture_output=True, text=True)
    assert text.returncode == 0 and "backend: auto ->" in text.stdout and "torch" in text.stdout


def test_auto_backend_on_a_linux_cpu_and_explicit_choices():
    assert choose_backend("torch")[0] == "torch" and choose_backend("mlx")[0] == "mlx"
    name, why = choose_backend("auto")
    if not torch.cuda.is_available():  # Linux CPU with both installed: the one measured faster here
        assert name == "torch" and "measured faster" in why
    with pytest.raises(UserError, match="not one of"):
        choose_backend("jax")


@pytest.mark.slow
def test_one_short_sft_run_ends_at_the_same_losses_on_both_backends(tmp_path, tiny_model_dir):
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft
    from tests.test_sft_e2e import write_recipe

    losses = {}
    for backend in ("mlx", "torch"):
        folder = tmp_path / backend
        folder.mkdir()
        path = write_recipe(folder, tiny_model_dir, steps=10, packing=True, learning_rate=2e-3, backend=backend)
        run_sft(load_recipe(path), echo=lambda m: None)
        records = [json.loads(x) for x in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
        losses[backend] = [r["loss"] for r in records if "loss" in r and r.get("loss") is not None]
        assert json.loads((folder / "run" / "manifest.json").read_text())["backend"]["name"] == backend
    assert len(losses["mlx"]) == len(losses["torch"]) == 10
    assert losses["mlx"][-1] < losses["mlx"][0] - 0.05  # it trains
    np.testing.assert_allclose(losses["torch"], losses["mlx"], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sft_on_cuda_in_bf16_with_compile_learns(tmp_path, tiny_model_dir):
    from edgetune.recipe import load_recipe
    from edgetune.sft import run_sft
    from tests.test_sft_e2e import write_recipe

    path = write_recipe(tmp_path, tiny_model_dir, steps=30, packing=True, learning_rate=3e-3, backend="torch")
    summary = run_sft(load_recipe(path), echo=lambda m: None)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["environment"]["dtype"] == "bfloat16" and manifest["environment"]["compiled"]
    assert summary["final_loss"] < summary["first_loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_head_on_cuda_in_bf16_gives_the_eager_head():
    """The compiled `softmax_minus_onehot` (Triton kernels) against the eager chunk loop, bf16 as
    in training, at a vocab whose rows span many blocks."""
    import edgetune.backends.torch_backend as tb

    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(1500, 64, generator=g, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(30000, 64, generator=g, device="cuda", dtype=torch.bfloat16) * 0.1
    y = torch.randint(0, 30000, (1500,), generator=g, device="cuda")
    results = []
    for chunk_grad in (None, torch.compile(tb.softmax_minus_onehot)):
        h.grad = None
        out = target_logprobs_head(h, w, y, chunk_grad)
        out.sum().backward()
        results.append((out.detach().float(), h.grad.float()))
    (eager_out, eager_grad), (fused_out, fused_grad) = results
    assert torch.allclose(fused_out, eager_out, atol=1e-3)
    assert torch.allclose(fused_grad, eager_grad, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_accumulation_under_cuda_graphs_gives_the_eager_gradients(tiny_model_dir, monkeypatch):
    """Two micro-batches a step with CUDA graphs forced on (reduce-overhead): each backward's gradients
    are taken out of the graphs' pool before the next replay (pytorch#169545), so they must sum to
    what the same compiled blocks give without graphs (the same kernels: tight), and to eager up to
    bf16 rounding (a norm-relative bound over all of them: compiled bf16 kernels left one tensor of
    this random tiny model 8.5% off eager on an H200; an overwritten micro-batch is off by ~100%).
    Passed on an H200 (2026-11-27), after which `compile_mode` gave accumulation graphs."""
    def grads(compile: str, mode: str = ""):
        monkeypatch.setenv("EDGETUNE_TORCH_COMPILE", compile)
        monkeypatch.setenv("EDGETUNE_TORCH_COMPILE_MODE", mode)
        return _accumulated_lora_grads(tiny_model_dir, 2, packing=True)

    loss_e, n_e, eager = grads("0")
    loss_c, n_c, compiled = grads("1", "default")
    loss_g, n_g, graphs = grads("1", "reduce-overhead")
    assert n_e == n_c == n_g > 0 and math.isclose(loss_g, loss_c, rel_tol=1e-3)
    assert math.isclose(loss_g, loss_e, rel_tol=2e-2)
    for c, g in zip(compiled, graphs):
        torch.testing.assert_close(g, c, atol=1e-3, rtol=1e-2)
    flat_e, flat_g = torch.cat([e.flatten() for e in eager]), torch.cat([g.flatten() for g in graphs])
    assert float((flat_g - flat_e).norm()) <= 0.15 * float(flat_e.norm())
