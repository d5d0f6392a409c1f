"""User-facing errors: one paragraph that names the file/field and the fix."""


class ErnasError(Exception):
    """An error caused by user input (a file, a field, a value). The CLI prints its message
    as one paragraph and exits with status 2, without a traceback."""
