"""trl's `TrlParser` over the recipe's dataclasses (imported only when a recipe is parsed: it imports trl)."""

import copy
import dataclasses
import types

from trl import TrlParser

from selm.errors import SELMError
from selm.recipe.schema import CONSTRAINT_KEYS, TRL_FIELDS, CheckedArguments


class RecipeParser(TrlParser):
    """TrlParser over the recipe's dataclasses. argparse sees only the help text: the constraint metadata is enforced
    by the schema's check pass (one message style for recipe and command-line values), and its errors are one line."""

    def __init__(self, classes, path=None, **kwargs):
        self.path = path
        # our own fields' choices are the check pass's; trl's fields keep argparse's choices
        self.checked = {f.name for cls in classes if issubclass(cls, CheckedArguments) for f in dataclasses.fields(cls)}
        super().__init__(classes, **kwargs)

    def _parse_dataclass_field(self, parser, field):
        field = copy.copy(field)
        ours = set(CONSTRAINT_KEYS) - ({"choices"} if field.name not in self.checked else set())
        metadata = {**field.metadata, **TRL_FIELDS.get(field.name, {})}
        field.metadata = types.MappingProxyType({k: v for k, v in metadata.items() if k not in ours})
        TrlParser._parse_dataclass_field(parser, field)

    def error(self, message):
        # argparse would print its usage (hundreds of lines here) and exit; say the one thing that is wrong instead
        raise SELMError(f"{self.path} (or its command-line overrides): {message}")
