"""Tools (schema, formats, loading), the calculator and feedback environments, their task data and config checks."""

from __future__ import annotations

import jinja2
import pytest
from fake_runtime import compose

from rltrain.config import ConfigError
from rltrain.config_rules import validate
from rltrain.data.tasks import generate_task
from rltrain.env.base import StepResult, as_step_result, clean_observation
from rltrain.env.calculator import CalculatorEnv, final_integer
from rltrain.env.feedback import FeedbackEnv
from rltrain.env.tools import HermesFormat, PlainTagFormat, ToolCall, call_tool, load_tools, tool_schema
from rltrain.env.worker import load_env, run_env_call


def lookup(city: str, days: int = 1, units: list | None = None) -> str:
    """Weather of a city.

    More text."""
    return f"{city}:{days}"


def test_schema_comes_from_the_signature():
    schema = tool_schema(lookup)["function"]
    assert schema["name"] == "lookup" and schema["description"] == "Weather of a city."
    assert schema["parameters"]["properties"] == {"city": {"type": "string"}, "days": {"type": "integer"}, "units": {}}
    assert schema["parameters"]["required"] == ["city"]


def test_tools_load_by_name_and_from_a_file(tmp_path):
    path = tmp_path / "mytools.py"
    path.write_text("def double(x: int) -> int:\n    return 2 * x\n")
    calc, double = load_tools(["calculator", f"{path}:double"])
    assert (calc.name, double.name) == ("calculator", "double")
    assert call_tool([calc, double], ToolCall("double", {"x": 21})) == ("42", False)
    assert call_tool([calc], ToolCall("calculator", {"expression": "47*83"})) == ("3901", False)
    text, failed = call_tool([calc], ToolCall("calculator", {"expression": "import os"}))
    assert failed and text.startswith("error: ValueError")
    assert call_tool([calc], ToolCall("nope", {}))[1]
    with pytest.raises(ConfigError, match="does not exist"):
        load_tools([f"{tmp_path}/missing.py:f"])


def test_plain_tag_format_parses_the_last_call():
    fmt = PlainTagFormat(load_tools(["calculator"]))
    assert fmt.parse("<calc>1+2</calc>") == ToolCall("calculator", {"expression": "1+2"})
    assert fmt.parse("no call 42") is None
    assert fmt.render_result("3", "<calc>1+2</calc>") == "\n<result>3</result>\n"
    assert fmt.render_result("3", "<calc>1+2</calc>\n") == "<result>3</result>\n"  # the newline was sampled


# Qwen2.5's chat template, its assistant and tool-message parts (what render_result must reproduce).
CHATML_TOOLS = (
    "{%- for m in messages %}"
    "{%- if m.role == 'tool' %}"
    "{%- if messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- m.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_hermes_format_continues_the_conversation_as_the_chat_template_renders_it():
    fmt = HermesFormat(load_tools(["calculator"]))
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
    assert fmt.parse(call + "<|im_end|>") == ToolCall("calculator", {"expression": "6*7"})
    assert fmt.parse("<tool_call>{not json}</tool_call>").name == ""
    template = jinja2.Template(CHATML_TOOLS)
    user = [{"role": "user", "content": "6*7?"}]
    prompt = template.render(messages=user, add_generation_prompt=True)
    after_tool = template.render(
        messages=[*user, {"role": "assistant", "content": call}, {"role": "tool", "content": "42"}],
        add_generation_prompt=True,
    )
    sampled_turn = call + "<|im_end|>"  # the model's turn ends with its stop token
    assert prompt + sampled_turn + fmt.render_result("42") == after_tool


def test_calculator_environment_rewards_the_final_answer_and_counts_calls():
    env = CalculatorEnv()
    env.reset({"answer": 3901})
    step = env.step("<calc>47*83</calc>", (1,))
    assert step == StepResult("\n<result>3901</result>\n", 0.0, False, {"tool_calls": 1.0, "tool_errors": 0.0})
    assert env.step("3901<|endoftext|>", (2,)) == StepResult("", 1.0, True, {"acc": 1.0})
    assert final_integer("so 12 then 3900") == 3900 and final_integer("none") is None
    capped = CalculatorEnv(max_calls=1)
    capped.reset({"answer": 1})
    capped.step("<calc>1</calc>", ())
    assert capped.step("<calc>1</calc>", ()).done


def test_feedback_environment_retries_until_right_or_out_of_attempts():
    answer = {"target": 21, "numbers": [4, 17]}
    env = FeedbackEnv(max_attempts=3, attempt_cost=0.1)
    env.reset({"answer": answer})
    first = env.step("<answer>17-4</answer>", ())
    assert first == StepResult("\n<fb>=13</fb>\n", 0.0, False, {"first_acc": 0.0})
    assert env.step("<answer>4+4</answer>\n", ()).observation == "<fb>use 4, 17</fb>\n"
    last = env.step("<answer>17+4</answer>", ())
    assert last.done and last.reward == pytest.approx(0.8) and last.metrics == {"acc": 1.0, "attempts": 3}
    state = load_env({"fn": "feedback", "params": {"max_attempts": 2}, "max_observation_chars": 100})
    kind, out = run_env_call(state, {"answer": answer}, [("<answer>17-4</answer>", ()), ("<answer>x</answer>", ())])
    assert kind == "ok" and out["done"] and out["reward"] == 0.0 and out["metrics"]["attempts"] == 2


def test_feedback_code_mode_runs_the_program_in_the_sandbox():
    env = FeedbackEnv(mode="code", max_attempts=2)
    env.reset({"answer": ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]})
    wrong = env.step("```python\ndef add(a, b):\n    return a - b\n```", ())
    assert not wrong.done and wrong.observation.startswith("\n<fb>passed 0 of 2 tests; AssertionError")
    assert env.step("```python\ndef add(a, b):\n    return a + b\n```", ()).reward == 1.0


def test_step_results_are_checked_and_observations_cleaned():
    assert as_step_result(("x", 1, True)) == StepResult("x", 1.0, True, {})
    for bad in (None, ("x", float("nan"), True), ("x", 0.0, True, {"m": "no"}), StepResult(observation=3)):
        with pytest.raises(TypeError):
            as_step_result(bad)
    assert clean_observation(b"a\xffb", 10) == ("a\ufffdb", False, True)
    assert clean_observation("a\udcffb", 10) == ("a?b", False, True)
    assert clean_observation("x" * 20, 5) == ("xxxxx", True, False)


def test_task_data_traces_match_what_the_environments_answer():
    train, _ = generate_task("calculator", 3, 2, 0)
    row = train[0]
    call, rest = row["solution"].split("</calc>")
    env = CalculatorEnv()
    env.reset(row)
    assert rest == env.step(call + "</calc>", ()).observation + str(row["answer"])
    assert generate_task("calculator", 3, 2, 0, tool=False)[0][0]["solution"] == str(row["answer"])
    retry = [r for r in generate_task("countdown_retry", 50, 2, 0, num_numbers=2)[0] if "<fb>" in r["solution"]]
    assert retry
    env = FeedbackEnv()
    env.reset(retry[0])
    attempt, rest = retry[0]["solution"].split("</answer>", 1)
    assert rest.startswith(env.step(attempt + "</answer>", ()).observation)


def test_env_config_is_checked_before_the_run(tmp_path):
    validate(compose(["env.fn=calculator"]))
    with pytest.raises(ConfigError, match="env.fn: file .* does not exist"):
        validate(compose([f"env.fn={tmp_path}/none.py:Env"]))
    with pytest.raises(ConfigError, match="env.params="):
        validate(compose(["env.fn=calculator", "+env.params.colour=red"]))
    with pytest.raises(ConfigError, match="env.max_turns=0"):
        validate(compose(["env.fn=calculator", "env.max_turns=0"]))
    with pytest.raises(ConfigError, match="rollout.sampler='tree'"):
        validate(compose(["env.fn=calculator", "rollout.sampler=tree"]))
    with pytest.raises(ConfigError, match=r"trainer.eval_sets=.*leave trainer.eval_sets empty"):
        validate(compose(["env.fn=calculator", "trainer.eval_sets=[{name:gsm8k,limit:4}]"]))
