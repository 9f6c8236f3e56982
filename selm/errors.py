"""One error type for bad input, so entry points can print it as one line and exit non-zero."""


class SELMError(Exception):
    """Bad input from the user (recipe, data, paths). The message names the file, key, row or value at fault."""


class SELMValueError(SELMError, ValueError):
    """A bad setting where trl's DPOTrainer raises ValueError: code that catches either keeps working."""
