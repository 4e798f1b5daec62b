__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    # `from llm2slm_cli import load` without importing torch for `llm2slm --help`
    if name in ("load", "Model"):
        from llm2slm_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'llm2slm_cli' has no attribute {name!r}")
