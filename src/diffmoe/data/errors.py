"""The one exception the data pipeline raises for bad input or bad options."""


class DataError(ValueError):
    """Bad corpus, option or dataset. The message names the file, line, field or value at fault.

    A subclass of ``ValueError`` so that the CLI reports it as ``error: <message>`` (exit 2) without a
    traceback.
    """
