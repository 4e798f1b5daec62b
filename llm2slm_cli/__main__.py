"""`python -m llm2slm_cli` (and `accelerate launch -m llm2slm_cli ...`)."""

from llm2slm_cli.cli import main

if __name__ == "__main__":
    main()
