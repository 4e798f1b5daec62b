"""`llm2slm serve`: an OpenAI-compatible HTTP API over the Python API (llm2slm_cli.api).

protocol.py mirrors the OpenAI request and response bodies as pydantic models; serving.py turns a validated request
into decoding jobs and batches concurrent ones together (Engine); app.py is the thin FastAPI layer.
"""
