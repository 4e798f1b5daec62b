"""llm2slm: LLM-to-SLM decoding. `from llm2slm_cli import load` is the Python API (api.py); the `llm2slm` command
is cli.py; docs/ARCHITECTURE.md shows how the modules fit."""

import logging

from llm2slm_cli.version import __version__

__all__ = ["__version__", "load"]


def __getattr__(name: str):
    if name in ("load", "Model"):
        # on first use (PEP 562): `import llm2slm_cli` (and `llm2slm --help`) stays light
        from llm2slm_cli import api

        return getattr(api, name)
    raise AttributeError(f"module 'llm2slm_cli' has no attribute {name!r}")


class _DropNotice(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# transformers imports torchao, where installed, whenever it loads a model; that import logs notices that are no one's
# to act on: torchao's CUDA-only libraries a CPU build cannot load, and torch's deprecation of torchao's own pytree
# registrations of enums. Those two records are dropped; everything else those loggers say gets through.
_NOTICES = (("torchao", "Failed to load"), ("torch.utils._pytree", "register_constant() on Enum subclasses"))
for _logger, _text in _NOTICES:
    logging.getLogger(_logger).addFilter(_DropNotice(_text))
