"""`objective.type` -> the objective class and its typed config block.

Built-in methods are listed by name below: adding one is one line here and one module. Any
other class can be named directly as `package.module:Class` (your own objective, or a test's),
so a user's method needs no change to jaxlearn at all. Nothing is registered at import time:
names are resolved when a recipe is read. Example::

    objective_class("lm").Config          # LMConfig
    objective = build_objective(model, cfg)
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from jaxlearn.config import Config, ConfigError
from jaxlearn.data.formats import data_format

BUILTIN: dict[str, str] = {
    "lm": "jaxlearn.objectives.lm:LMObjective",
    "dpo": "jaxlearn.objectives.preference:DPO",
    "ipo": "jaxlearn.objectives.preference:IPO",
    "simpo": "jaxlearn.objectives.preference:SimPO",
    "orpo": "jaxlearn.objectives.preference:ORPO",
    "kto": "jaxlearn.objectives.preference:KTO",
    "reward": "jaxlearn.objectives.reward:RewardModel",
    "distill": "jaxlearn.objectives.distill:Distill",
    "grpo": "jaxlearn.objectives.rl:GRPO",
    "ppo": "jaxlearn.objectives.rl:PPO",
    "continual": "jaxlearn.objectives.continual:ContinualObjective",
}


def objective_class(type_name: str, where: str = "objective.type") -> type:
    """The `Objective` subclass named by `type_name` (a built-in name or `module:Class`).

    >>> objective_class("lm").__name__
    'LMObjective'
    """
    target = BUILTIN.get(type_name, type_name)
    if ":" not in target:
        close = difflib.get_close_matches(str(type_name), list(BUILTIN), n=1, cutoff=0.4)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{where}: unknown objective {type_name!r}.{hint} Built-in: {', '.join(BUILTIN)}; "
                          "or name your own class as package.module:Class.")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{where}: cannot import objective {target!r} ({e}). Check the module path and that "
                          "it is importable (installed, or on PYTHONPATH).") from None
    from jaxlearn.objectives.base import Objective

    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ConfigError(f"{where}: {target!r} is not a jaxlearn.objectives.base.Objective subclass.")
    return cls


def build_objective(model: Any, cfg: Config) -> Any:
    """The recipe's objective, bound to the policy `model`.

    >>> objective = build_objective(model, load_config(None))        # doctest: +SKIP
    """
    cls = objective_class(cfg.objective.type)
    if data_format(cfg.data) == "unpaired" and not cls.reads_unpaired:
        # unpaired rows put unrelated examples side by side: a pairwise loss on them is noise
        raise ConfigError(f"data.format=unpaired holds single labelled replies (prompt, completion, label), which "
                          f"objective.type={cfg.objective.type} cannot use: it compares a chosen and a rejected "
                          "reply to the same prompt. Use objective.type=kto, or pairs with data.format=preference.")
    if data_format(cfg.data) == "unpaired" and getattr(cfg.objective, "reference", "auto") == "stored":
        raise ConfigError("objective.reference=stored reads ref_chosen_logp/ref_rejected_logp from pair records; "
                          "unpaired records carry none. Use objective.reference=auto with data.format=unpaired.")
    return cls(model, cfg.objective, cfg)
