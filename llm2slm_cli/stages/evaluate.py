from llm2slm_cli.errors import UserError


def run(config) -> None:
    raise UserError("this stage is not yet available")
