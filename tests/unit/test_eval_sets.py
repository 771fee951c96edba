"""Eval-set entries: names, dicts, defaults and the ConfigError that names the entry's key."""

from __future__ import annotations

import pytest

from rltrain.config import ConfigError
from rltrain.eval.sets import SHIPPED, EvalSet, parse_eval_set, parse_eval_sets


def test_a_name_is_a_set_with_the_defaults():
    assert parse_eval_set("gsm8k", "eval.sets[0]") == EvalSet(name="gsm8k")
    assert parse_eval_set("heldout", "eval.sets[0]").n == 1


def test_a_dict_keeps_its_options_and_nulls_take_the_defaults():
    spec = parse_eval_set({"name": "math500", "n": 4, "temperature": 1, "top_p": 0.95, "max_tokens": None}, "k")
    assert (spec.n, spec.temperature, spec.top_p, spec.max_tokens) == (4, 1.0, 0.95, None)


def test_every_shipped_name_parses():
    assert [parse_eval_set(name, "k").name for name in SHIPPED] == list(SHIPPED)


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("mmlu", "eval.sets[1].name"),
        ({"name": "gsm8k", "n": 0}, "eval.sets[1].n"),
        ({"name": "gsm8k", "n": True}, "eval.sets[1].n"),
        ({"name": "gsm8k", "temperature": -1}, "eval.sets[1].temperature"),
        ({"name": "gsm8k", "top_p": 0}, "eval.sets[1].top_p"),
        ({"name": "gsm8k", "max_tokens": 0}, "eval.sets[1].max_tokens"),
        ({"name": "gsm8k", "template": "fancy"}, "eval.sets[1].template"),
        ({"name": "gsm8k", "limit": -3}, "eval.sets[1].limit"),
        ({"name": "gsm8k", "reward": "no_such_grader"}, "eval.sets[1].reward"),
        ({"name": "gsm8k", "samples": 4}, "eval.sets[1]"),
        ({"path": "x.jsonl"}, "eval.sets[1].name"),
        (3, "eval.sets[1]"),
    ],
)
def test_a_bad_entry_names_its_key(entry, named):
    with pytest.raises(ConfigError) as info:
        parse_eval_sets(["heldout", entry], "eval.sets")
    assert str(info.value).startswith(named + "=")


def test_own_data_needs_a_path_and_names_must_be_unique():
    assert parse_eval_set({"name": "mine", "path": "data/mine.jsonl"}, "k").path == "data/mine.jsonl"
    with pytest.raises(ConfigError, match="unique"):
        parse_eval_sets(["gsm8k", {"name": "gsm8k", "n": 4}], "eval.sets")
