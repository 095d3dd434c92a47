"""Synthesized "general agent" environments (spec §8, the paper's environment-synthesis recipe, small).

Each environment is a small in-memory store database generated from (level, seed), task-specific
tool functions over it (with OpenAI function schemas for the V3.2 chat format), one task and a
Python verifier that reads the final answer and the database state. Difficulty grows by level:

  1: look up one product's price                      (one tool call)
  2: find the cheapest product of a category          (list, then one lookup per product)
  3: order q units of the cheapest product of a category with at least q in stock
     (list, lookups, a state-changing order; verified on the database, not on the text)

As in the paper, an environment is kept only when its reference solution (Python over the same
tools) passes the verifier; otherwise the seed moves on. `run_episode` plays a text policy
through `chat.run_tool_loop` (tool results fed back, thinking retained within the turn) and
scores it; `AgentGame` is the same episode as a game for token-level rollouts
(rl/multiturn.py): each reply is parsed, its tool calls run (`chat.call_tool`) and the results
rendered by `encode_messages` after the reply's own tokens. A malformed completion scores 0,
never raises.
"""

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from deepseek_jax.chat import (
    CompletionError,
    call_tool,
    encode_messages,
    parse_completion,
    run_tool_loop,
)
from deepseek_jax.rl.rewards import Reward, parse_final_answer

LEVELS = (1, 2, 3)
_NAMES = ("apple", "bolt", "cable", "drill", "easel", "fan", "glove", "hammer", "ink", "jar", "kettle", "lamp",
          "mug", "nail", "oven", "pen", "quilt", "rope", "saw", "tape")
_CATEGORIES = ("kitchen", "tools", "office")


def _schema(name, description, properties, required):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


_SCHEMAS = {
    "list_products": _schema("list_products", "Names of the products in a category.",
                             {"category": {"type": "string", "description": "kitchen, tools or office"}},
                             ["category"]),
    "get_product": _schema("get_product", "Price, stock and category of a product.",
                           {"name": {"type": "string", "description": "The product name"}}, ["name"]),
    "place_order": _schema("place_order", "Order a quantity of a product (reduces its stock).",
                           {"name": {"type": "string", "description": "The product name"},
                            "quantity": {"type": "integer", "description": "Units to order"}},
                           ["name", "quantity"]),
}


@dataclasses.dataclass
class AgentEnv:
    level: int
    task: str
    db: dict[str, Any]                            # {"products": {name: {...}}, "orders": [(name, q)]}
    tool_names: tuple[str, ...]
    verify: Callable[[str, dict], bool]           # (final answer text, db) -> solved
    solution: Callable[[dict[str, Callable]], str]  # reference solution over the tools -> answer text

    def tools(self) -> dict[str, Callable[..., Any]]:
        """The tool functions, bound to this environment's database (they may change it)."""
        products, orders = self.db["products"], self.db["orders"]

        def list_products(category: str) -> list[str]:
            if category not in _CATEGORIES:
                raise ValueError(f"unknown category {category!r}; categories: {list(_CATEGORIES)}")
            return sorted(n for n, p in products.items() if p["category"] == category)

        def get_product(name: str) -> dict:
            if name not in products:
                raise KeyError(f"no product {name!r}")
            return dict(products[name])

        def place_order(name: str, quantity: int) -> str:
            if name not in products:
                raise KeyError(f"no product {name!r}")
            if not isinstance(quantity, int) or not 0 < quantity <= products[name]["stock"]:
                raise ValueError(f"quantity must be an int in [1, {products[name]['stock']}], got {quantity!r}")
            products[name]["stock"] -= quantity
            orders.append((name, quantity))
            return f"ordered {quantity} x {name}"

        every = {"list_products": list_products, "get_product": get_product, "place_order": place_order}
        return {n: every[n] for n in self.tool_names}

    def schemas(self) -> list[dict]:
        return [_SCHEMAS[n] for n in self.tool_names]

    def messages(self) -> list[dict]:
        """The episode's opening: a system message with the tool schemas and the task."""
        system = {"role": "system", "content": "You are a store assistant. Use the tools; end with the answer.",
                  "tools": self.schemas()}
        return [system, {"role": "user", "content": self.task}]


def _mentions(text, names):
    words = set(text.replace(".", " ").replace(",", " ").split())
    return {n for n in names if n in words}


def _build(level, rng):
    n = 4 + 2 * level
    names = [str(x) for x in rng.choice(_NAMES, n, replace=False)]
    products = {name: {"price": int(rng.integers(1, 100)), "stock": int(rng.integers(0, 10)),
                       "category": str(rng.choice(_CATEGORIES))} for name in names}
    db = {"products": products, "orders": []}
    if level == 1:
        name = names[0]
        price = products[name]["price"]
        return AgentEnv(level, f"What is the price of the {name}? Answer with the number.", db, ("get_product",),
                        verify=lambda text, db: parse_final_answer(text) == str(price),
                        solution=lambda tools: str(tools["get_product"](name)["price"]))
    category = products[names[0]]["category"]
    in_cat = [m for m in names if products[m]["category"] == category]
    if level == 2:
        cheapest = min(in_cat, key=lambda m: products[m]["price"])
        unique = sum(products[m]["price"] == products[cheapest]["price"] for m in in_cat) == 1

        def solve(tools):
            listed = tools["list_products"](category)
            return min(listed, key=lambda m: tools["get_product"](m)["price"])

        return AgentEnv(level, f"Which {category} product is the cheapest? Answer with its name.", db,
                        ("list_products", "get_product"),
                        verify=lambda text, db: unique and _mentions(text, names) == {cheapest}, solution=solve)
    q = int(rng.integers(1, 4))
    ok = [m for m in in_cat if products[m]["stock"] >= q]
    target = min(ok, key=lambda m: products[m]["price"]) if ok else None
    unique = target is not None and sum(products[m]["price"] == products[target]["price"] for m in ok) == 1

    def solve(tools):
        info = {m: tools["get_product"](m) for m in tools["list_products"](category)}
        name = min((m for m in info if info[m]["stock"] >= q), key=lambda m: info[m]["price"])
        return tools["place_order"](name, q)

    return AgentEnv(level, f"Order {q} units of the cheapest {category} product that has at least {q} in stock.",
                    db, ("list_products", "get_product", "place_order"),
                    verify=lambda text, db: unique and db["orders"] == [(target, q)], solution=solve)


def make_env(level: int, seed: int) -> AgentEnv:
    """An environment whose reference solution passes its verifier (the first such from `seed` on)."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    for attempt in range(100):
        env = _build(level, np.random.default_rng([seed, level, attempt]))
        trial = dataclasses.replace(env, db=copy.deepcopy(env.db))
        try:
            solved = trial.verify(trial.solution(trial.tools()), trial.db)
        except (KeyError, ValueError):
            solved = False
        if solved:
            return env
    raise ValueError(f"make_env: no solvable environment for level {level}, seed {seed} in 100 attempts")


def _verdict(env: AgentEnv, history: list[dict]) -> Reward:
    """The verifier's reward for a finished conversation: "correct", "wrong" or "unfinished"."""
    last = history[-1]
    if last["role"] != "assistant" or last.get("tool_calls"):
        return Reward(0.0, "unfinished")
    solved = env.verify(last.get("content") or "", env.db)
    return Reward(1.0 if solved else 0.0, "correct" if solved else "wrong")


def run_episode(complete: Callable[[str], str], env: AgentEnv, *, thinking_mode: str = "chat",
                max_steps: int = 8) -> tuple[list[dict], Reward]:
    """Plays `complete` (prompt text -> completion text) through the tool loop on a copy of the
    environment; the reward is the verifier's verdict on the final answer and the database.
    Returns (conversation, Reward); reasons: "correct", "wrong", "malformed", "unfinished"."""
    env = dataclasses.replace(env, db=copy.deepcopy(env.db))
    try:
        history = run_tool_loop(complete, env.messages(), env.tools(), thinking_mode=thinking_mode,
                                max_steps=max_steps)
    except CompletionError:
        return env.messages(), Reward(0.0, "malformed")
    return history, _verdict(env, history)


class AgentGame:
    """One episode of `env` (on a copy of its database) for `multiturn.play`.

    reward(): the verifier's verdict once the model answers without tool calls; "malformed" for
    a reply the chat format cannot parse, "truncated" for a reply cut by max_new_tokens, else
    "unfinished" (the episode ran out of turns or context)."""

    def __init__(self, env: AgentEnv, thinking_mode: str = "chat"):
        self.env = dataclasses.replace(env, db=copy.deepcopy(env.db))
        self.thinking_mode, self.tools = thinking_mode, self.env.tools()
        self.history, self.outcome = self.env.messages(), None

    def opening(self) -> str:
        return encode_messages(self.history, self.thinking_mode)

    def respond(self, completion: str, truncated: bool) -> str | None:
        if truncated:
            self.outcome = Reward(0.0, "truncated")
            return None
        try:
            reply = parse_completion(completion, self.thinking_mode)
        except CompletionError:
            self.outcome = Reward(0.0, "malformed")
            return None
        self.history.append(reply)
        if not reply["tool_calls"]:
            self.outcome = _verdict(self.env, self.history)
            return None
        results = [{"role": "tool", "content": call_tool(self.tools, call)} for call in reply["tool_calls"]]
        observation = encode_messages(results, self.thinking_mode, context=self.history)
        self.history += results
        return observation

    def reward(self) -> Reward:
        return self.outcome or Reward(0.0, "unfinished")

    def well_formed(self) -> bool:
        return self.outcome is None or self.outcome.reason not in ("malformed", "truncated")
