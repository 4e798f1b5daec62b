"""--config files are typed: a value of the wrong type is one line naming the option, never coerced; a file nested
past any sense is one line, not a RecursionError; --print-config shows the configuration, not the testing aids."""

import pytest
import yaml


@pytest.mark.parametrize("text, message", [
    ("num_beams: true\n", "option num-beams takes a whole number, got true"),
    ("num_beams: 1.5\n", "option num-beams takes a whole number, got 1.5"),
    ("max_new_tokens: '5'\n", 'option max-new-tokens takes a whole number, got "5"'),
    ("length_penalty: yes\n", "option length-penalty takes a number, got true"),
    ("sample: 1\n", "option sample takes true or false, got 1"),
    ("model: false\n", "option model takes a text value, got false"),
    ("num_beam: 2\n", "unknown option num-beam for `llm2slm generate`; did you mean num-beams?"),
])
def test_a_config_value_of_the_wrong_type_is_refused(cli, toy_files, tmp_path, text, message):
    cfg = tmp_path / "gen.yaml"
    cfg.write_text(f"model: tiny-gpt2\ninputs: [{toy_files['dev']}]\nout: {tmp_path / 'o'}\n" + text)
    result = cli("generate", "--config", cfg, code=2)
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_a_config_value_of_the_right_type_is_taken(cli, toy_files, tmp_path):
    cfg = tmp_path / "gen.yaml"  # a float option given a whole number, a text option given a number
    cfg.write_text(f"model: tiny-gpt2\ninputs: [{toy_files['dev']}]\nout: {tmp_path / 'o'}\nlength_penalty: 1\n"
                   "num_beams: 2\ntop_p: 9e-1\n")  # PyYAML reads 9e-1 as text: still a float literal
    effective = yaml.safe_load(cli("generate", "--config", cfg, "--print-config").stdout)
    assert effective["length_penalty"] == 1 and effective["num_beams"] == 2 and effective["top_p"] == 0.9


@pytest.mark.parametrize("text", ["[" * 5000 + "]" * 5000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 3000))])
def test_a_deeply_nested_config_file_is_one_line(cli, tmp_path, text):
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(text)
    result = cli("generate", "--config", cfg, code=2)
    assert result.output.startswith("error:") and len(result.output.strip().splitlines()) == 1, result.output[-500:]
    assert "Traceback" not in result.output and "RecursionError" not in result.output


def test_print_config_leaves_hidden_options_out(cli, toy_files, tmp_path):
    printed = cli("train", toy_files["train"], "--slm", "tiny-gpt2", "--out", tmp_path / "r", "--print-config").stdout
    effective = yaml.safe_load(printed)
    assert "stop_after" not in effective and effective["slm"] == "tiny-gpt2" and "max_steps" in effective
    again = tmp_path / "again.yaml"  # still a config file giving the same configuration
    again.write_text(printed)
    assert cli("train", "--config", again, "--print-config").stdout == printed
