"""The bench library: what `llm2slm bench` (stages/bench.py, its outline) and the scripts under benchmarks/ use,
one responsibility each:

- timing.py: how one row is timed (random prompts, exactly N tokens, medians, FLOPs, memory)
- plan.py: which rows a run has (the options turned into row plans, checked before anything is loaded)
- rows.py: a timed row from loaded models (plain, LLM-to-SLM, assisted, speculative)
- measure.py: every row measured, each model loaded once; --throughput
- quality.py: --quality scores read from `eval` outputs
- peers.py: the peer runtimes' rows (CTranslate2, llama.cpp)
- report.py: the output files, plots and console tables
"""
