"""Tools a model calls (lm/agent): the calculator's exact arithmetic and refusals, and the
registry's schemas and runner (every failure an error result, nothing raised)."""

import json
import re
import sys
import textwrap
import time

import pytest

from lm.agent import registry
from lm.agent.calculator import MAX_DIGITS, CalculatorError, calculator, evaluate

TABLE = [
    ("1234 + 5678", "6912"),
    ("9999 + 1", "10000"),
    ("347 * 86", "29842"),
    ("123456789 * 987654321", "121932631112635269"),
    ("0.1 + 0.2", "0.3"),
    ("1.5 * 1.5", "2.25"),
    ("10 / 4", "2.5"),
    ("1 / 3", "~0.33333333333333333333"),
    ("2 / 3", "~0.66666666666666666667"),
    ("-7 // 2", "-4"),
    ("-7 % 3", "2"),
    ("7.5 % 2", "1.5"),
    ("2 ^ 10", "1024"),
    ("2 ** -2", "0.25"),
    ("-2 ^ 2", "-4"),
    ("(-2) ^ 2", "4"),
    ("2 ^ (3 + 1)", "16"),
    ("1,234,567 * 2", "2469134"),
    ("1_000 - 1", "999"),
    ("((1 + 2) * (3 - 4)) / -6", "0.5"),
    (".5 + .25", "0.75"),
    ("2 ^ 100", str(2**100)),
    ("3 - 5", "-2"),
    ("0.1 * 3 - 0.3", "0"),
]


@pytest.mark.parametrize("expression,expected", TABLE)
def test_calculator_is_exact(expression, expected):
    assert calculator(expression) == expected


@pytest.mark.parametrize("expression,message", [
    ('__import__("os").system("true")', "cannot read '__import__"),
    ("(1).real", "cannot read '.real'"),
    ("x + 1", "cannot read 'x + 1'"),
    ("9 ^ 9 ^ 9", "a power in an exponent"),
    ("2 ** 2 ** 2", "a power in an exponent"),
    ("9 ^ (9 ^ 9)", "an exponent over"),
    ("9 ^ 10000", f"more than {MAX_DIGITS} digits"),
    ("2 ^ 0.5", "only integer exponents"),
    ("1" * 501, "at most 500"),
    ("1 / 0", "division by zero"),
    ("0 ^ -1", "division by zero"),
    ("(1 + 2", "without its ')'"),
    ("1 +", "ends too early"),
    ("1 2", "unexpected"),
    ("3,4", "groups of three"),
    ("", "empty"),
])
def test_calculator_refuses_with_a_reason_and_in_bounded_time(expression, message):
    t = time.perf_counter()
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate(expression)
    assert time.perf_counter() - t < 0.5


def test_products_at_the_digit_limit_stay_fast():
    big = "9" * 240
    t = time.perf_counter()
    with pytest.raises(CalculatorError, match="digits"):
        evaluate("(9 ^ 300) * (9 ^ 300) * (9 ^ 300) * (9 ^ 300)")  # 1,145 digits: refused
    assert len(calculator(f"{big} * {big}")) == 480
    assert time.perf_counter() - t < 0.5


def test_the_calculators_schema_comes_from_its_signature_and_docstring():
    (tool,) = registry.resolve("calculator")
    spec = tool.spec()
    assert spec["type"] == "function" and spec["function"]["name"] == "calculator"
    params = spec["function"]["parameters"]
    assert params["required"] == ["expression"]
    assert params["properties"]["expression"]["type"] == "string"
    assert params["properties"]["expression"]["description"] == 'for example "1234 * 56"'
    assert spec["function"]["description"] == "Exact arithmetic: + - * / // % ^ and parentheses."


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_tools.py").write_text(textwrap.dedent('''
        import time

        def search(query: str, limit: int = 3, exact: bool | None = None) -> list:
            """Search the notes.

            Args:
                query: what to look for
                limit: at most this many
                    results (a continued line)
            """
            return [f"{query} {i}" for i in range(limit)]

        def boom(x: float):
            """Always fails."""
            raise RuntimeError("the index is gone")

        def hang():
            time.sleep(30)

        def huge() -> str:
            return "y" * 100_000

        def odd():
            return object()

        NOT_A_FUNCTION = 3
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_tools"
    sys.modules.pop("my_tools", None)


def test_user_functions_as_module_function(user_module):
    tools = registry.resolve(f"calculator, {user_module}:search,{user_module}:boom")
    search = tools[1].spec()["function"]
    assert search["name"] == "search" and search["description"] == "Search the notes."
    assert search["parameters"] == {"type": "object", "required": ["query"], "properties": {
        "query": {"type": "string", "description": "what to look for"},
        "limit": {"type": "integer", "description": "at most this many results (a continued line)"},
        "exact": {"type": "boolean"}}}
    assert json.loads(registry.run(tools, "search", '{"query": "jax", "limit": 2}')) == ["jax 0", "jax 1"]
    assert registry.run(tools, "calculator", {"expression": "6 * 7"}) == "42"


@pytest.mark.parametrize("names,message", [
    ("nope", "a built-in (calculator) or a function as module:function"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("my_tools:missing", "has no 'missing'"),
    ("my_tools:NOT_A_FUNCTION", "is not a function"),
    ("calculator,calculator", "two tools are named 'calculator'"),
])
def test_bad_tool_names_are_refused_by_name(user_module, names, message):
    with pytest.raises(registry.ToolError, match=re.escape(message)):
        registry.resolve(names)


def test_every_failure_is_an_error_result_never_an_exception(user_module):
    tools = registry.resolve(f"calculator,{user_module}:boom,{user_module}:hang,{user_module}:huge,"
                             f"{user_module}:odd")
    cases = {
        ("calculator", '{"expression": "2 ^ 3 ^ 4"}'): "error: CalculatorError: a power in an exponent",
        ("calculator", '{"expression": '): "error: the arguments are not valid JSON",
        ("calculator", "[1, 2]"): "error: the arguments must be a JSON object, not list",
        ("calculator", '{"expr": "1"}'): "error: missing a required argument: 'expression'",
        ("calculator", '{"expression": "1", "x": 2}'): "error: got an unexpected keyword argument 'x'",
        ("calculator", '{"expression": 5}'): "error: CalculatorError: the expression must be a string",
        ("boom", '{"x": 1}'): "error: RuntimeError: the index is gone",
        ("search", "{}"): "error: unknown tool 'search' (tools: calculator, boom, hang, huge, odd)",
    }
    for (name, args), want in cases.items():
        assert registry.run(tools, name, args).startswith(want), (name, args)
    t = time.perf_counter()
    assert registry.run(tools, "hang", "{}", timeout=0.3) == "error: the tool did not finish within 0.3 s"
    assert time.perf_counter() - t < 2
    out = registry.run(tools, "huge", "", max_chars=100)
    assert out.startswith("y" * 100) and out.endswith("[cut: 99900 more characters]")
    assert registry.run(tools, "odd", "{}").startswith('"<object object')  # not JSON: written as text
    assert registry.run(tools, "calculator", '{"expression": "1+1"}') == "2"
