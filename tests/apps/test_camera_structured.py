"""The camera pipeline with constrained answers: `--choices` and `--json-schema` make every answer
one of the choices or valid JSON (checked with jsonschema), the JSON line carries the parsed
`value`, and alerts fire on that value rather than on a regex over free text."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from edge_vlm.apps.camera.alerts import AlertRule
from edge_vlm.apps.camera.pipeline import structured_value
from edge_vlm.cli import main

SCHEMA = {"type": "object", "properties": {"person": {"type": "boolean"},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["person", "count"], "additionalProperties": False}


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("shots")
    rng = np.random.default_rng(4)
    for i in range(3):
        cv2.imwrite(str(folder / f"shot_{i}.png"), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return folder


def run(capsys, tiny_vila, shots, *extra):
    code = main(["camera", "--model", str(tiny_vila), "--source", str(shots), "--interval", "0",
                 "--max-context", "256", "--prompt", "Is there a person?", *extra])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_choices_constrain_every_answer_and_alert_on_the_value(capsys, tiny_vila, shots):
    # a random tiny model answers anything; sampled (seeded) so both choices have a chance
    code, lines, err = run(capsys, tiny_vila, shots, "--choices", "yes,no", "--alert", "yes", "--cooldown", "0",
                           "--temperature", "1.0", "--seed", "3", "--max-new-tokens", "8")
    assert code == 0 and len(lines) == 3, err
    for r in lines:
        assert r["value"] in ("yes", "no") and r["answer"] == r["value"]
        assert r["alert"] is (r["value"] == "yes")


def test_json_schema_answers_validate_and_alert_on_a_field(capsys, tiny_vila, shots, tmp_path):
    schema = tmp_path / "event.json"
    schema.write_text(json.dumps(SCHEMA))
    code, lines, err = run(capsys, tiny_vila, shots, "--json-schema", str(schema), "--alert", "person=true",
                           "--cooldown", "0", "--temperature", "0.8", "--seed", "1", "--max-new-tokens", "40")
    assert code == 0 and len(lines) == 3, err
    for r in lines:
        if r["value"] is None:  # only when the answer was cut short, and then it says so
            assert "cut short" in r["value_error"] and r["alert"] is False
            continue
        jsonschema.validate(r["value"], SCHEMA)
        assert json.loads(r["answer"]) == r["value"]
        assert r["alert"] is (r["value"]["person"] is True)
    assert any(r["value"] is not None for r in lines)


@pytest.mark.parametrize("argv,message", [
    (["--choices", "yes"], "at least two"),
    (["--json-schema", "/nonexistent/schema.json"], "cannot read"),
    (["--choices", "yes,no", "--server", "http://127.0.0.1:9"], "not with --server"),
])
def test_bad_structured_options_are_one_line_errors(capsys, tiny_vila, shots, argv, message):
    code, lines, err = run(capsys, tiny_vila, shots, *argv)
    assert code == 1 and lines == []
    assert message in err and len(err.strip().splitlines()) == 1


def test_invalid_schema_fails_before_the_model_loads(capsys, tiny_vila, shots, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = run(capsys, tiny_vila, shots, "--json-schema", str(bad))
    assert code == 1 and "is not JSON" in err


def test_alert_rules_on_values():
    assert AlertRule("yes", "choice").matches("yes", "yes") and not AlertRule("yes", "choice").matches("no", "no")
    assert not AlertRule("yes", "choice").matches("yes", None)  # a cut-short answer has no value
    rule = AlertRule("where.zone=door", "json")
    assert rule.matches("", {"where": {"zone": "Door"}}) and not rule.matches("", {"where": {"zone": "yard"}})
    assert not rule.matches("", {"where": 3}) and not rule.matches("", None)
    assert AlertRule("count=2", "json").matches("", {"count": 2}) and not AlertRule("count=2", "json").matches(
        "", {"count": "2x"})
    assert AlertRule('"label":"car"', "json").matches("", {"label": "car"})  # no '=': a regex over the JSON
    assert AlertRule("yes").matches("Yes, there is.") and not AlertRule("yes").matches("No, yes.")  # free text


def test_structured_value_says_when_an_answer_was_cut():
    assert structured_value('{"a":1}', "json", "eos") == {"value": {"a": 1}}
    assert structured_value("no", "choice", "eos") == {"value": "no"}
    cut = structured_value('{"a":', "json", "max_new_tokens")
    assert cut["value"] is None and "max_new_tokens" in cut["value_error"]
