"""The parts of `llm2slm bench` (the stage itself is stages/bench.py), one responsibility each:

- plan.py: which rows a run has (the options turned into row plans, checked before anything is loaded)
- rows.py: a timed row from loaded models (plain, LLM-to-SLM, assisted, speculative)
- measure.py: every row measured, each model loaded once; --throughput
- quality.py: --quality scores read from `eval` outputs
- report.py: the output files, plots and console tables

How one row is timed (random prompts, exactly N tokens, medians, FLOPs, memory) is llm2slm_cli/benchmarking.py.
"""
