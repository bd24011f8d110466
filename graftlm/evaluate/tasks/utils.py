"""Functions the task templates of this folder name with `!function utils.NAME` (lm-eval imports this file by path)."""

from graftlm.evaluate.choice import xcopa_choice


def xcopa_choices(doc: dict) -> list[str]:
    """The two choices with a lowercased first letter, as lm-eval's own xcopa task writes them."""
    return [xcopa_choice(doc["choice1"]), xcopa_choice(doc["choice2"])]
