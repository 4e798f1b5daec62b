"""Logit distillation: distill-labels --top-k-logits stores the LLM's top-K distributions, train --kd-weight mixes a KL
to them with the cross-entropy; --slm-layers with block lists (first and last layers).

The KD loss is checked against a hand computation; the stored distributions against the teacher's own forward pass
(decoder-only and encoder-decoder); --kd-weight 0 trains bitwise as plain cross-entropy; a resumed KD run ends with
the uninterrupted run's weights; damaged or mismatched logit artifacts are refused before --out exists."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llm2slm_cli import checkpoint
from llm2slm_cli import loading as M
from llm2slm_cli.config import DistillConfig
from llm2slm_cli.kd import kd_loss
from llm2slm_cli.llm2slm import FrozenLLM, LLMToSLM
from llm2slm_cli.stages import distill
from llm2slm_cli.teacher import TeacherLogits


def _reference_kd(logits, mask, ids, logprobs, temperature):
    """KL over the K teacher tokens plus "any other token", written out one position at a time."""
    total = 0.0
    batch, length, _ = logits.shape
    for b in range(batch):
        for t in range(length):
            if not mask[b, t]:
                continue
            z = [float(x) for x in logits[b, t]]
            top = max(z)
            log_norm = top + math.log(sum(math.exp(x - top) for x in z))
            teacher, student = [], []
            for j in range(ids.shape[2]):
                if ids[b, t, j] >= 0:
                    teacher.append(float(logprobs[b, t, j]))
                    student.append(z[int(ids[b, t, j])] - log_norm)
            teacher.append(math.log(1 - sum(math.exp(x) for x in teacher)))
            student.append(math.log(1 - sum(math.exp(x) for x in student)))
            if temperature != 1.0:
                def soft(v):
                    m = max(x / temperature for x in v)
                    n = m + math.log(sum(math.exp(x / temperature - m) for x in v))
                    return [x / temperature - n for x in v]

                teacher, student = soft(teacher), soft(student)
            total += sum(math.exp(p) * (p - q) for p, q in zip(teacher, student)) * temperature ** 2
    return total


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_equals_a_hand_computed_reference(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g) * 2
    teacher = torch.randn(2, 3, 11, generator=g).log_softmax(-1)
    logprobs, ids = teacher.topk(4, -1)
    ids[0, 1, 2] = -1  # a teacher token the student cannot emit (outside its trimmed vocabulary)
    ids[1, 2] = -1  # padding
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = kd_loss(logits, mask, ids, logprobs, temperature)
    assert float(got) == pytest.approx(_reference_kd(logits, mask, ids, logprobs, temperature), rel=1e-5)
    # a student that is the teacher has nothing left to learn; the gradient flows to the logits
    assert float(kd_loss(teacher, mask, teacher.topk(4, -1)[1], logprobs, temperature)) == pytest.approx(0, abs=1e-5)
    logits.requires_grad_(True)
    kd_loss(logits, mask, ids, logprobs, temperature).backward()
    assert logits.grad[1, 2].abs().sum() == 0 and logits.grad[0, 0].abs().sum() > 0


def _teacher_files(tmp_path, toy_files, model="tiny-llama", k=5, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = DistillConfig(inputs=[toy_files["train"]], model=model, out=tmp_path / f"kd-{model}", top_k_logits=k,
                           teacher_forced=True, max_target_length=16, shard_size=5, batch_size=3,
                           template="upper: {src}", quiet=True, **kw)
    return distill.run(config)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5-large"])
def test_stored_distributions_are_the_teachers_own(model, toy_files, tmp_path):
    from llm2slm_cli.runtime import tokenize_prompts, tokenize_targets

    out = _teacher_files(tmp_path, toy_files, model)
    names = {p.name for p in out.iterdir()}
    assert names == {"examples.parquet", "manifest.json", *(f"logits-{k:05d}.safetensors" for k in range(4))}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["logits"]["top_k"] == 5 and manifest["logits"]["teacher_forced"]
    store = TeacherLogits(out)
    rows = [json.loads(line) for line in toy_files["train"].read_text().splitlines()]
    hf = M.load_model(model, role="LLM").eval()
    tok = M.load_tokenizer(model)
    for row in rows[:4]:  # one example at a time, no padding: the plain forward pass
        prompt = tokenize_prompts(tok, ["upper: " + row["src"]], 512)[0][0]
        target = tokenize_targets(tok, [row["tgt"]], 16)[0]
        ids, logprobs, stored_targets = store.rows(row["id"])
        assert stored_targets.tolist() == target and ids.shape == (len(target), 5)
        with torch.no_grad():
            if M.model_kind(hf.config) == "encoder-decoder":
                start = hf.config.decoder_start_token_id
                logits = hf(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[start] + target[:-1]]))
                logits = logits.logits[0]
            else:
                logits = hf(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1: -1]
        want_values, want_ids = logits.log_softmax(-1).topk(5, -1)
        assert torch.allclose(torch.from_numpy(logprobs).float(), want_values, atol=2e-3)
        assert (torch.from_numpy(ids).long() == want_ids).float().mean() > 0.95  # ties may swap within fp16


def _train(cli, data, out, *extra):
    cli("train", data, "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6",
        "--max-target-length", "16", "--lr", "3e-3", "--quiet", "--out", out, *extra)
    return load_file(str(out / "final" / "model.safetensors"))


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_kd_weight_zero_trains_bitwise_as_cross_entropy_and_kd_moves_the_student(cli, toy_files, tmp_path):
    labels = _teacher_files(tmp_path, toy_files)
    plain = _train(cli, labels, tmp_path / "ce")
    zero = _train(cli, labels, tmp_path / "zero", "--kd-weight", "0")
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert [r["loss"] for r in _log(tmp_path / "ce")] == [r["loss"] for r in _log(tmp_path / "zero")]
    kd = _train(cli, labels, tmp_path / "kd", "--kd-weight", "1", "--kd-temperature", "2")
    assert any(not torch.equal(plain[k], kd[k]) for k in plain)
    log = _log(tmp_path / "kd")
    assert all(r["loss"] == pytest.approx(r["kd"], abs=1e-6) for r in log)  # A = 1: the KL alone
    assert log[-1]["kd"] < log[0]["kd"]  # the student moves toward the teacher


def test_kd_resume_is_exact(cli, toy_files, tmp_path):
    labels = _teacher_files(tmp_path, toy_files)
    common = ["--kd-weight", "0.5", "--save-every", "2"]
    straight = _train(cli, labels, tmp_path / "straight", *common)
    cli("train", labels, "--slm", "tiny-gpt2", "--batch-size", "4", "--micro-batch-size", "2", "--max-steps", "6",
        "--max-target-length", "16", "--lr", "3e-3", "--quiet", "--out", tmp_path / "broken", *common,
        "--stop-after", "3")
    resumed = _train(cli, labels, tmp_path / "broken", *common, "--resume")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert _log(tmp_path / "straight") == [{**r, "examples_per_second": s["examples_per_second"]} for r, s in
                                           zip(_log(tmp_path / "broken"), _log(tmp_path / "straight"))]


def test_bad_or_mismatched_logits_are_refused_before_any_work(cli, toy_files, tmp_path):
    labels = _teacher_files(tmp_path, toy_files)
    base = ["--slm", "tiny-gpt2", "--max-steps", "1", "--batch-size", "4", "--micro-batch-size", "2", "--quiet"]
    # targets cut at another length than the one the distributions cover
    r = cli("train", labels, *base, "--kd-weight", "0.5", "--max-target-length", "8", "--out", tmp_path / "a", code=2)
    assert "target tokens differ" in r.output and not (tmp_path / "a").exists()
    # distributions over another tokenizer's vocabulary (the tiny presets share one: the record says otherwise)
    manifest = json.loads((labels / "manifest.json").read_text())
    other = json.loads(json.dumps(manifest))
    other["logits"]["tokenizer_fingerprint"] = "0" * 64
    (labels / "manifest.json").write_text(json.dumps(other))
    r = cli("train", labels, *base, "--kd-weight", "0.5", "--max-target-length", "16", "--out", tmp_path / "b",
            code=2)
    assert "another vocabulary" in r.output and not (tmp_path / "b").exists()
    (labels / "manifest.json").write_text(json.dumps(manifest))
    # labels made without --top-k-logits
    plain = distill.run(DistillConfig(inputs=[toy_files["train"]], model="tiny-llama", out=tmp_path / "plain",
                                      max_new_tokens=3, num_beams=1, quiet=True))
    r = cli("train", plain, *base, "--kd-weight", "0.5", "--out", tmp_path / "c", code=2)
    assert "no teacher distributions" in r.output and not (tmp_path / "c").exists()
    # a flipped byte in a shard
    shard = labels / "logits-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = cli("train", labels, *base, "--kd-weight", "0.5", "--max-target-length", "16", "--out", tmp_path / "d",
            code=2)
    assert "damaged" in r.output and "logits-00001" in r.output and not (tmp_path / "d").exists()
    # option checks
    assert "--kd-weight must be in [0, 1]" in cli("train", labels, *base, "--kd-weight", "1.5", "--out",
                                                  tmp_path / "e", code=2).output
    assert "--teacher-forced" in cli("distill-labels", toy_files["train"], "--model", "tiny-llama",
                                     "--teacher-forced", "--out", tmp_path / "f", code=2).output


def test_kd_with_a_trimmed_vocabulary_drops_unkept_teacher_tokens():
    model = LLMToSLM.build("tiny-llama", FrozenLLM("tiny-llama"))
    model.trim_vocabulary(torch.tensor([5, 9, 30, 31]), 3)
    kept = model.slm_vocab.tolist()
    ids = torch.tensor([[[9, 7, 31, -1]]])
    mapped = model.teacher_slm_ids(ids)[0, 0].tolist()
    assert mapped[0] == kept.index(9) and mapped[1] == -1 and mapped[2] == kept.index(31) and mapped[3] == -1


def test_slm_layers_first_and_last_blocks_keep_their_weights_and_save_load(tmp_path):
    full = M.load_model("tiny-llama", role="SLM")
    torch.manual_seed(0)
    model = LLMToSLM.build("tiny-llama", None, slm_layers=[0, -1]).eval()
    blocks = model.slm.model.layers
    n = len(full.model.layers)
    assert len(blocks) == 2 and model.slm.config.num_hidden_layers == 2 and n > 2
    for new, old in [(0, 0), (1, n - 1)]:
        a, b = blocks[new].state_dict(), full.model.layers[old].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert blocks[new].self_attn.layer_idx == new  # the KV cache sees consecutive layers
    tok = model.prompt_tokenizer
    ids = torch.tensor([tok("alpha beta").input_ids])
    greedy = dict(max_new_tokens=6, do_sample=False, num_beams=1)
    out = model.generate(ids, torch.ones_like(ids), **greedy)
    checkpoint.save(model, tmp_path / "ckpt")
    again = checkpoint.load(tmp_path / "ckpt")
    assert again.config.slm_layers == [0, -1] and again.generate(ids, torch.ones_like(ids), **greedy) == out
    with pytest.raises(Exception, match="increasing order"):
        LLMToSLM.build("tiny-llama", None, slm_layers=[1, 0])


def test_eval_counts_loops_and_distinct_outputs_and_pairs_a_bootstrap(tmp_path):
    import pyarrow as pa

    from llm2slm_cli import artifacts as A
    from llm2slm_cli.config import EvalConfig
    from llm2slm_cli.stages import evaluate

    assert evaluate.repetition_loop("die Regierung, die Regierung, die Regierung,")
    assert evaluate.repetition_loop("Es ist es es es")
    assert evaluate.repetition_loop("Die Regierung der Regierung der Regierung der Regierung, die die Regie")
    assert not evaluate.repetition_loop("Die Regierung hat die Wahl gewonnen, sagte er.")

    refs = ["Die Katze sitzt auf der Matte .", "Der Hund bellt laut .", "Es regnet heute in Berlin .",
            "Wir gehen morgen ins Kino ."] * 5

    def predictions(name, texts):
        d = tmp_path / name
        d.mkdir()
        ids = [str(i) for i in range(len(texts))]
        A.write_parquet(d / A.PREDICTIONS, pa.table({"id": ids, "prompt": ["p"] * len(ids), "prediction": texts,
                                                     "reference": refs}))
        A.atomic_write_json(d / A.MANIFEST, A.make_manifest(A.KIND_PREDICTIONS, {}, files={
            A.PREDICTIONS: A.file_record(d / A.PREDICTIONS)}))
        return d

    base = predictions("base", ["die die die die"] * 20)
    good = predictions("good", [r if i % 4 else "Die Katze ." for i, r in enumerate(refs)])
    result = evaluate.run(EvalConfig(predictions=good, out=tmp_path / "eval", metrics="bleu,chrf",
                                     paired_with=base, bootstrap_samples=100, quiet=True))
    assert result["outputs"] == {"distinct": 4 / 20, "repetition_loops": 0.0, "empty": 0.0}
    paired = result["paired"]
    assert paired["chrf"]["score"] == pytest.approx(result["metrics"]["chrf"]["score"])
    assert paired["chrf"]["delta"] > 50 and paired["chrf"]["p_value"] < 0.05 and paired["chrf"]["ci95"] >= 0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["paired"]
    assert all(isinstance(saved[m][k], float) for m in ("bleu", "chrf") for k in ("mean", "ci95", "baseline_mean"))
    worse = evaluate.run(EvalConfig(predictions=base, out=tmp_path / "eval2", metrics="chrf", quiet=True))
    assert worse["outputs"]["repetition_loops"] == 1.0 and worse["outputs"]["distinct"] == 1 / 20


def test_kd_into_an_encoder_decoder_slm(cli, toy_files, tmp_path):
    labels = _teacher_files(tmp_path, toy_files, "tiny-t5-large")
    cli("train", labels, "--slm", "tiny-t5", "--llm", "tiny-t5-large", "--batch-size", "4", "--micro-batch-size", "2",
        "--max-steps", "6", "--max-target-length", "16", "--lr", "3e-3", "--kd-weight", "1", "--quiet",
        "--out", tmp_path / "t5")
    log = _log(tmp_path / "t5")
    assert log[-1]["kd"] < log[0]["kd"] and all(r["loss"] == pytest.approx(r["kd"], abs=1e-6) for r in log)


def test_teacher_logits_resume_after_a_crash_gives_the_same_files(toy_files, tmp_path, crash_distill_on_shard):
    straight = _teacher_files(tmp_path / "a", toy_files)
    disarm = crash_distill_on_shard(2)
    with pytest.raises(RuntimeError):
        _teacher_files(tmp_path / "b", toy_files)
    disarm()
    broken = _teacher_files(tmp_path / "b", toy_files, resume=True)
    for name in [f"logits-{k:05d}.safetensors" for k in range(4)] + ["examples.parquet"]:
        assert (straight / name).read_bytes() == (broken / name).read_bytes(), name


def test_fp16_training_of_a_t5_slm_from_a_directory_is_refused(cli, toy_files, tmp_path):
    M.load_model("tiny-t5", role="SLM").save_pretrained(tmp_path / "t5dir")
    M.load_tokenizer("tiny-t5").save_pretrained(tmp_path / "t5dir")
    r = cli("train", toy_files["train"], "--slm", tmp_path / "t5dir", "--mixed-precision", "fp16", "--max-steps", "1",
            "--out", tmp_path / "run", code=2)
    assert "float16 is refused" in r.output and not (tmp_path / "run").exists()
