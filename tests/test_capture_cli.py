"""`moeprof capture` and workload files: exact messages and exit codes, no tracebacks."""

from __future__ import annotations

import json

import pytest
import transformers as tf

from moeprof.capture.run import byte_tokenizer
from moeprof.capture.workload import Prompt, parse_workload, plain_chat, read_workload
from moeprof.errors import WorkloadError
from moeprof.trace.reader import Trace


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = [
    json.dumps({"domain": "code", "text": "def f(x):"}),
    json.dumps({"domain": "chat", "messages": [{"role": "user", "content": "hi"}], "id": "c1", "dataset": "d"}),
]


def test_workload_parses_text_and_messages(tmp_path):
    prompts = read_workload(_write(tmp_path / "p.jsonl", GOOD + [""]))
    assert [p.domain for p in prompts] == ["code", "chat"]
    assert prompts[1].messages == (("user", "hi"),) and prompts[1].id == "c1" and prompts[1].line == 2
    assert prompts[1].render(None) == "user: hi\nassistant:"
    assert plain_chat([{"role": "system", "content": "s"}]) == "system: s\nassistant:"


def test_chat_template_is_used_when_the_tokenizer_has_one():
    tok = byte_tokenizer()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    p = Prompt(domain="chat", messages=(("user", "hey"),))
    assert p.render(tok) == "<user>hey<assistant>"


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "p.jsonl:2: not valid JSON"),
        ('{"domain": "code", "text": "x", "domian": "y"}', "p.jsonl:2: unknown field 'domian'; allowed fields: domain, text, messages, id, dataset"),
        ('{"text": "x"}', "p.jsonl:2: field 'domain' is required and must be a non-empty string"),
        ('{"domain": "code"}', "p.jsonl:2: give exactly one of 'text' or 'messages'"),
        ('{"domain": "code", "text": "x", "messages": []}', "p.jsonl:2: give exactly one of 'text' or 'messages'"),
        ('{"domain": "c", "messages": [{"role": "user"}]}', "p.jsonl:2: messages[0] must be an object"),
        ('{"domain": "c", "text": "x", "id": 1.5}', "p.jsonl:2: field 'id' must be a string or an integer"),
        ('[1, 2]', "p.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_bad_workload_lines_name_file_and_line(tmp_path, line, message):
    path = _write(tmp_path / "p.jsonl", [GOOD[0], line])
    with pytest.raises(WorkloadError) as err:
        read_workload(path)
    assert str(err.value).startswith(str(tmp_path / message.split(":")[0]) + ":" + message.split(":", 1)[1])


def test_duplicate_ids_and_limit():
    lines = [json.dumps({"domain": "a", "text": "x", "id": 7}), json.dumps({"domain": "a", "text": "y", "id": 7})]
    with pytest.raises(WorkloadError, match=r"w:2: id 7 repeats the id of line 1"):
        parse_workload(lines, source="w")
    assert len(parse_workload(lines, source="w", limit=1)) == 1


def test_cli_bad_prompts_line(cli, tmp_path):
    path = _write(tmp_path / "p.jsonl", [GOOD[0], "{oops"])
    r = cli("capture", "--prompts", path, "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert f"Error: {path}:2: not valid JSON" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert not (tmp_path / "t").exists()


def test_cli_unknown_field(cli, tmp_path):
    path = _write(tmp_path / "p.jsonl", ['{"domain": "code", "txt": "x"}'])
    r = cli("capture", "--prompts", path, "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert f"{path}:1: unknown field 'txt'; allowed fields: domain, text, messages, id, dataset" in " ".join(r.stderr.split())


def test_cli_existing_output_without_force(cli, tmp_path):
    path = _write(tmp_path / "p.jsonl", GOOD)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "something").write_text("x")
    r = cli("capture", "--prompts", path, "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert f"Error: {tmp_path / 't'} already exists; pass --force to replace it" in " ".join(r.stderr.split())
    assert "Traceback" not in r.stderr


def test_cli_missing_model_path(cli, tmp_path):
    path = _write(tmp_path / "p.jsonl", GOOD)
    r = cli("capture", "--model", tmp_path / "nope", "--prompts", path, "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert f"Error: --model {tmp_path / 'nope'}: no such directory" in " ".join(r.stderr.split())


def test_cli_model_without_moe_layers(cli, tmp_path):
    cfg = tf.LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    byte_tokenizer().save_pretrained(tmp_path / "dense")
    path = _write(tmp_path / "p.jsonl", GOOD)
    r = cli("capture", "--model", tmp_path / "dense", "--prompts", path, "--out", tmp_path / "t")
    assert r.exit_code == 2
    assert "no MoE layers found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "t").exists()


def test_cli_captures_with_the_default_model(cli, tmp_path):
    path = _write(tmp_path / "p.jsonl", GOOD + [json.dumps({"domain": "math", "text": "1+1="})])
    r = cli("capture", "--prompts", path, "--out", tmp_path / "t", "--max-new-tokens", "3", "--batch-size", "2", "--limit", "2")
    assert r.exit_code == 0, r.stderr
    assert "captured" in r.stdout and "requests" in r.stdout
    t = Trace.open(tmp_path / "t", verify="full")
    assert t.complete and t.manifest.source == "hf"
    req = t.requests()
    assert req["domain"].to_list() == ["code", "chat"]
    assert all(0 <= d <= 2 for d in req["decode_tokens"].to_list())  # 3 generated, the last never fed back
    layers = len(t.model.moe_layers)
    assert t.num_routing_rows == layers * int(req["prompt_tokens"].sum() + req["decode_tokens"].sum())
    assert t.manifest.capture["workload_ids"] == [None, "c1"]
    assert t.manifest.capture["decoding"] == "greedy"
