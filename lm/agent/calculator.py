"""The built-in calculator: exact arithmetic on integers and decimals, parsed by a small grammar.

    expression := term (("+" | "-") term)*
    term       := unary (("*" | "/" | "//" | "%") unary)*
    unary      := ("+" | "-") unary | power
    power      := atom (("^" | "**") unary)?        (right-associative; no tower: a^b^c is refused)
    atom       := number | "(" expression ")"
    number     := digits ["." digits] | "." digits  (with "_" or "," between digit groups)

Nothing is evaluated by Python: the text is tokenised by a regular expression and reduced
by this grammar over `fractions.Fraction`, so 0.1 + 0.2 is exactly 0.3 and integers have no
size but the limits: an expression of at most MAX_CHARS characters, numbers (operands and
every intermediate result) of at most MAX_DIGITS digits, integer exponents of at most
MAX_EXPONENT. A result that is not an integer is written as a decimal, exact when it
terminates within DECIMALS places, else rounded to DECIMALS places (half to even) and
marked with "~". Errors are `CalculatorError` with a message meant for the model to read.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_CHARS = 500
MAX_DIGITS = 1000
MAX_EXPONENT = 10_000
DECIMALS = 20

_TOKEN = re.compile(r"\s*(?:(\d[\d_,]*(?:\.\d+)?|\.\d+)|(\*\*|//|[-+*/%^()]))")


class CalculatorError(ValueError):
    """An expression the calculator refuses, with why."""


def _tokens(text: str) -> list[tuple[str, object]]:
    out, i = [], 0
    text = text.strip()
    while i < len(text):
        m = _TOKEN.match(text, i)
        if not m or m.end() == i:
            bad = text[i:].lstrip()[:20]
            raise CalculatorError(f"cannot read {bad!r}: only numbers, + - * / // % ^ ** and parentheses are allowed")
        number, op = m.groups()
        if number is not None:
            digits = number.replace("_", "").replace(",", "")
            if re.fullmatch(r"\d{1,3}(,\d{3})*(\.\d+)?", number) is None and "," in number:
                raise CalculatorError(f"{number!r}: commas go between groups of three digits")
            out.append(("num", _check(Fraction(digits))))
        else:
            out.append(("op", op))
        i = m.end()
    return out


def _log10(n: int) -> float:
    return math.log10(abs(n)) if n else 0.0


def _check(x: Fraction) -> Fraction:
    if max(len(str(abs(x.numerator))), len(str(x.denominator))) > MAX_DIGITS:
        raise CalculatorError(f"a number of more than {MAX_DIGITS} digits: too large")
    return x


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, *ops):
        kind, value = self.peek()
        if kind == "op" and value in ops:
            self.i += 1
            return value
        return None

    def expression(self) -> Fraction:
        x = self.term()
        while (op := self.take("+", "-")) is not None:
            y = self.term()
            x = _check(x + y if op == "+" else x - y)
        return x

    def term(self) -> Fraction:
        x = self.unary()
        while (op := self.take("*", "/", "//", "%")) is not None:
            y = self.unary()
            if op == "*":
                x = _check(x * y)
                continue
            if y == 0:
                raise CalculatorError("division by zero")
            if op == "/":
                x = _check(x / y)
            elif op == "//":
                x = Fraction(x // y)
            else:
                x = _check(x - y * (x // y))
        return x

    def unary(self, in_exponent: bool = False) -> Fraction:
        if (op := self.take("+", "-")) is not None:
            x = self.unary(in_exponent)
            return -x if op == "-" else x
        return self.power(in_exponent)

    def power(self, in_exponent: bool) -> Fraction:
        base = self.atom()
        if self.take("^", "**") is None:
            return base
        if in_exponent:
            raise CalculatorError("a power in an exponent (a tower such as 2^3^4) is not computed")
        exp = self.unary(in_exponent=True)
        if exp.denominator != 1:
            raise CalculatorError("only integer exponents are computed")
        e = exp.numerator
        if abs(e) > MAX_EXPONENT:
            raise CalculatorError(f"an exponent over {MAX_EXPONENT}: too large")
        if base == 0 and e < 0:
            raise CalculatorError("division by zero (0 to a negative power)")
        if abs(base) not in (0, 1) and abs(e) * max(_log10(base.numerator), _log10(base.denominator)) > MAX_DIGITS:
            raise CalculatorError(f"the result would have more than {MAX_DIGITS} digits")
        return _check(base ** e)

    def atom(self) -> Fraction:
        kind, value = self.peek()
        if kind == "num":
            self.i += 1
            return value
        if self.take("("):
            x = self.expression()
            if not self.take(")"):
                raise CalculatorError("a '(' without its ')'")
            return x
        raise CalculatorError("the expression ends too early" if kind is None else f"unexpected {value!r}")


def evaluate(expression: str) -> Fraction:
    """The exact value of `expression` (see the module's grammar and limits)."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be a string, not {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"the expression has {len(expression)} characters; at most {MAX_CHARS}")
    tokens = _tokens(expression)
    if not tokens:
        raise CalculatorError("an empty expression")
    parser = _Parser(tokens)
    value = parser.expression()
    if parser.i < len(tokens):
        raise CalculatorError(f"unexpected {parser.peek()[1]!r}")
    return value


def format_number(x: Fraction) -> str:
    """An integer as is; a fraction as a decimal: exact if it ends within DECIMALS places,
    else rounded (half to even) and marked "~"."""
    if x.denominator == 1:
        return str(x.numerator)
    scaled = x * 10**DECIMALS
    rounded = round(scaled)  # Fraction.__round__: half to even
    sign = "-" if rounded < 0 else ""
    digits = str(abs(rounded)).rjust(DECIMALS + 1, "0")
    text = f"{sign}{digits[:-DECIMALS]}.{digits[-DECIMALS:]}".rstrip("0").rstrip(".")
    return text if rounded == scaled else "~" + text


def calculator(expression: str) -> str:
    """Exact arithmetic: + - * / // % ^ and parentheses.

    Args:
        expression: for example "1234 * 56"
    """
    return format_number(evaluate(expression))
