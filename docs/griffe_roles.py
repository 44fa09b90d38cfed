"""Griffe extension: Sphinx roles in docstrings become cross-references.

(Also drops the names a module imports but does not export in ``__all__``,
which inspecting the package would list.)

The docstrings use Sphinx roles (``:func:`name```, ``:meth:`~posbias.X.y```),
which Markdown shows as raw text. At docs build time each role becomes an
optional mkdocs-autorefs reference: a link when the target is on the API page,
inline code otherwise (no broken link, no warning). The source stays as is.
"""

from __future__ import annotations

import re
from html import escape

import griffe

ROLE = re.compile(r":(?:func|meth|class|data|mod|attr|exc|obj):`(~?)([\w.]+)(?:\(\))?`")


def _objects(obj: griffe.Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _resolve(obj: griffe.Object, target: str) -> str:
    if target.startswith("posbias"):
        return target
    first, _, rest = target.partition(".")
    scope = obj if obj.is_module or obj.is_class else obj.parent
    while scope is not None:
        if first in scope.members:
            base = scope.members[first]
            path = base.target_path if base.is_alias else base.path
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    return target


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        for obj in list(_objects(pkg)):
            if obj.is_module and obj.exports is not None:  # a module with __all__
                exports = {e if isinstance(e, str) else e.name for e in obj.exports}
                for name in [n for n, m in obj.members.items() if m.is_alias]:
                    if name not in exports:  # imported for internal use, not API
                        del obj.members[name]
            if obj.docstring is not None:
                text = obj.docstring.value
                obj.docstring.value = ROLE.sub(lambda m, o=obj: self._ref(o, m), text)

    @staticmethod
    def _ref(obj: griffe.Object, match: re.Match) -> str:
        short, target = match[1] == "~", match[2]
        title = target.rsplit(".", 1)[-1] if short else target
        path = _resolve(obj, target)
        return (
            f'<autoref identifier="{escape(path)}" optional><code>{escape(title)}</code></autoref>'
        )
