"""Priority tiers: which tier a file is in, from its metadata, its sidecars, rules and tags.

Rules are expressions over a file's metadata, written in the store's vault.toml, tried in order;
the first that holds names the tier:

    rating >= 4 or pick or label == 'red'      ->  select
    reject                                     ->  reject
    true                                       ->  general

Names an expression may use: rating (-1..5, 0 when unrated), label ('' when none), pick,
reject, keywords (a list: 'eagle' in keywords), camera, lens, iso, ext ('.nef'), path,
has_sidecar. Operators: and, or, not, ==, !=, <, <=, >, >=, in. Nothing else is evaluated: a
rule is data, not code.

A tag overrides the rules: the xattr user.vaultfs.tier on the file, or else on the nearest
folder above it that has one.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable

from ..store.recompress import MEDIA_KEY as LEVEL_KEY

FALLBACK = "general"  # when no rule holds
MAX_RULE = 500  # characters: keeps evaluation shallow (no deep recursion in a tree walk)
# The decisions where the newest source wins (in the file, or a sidecar saved later): a
# rating and a reject are one decision (a reject is a rating of -1 in most editors).
DECISIONS = (("rating", "reject"), ("label",), ("pick",))
# What a sidecar never lends its image: an image stays an image whatever its sidecar is, and
# the level its chunks were recompressed at is its own.
OWN_KEYS = ("kind", LEVEL_KEY)

_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
            ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}
NAMES = ("rating", "label", "pick", "reject", "keywords", "camera", "lens", "iso", "ext",
         "path", "has_sidecar", "true", "false")


class RuleError(ValueError):
    """A tier rule that cannot be read; the message says where."""


def compile_rule(text: str) -> Callable[[dict], bool]:
    """A rule's expression as a function of a file's variables (see the module's doc)."""
    if len(text) > MAX_RULE:
        raise RuleError(f"rule of {len(text)} characters: at most {MAX_RULE}")
    try:
        tree = ast.parse(text.strip(), mode="eval").body
        _check(tree, text)
    except SyntaxError as e:
        raise RuleError(f"rule {text!r}: {e.msg}") from None
    except RecursionError:
        raise RuleError(f"rule {text[:40]!r}...: nested too deeply") from None
    return lambda variables: bool(_eval(tree, variables))


def _check(node: ast.AST, text: str) -> None:
    if isinstance(node, ast.BoolOp) or isinstance(node, ast.UnaryOp) and \
            isinstance(node.op, ast.Not):
        for child in (node.values if isinstance(node, ast.BoolOp) else [node.operand]):
            _check(child, text)
    elif isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        for child in [node.left, *node.comparators]:
            _check(child, text)
    elif isinstance(node, ast.Name):
        if node.id not in NAMES:
            raise RuleError(f"rule {text!r}: unknown name {node.id!r} "
                            f"(known: {', '.join(NAMES)})")
    elif isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool)):
        pass
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and \
            isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
        pass  # a negative number: rating == -1
    elif isinstance(node, (ast.List, ast.Tuple)):
        for child in node.elts:
            _check(child, text)
    else:
        raise RuleError(f"rule {text!r}: only names, numbers, strings, comparisons, and, "
                        f"or, not are allowed")


def _eval(node: ast.AST, v: dict):
    if isinstance(node, ast.BoolOp):
        values = (_eval(n, v) for n in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -node.operand.value
        return not _eval(node.operand, v)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, v)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, v)
            try:
                if not _COMPARE[type(op)](left, right):
                    return False
            except TypeError:  # '3' < 4: a rule over a field of another type holds not
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        return {"true": True, "false": False}.get(node.id, v.get(node.id))
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_eval(n, v) for n in node.elts]
    return node.value


def effective(own: dict | None, own_time: int, sidecars: list[tuple[dict, int]]) -> dict:
    """A file's metadata with its sidecars': for each decision (rating with reject, label,
    pick) the newest source that makes it wins, whole; keywords and the editors whose settings
    are present (develop) are all of them; the rest is the file's own, else a sidecar's."""
    sources = sorted([(own_time, own or {})] + [(t, m) for m, t in sidecars],
                     key=lambda s: s[0], reverse=True)
    out = dict(own or {})
    for group in DECISIONS:
        for _, meta in sources:
            if any(key in meta for key in group):
                for key in group:
                    if key in meta:
                        out[key] = meta[key]
                    else:
                        out.pop(key, None)
                break
    for _, meta in sources:
        for key, value in meta.items():
            if key not in OWN_KEYS:
                out.setdefault(key, value)
    for key in ("keywords", "develop"):  # all of them: every source's keywords and editors
        values = sorted({k for _, m in sources for k in m.get(key, ())})
        if values:
            out[key] = values
    return out


def variables(meta: dict, path: str, has_sidecar: bool) -> dict:
    name = path.rsplit("/", 1)[-1]
    camera = " ".join(p for p in (meta.get("make"), meta.get("model")) if p)
    return {"rating": meta.get("rating", 0), "label": meta.get("label", ""),
            "pick": bool(meta.get("pick")), "reject": bool(meta.get("reject")),
            "keywords": meta.get("keywords", []), "camera": camera,
            "lens": meta.get("lens", ""), "iso": meta.get("iso", 0),
            "ext": ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else "",
            "path": path, "has_sidecar": has_sidecar}


class Tiers:
    """The ordered tiers of a store and their compiled rules."""

    def __init__(self, rules: list[tuple[str, str]]):
        self.names = [name for name, _ in rules]
        if FALLBACK not in self.names:
            self.names.append(FALLBACK)
        self._rules = [(name, compile_rule(text)) for name, text in rules]

    def tier_of(self, variables: dict, tag: str | None) -> str:
        if tag in self.names:  # a tag naming no tier (any more) leaves it to the rules
            return tag
        for name, rule in self._rules:
            if rule(variables):
                return name
        return FALLBACK
