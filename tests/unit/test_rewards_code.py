"""``code`` grader, pure parts: program extraction, test-case formats, output comparison, start-up checks."""

import json

import pytest

from rewards import code


def test_extract_program_prefers_the_last_python_fence():
    completion = "```python\nprint(1)\n```\ntext\n```bash\nls\n```\n```py\nprint(2)\n```\nbye"
    assert code.extract_program(completion) == "print(2)\n"


def test_extract_program_falls_back_to_any_fence_then_the_whole_text():
    assert code.extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert code.extract_program("print(4)") == "print(4)"
    assert code.extract_program("```python\nprint(5)\n") == "```python\nprint(5)\n"  # unclosed fence


@pytest.mark.parametrize(
    ("truth", "expected"),
    [
        ([{"input": "1 2\n", "output": "3\n"}], [{"input": "1 2\n", "output": "3\n"}]),
        ({"inputs": ["1\n"], "outputs": ["2\n"]}, [{"input": "1\n", "output": "2\n"}]),
        (json.dumps(["assert f(1) == 2"]), ["assert f(1) == 2"]),
    ],
)
def test_parse_tests_formats(truth, expected):
    assert code.parse_tests(truth) == expected


@pytest.mark.parametrize("truth", [[], {"inputs": [1], "outputs": [2], "fn_name": "f"}, [{"input": "1"}], 5])
def test_parse_tests_rejects_bad_ground_truth(truth):
    with pytest.raises(ValueError):
        code.parse_tests(truth)


def test_parse_tests_caps_the_number_of_cases():
    assert len(code.parse_tests(["assert True"] * 1000)) == code.MAX_TEST_CASES


@pytest.mark.parametrize(
    ("actual", "expected", "match"),
    [
        ("3\n", "3", True),
        ("3  \n\n\n", "3\n", True),
        ("1\n2\n", "1\n2", True),
        ("3", "4", False),
        ("1 2", "1  2", False),
    ],
)
def test_outputs_match_ignores_trailing_whitespace_only(actual, expected, match):
    assert code.outputs_match(actual, expected) is match


@pytest.mark.parametrize("params", [{"timeout_s": 0}, {"memory_mb": 10}])
def test_validate_params_rejects_bad_limits(params):
    with pytest.raises(ValueError):
        code.validate_params(params)
