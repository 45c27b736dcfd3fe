"""MATH answer grading as CS336's `r1_zero_reward_fn` does it in its default (fast) mode.

Two checks, either one suffices (written here from their documented behaviour):

1. Hendrycks MATH string normalisation (`hendrycks_normalize`): strip LaTeX spacing,
   `\\left`/`\\right`, units, degrees, `\\$`, `\\%`, fix `\\frac12`/`\\sqrt3`/`a/b`
   shorthands, then compare strings. Unreduced fractions stay unequal on purpose.
2. Minerva-style normalisation (`minerva_normalize`), then element-wise comparison of
   tuples/intervals with sympy: integers must match literally, `a/b` fractions must
   match literally, anything else is equal when `simplify(gt - given) == 0`.

No wall-clock timeout is involved anywhere, so a grade never depends on machine load.
The reference's `fast=False` adds HF math-verify as a fallback (`fast=False` here too;
that fallback has math-verify's own timeouts and is load-dependent, as in the reference).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

# ---------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------


def last_boxed(text: str) -> Optional[str]:
    """The contents of the last `\\boxed{...}` (or the `\\fbox` span), None when unbalanced."""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth, end = 0, None
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                end = i
                break
    if end is None:
        return None
    span = text[start : end + 1]
    if not span.startswith("\\boxed{") or not span.endswith("}"):
        return None  # `\boxed 5`, `\fbox{..}`: the reference extracts nothing from these
    return span[len("\\boxed{") : -1]


def extract_answer(text: str) -> Optional[str]:
    """Boxed answer, else the part after a GSM8K `####` marker, else None."""
    if "\\boxed" in text:
        return last_boxed(text)
    if "####" in text:
        return text.split("####")[-1].strip()
    return None


# ---------------------------------------------------------------------------------------
# Check 1: Hendrycks MATH normalisation
# ---------------------------------------------------------------------------------------

# Unit words (MathQA's list) removed when they stand alone; used as regex fragments, as
# the reference does, so "." in "q ." matches any character. Each also with a plural "s".
_UNIT_WORDS = [
    "east",
    "degree",
    "mph",
    "kmph",
    "ft",
    "m sqaure",
    " m east",
    "sq m",
    "deg",
    "mile",
    "q .",
    "monkey",
    "prime",
    "ratio",
    "profit of rs",
    "rd",
    "o",
    "gm",
    "p . m",
    "lb",
    "tile",
    "per",
    "dm",
    "lt",
    "gain",
    "ab",
    "way",
    "west",
    "a .",
    "b .",
    "c .",
    "d .",
    "e .",
    "f .",
    "g .",
    "h .",
    "t",
    "a",
    "h",
    "no change",
    "men",
    "soldier",
    "pie",
    "bc",
    "excess",
    "st",
    "inches",
    "noon",
    "percent",
    "by",
    "gal",
    "kmh",
    "c",
    "acre",
    "rise",
    "a . m",
    "th",
    "π r 2",
    "sq",
    "mark",
    "l",
    "toy",
    "coin",
    "sq . m",
    "gallon",
    "° f",
    "profit",
    "minw",
    "yr",
    "women",
    "feet",
    "am",
    "pm",
    "hr",
    "cu cm",
    "square",
    "v â € ™",
    "are",
    "rupee",
    "rounds",
    "cubic",
    "cc",
    "mtr",
    "s",
    "ohm",
    "number",
    "kmph",
    "day",
    "hour",
    "minute",
    "min",
    "second",
    "man",
    "woman",
    "sec",
    "cube",
    "mt",
    "sq inch",
    "mp",
    "∏ cm ³",
    "hectare",
    "more",
    "sec",
    "unit",
    "cu . m",
    "cm 2",
    "rs .",
    "rs",
    "kg",
    "g",
    "month",
    "km",
    "m",
    "cm",
    "mm",
    "apple",
    "liter",
    "loss",
    "yard",
    "pure",
    "year",
    "increase",
    "decrease",
    "d",
    "less",
    "Surface",
    "litre",
    "pi sq m",
    "s .",
    "metre",
    "meter",
    "inch",
]
_UNIT_PATTERNS = [re.compile(r"(^|\W)" + u + r"($|\W)") for u in _UNIT_WORDS + [u + "s" for u in _UNIT_WORDS]]
_ENCLOSING_TEXT = re.compile(r"^\\text\{(?P<text>.+?)\}$")


class _Unnormalisable(Exception):
    """The Hendrycks steps hit a form they do not handle; the answer is compared as is."""


def _braced_fracs(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{7}` -> `\\frac{1}{7}`; `\\frac{..}` untouched."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part:
            raise _Unnormalisable  # "\frac" at the very end
        if part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        num, den, rest = part[0], part[1], part[2:]
        out += "{" + num + "}" + (den if den == "{" else "{" + den + "}") + rest
    return out


def _slash_to_frac(s: str) -> str:
    """`3/4` (two plain integers, nothing else) -> `\\frac{3}{4}`."""
    pieces = s.split("/")
    if len(pieces) != 2:
        return s
    try:
        a, b = int(pieces[0]), int(pieces[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def _braced_sqrt(s: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}`."""
    if "\\sqrt" not in s:
        return s
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if not part:
            raise _Unnormalisable  # "\sqrt" at the very end
        out += "\\sqrt" + (part if part[0] == "{" else "{" + part[0] + "}" + part[1:])
    return out


def _hendrycks_steps(s: str) -> str:
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s)
    s = s.replace("bmatrix", "pmatrix").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "")
    without_text_unit = re.sub(r"\\text{.*?}$", "", s).strip()  # "5 \text{ miles}" -> "5"
    if without_text_unit and without_text_unit != s:
        s = without_text_unit
    for _ in range(2):
        for pattern in _UNIT_PATTERNS:
            stripped = pattern.sub(r"\1\2", s)
            if stripped:
                s = stripped
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # units written as "\text{ cm}" on the right
        pieces = s.split("\\text{ ")
        if len(pieces) != 2:
            raise _Unnormalisable
        s = pieces[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> "5"
        s = sides[1]
    s = _braced_sqrt(s).replace(" ", "")
    s = _braced_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def hendrycks_normalize(answer: Optional[str]) -> Optional[str]:
    """Hendrycks et al. (MATH) answer normalisation, as CS336's grader applies it."""
    if answer is None:
        return None
    answer = answer.strip()
    m = _ENCLOSING_TEXT.search(answer)
    if m is not None:
        answer = m.group("text").strip()
    try:
        return _hendrycks_steps(answer)
    except _Unnormalisable:
        return answer


# ---------------------------------------------------------------------------------------
# Check 2: Minerva-style normalisation + sympy
# ---------------------------------------------------------------------------------------

_MINERVA_UNITS = [
    "degree",
    "cm",
    "centimeter",
    "meter",
    "mile",
    "second",
    "minute",
    "hour",
    "day",
    "week",
    "month",
    "year",
    "foot",
    "feet",
    "inch",
    "yard",
]
_MINERVA_UNIT_PATTERNS = [re.compile(u + r"(es)?(s)? *(\^[0-9]+)?") for u in _MINERVA_UNITS]
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_TUPLE_CHARS = "()[]"
# sympy can hang on these; the reference refuses to evaluate them (a plain "not equal")
_NO_EVAL_SUBSTRINGS = ("^{", "^(")
_NO_EVAL_PATTERNS = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))


def _drop_thousands_commas(s: str) -> str:
    while True:
        nxt = _THOUSANDS_COMMA.sub(r"\1\3\4", s)
        if nxt == s:
            return s
        s = nxt


def _as_float(s: str) -> Optional[float]:
    try:
        return float(s)
    except ValueError:
        return None


def _is_whole(x: float) -> bool:
    try:
        return abs(x - int(round(x))) <= 1e-7
    except (OverflowError, ValueError):
        return False


def _is_integer_text(s: str) -> bool:
    x = _as_float(_drop_thousands_commas(s))
    return x is not None and _is_whole(x)


def _is_plain_fraction(s: str) -> bool:
    return bool(re.search(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$", s))


def _latex_to_text(s: str) -> str:
    import logging

    from pylatexenc import latex2text

    logging.getLogger("pylatexenc").setLevel(logging.ERROR)  # "macro failed its substitution" noise

    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    s = latex2text.LatexNodes2Text().latex_to_text(s)
    for symbol, name in (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*")):
        s = s.replace(symbol, name)
    return s.strip()


def minerva_normalize(expr: Optional[str]) -> Optional[str]:
    """Lewkowycz et al. (Minerva)-style normalisation to something sympy can parse."""
    if expr is None:
        return None
    m = _ENCLOSING_TEXT.search(expr)
    if m is not None:
        expr = m.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for pattern in _MINERVA_UNIT_PATTERNS:
        expr = pattern.sub("", expr)
    expr = re.sub(r"\^ *\\circ", "", expr)
    if expr and expr[0] == "{" and expr[-1] == "}":
        expr = expr[1:-1]
    expr = re.sub(r",\\! *", "", expr)
    x = _as_float(expr)
    if x is not None and _is_whole(x):
        expr = str(int(round(x)))
    if "\\" in expr:
        try:
            expr = _latex_to_text(expr)
        except Exception:  # noqa: BLE001 - pylatexenc refuses some inputs; keep the text as is
            pass
    expr = re.sub(r"- *", "-", expr)
    expr = re.sub(r"([0-9]) +([0-9])", r"\1+\2", expr)  # mixed numbers: "7 3/4" -> "7+3/4"
    expr = expr.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _is_integer_text(expr):
        expr = str(int(float(expr.replace(",", ""))))
    return expr


def _may_evaluate(expr: str) -> bool:
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2:
        return False
    return not any(b in expr for b in _NO_EVAL_SUBSTRINGS) and not any(p.search(expr) for p in _NO_EVAL_PATTERNS)


def _sympy_equal(truth: str, given: str) -> bool:
    import sympy
    from sympy.parsing import sympy_parser

    expr = f"({truth})-({given})"
    if not _may_evaluate(expr):
        return False
    try:
        diff = sympy_parser.parse_expr(
            expr.replace("^", "**"),
            transformations=sympy_parser.standard_transformations + (sympy_parser.implicit_multiplication_application,),
        )
        return sympy.simplify(diff) == 0
    except Exception:  # noqa: BLE001 - anything sympy cannot parse or simplify is "not equal"
        return False


def _elements(expr: str) -> list[str]:
    """A tuple or interval's elements ("(1,2]" -> ["1", "2"]), else the expression alone."""
    expr = _drop_thousands_commas(expr)
    if not expr:
        return []
    if (
        len(expr) > 2
        and expr[0] in _TUPLE_CHARS
        and expr[-1] in _TUPLE_CHARS
        and not any(c in expr[1:-1] for c in _TUPLE_CHARS)
    ):
        return [e.strip() for e in expr[1:-1].split(",")]
    return [expr]


def _sympy_grade(given: str, truth: str) -> bool:
    t, g = minerva_normalize(truth), minerva_normalize(given)
    if t is None:
        return False
    if t == g:
        return True
    if not g:
        return False
    t_elems, g_elems = _elements(t), _elements(g)
    if len(t_elems) > 1 and (t[0] != g[0] or t[-1] != g[-1]):
        return False  # an open interval is not a closed one
    if len(t_elems) != len(g_elems):
        return False
    for te, ge in zip(t_elems, g_elems):
        if _is_plain_fraction(te) and _is_plain_fraction(ge):
            ok = te == ge  # unreduced fractions get no credit
        elif _is_integer_text(te) != _is_integer_text(ge):
            ok = False  # an integer answer must be written as one
        else:
            ok = _sympy_equal(te, ge)
        if not ok:
            return False
    return True


def _math_verify_equal(given: str, truth: str) -> bool:
    """The reference's `fast=False` fallback: HF math-verify (has its own timeouts)."""
    try:
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError:
        return False
    t, g = minerva_normalize(truth), minerva_normalize(given)
    if t is None:
        return False
    if t == g:
        return True
    cfg = dict(
        extraction_config=(LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()),
        fallback_mode="no_fallback",
        extraction_mode=["first_match"],
        parsing_timeout=1,
    )
    try:
        return bool(
            verify(
                parse(truth if "$" in truth else f"${truth}$", **cfg),
                parse(given if "$" in given else f"${given}$", **cfg),
                timeout_seconds=1,
            )
        )
    except Exception:  # noqa: BLE001
        return False


def grade(given: str, truth: Optional[str], fast: bool = True) -> bool:
    """Is `given` the same answer as `truth`? (the reference's `grade`)."""
    if truth is not None and ("\\boxed" in truth or "####" in truth):
        truth = extract_answer(truth)
    if hendrycks_normalize(truth) == hendrycks_normalize(given):
        return True
    if truth is not None and _sympy_grade(given, truth):
        return True
    return (not fast) and truth is not None and _math_verify_equal(given, truth)


def r1_zero_score(response: str, truth: "str | int | float | Iterable[str]", fast: bool = True) -> dict[str, float]:
    """CS336's r1_zero reward: `</think> <answer>...</answer>` format, then the answer graded."""
    zero = {"format_reward": 0.0, "answer_reward": 0.0, "reward": 0.0}
    if "</think> <answer>" not in response or "</answer>" not in response:
        return zero
    answer: Optional[str] = response.split("<answer>")[-1].replace("</answer>", "")
    if "\\boxed" in answer:
        answer = extract_answer(answer)
        if answer is None:
            return dict(zero, format_reward=1.0)
    truths = [str(truth)] if isinstance(truth, (str, int, float)) else [str(t) for t in truth]
    correct = any(grade(answer, t, fast) for t in truths)
    return {"format_reward": 1.0, "answer_reward": float(correct), "reward": float(correct)}
