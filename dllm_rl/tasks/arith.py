"""A small, bounded arithmetic parser with exact evaluation, for expressions written by a model.

Two grammars, both parsed by hand (never Python's eval / exec / ast / compile):

* ``strict`` — the fixed Countdown checker (docs/tasks.md, "Countdown"): non-negative integer literals, the
  binary operators ``+ - * /``, parentheses and ASCII whitespace. No unary minus, no decimals, no other
  character. ``parse_expression`` returns the exact value and the integer literals in order.
* ``python`` — what Python's ``eval`` accepts over the reference's character set (digits,
  ``+ - * / ( ) .`` and whitespace), so that d1's reward and eval parser can be
  reproduced without running eval: decimal literals (``2.5``, ``2.``, ``.5``), unary ``+``/``-``,
  ``**`` (right-associative, binding tighter than a unary minus on its left) and ``//``; an integer
  literal with a leading zero (``05``) is a syntax error as in Python, and a newline is only allowed
  inside parentheses. ``evaluate_reference`` returns the exact value.

Values are ``fractions.Fraction``, so ``/`` is true division with no rounding; division by zero fails.
Every input is handled in bounded time: the text is capped at ``MAX_EXPRESSION_CHARS`` (after operator
normalisation and stripping), parentheses and unary/power chains at ``MAX_DEPTH`` levels of recursion,
integer digit runs at ``MAX_LITERAL_DIGITS`` and every intermediate numerator and denominator at
``MAX_BITS`` bits (checked *before* a power is computed). Exceeding a limit is a failure (``None``),
like a syntax error; nothing raises. Known differences of the ``python`` grammar from eval, all on
inputs no Countdown answer needs: a non-integer exponent fails (eval gives a float or a complex), and
the limits above fail where eval would compute a huge number or a deeply nested expression.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

MAX_INPUT_CHARS = 2_000  # raw text longer than this is not looked at (cheap early exit)
MAX_EXPRESSION_CHARS = 200  # after normalisation and stripping
MAX_DEPTH = 20
MAX_LITERAL_DIGITS = 6
MAX_BITS = 256

# Operator spellings a model copies from LaTeX or typography; replaced before parsing (fixed checker).
OPERATOR_SPELLINGS: tuple[tuple[str, str], ...] = (
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\\div", "/"),
    ("\u00d7", "*"),  # ×
    ("\u00f7", "/"),  # ÷
)

DIGITS = frozenset("0123456789")
# ASCII only on purpose: str.isdigit() / isspace() accept e.g. Arabic-Indic digits and no-break spaces.
_STRICT_SPACE = frozenset(" \t\n\r\f\v")
# Python's tokenizer accepts space, tab and form feed anywhere, a newline only inside brackets, and
# rejects vertical tab and the other control characters.
_PYTHON_SPACE = frozenset(" \t\f")
_PYTHON_NEWLINE = frozenset("\n\r")


class _Fail(Exception):
    """Internal: the text is not an expression of the grammar (never escapes this module)."""


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A strict-grammar expression: its exact value and its integer literals in order of appearance."""

    value: Fraction
    literals: tuple[int, ...]


def normalise_operators(text: str) -> str:
    """``\\times``, ``\\cdot``, ``×`` → ``*`` and ``\\div``, ``÷`` → ``/``."""
    for spelling, op in OPERATOR_SPELLINGS:
        text = text.replace(spelling, op)
    return text


def digit_runs(text: str) -> list[int]:
    """The integers of every maximal run of ASCII digits, in order (the reference's lexical ``\\d+`` check).

    ``2.5`` gives [2, 5]: the reference counts numbers lexically. A run longer than MAX_LITERAL_DIGITS
    gives -1, a value no task number has, so it fails the comparison without a huge int() conversion.
    """
    out: list[int] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] in DIGITS:
            j = i
            while j < n and text[j] in DIGITS:
                j += 1
            out.append(int(text[i:j]) if j - i <= MAX_LITERAL_DIGITS else -1)
            i = j
        else:
            i += 1
    return out


def parse_expression(text: str) -> Parsed | None:
    """The strict-grammar expression in ``text`` (operators normalised, surrounding whitespace ignored), or None."""
    tokens = _tokens(text, python=False)
    if tokens is None:
        return None
    try:
        parser = _Parser(tokens, python=False)
        value = parser.parse()
    except _Fail:
        return None
    return Parsed(value, tuple(parser.literals))


def evaluate_reference(text: str) -> Fraction | None:
    """Exact value of ``text`` as Python's eval would compute it over digits, ``+-*/().`` and whitespace.

    No operator normalisation (the reference's training reward has none). None where eval would raise
    (syntax error, division by zero, a call such as ``2(3)``) or give a non-number (the empty tuple
    ``()``), and where a limit is hit.
    """
    tokens = _tokens(text, python=True)
    if tokens is None:
        return None
    try:
        return _Parser(tokens, python=True).parse()
    except _Fail:
        return None


# -------------------------------------------------------------------------------------------- tokenizer

# A token is an operator or parenthesis string, or a number: (value, the int of an integer literal or None).
Token = str | tuple[Fraction, int | None]


def _tokens(text: str, python: bool) -> list[Token] | None:
    """The token list of ``text``, or None for a character or literal the grammar does not allow."""
    if not isinstance(text, str) or len(text) > MAX_INPUT_CHARS:
        return None
    if not python:
        text = normalise_operators(text)
    text = text.strip()
    if not text or len(text) > MAX_EXPRESSION_CHARS:
        return None
    out: list[Token] = []
    depth = 0  # parenthesis depth, for Python's newline rule
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in DIGITS or (python and ch == "." and i + 1 < n and text[i + 1] in DIGITS):
            number, i = _number(text, i, python)
            if number is None:
                return None
            out.append(number)
            continue
        if ch in "+-":
            out.append(ch)
        elif ch in "*/":
            if python and i + 1 < n and text[i + 1] == ch:  # ** and // are one token in Python
                out.append(ch * 2)
                i += 1
            else:
                out.append(ch)
        elif ch in "()":
            depth += 1 if ch == "(" else -1
            out.append(ch)
        elif python:
            if ch in _PYTHON_NEWLINE:
                if depth <= 0:
                    return None
            elif ch not in _PYTHON_SPACE:
                return None
        elif ch not in _STRICT_SPACE:
            return None
        i += 1
    return out


def _number(text: str, i: int, python: bool) -> tuple[tuple[Fraction, int | None] | None, int]:
    """The number literal starting at ``i`` and the index after it; None for a literal the grammar rejects."""
    n = len(text)
    j = i
    while j < n and text[j] in DIGITS:
        j += 1
    whole = text[i:j]
    fraction = None
    if python and j < n and text[j] == ".":
        k = j + 1
        while k < n and text[k] in DIGITS:
            k += 1
        fraction, j = text[j + 1 : k], k
    if len(whole) > MAX_LITERAL_DIGITS or (fraction is not None and len(fraction) > MAX_LITERAL_DIGITS):
        return None, j
    if fraction is None:
        # "05" is a syntax error in Python; in the strict grammar it is not how a number is written.
        if len(whole) > 1 and whole[0] == "0" and (not python or whole.strip("0")):
            return None, j
        return (Fraction(int(whole)), int(whole)), j
    value = Fraction(int(whole or "0")) + (Fraction(int(fraction), 10 ** len(fraction)) if fraction else 0)
    return (value, None), j


# ------------------------------------------------------------------------------------------------ parser


def _bounded(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise _Fail
    return value


class _Parser:
    """Recursive descent over a token list; every recursion level counts against MAX_DEPTH.

    strict:  expr := term (("+" | "-") term)*      term := atom (("*" | "/") atom)*
             atom := INT | "(" expr ")"
    python:  expr := term (("+" | "-") term)*      term := unary (("*" | "/" | "//") unary)*
             unary := ("+" | "-") unary | power    power := atom ("**" unary)?
             atom := NUMBER | "(" expr ")"
    """

    def __init__(self, tokens: list[Token], python: bool) -> None:
        self.tokens = tokens
        self.python = python
        self.pos = 0
        self.depth = 0
        self.literals: list[int] = []

    def parse(self) -> Fraction:
        value = self._expr()
        if self.pos != len(self.tokens):
            raise _Fail
        return value

    def _peek(self) -> Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _descend(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _Fail

    def _expr(self) -> Fraction:
        value = self._term()
        while (op := self._peek()) in ("+", "-"):
            self.pos += 1
            right = self._term()
            value = _bounded(value + right if op == "+" else value - right)
        return value

    def _term(self) -> Fraction:
        operand = self._unary if self.python else self._atom
        value = operand()
        while (op := self._peek()) in ("*", "/", "//"):  # the tokenizer makes "//" in python mode only
            self.pos += 1
            right = operand()
            if op == "*":
                value = _bounded(value * right)
            elif right == 0:
                raise _Fail
            else:
                value = _bounded(value / right if op == "/" else Fraction(value // right))
        return value

    def _unary(self) -> Fraction:
        op = self._peek()
        if op in ("+", "-"):
            self.pos += 1
            self._descend()
            value = self._unary()
            self.depth -= 1
            return -value if op == "-" else value
        return self._power()

    def _power(self) -> Fraction:
        base = self._atom()
        if self._peek() != "**":
            return base
        self.pos += 1
        self._descend()
        exponent = self._unary()
        self.depth -= 1
        if exponent.denominator != 1 or (base == 0 and exponent < 0):
            raise _Fail
        # Estimate the result's size before computing it: 9**9**9 must fail, not run for minutes.
        bits = max(base.numerator.bit_length(), base.denominator.bit_length()) - 1
        if bits * abs(exponent.numerator) > MAX_BITS:
            raise _Fail
        return _bounded(base**exponent.numerator)

    def _atom(self) -> Fraction:
        token = self._peek()
        if isinstance(token, tuple):
            self.pos += 1
            value, literal = token
            if literal is not None:
                self.literals.append(literal)
            return value
        if token == "(":
            self.pos += 1
            self._descend()
            value = self._expr()
            self.depth -= 1
            if self._peek() != ")":
                raise _Fail
            self.pos += 1
            return value
        raise _Fail
