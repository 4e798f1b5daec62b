"""The toolkit's version, in a module of its own: what records it (every manifest, `llm2slm --version`) reads it
here, below everything, instead of from the package's face (`llm2slm_cli/__init__.py`, which leads to api.py)."""

__version__ = "0.1.0"
