"""A small filter language, a subset of PocketBase's, compiled to a parameterised SQL condition.

    expr    := and ("||" and)*
    and     := primary ("&&" primary)*
    primary := "(" expr ")" | operand OP operand
    operand := identifier | @request.auth.<name> | 'text' | "text" | number | true | false | null
    OP      := = != > >= < <= ~ !~

Identifiers must name a known column. Anything else (any-of operators, relations, functions,
other ``@`` macros) raises ``FilterError`` with a message fit for the client, so that an
expression is either understood fully or refused, never half-applied.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Union

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<number>-?\d+(?:\.\d+)?)
      | (?P<op>!=|>=|<=|!~|\?\S*|=|>|<|~|&&|\|\||\(|\))
      | (?P<ident>@?[A-Za-z_][A-Za-z0-9_.:]*)
    )""",
    re.VERBOSE,
)
_COMPARISONS = {"=", "!=", ">", ">=", "<", "<=", "~", "!~"}
_AUTH_PREFIX = "@request.auth."
_MAX_LENGTH = 3500


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class Literal:
    value: Any


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class AuthField:
    name: str


Operand = Union[Literal, Column, AuthField]


@dataclass(frozen=True)
class Comparison:
    left: Operand
    op: str
    right: Operand


@dataclass(frozen=True)
class Logical:
    op: str  # "AND" or "OR"
    parts: tuple["Node", ...]


Node = Union[Comparison, Logical]


def _tokenize(text: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN_RE.match(text, pos)
        if match is None or match.end() == pos:
            raise FilterError(f"Unexpected character at position {pos + 1}.")
        kind = match.lastgroup
        assert kind is not None
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    return tokens


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]], columns: Collection[str]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.columns = columns

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise FilterError("Unexpected end of expression.")
        self.pos += 1
        return token

    def parse(self) -> Node:
        node = self.expr()
        if self.peek() is not None:
            raise FilterError(f"Unexpected {self.peek()[1]!r}.")  # type: ignore[index]
        return node

    def expr(self) -> Node:
        parts = [self.conjunction()]
        while self.peek() == ("op", "||"):
            self.take()
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else Logical("OR", tuple(parts))

    def conjunction(self) -> Node:
        parts = [self.primary()]
        while self.peek() == ("op", "&&"):
            self.take()
            parts.append(self.primary())
        return parts[0] if len(parts) == 1 else Logical("AND", tuple(parts))

    def primary(self) -> Node:
        if self.peek() == ("op", "("):
            self.take()
            node = self.expr()
            if self.take() != ("op", ")"):
                raise FilterError("Missing closing parenthesis.")
            return node
        left = self.operand()
        kind, op = self.take()
        if kind != "op" or op not in _COMPARISONS:
            raise FilterError(f"Unsupported operator {op!r}.")
        return Comparison(left, op, self.operand())

    def operand(self) -> Operand:
        kind, text = self.take()
        if kind == "string":
            body = text[1:-1]
            return Literal(re.sub(r"\\(.)", r"\1", body))
        if kind == "number":
            value = float(text) if "." in text else int(text)
            # SQLite integers are 64-bit: compare larger literals as floats.
            return Literal(float(value) if isinstance(value, int) and not -(2**63) <= value < 2**63 else value)
        if kind == "ident":
            lowered = text.lower()
            if lowered in ("true", "false"):
                return Literal(lowered == "true")
            if lowered == "null":
                return Literal(None)
            if text.startswith(_AUTH_PREFIX) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text[len(_AUTH_PREFIX) :]):
                return AuthField(text[len(_AUTH_PREFIX) :])
            if text.startswith("@"):
                raise FilterError(f"Unsupported macro or placeholder {text!r}.")
            if text not in self.columns:
                raise FilterError(f"Unknown field {text!r}.")
            return Column(text)
        raise FilterError(f"Unexpected {text!r}.")


def parse(text: str, columns: Collection[str]) -> Node:
    if len(text) > _MAX_LENGTH:
        raise FilterError("The expression is too long.")
    tokens = _tokenize(text)
    if not tokens:
        raise FilterError("The expression is empty.")
    return _Parser(tokens, columns).parse()


def to_sql(node: Node, auth: Mapping[str, Any] | None, table_alias: str = "") -> tuple[str, list[Any]]:
    """The SQL condition for ``node``; ``auth`` is the requesting auth record (``None`` for guests)."""
    params: list[Any] = []
    prefix = f"{table_alias}." if table_alias else ""

    def operand(value: Operand) -> tuple[str, Any]:
        if isinstance(value, Column):
            return prefix + '"' + value.name + '"', _NOT_LITERAL
        if isinstance(value, AuthField):
            resolved = (auth or {}).get(value.name)
            return "?", ("" if resolved is None else resolved)
        return "?", value.value

    def emit(current: Node) -> str:
        if isinstance(current, Logical):
            return "(" + f" {current.op} ".join(emit(part) for part in current.parts) + ")"
        left_sql, left_value = operand(current.left)
        right_sql, right_value = operand(current.right)
        op = current.op
        if right_value is None or left_value is None:
            subject = left_sql if right_value is None else right_sql
            if left_value is None and right_value is None:
                return "1" if op == "=" else "0"
            other = left_value if right_value is None else right_value
            if other is not _NOT_LITERAL:
                params.append(other)
            if op == "=":
                return f"({subject} IS NULL OR {subject} = '')"
            if op == "!=":
                return f"({subject} IS NOT NULL AND {subject} != '')"
            raise FilterError(f"Operator {op!r} cannot compare with null.")
        for value in (left_value, right_value):
            if value is not _NOT_LITERAL:
                params.append(_bool_to_int(value))
        if op in ("~", "!~"):
            if right_value is not _NOT_LITERAL and isinstance(right_value, str) and "%" not in right_value:
                params[-1] = "%" + right_value.replace("\\", "\\\\").replace("_", "\\_") + "%"
            negation = "NOT " if op == "!~" else ""
            return f"({left_sql} {negation}LIKE {right_sql} ESCAPE '\\')"
        return f"({left_sql} {op} {right_sql})"

    return emit(node), params


class _NotLiteral:
    pass


_NOT_LITERAL: Any = _NotLiteral()


def _bool_to_int(value: Any) -> Any:
    return int(value) if isinstance(value, bool) else value


def references_columns(node: Node) -> bool:
    if isinstance(node, Logical):
        return any(references_columns(part) for part in node.parts)
    return isinstance(node.left, Column) or isinstance(node.right, Column)
