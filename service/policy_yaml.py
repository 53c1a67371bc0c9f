"""The one YAML reader for policy files: PyYAML's safe loader, minus the quirks that misread them.

Every file under ``policies/`` is read through :func:`load_policy_yaml` (or, where a loader needs
line numbers, :func:`compose_policy_yaml`). Both refuse, naming the file and the line:

- a key given twice in one mapping. Plain YAML keeps the last value, so a second ``rules:`` key
  would silently drop every rule above it, and a second ``min_returns:`` would change a
  threshold nobody sees in the first one;
- a merge key (``<<``), through which a mapping can hide the same overriding;
- an anchor (``&name``) or an alias (``*name``): a policy is a small hand-written file whose
  every value is written where it applies, and nested aliases can make a 3 KB file stand for
  billions of values that each reader walks (an "alias bomb"), hanging start-up;
- a whole number whose text is not plain decimal digits (optionally signed, no leading zero).
  YAML 1.1 reads ``024`` as octal 20, ``1:00`` as 60 (base 60), and also takes ``0x18``, ``0b1``
  and ``2_4``; a policy value means what it says in decimal or it does not load;
- a file that is not UTF-8 (PyYAML also reads UTF-16 after a byte order mark): the flagging
  policy is archived and served as the UTF-8 text it was read as.

Everything else is PyYAML's safe loading (no tags that construct Python objects).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import yaml

INT_TAG: Final = "tag:yaml.org,2002:int"
MERGE_TAG: Final = "tag:yaml.org,2002:merge"
PLAIN_DECIMAL: Final = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")


class PolicyYAMLError(ValueError):
    """A policy file is not YAML, or uses a quirk this reader refuses; the message names the file
    and, where there is one, the line."""


class _PolicyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing an anchor or alias as it meets one (before it is expanded
    or repeated anywhere)."""

    def __init__(self, content: str | bytes, *, source: str) -> None:
        super().__init__(content)
        self.source = source

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        # types-PyYAML leaves peek_event untyped; it returns the next event, unconsumed.
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.NodeEvent) and (
            isinstance(event, yaml.AliasEvent) or event.anchor is not None
        ):
            mark = event.start_mark
            where = f"{self.source}:{mark.line + 1}" if mark is not None else self.source
            raise PolicyYAMLError(
                f"{where}: anchors (&) and aliases (*) are not allowed in a policy file; write "
                "each value out"
            )
        return super().compose_node(parent, index)


def compose_policy_yaml(content: str | bytes, *, source: str) -> yaml.Node | None:
    """The checked node tree of one YAML document (None for an empty one); see the module."""
    with _loader(content, source=source) as loader:
        return _checked_root(loader, source=source)


def load_policy_yaml(content: str | bytes, *, source: str) -> Any:
    """The plain Python value (dicts, lists, text, numbers) of one checked YAML document."""
    with _loader(content, source=source) as loader:
        root = _checked_root(loader, source=source)
        return None if root is None else loader.construct_document(root)


@contextmanager
def _loader(content: str | bytes, *, source: str) -> Iterator[yaml.SafeLoader]:
    """A safe loader over ``content``; any YAML error is re-raised naming ``source``."""
    if isinstance(content, bytes):
        try:
            content = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyYAMLError(
                f"{source}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"
            ) from None
    try:
        loader = _PolicyLoader(content, source=source)
        try:
            yield loader
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        # One line, at the line where the parser gave up: its full report spans several.
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        raise PolicyYAMLError(f"{where}: not valid YAML: {exc.problem}") from exc
    except yaml.YAMLError as exc:
        raise PolicyYAMLError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from exc


def _checked_root(loader: yaml.SafeLoader, *, source: str) -> yaml.Node | None:
    root = loader.get_single_node()
    if root is not None:
        _check(root, source=source, key="")
    return root


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _check(node: yaml.Node, *, source: str, key: str) -> None:
    """Raise on the first duplicate key, merge key or non-decimal whole number, in file order.

    ``key`` is the mapping key the node is the value of (for the message). The tree is a tree:
    the loader refused any alias that would let a node appear twice.
    """
    if isinstance(node, yaml.ScalarNode):
        if node.tag == INT_TAG and not PLAIN_DECIMAL.fullmatch(node.value):
            named = f"{key}: " if key else ""
            raise PolicyYAMLError(
                f"{source}:{_line(node)}: {named}{node.value} is not a plain decimal whole number "
                "(YAML 1.1 reads a leading 0 as octal and colons as base 60, and takes 0x, 0b "
                "and _); write plain digits, or quote the value if it is text"
            )
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check(item, source=source, key=key)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == MERGE_TAG:
                raise PolicyYAMLError(
                    f"{source}:{_line(key_node)}: merge keys (<<) are not allowed in a policy "
                    "file; write each key out"
                )
            _check(key_node, source=source, key=key)
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else key
            if isinstance(key_node, yaml.ScalarNode):
                if name in first_line:
                    raise PolicyYAMLError(
                        f"{source}:{_line(key_node)}: key {name!r} is given twice in one mapping "
                        f"(first on line {first_line[name]}); YAML would keep only the last one"
                    )
                first_line[name] = _line(key_node)
            _check(value_node, source=source, key=name)
