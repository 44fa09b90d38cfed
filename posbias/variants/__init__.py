"""Built-in bias variants; importing this package registers them."""

from . import alibi  # noqa: F401
