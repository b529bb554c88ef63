"""Answer extraction and normalisation, pure Python (no sympy, no subprocess).

Per task: the response's final answer (for ``gsm8k`` and ``math``, in this order of preference:
the last ``\\boxed{}``, the last ``#### N`` line, ``answer is``, the last number; for
``arithmetic`` the integer after the last ``=``), its canonical form, the exact-number rules of
``arithmetic`` and ``gsm8k``, the ``math`` fast path (normalised-string / exact-rational equality)
and the pre-checks that keep pathological input away from sympy (``_explosive``). Every regex here
is linear and only the last ``MAX_TAIL_CHARS`` characters of a response are searched. See
:mod:`hca.verify` for the rules.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_TAIL_CHARS = 16_000  # only the end of a response is searched for its answer
MAX_ANSWER_CHARS = 1_000  # longer extracted answers / references never reach sympy
MAX_NUMBER_CHARS = 200  # longer digit runs are not parsed as numbers


def _tail(s: str, n: int = MAX_TAIL_CHARS) -> tuple[str, bool]:
    """The last ``n`` characters and whether anything was cut off."""
    return (s[-n:], True) if len(s) > n else (s, False)


# ---------------------------------------------------------------------------------------------
# numbers
# ---------------------------------------------------------------------------------------------

_MINUS = "\u2212\u2013\u2014"  # unicode minus, en dash, em dash (models emit them)
_DEC = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_PLAIN_NUM_RE = re.compile(rf"[+-]?(?:{_DEC})")
_FRAC_RE = re.compile(r"([+-]?)\\frac\{([+-]?(?:\d+(?:\.\d+)?|\.\d+))\}\{([+-]?(?:\d+(?:\.\d+)?|\.\d+))\}")
_SLASH_RE = re.compile(r"([+-]?(?:\d+(?:\.\d+)?|\.\d+))/([+-]?(?:\d+(?:\.\d+)?|\.\d+))")
_MIXED_RE = re.compile(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


def _to_fraction(tok: str) -> Fraction | None:
    """An exact rational for a plain number token (sign, digits, thousands commas, decimals)."""
    if len(tok) > MAX_NUMBER_CHARS or not _PLAIN_NUM_RE.fullmatch(tok):
        return None
    try:
        return Fraction(tok.replace(",", ""))
    except (ValueError, ZeroDivisionError, ArithmeticError):
        return None


def _parse_number(s: str) -> Fraction | None:
    """Exact value of an already cleaned string that is *only* a number, else None.

    Accepts ``12``, ``-1,000.50``, ``.5``, ``3/4``, ``\\frac{3}{4}``, ``-\\frac{-3}{4}`` and the mixed
    number ``1\\frac{4}{5}`` (proper fraction only).
    """
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    q = _to_fraction(s)
    if q is not None:
        return q
    m = _FRAC_RE.fullmatch(s) or _SLASH_RE.fullmatch(s)
    if m is not None:
        g = m.groups()
        sign, a, b = ("", *g) if len(g) == 2 else g
        fa, fb = _to_fraction(a), _to_fraction(b)
        if fa is None or fb is None or fb == 0:
            return None
        return -(fa / fb) if sign == "-" else fa / fb
    m = _MIXED_RE.fullmatch(s)
    if m is not None:
        sign, whole, a, b = m.groups()
        w, fa, fb = int(whole), int(a), int(b)
        if fb == 0 or fa >= fb:
            return None
        q = w + Fraction(fa, fb)
        return -q if sign == "-" else q
    return None


def _canon_number(q: Fraction) -> str:
    """Canonical string: ``"18"``, ``"-0.25"``, ``"1/3"`` (decimal iff the decimal terminates)."""
    if q.denominator == 1:
        return str(q.numerator)
    d, k2, k5 = q.denominator, 0, 0
    while d % 2 == 0:
        d //= 2
        k2 += 1
    while d % 5 == 0:
        d //= 5
        k5 += 1
    if d != 1 or max(k2, k5) > 50:
        return f"{q.numerator}/{q.denominator}"
    k = max(k2, k5)
    n = abs(q.numerator) * 10**k // q.denominator
    digits = str(n).rjust(k + 1, "0")
    out = (digits[:-k] + "." + digits[-k:]).rstrip("0").rstrip(".")
    return ("-" if q < 0 else "") + out


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    if a == b:
        return True
    if a.denominator == 1 and b.denominator == 1:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    except OverflowError:
        return False


# ---------------------------------------------------------------------------------------------
# braces and boxes
# ---------------------------------------------------------------------------------------------

_BRACE_RE = re.compile(r"(?<!\\)[{}]")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")


def _last_boxed(text: str) -> str | None:
    """Content of the last well-formed ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` in text.

    One linear pass matches all braces; an unbalanced last box falls back to the one before it.
    """
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    match_of: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match_of[stack.pop()] = m.start()
    for pos in reversed(starts):
        j = pos
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = match_of.get(j)
            if end is not None:
                return text[j + 1 : end].strip()
            continue
        m = re.match(r"[^\s${}]+", text[j : j + MAX_ANSWER_CHARS])  # \boxed 5
        if m is not None:
            return m.group().rstrip(".,;").strip() or None
    return None


# ---------------------------------------------------------------------------------------------
# arithmetic
# ---------------------------------------------------------------------------------------------

_AFTER_EQ_RE = re.compile(r"[ \t]*(-?\d+)(?!\d|[.,]\d)")
_INT_RE = re.compile(r"(?<![\d.])-?\d+(?![.,]?\d)")
_REF_INT_RE = re.compile(r"[+-]?\d+")


def _canon_int(tok: str) -> str:
    neg = tok.startswith("-")
    digits = tok.lstrip("+-").lstrip("0") or "0"
    return "-" + digits if neg and digits != "0" else digits


def _extract_arithmetic(response: str) -> str | None:
    text, cut = _tail(response)
    i = text.rfind("=")
    if i >= 0:
        m = _AFTER_EQ_RE.match(text, i + 1)
        if m is not None:
            return _canon_int(m.group(1))
    last = None
    for last in _INT_RE.finditer(text):
        pass
    if last is None or (cut and last.start() == 0):
        return None
    return _canon_int(last.group())


def _arithmetic_correct(response: str, reference: str) -> bool:
    pred = _extract_arithmetic(response)
    ref = reference.strip()
    if pred is None or len(ref) > MAX_TAIL_CHARS or not _REF_INT_RE.fullmatch(ref):
        return False
    return pred == _canon_int(ref)


# ---------------------------------------------------------------------------------------------
# gsm8k
# ---------------------------------------------------------------------------------------------

_GSM_TOKEN_RE = re.compile(
    r"(?<![\w.,])(?P<sign>-?)[ \t]*(?:\\?\$[ \t]*)?(?:"
    r"\\[dt]?frac\{(?P<fa>\d+(?:\.\d+)?)\}\{(?P<fb>\d+(?:\.\d+)?)\}"
    rf"|(?P<num>{_DEC})(?:/(?P<den>\d+(?:\.\d+)?)(?![\d.]))?"
    r")"
)
_ANSWER_IS_RE = re.compile(r"(?i)answer(?:\s+is|\s*:)")
_HASHES = "####"


def _gsm_token_value(m: re.Match) -> Fraction | None:
    if m.group("fa") is not None:
        a, b = _to_fraction(m.group("fa")), _to_fraction(m.group("fb"))
        q = a / b if a is not None and b else None
    else:
        q = _to_fraction(m.group("num"))
        if q is not None and m.group("den") is not None:
            d = _to_fraction(m.group("den"))
            q = q / d if d else None
    if q is not None and m.group("sign") == "-":
        q = -q
    return q


def _gsm_clean(s: str) -> str:
    for ch in _MINUS:
        s = s.replace(ch, "-")
    return s


def _first_gsm_number(s: str) -> Fraction | None:
    m = _GSM_TOKEN_RE.search(s)
    return None if m is None else _gsm_token_value(m)


def _last_gsm_number(s: str, cut: bool = False) -> Fraction | None:
    last = None
    for last in _GSM_TOKEN_RE.finditer(s):
        pass
    if last is None or (cut and last.start() == 0):
        return None
    return _gsm_token_value(last)


def _strip_latex_wrappers(s: str) -> str:
    for _ in range(4):
        s2 = re.sub(r"\\(?:text|textbf|mathrm|mbox|mathbf|textrm)\s*\{([^{}]*)\}", r"\1", s)
        if s2 == s:
            break
        s = s2
    return s


def _gsm_whole_number(s: str) -> Fraction | None:
    """Value of a string that is just a number (with $, commas, %, units-free).

    Digits separated only by whitespace (``"2 30"``) are not one number (None), so that text
    with its unit words removed is not read as a concatenation.
    """
    s = _strip_latex_wrappers(_gsm_clean(s)).strip()
    if _DIGIT_GAP_RE.search(s):
        return None
    s = re.sub(r"\\[,!;: ]|\\\$|\$|\\%|%|\\left|\\right|\s", "", s.replace("{,}", ","))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").rstrip(".")
    return _parse_number(s)


_DIGIT_GAP_RE = re.compile(r"\d\s+\d")
_UNIT_TEXT_RE = re.compile(
    r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{[^{}\d]*\}(?:\s*\^\s*\{?\s*[23]\s*\}?)?"
)
_HASH_LINE_RE = re.compile(r"(?<!#)####(?!#)[ \t]*([^\n]*)")


def _gsm_box_value(box: str) -> Fraction | None:
    """The number a ``\\boxed{}`` holds: the whole content if it is a number (``\\$1,000``,
    ``18.00``, ``1{,}000``, ``\\frac{3}{4}``); else, after the last ``=`` (``2 \\times 9 = 18``)
    and with unit ``\\text{...}`` groups removed (``18 \\text{ cm}^2``), that rest if it is a
    number, else its *first* number (``18 apples``)."""
    q = _gsm_whole_number(box)
    if q is not None:
        return q
    rest = box.rsplit("=", 1)[-1]
    rest = _UNIT_TEXT_RE.sub(" ", rest if re.search(r"\d", rest) else box)
    q = _gsm_whole_number(rest)
    return q if q is not None else _first_gsm_number(_gsm_clean(rest))


def _hash_answer(text: str) -> str | None:
    """The rest of the line after the last ``####`` whose rest is just a number (``#### 18``,
    ``#### $1,000.``), GSM8K's answer line; markdown headings (``#### Step 3: ...``) never count."""
    found = None
    for m in _HASH_LINE_RE.finditer(text):
        rest = m.group(1).strip()
        if len(rest) <= MAX_NUMBER_CHARS and _gsm_whole_number(rest) is not None:
            found = rest
    return found


def _extract_gsm8k_value(response: str) -> Fraction | None:
    """The final answer of a gsm8k response; the first rule that gives a number wins:

    1. the last ``\\boxed{}``/``\\fbox{}`` (:func:`_gsm_box_value`); chat models are asked for
       a box and often write arithmetic or an "answer is" before it;
    2. the last ``#### N`` line (:func:`_hash_answer`);
    3. the first number in the 60 characters after the last "answer is" / "answer:";
    4. the last number of the response (not one cut in half by the tail limit).

    A last box without a number in it (``\\boxed{}``, ``\\boxed{\\text{Janet}}``) is skipped,
    not taken as a wrong answer, and an earlier box is then not consulted.
    """
    text, cut = _tail(response)
    text = _gsm_clean(text)
    box = _last_boxed(text)
    if box is not None:
        q = _gsm_box_value(box)
        if q is not None:
            return q
    hashed = _hash_answer(text)
    if hashed is not None:
        return _gsm_whole_number(hashed)
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is not None:
        q = _first_gsm_number(text[last.end() : last.end() + 60])
        if q is not None:
            return q
    return _last_gsm_number(text, cut)


def _gsm8k_reference(reference: str) -> Fraction | None:
    ref = reference.strip()
    if len(ref) <= MAX_NUMBER_CHARS:
        q = _gsm_whole_number(ref)
        if q is not None:
            return q
    return _extract_gsm8k_value(ref)


def _gsm8k_correct(response: str, reference: str) -> bool:
    ref = _gsm8k_reference(reference)
    if ref is None:
        return False
    pred = _extract_gsm8k_value(response)
    return pred is not None and _numbers_equal(pred, ref)


# ---------------------------------------------------------------------------------------------
# math: extraction, normalisation, fast path
# ---------------------------------------------------------------------------------------------

_UNIT_TAIL_RE = re.compile(
    r"^(?P<val>.*?[\d}a-zA-Z)\]])\s*\\(?:text|mbox|mathrm|textrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}"
    r"(?:\s*\^\s*\{?\s*[23]\s*\}?)?\s*$",
    re.DOTALL,
)
_DEGREE_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big|bigg|Bigg)(?![a-zA-Z])\s*\.?")
_SPACING_RE = re.compile(r"\\[,!;: >]|\\(?:quad|qquad|displaystyle|textstyle)(?![a-zA-Z])|~")
_LHS_RE = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")
_PLAIN_UNIT_RE = re.compile(r"(-?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s+[a-zA-Z]{3,}(?:\s+[a-zA-Z]{2,}){0,2}")
_CONJUNCTION_RE = re.compile(r"\b(?:and|or)\b")
_ANCHOR_RE = re.compile(r"(?i)(?:final answer|answer)(?:\s+is|\s*:)\s*:?")


def _normalize_math(s: str) -> str:
    """A canonical-ish LaTeX string: equal strings are taken as equal answers."""
    s = s.strip()
    for ch in _MINUS:
        s = s.replace(ch, "-")
    if s.startswith("$") or s.endswith("$"):
        s = s.strip("$").strip()
    if (s.startswith("\\(") and s.endswith("\\)")) or (s.startswith("\\[") and s.endswith("\\]")):
        s = s[2:-2].strip()
    s = s.replace("{,}", ",")
    s = _SPACING_RE.sub(" ", s)
    s = _LEFT_RIGHT_RE.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREE_RE.sub("", s)
    m = _UNIT_TAIL_RE.match(s)
    if m is not None and re.search(r"\d", m.group("val")):
        s = m.group("val")
    s = _strip_latex_wrappers(s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?=\d)", "", s)  # "\\15": a mangled "\\$15"
    s = s.strip().rstrip(".").strip()
    m = _PLAIN_UNIT_RE.fullmatch(s)  # "43 minutes", "12 square feet"
    if m is not None and not _CONJUNCTION_RE.search(s):
        s = m.group(1)
    if s.count("=") == 1:
        s = _LHS_RE.sub("", s)
    s = re.sub(r"\s+", "", s)
    # \frac12 -> \frac{1}{2}, \frac{1}2 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}, \sqrt2 -> \sqrt{2}
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\d+)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    return s


def _math_canonical(ans: str) -> str:
    norm = _normalize_math(ans)
    q = _parse_number(norm)
    return _canon_number(q) if q is not None else norm


def _extract_math(response: str) -> tuple[str | None, str]:
    """(raw answer, source) where source is "boxed", "hashes", "anchor" or "" (nothing found).

    The order of gsm8k's rules: the last ``\\boxed{}`` (an empty one included), then the last
    ``#### N`` line, then the text after the last "answer is" / "answer:"; "" leaves the rest
    (math-verify's own extraction, about the last LaTeX/number) to the caller.
    """
    text, _ = _tail(response)
    box = _last_boxed(text)
    if box is not None:
        return box, "boxed"
    hashed = _hash_answer(_gsm_clean(text))
    if hashed is not None:
        return hashed, "hashes"
    last = None
    for last in _ANCHOR_RE.finditer(text):
        pass
    if last is not None:
        rest = text[last.end() : last.end() + 300].lstrip()
        m = re.match(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", rest, re.DOTALL)
        if m is not None:
            cand = next(g for g in m.groups() if g is not None)
        else:
            cand = re.split(r"\n|\.(?:\s|$)", rest, maxsplit=1)[0]
        cand = cand.strip()
        if cand:
            return cand, "anchor"
    return None, ""


def _math_reference(reference: str) -> str:
    ref = reference.strip()
    i = ref.rfind(_HASHES)
    if i >= 0:  # a GSM8K-style solution
        return ref[i + len(_HASHES) :].strip()
    if "\\boxed" in ref or "\\fbox" in ref:
        box = _last_boxed(_tail(ref)[0])
        if box is not None:
            return box
    return ref


def _fast_math(pred: str, ref: str) -> bool | None:
    """True/False when normalisation alone decides, else None (ask math-verify)."""
    p, r = _normalize_math(pred), _normalize_math(ref)
    if not p:
        return False
    if p == r:
        return True
    pn, rn = _parse_number(p), _parse_number(r)
    if pn is not None and rn is not None:
        if pn == rn:
            return True
        try:
            close = math.isclose(float(pn), float(rn), rel_tol=1e-4, abs_tol=1e-9)
        except OverflowError:
            close = False
        return None if close else False
    return None


_POW_CHAIN_RE = re.compile(r"\d+(?:\.\d+)?(?:\s*(?:\^|\*\*)\s*[{(\s]*-?\s*\d+(?:\.\d+)?)+")
_CHAIN_NUM_RE = re.compile(r"\d+(?:\.\d+)?")
_FACTORIAL_RE = re.compile(r"(\d+)\s*\}?\s*!")


def _explosive(s: str) -> bool:
    """Expressions whose exact value is too large for sympy to touch in reasonable time."""
    for m in _POW_CHAIN_RE.finditer(s):
        nums = _CHAIN_NUM_RE.findall(m.group())
        try:
            e = float(nums[-1]) if len(nums[-1]) < 300 else math.inf
            for b in reversed(nums[:-1]):
                fb = float(b) if len(b) < 300 else math.inf
                if fb <= 1.0:
                    e = 1.0
                    continue
                logv = e * math.log10(fb)
                if logv > 1e5:
                    return True
                e = 10.0**logv
        except (OverflowError, ValueError):
            return True
    for m in _FACTORIAL_RE.finditer(s):
        if len(m.group(1)) > 6 or int(m.group(1)) > 100_000:
            return True
    return False
