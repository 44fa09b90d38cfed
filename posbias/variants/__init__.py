"""Built-in bias variants; importing this package registers them."""

from . import alibi, fire, kerple, sandwich, t5, vision  # noqa: F401
