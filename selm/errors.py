"""One error type for bad input, so entry points can print it as one line and exit non-zero."""


class SELMError(Exception):
    """Bad input from the user (recipe, data, paths). The message names the file, key, row or value at fault."""
