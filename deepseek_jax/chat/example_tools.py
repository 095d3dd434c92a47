"""Example tools for the tool-calling loop, with their OpenAI function schemas.

`calculate` evaluates arithmetic by walking its `ast` (numbers, + - * / // % **, unary signs,
parentheses; no names, calls or attributes) with a bound on number size; `make_clock` answers
with an injected time, so runs are reproducible; `make_lookup` reads a small in-memory table.
A tool signals failure by raising; `run_tool_loop` turns that into the tool's result text.
"""

import ast
import datetime
import operator
import zoneinfo
from collections.abc import Callable, Mapping
from typing import Any

_MAX_EXPRESSION_CHARS = 1000
_MAX_INT_BITS = 4096
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _function_schema(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


CALCULATE_SCHEMA = _function_schema(
    "calculate", "Evaluate an arithmetic expression with + - * / // % ** and parentheses.",
    {"expression": {"type": "string", "description": "The expression, e.g. (2 + 3) * 4 ** 2"}}, ["expression"])
CURRENT_TIME_SCHEMA = _function_schema(
    "current_time", "Get the current date and time in a timezone.",
    {"timezone": {"type": "string", "description": "An IANA timezone, e.g. UTC, Asia/Shanghai"}}, [])
LOOKUP_SCHEMA = _function_schema(
    "lookup", "Look up the value stored under a key in the knowledge table.",
    {"key": {"type": "string", "description": "The key to look up"}}, ["key"])


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression; ValueError for anything else."""
    if not isinstance(expression, str) or len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression must be a string of at most {_MAX_EXPRESSION_CHARS} characters")
    return _evaluate(ast.parse(expression, mode="eval").body)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int) \
                and abs(left) > 1 and right * max(abs(left).bit_length() - 1, 1) > _MAX_INT_BITS:
            raise ValueError(f"{left} ** {right} is too large")
        value = _BINARY[type(node.op)](left, right)
        if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
            raise ValueError("the result is too large")
        if isinstance(value, complex):
            raise ValueError(f"{left} ** {right} is not a real number")
        return value
    raise ValueError(f"unsupported expression element: {ast.unparse(node)!r}")


def make_clock(now: datetime.datetime) -> Callable[..., dict]:
    """`current_time(timezone="UTC")` that always answers with `now` (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("make_clock: `now` must be timezone-aware, e.g. datetime(..., tzinfo=timezone.utc)")

    def current_time(timezone: str = "UTC") -> dict:
        local = now.astimezone(zoneinfo.ZoneInfo(timezone))
        return {"datetime": local.isoformat(), "weekday": local.strftime("%A"), "timezone": timezone}

    return current_time


def make_lookup(table: Mapping[str, Any]) -> Callable[[str], Any]:
    """`lookup(key)` over a copy of `table`; an unknown key raises KeyError listing the known ones."""
    table = dict(table)

    def lookup(key: str) -> Any:
        if key not in table:
            raise KeyError(f"no entry for {key!r}; known keys: {sorted(table)}")
        return table[key]

    return lookup


def example_tools(now: datetime.datetime, table: Mapping[str, Any]) -> tuple[dict[str, Callable], list[dict]]:
    """The three example tools by name and their schemas (put the schemas on the system message)."""
    tools = {"calculate": calculate, "current_time": make_clock(now), "lookup": make_lookup(table)}
    return tools, [CALCULATE_SCHEMA, CURRENT_TIME_SCHEMA, LOOKUP_SCHEMA]
