"""llm2slm: LLM-to-SLM decoding. `from llm2slm_cli import load` is the Python API (api.py); the `llm2slm` command
is cli.py; docs/ARCHITECTURE.md shows how the modules fit."""

from llm2slm_cli.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "Model"):
        # on first use (PEP 562): `import llm2slm_cli` (and `llm2slm --help`) stays light
        from llm2slm_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'llm2slm_cli' has no attribute {name!r}")
