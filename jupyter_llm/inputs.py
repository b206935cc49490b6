"""Bounded reading of what people hand us: spec, cluster, sweep and pipeline files, YAML text
and values. Every reader is size-limited, refuses text that is not UTF-8 with the file and
byte offset, and refuses YAML whose aliases would expand past a limit (a few lines of
"billion laughs" must not take a kernel's memory) -- each as a `UserError` naming the input.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

MAX_INPUT_BYTES = 1 << 20  # a spec, cluster or pipeline file; a REST body
MAX_YAML_NODES = 100_000  # scalars, lists and mappings once every alias is expanded


class InputError(UserError):
    """Input that cannot be read: too large, not UTF-8, not YAML, or a YAML bomb. `detail`
    is the message without the name of the input; `syntax` is true when the text is simply
    not YAML (a caller may then take it as a plain string); `too_large` when it is over the limit."""

    def __init__(self, source: str, detail: str, syntax: bool = False, too_large: bool = False):
        self.source, self.detail, self.syntax, self.too_large = source, detail, syntax, too_large
        super().__init__(f"{source}: {detail}")


def decode(data: bytes, source: str, max_bytes: int = MAX_INPUT_BYTES) -> str:
    """UTF-8 text of `data`, or an InputError naming the byte offset and line of a bad byte."""
    if len(data) > max_bytes:
        raise InputError(
            source, f"{len(data):,} bytes is more than the {max_bytes:,} allowed", too_large=True
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(
            source,
            f"not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
            "cannot be decoded; save the file as UTF-8",
        ) from None


def read_text(path: str | os.PathLike[str], max_bytes: int = MAX_INPUT_BYTES) -> str:
    """A text file's content, bounded and decoded as UTF-8 (errors name the file)."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise InputError(str(p), f"{size:,} bytes is more than the {max_bytes:,} allowed", too_large=True)
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputError(str(p), f"cannot be read: {e.strerror or e}") from None
    return decode(data, str(p), max_bytes)


def load_yaml(text: str, source: str = "<yaml>", max_nodes: int = MAX_YAML_NODES) -> Any:
    """`yaml.safe_load` with limits: the text's size and the node count once aliases expand."""
    if len(text) > MAX_INPUT_BYTES:
        raise InputError(
            source, f"{len(text):,} characters is more than the {MAX_INPUT_BYTES:,} allowed", too_large=True
        )
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _count(node, max_nodes, source)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e)
        raise InputError(source, f"not valid YAML{where}: {what}", syntax=True) from None
    except RecursionError:
        raise InputError(source, "YAML nested too deeply") from None
    finally:
        loader.dispose()


def _count(root: yaml.Node, limit: int, source: str) -> None:
    """Nodes under `root` with aliases expanded (each shared node counted once per use)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise InputError(source, "a YAML anchor refers to itself (a recursive structure)")
        open_.add(key)
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(c) for c in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        open_.discard(key)
        if n > limit:
            raise InputError(
                source, f"the YAML expands to more than {limit:,} values (aliases: '*name' repeats '&name')"
            )
        sizes[key] = n
        return n

    size(root)
