"""recipes/multi-gpu: its accelerate config files are what accelerate reads and what the README says they are, and
every command the README shows launches an existing config and parses against the real CLI. (The CPU config is
launched for real in tests/test_distributed.py.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from llm2slm_cli import artifacts as A
from llm2slm_cli.features import feature_bytes, index_bytes

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "multi-gpu"
CPU_CONFIG = RECIPE / "cpu-two-processes.yaml"


def _config(name: str) -> dict:
    config = yaml.safe_load((RECIPE / name).read_text())
    assert isinstance(config, dict), name
    return config


def _launches() -> list[list[str]]:
    """Every `accelerate launch ...` command of the README's code blocks, as argument lists."""
    text = (RECIPE / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("accelerate launch"):
                commands.append(shlex.split(line))
    return commands


def test_the_config_files_are_accelerate_configs_of_the_documented_shapes():
    from accelerate.commands.config.config_args import ClusterConfig

    assert sorted(p.name for p in RECIPE.glob("*.yaml")) == ["cpu-two-processes.yaml", "multi-node.yaml",
                                                            "one-node.yaml"]
    for path in RECIPE.glob("*.yaml"):
        ClusterConfig.from_yaml_file(str(path))  # accelerate refuses unknown keys and values
    shape = {name: {k: _config(name)[k] for k in ("compute_environment", "distributed_type", "num_machines",
                                                  "machine_rank", "num_processes", "mixed_precision")}
             for name in ("one-node.yaml", "multi-node.yaml", "cpu-two-processes.yaml")}
    assert shape == {
        "one-node.yaml": {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1,
                          "machine_rank": 0, "num_processes": 8, "mixed_precision": "bf16"},
        "multi-node.yaml": {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                            "num_machines": 2, "machine_rank": 0, "num_processes": 16, "mixed_precision": "bf16"},
        "cpu-two-processes.yaml": {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                                   "num_machines": 1, "machine_rank": 0, "num_processes": 2, "mixed_precision": "no"},
    }
    node = _config("multi-node.yaml")
    assert isinstance(node["main_process_ip"], str) and isinstance(node["main_process_port"], int)
    assert _config("cpu-two-processes.yaml")["use_cpu"] is True


def test_every_documented_command_launches_a_config_here_and_parses_against_the_cli():
    import typer.main

    from llm2slm_cli.cli import app

    group = typer.main.get_command(app)
    commands = _launches()
    assert len(commands) == 6, commands
    configs = []
    for argv in commands:
        assert argv[:3] == ["accelerate", "launch", "--config_file"], argv
        assert (ROOT / argv[3]).is_file(), argv[3]
        configs.append((argv[3], "--device" in argv and argv[argv.index("--device") + 1] == "cpu"))
        stage, *options = argv[argv.index("-m") + 2:]
        assert argv[argv.index("-m") + 1] == "llm2slm_cli"
        group.commands[stage].make_context(stage, list(options), resilient_parsing=False)  # raises on a bad option
    # the CPU command is the one that uses the CPU config (the one tests/test_distributed.py launches), and only it
    assert [c for c, cpu in configs if cpu] == [str(CPU_CONFIG.relative_to(ROOT))]
    assert {c for c, cpu in configs if not cpu} == {"recipes/multi-gpu/one-node.yaml",
                                                     "recipes/multi-gpu/multi-node.yaml"}


def test_the_paper_scale_arithmetic_in_the_readme():
    text = " ".join((RECIPE / "README.md").read_text().split())
    tokens = 4_508_785 * 30
    total = feature_bytes(tokens, 1024, "float16")
    assert f"4,508,785 x 30 = {tokens:,} tokens; {tokens:,} x 1024 x 2 = {total:,} bytes = " \
           f"{A.human_bytes(total)} ({total / 2**30:.0f} GiB)" in text
    assert f"at most about {index_bytes(tokens, 4_508_785) / 1e9:.1f} GB of index" in text
    assert f"another {A.human_bytes(feature_bytes(4_508_785 * 10, 1024, 'float16'))}" in text
    summaries = feature_bytes(287_113 * 512, 1024, "float16")
    assert f"287,113 x 512 x 1024 x 2 bytes = {A.human_bytes(summaries)}" in text
