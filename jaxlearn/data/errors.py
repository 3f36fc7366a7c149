"""The one exception type of the data layer.

Every message names the file (and line, record or key) that is wrong and says how to fix it,
so a user can act on it without reading a traceback. Example::

    raise DataError("data/a.jsonl:12: the line is not JSON (...). Fix or delete that line.")
"""


class DataError(ValueError):
    """Bad or missing data; the message says where and what to do about it."""
