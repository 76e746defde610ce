"""Export: a trained adapter becomes files that on-device runtimes load.

`edgetune export` (cli.py) merges the adapter into the base (fuse.py) and writes an MLX folder
(mlx_export.py) or a GGUF file for llama.cpp/Ollama (gguf.py, modelfile.py), or converts the
adapter to/from Hugging Face PEFT (peft.py); every export carries a model card (card.py).
"""
