"""Where models come from without the hub: `edgetune model tiny` and its built-in corpus."""
