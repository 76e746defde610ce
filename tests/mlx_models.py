"""Small mlx-lm models built in code for unit tests that need no tokenizer."""

from edgetune.runtime import mlx_core

mx = mlx_core()


def make_model(model_type: str = "llama", seed: int = 0, vocab: int = 97, hidden: int = 32, layers: int = 2):
    from mlx_lm.utils import _get_classes

    config = {
        "model_type": model_type, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": vocab, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": model_type == "qwen2", "max_position_embeddings": 512,
    }
    model_cls, args_cls = _get_classes(config)
    mx.random.seed(seed)
    model = model_cls(args_cls.from_dict(config))
    mx.eval(model.parameters())
    return model
