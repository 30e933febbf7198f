"""Verifiable task families: the embedded default's benchmark and training data.

ZEDA is judged by accuracy on math, code and instruction-following benchmarks against the static
teacher (docs/method.md §6). The project's self-contained default trains a tiny char-level MoE teacher from
scratch on CPU, so it needs tasks of the same three kinds that such a model can learn in minutes and
that can be checked exactly:

- math: two-step integer arithmetic ("Compute 358+67-149."), worked digit by digit, least significant
  digit first, with the carry (or borrow) written on every line.
- code: predict what a tiny Python snippet prints (assignments, a loop, list and string operations),
  with a short trace. Index lookups are traced as `a[0]=4 a[1]=9 ...` so that picking an element by
  position becomes copying after a matching `a[i]=`, which a tiny model learns far more easily.
- if (instruction following): write words under checkable constraints (order, case, count,
  separator). The verifier checks the constraints on the output, so any valid answer passes.

Every response is a short worked solution and a final line `Answer: ...`. Answers mix easy tokens
(copied from the prompt) with hard ones (computed): that contrast is what lets a dynamic MoE spend less
expert compute on some tokens. Prompts are at most 100 characters, responses at most 120, and every
character is printable ASCII or newline (the vocabulary of zeda_toy/tokenizer.py).

Splits: an item belongs to "test" iff a SHA-256 of its family and prompt falls in a fixed 20% bucket.
`generate` draws items from a seeded `random.Random` and keeps only those of the requested split, so
train and test can never share a prompt, and the result is the same in every process (no salted hash()).

The held-out slice (`heldout`): items of the *train* split drawn with their own seed, which the pipeline
removes from its SFT and OPD prompts. Settings of the pipeline are chosen on it, so the test split is never
used to choose anything (`python pipeline.py --eval-split heldout`, `evaluate.py --split heldout`).
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from zeda.errors import UsageError

FAMILIES = ("math", "code", "if")
SPLITS = ("train", "test")
MAX_PROMPT_CHARS = 100
MAX_RESPONSE_CHARS = 120
TEST_PERCENT = 20  # share of the prompt space (by hash) that is held out as "test"
ANSWER_PREFIX = "Answer:"
HELDOUT_SEED = 777  # draws the held-out slice of the train split (see heldout)
HELDOUT_MAX = 1000  # per family: the pipeline keeps this many held-out items out of its training prompts


@dataclass(frozen=True)
class Task:
    """One verifiable item. `verify` needs only family, prompt and answer, so a Task can be rebuilt
    from an exported benchmark record (`task_from_record`)."""

    family: str
    prompt: str  # the user message
    response: str  # the reference assistant answer: worked solution + final line "Answer: ..."
    answer: str  # the final answer alone (reference), used for JSONL benchmark export


# ----------------------------------------------------------------------------------------------
# Answer extraction and the split rule


def extract_answer(text: str) -> str | None:
    """The final answer from "... Answer: X" text: the rest of the line after the last "Answer:",
    stripped. None when the text has no "Answer:" at all."""
    start = text.rfind(ANSWER_PREFIX)
    if start < 0:
        return None
    return text[start + len(ANSWER_PREFIX):].split("\n", 1)[0].strip()


def split_of(family: str, prompt: str) -> str:
    """The split an item belongs to, decided by its prompt alone, so both splits stay disjoint."""
    digest = hashlib.sha256(f"{family}\n{prompt}".encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


# ----------------------------------------------------------------------------------------------
# math: two binary operations, each worked digit by digit (least significant digit first)


def _digits_lsd(n: int) -> list[int]:
    return [int(ch) for ch in reversed(str(n))]


def _add_lines(a: int, b: int) -> list[str]:
    """`x+y+c=s` per digit; the tens digit of s is the next line's carry c."""
    da, db = _digits_lsd(a), _digits_lsd(b)
    lines, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = da[i] if i < len(da) else 0
        y = db[i] if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return lines


def _sub_lines(a: int, b: int) -> list[str]:
    """`x-y-b=r` per digit (a >= b); a borrow shows as a leading 1 on x ("15-9-0=6") and is the
    next line's b. Same shape as addition: the carry lives in the line that causes it."""
    da, db = _digits_lsd(a), _digits_lsd(b)
    lines, borrow = [], 0
    for i in range(len(da)):
        x = da[i]
        y = db[i] if i < len(db) else 0
        if x - y - borrow < 0:
            lines.append(f"1{x}-{y}-{borrow}={10 + x - y - borrow}")
            borrow = 1
        else:
            lines.append(f"{x}-{y}-{borrow}={x - y - borrow}")
            borrow = 0
    return lines


def _mul_lines(a: int, d: int) -> list[str]:
    """`x*d+c=p` per digit of a (d is one digit); the tens digit of p is the next carry, and the
    last carry becomes the leading digit of the product."""
    lines, carry = [], 0
    for x in _digits_lsd(a):
        p = x * d + carry
        lines.append(f"{x}*{d}+{carry}={p}")
        carry = p // 10
    return lines


_STEP_LINES: dict[str, Callable[[int, int], list[str]]] = {"+": _add_lines, "-": _sub_lines, "*": _mul_lines}
_APPLY: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
# (first op, second op, parenthesise the first step?) -- always two steps, evaluated left to right.
_MATH_SHAPES = (("+", "-", False), ("-", "+", False), ("+", "+", False),
                ("*", "+", False), ("*", "-", False), ("+", "*", True), ("-", "*", True))


def _make_math(rng: random.Random) -> Task:
    op1, op2, paren = rng.choice(_MATH_SHAPES)
    a = rng.randint(10, 999)
    b = rng.randint(2, 9) if op1 == "*" else rng.randint(10, 999)
    if op1 == "-" and a < b:  # subtraction is only worked for a >= b: keep every result >= 0
        a, b = b, a
    first = _APPLY[op1](a, b)  # >= 10 whenever op2 is "-" (shapes "+-" and "*-")
    if op2 == "*":
        c = rng.randint(2, 9)
    else:
        c = rng.randint(10, min(999, first) if op2 == "-" else 999)
    result = _APPLY[op2](first, c)
    expr = f"({a}{op1}{b}){op2}{c}" if paren else f"{a}{op1}{b}{op2}{c}"
    lines = _STEP_LINES[op1](a, b) + [f"{a}{op1}{b}={first}"]
    lines += _STEP_LINES[op2](first, c) + [f"{first}{op2}{c}={result}"]
    lines.append(f"{ANSWER_PREFIX} {result}")
    return Task("math", f"Compute {expr}.", "\n".join(lines), str(result))


# ----------------------------------------------------------------------------------------------
# code: snippet + trace; the reference answer comes from actually running the snippet

_CODE_HEADER = "What does this code print?\n"
_WORDS = (  # short common words, 3-4 letters
    "ant", "ape", "arm", "art", "bag", "bat", "bed", "bee", "bell", "bird", "blue", "boat", "bone", "book",
    "box", "bus", "cake", "cap", "car", "cat", "clay", "coat", "cow", "crab", "cup", "deer", "desk", "dog",
    "door", "dove", "drum", "duck", "dust", "egg", "elk", "elm", "emu", "eye", "fan", "farm", "fig", "fish",
    "flag", "fork", "fox", "frog", "gate", "gift", "goat", "gold", "gum", "hat", "hen", "hill", "horn", "hut",
    "ice", "inch", "ink", "iron", "ivy", "jam", "jar", "jaw", "jet", "jug", "kid", "king", "kite", "kiwi",
    "knot", "lamp", "leaf", "leg", "lime", "lion", "lip", "log", "map", "mask", "milk", "mint", "moon",
    "moss", "mug", "nail", "nest", "net", "nose", "nut", "oak", "oar", "oil", "owl", "oven", "pan",
    "pea", "pen", "pie", "pig", "pin", "pot", "quiz", "rail", "rain", "ram", "rat", "red", "ring", "road",
    "rock", "rose", "rug", "salt", "sand", "seal", "ship", "sock", "sofa", "star", "sun", "tank", "tea",
    "tent", "toe", "toy", "tree", "tub", "urn", "van", "vase", "vest", "vine", "wall", "web", "wig", "wind",
    "wing", "wolf", "yak", "yam", "yard", "yarn", "zinc", "zip", "zoo",
)


def _run_snippet(code: str) -> str:
    """Run one of this module's own snippets and return what it prints. Only generator output is
    ever run: snippets are bounded (no while loops, tiny ranges) and see only these builtins."""
    printed: list[str] = []

    def _print(*args: object) -> None:
        printed.append(" ".join(str(a) for a in args))

    builtins = {"print": _print, "range": range, "len": len, "sum": sum, "max": max}
    exec(compile(code, "<zeda.tasks snippet>", "exec"), {"__builtins__": builtins})
    return "\n".join(printed)


def _binop(rng: random.Random, left: str, env: dict[str, int]) -> tuple[str, str, int] | None:
    """A small binary op on variable `left` and another variable or a literal:
    (code "y * 3", trace "7*3", value 21). Kept to one step a tiny model can do at once: products of
    two digits, sums and differences with a single-digit side, results in 0..99. None when the draw
    breaks those bounds (the caller draws again)."""
    op = rng.choice("+-*")
    others = [name for name in env if name != left]
    right = rng.choice(others) if others and rng.random() < 0.5 else str(rng.randint(2, 9))
    operands = (left, right) if rng.random() < 0.7 else (right, left)  # mostly the chained value first
    a, b = (env[o] if o in env else int(o) for o in operands)
    if (op == "*" and max(a, b) > 9) or (op != "*" and min(a, b) > 9):
        return None
    value = _APPLY[op](a, b)
    if not 0 <= value <= 99:
        return None
    return f"{operands[0]} {op} {operands[1]}", f"{a}{op}{b}", value


def _code_arith(rng: random.Random) -> tuple[str, list[str]]:
    x = rng.randint(2, 9)
    env, code, trace = {"x": x}, [f"x = {x}"], []
    last = "x"  # each line uses the previous result, so the trace is a chain
    for name in ["y", "z"][: rng.randint(1, 2)] + [None]:
        step = None
        while step is None:
            step = _binop(rng, last, env)
        expr, sub, value = step
        if name is None:  # the print line
            code.append(f"print({expr})")
            trace.append(f"{expr.replace(' ', '')} = {sub} = {value}")
        else:
            code.append(f"{name} = {expr}")
            trace.append(f"{name} = {sub} = {value}")
            env[name], last = value, name
    return "\n".join(code), trace


def _code_loop(rng: random.Random) -> tuple[str, list[str]]:
    acc, var = rng.choice("stn"), rng.choice("ijk")
    s = rng.randint(0, 9)
    if rng.random() < 0.5:
        lo, hi = 0, rng.randint(3, 5)
        args = str(hi)
    else:
        lo = rng.randint(1, 4)
        hi = lo + rng.randint(3, 4)
        args = f"{lo}, {hi}"
    k = rng.randint(2, 3)
    body, inc = rng.choice(((var, lambda i: i), (f"{var} * {k}", lambda i: i * k),
                            (f"{var} + {k + 2}", lambda i: i + k + 2)))
    code = f"{acc} = {s}\nfor {var} in range({args}):\n    {acc} += {body}\nprint({acc})"
    trace = []
    for i in range(lo, hi):  # one line per iteration: the loop variable, then the update
        trace.append(f"{var}={i} {acc}={s}+{inc(i)}={s + inc(i)}")
        s += inc(i)
    return code, trace


def _code_filter_loop(rng: random.Random) -> tuple[str, list[str]]:
    values = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    t = rng.randint(2, 7)
    cond, test = rng.choice(((f"v > {t}", lambda v: v > t), (f"v < {t}", lambda v: v < t),
                             ("v % 2 == 0", lambda v: v % 2 == 0)))
    add_value = rng.random() < 0.5
    code = f"c = 0\nfor v in {values}:\n    if {cond}:\n        c += {'v' if add_value else 1}\nprint(c)"
    trace, c = [], 0
    for v in values:
        if not test(v):
            trace.append(f"v={v} no")
        elif add_value:
            trace.append(f"v={v} yes c={c}+{v}={c + v}")
            c += v
        else:
            c += 1
            trace.append(f"v={v} yes c={c}")
    return code, trace


def _enumerate(name: str, items: list) -> str:
    return " ".join(f"{name}[{i}]={v}" for i, v in enumerate(items))


def _code_index(rng: random.Random) -> tuple[str, list[str]]:
    a = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
    n = len(a)
    trace = [_enumerate("a", a)]  # always list every a[i]=v first: a lookup becomes a copy
    kind = rng.choice(("index", "negative", "sum", "slice"))
    if kind == "index":
        i = rng.randrange(n)
        expr, trace_line = f"a[{i}]", f"a[{i}] = {a[i]}"
    elif kind == "negative":
        j = rng.randint(1, n)
        expr, trace_line = f"a[-{j}]", f"a[-{j}] = a[{n - j}] = {a[n - j]}"
    elif kind == "sum":
        i, j = rng.randrange(n), rng.randrange(n)
        expr, trace_line = f"a[{i}] + a[{j}]", f"a[{i}]+a[{j}] = {a[i]}+{a[j]} = {a[i] + a[j]}"
    else:
        i = rng.randrange(n - 1)
        j = rng.randint(i + 1, min(n, i + 3))
        names = ", ".join(f"a[{k}]" for k in range(i, j))
        expr, trace_line = f"a[{i}:{j}]", f"a[{i}:{j}] = [{names}] = {a[i:j]}"
    trace.append(trace_line)
    return f"a = {a}\nprint({expr})", trace


def _code_list_ops(rng: random.Random) -> tuple[str, list[str]]:
    a = [rng.randint(0, 9) for _ in range(rng.randint(3, 4))]
    v = rng.randint(0, 9)
    op = rng.choice(("append", "pop", "insert", "reverse"))
    if op == "append":
        stmt, b, trace = f"a.append({v})", a + [v], []
    elif op == "pop":
        stmt, b, trace = "a.pop()", a[:-1], []
    elif op == "insert":
        stmt, b, trace = f"a.insert(0, {v})", [v] + a, []
    else:  # reverse: list forwards, then the same pairs backwards, then copy the values
        stmt, b = "a.reverse()", a[::-1]
        trace = [_enumerate("a", a), " ".join(f"a[{i}]={a[i]}" for i in reversed(range(len(a))))]
    trace.append(f"a = {b}")
    out = "a" if op == "reverse" else rng.choice(("a", "sum(a)", "len(a)", "max(a)"))
    if out == "sum(a)":
        acc, steps = b[0], []
        for x in b[1:]:
            steps.append(f"{acc}+{x}={acc + x}")
            acc += x
        trace.append(" ".join(steps))
    elif out == "len(a)":
        trace.append(" ".join(f"{i + 1}:{x}" for i, x in enumerate(b)))  # count up; the last number is len
    elif out == "max(a)":
        best, steps = b[0], []
        for x in b[1:]:
            steps.append(f"max({best},{x})={max(best, x)}")
            best = max(best, x)
        trace.append(" ".join(steps))
    return f"a = {a}\n{stmt}\nprint({out})", trace


def _code_strings(rng: random.Random) -> tuple[str, list[str]]:
    s, t = rng.sample(_WORDS, 2)
    kind = rng.choice(("concat", "upper", "reverse", "len", "pick", "repeat"))
    if kind == "concat":
        sep = rng.choice(("", " ", "-"))
        if sep:
            expr, sub = f"s + '{sep}' + t", f"{s}+'{sep}'+{t}"
        else:
            expr, sub = "s + t", f"{s}+{t}"
        trace = [f"{expr.replace(' + ', '+')} = {sub} = {s}{sep}{t}"]
    elif kind == "upper":
        expr = "s.upper() + t"
        trace = [f"s.upper() = {s.upper()}", f"{s.upper()}+{t} = {s.upper()}{t}"]
    elif kind == "reverse":
        expr = "s[::-1]"
        trace = [_enumerate("s", list(s)), " ".join(f"s[{i}]={s[i]}" for i in reversed(range(len(s))))]
    elif kind == "len":
        expr = "len(s + t)"
        trace = [f"s+t = {s}{t}", " ".join(f"{i + 1}:{ch}" for i, ch in enumerate(s + t))]
    elif kind == "pick":
        i, j = rng.randrange(len(s)), rng.randrange(len(t))
        expr = f"s[{i}] + t[{j}]"
        trace = [_enumerate("s", list(s)), _enumerate("t", list(t)), f"s[{i}]+t[{j}] = {s[i]}+{t[j]} = {s[i]}{t[j]}"]
    else:
        k = rng.randint(2, 3)
        expr = f"s * {k}"
        trace = [f"s*{k} = {'+'.join([s] * k)} = {s * k}"]
    return f"s = '{s}'\nt = '{t}'\nprint({expr})", trace


_CODE_KINDS = (_code_arith, _code_loop, _code_filter_loop, _code_index, _code_list_ops, _code_strings)


def _make_code(rng: random.Random) -> Task:
    code, trace = rng.choice(_CODE_KINDS)(rng)
    answer = _run_snippet(code)  # ground truth from Python itself, not from the trace
    response = "\n".join(trace + [f"{ANSWER_PREFIX} {answer}"])
    return Task("code", _CODE_HEADER + code, response, answer)


# ----------------------------------------------------------------------------------------------
# if: instruction following; prompts are parsed back by regex in `_check_if`

_SEPARATORS = {"commas": ",", "semicolons": ";", "dashes": "-", "spaces": " "}
_CASES: dict[str, Callable[[str], str]] = {"uppercase": str.upper, "lowercase": str.lower, "title case": str.capitalize}
_SEP_RE = "|".join(_SEPARATORS)
_CASE_RE = "|".join(_CASES)
_ARRANGE_RE = re.compile(
    rf"Write the words ([a-z ]+) in (the same|reverse|alphabetical) order, in ({_CASE_RE}), separated by ({_SEP_RE})\.")
_REPEAT_RE = re.compile(rf"Write the word ([a-z]+) exactly (\d+) times in ({_CASE_RE}), separated by ({_SEP_RE})\.")
_FILTER_RE = re.compile(
    rf"From: ([a-z ]+)\. Write only the words (starting with '[a-z]'|containing '[a-z]'|with \d letters), "
    rf"in any order, separated by ({_SEP_RE})\.")
_SPELL_RE = re.compile(rf"Spell the word ([a-z]+)( backwards)? in (uppercase|lowercase), separated by ({_SEP_RE})\.")
_PICK_RE = re.compile(rf"Write any (\d) different words from: ([a-z ]+)\. Use ({_CASE_RE}), separated by ({_SEP_RE})\.")


def _filter_test(cond: str) -> Callable[[str], bool]:
    """The predicate named by a filter condition, e.g. "containing 'a'" or "with 3 letters"."""
    if cond.startswith("with "):
        k = int(cond.split()[1])
        return lambda w: len(w) == k
    letter = cond[-2]
    return (lambda w: w.startswith(letter)) if cond.startswith("starting") else (lambda w: letter in w)


def _words_distinct_initials(rng: random.Random, k: int) -> list[str]:
    """k words with distinct first letters, so "alphabetical" only needs the first letter."""
    while True:
        words = rng.sample(_WORDS, k)
        if len({w[0] for w in words}) == k:
            return words


def _if_arrange(rng: random.Random) -> tuple[str, list[str], str]:
    words = _words_distinct_initials(rng, rng.randint(3, 4))
    order = rng.choice(("the same", "reverse", "alphabetical"))
    case, sep_name = rng.choice(list(_CASES)), rng.choice(list(_SEPARATORS))
    ordered = {"the same": words, "reverse": words[::-1], "alphabetical": sorted(words)}[order]
    cased = [_CASES[case](w) for w in ordered]
    prompt = f"Write the words {' '.join(words)} in {order} order, in {case}, separated by {sep_name}."
    return prompt, [f"order: {' '.join(ordered)}", f"case: {' '.join(cased)}"], _SEPARATORS[sep_name].join(cased)


def _if_repeat(rng: random.Random) -> tuple[str, list[str], str]:
    word, n = rng.choice(_WORDS), rng.randint(2, 5)
    case, sep_name = rng.choice(list(_CASES)), rng.choice(list(_SEPARATORS))
    cased = _CASES[case](word)
    prompt = f"Write the word {word} exactly {n} times in {case}, separated by {sep_name}."
    trace = [" ".join(f"{i + 1}:{cased}" for i in range(n))]  # count while writing, so n is not lost
    return prompt, trace, _SEPARATORS[sep_name].join([cased] * n)


def _if_filter(rng: random.Random) -> tuple[str, list[str], str]:
    while True:
        cond = rng.choice((f"starting with '{rng.choice(_WORDS)[0]}'", f"containing '{rng.choice('aeiorstn')}'",
                           f"with {rng.randint(3, 4)} letters"))
        test = _filter_test(cond)
        yes, no = [w for w in _WORDS if test(w)], [w for w in _WORDS if not test(w)]
        n_yes = rng.randint(1, 3)
        if len(yes) >= n_yes:
            break
    words = rng.sample(yes, n_yes) + rng.sample(no, rng.randint(4, 5) - n_yes)
    rng.shuffle(words)
    sep_name = rng.choice(list(_SEPARATORS))
    prompt = f"From: {' '.join(words)}. Write only the words {cond}, in any order, separated by {sep_name}."
    trace = [" ".join(f"{w}:{'y' if test(w) else 'n'}" for w in words)]
    return prompt, trace, _SEPARATORS[sep_name].join(w for w in words if test(w))


def _if_spell(rng: random.Random) -> tuple[str, list[str], str]:
    word, backwards = rng.choice(_WORDS), rng.random() < 0.5
    case, sep_name = rng.choice(("uppercase", "lowercase")), rng.choice(list(_SEPARATORS))
    letters = list(word)[::-1] if backwards else list(word)
    prompt = f"Spell the word {word}{' backwards' if backwards else ''} in {case}, separated by {sep_name}."
    trace = [f"letters: {' '.join(word)}"] + ([f"backwards: {' '.join(letters)}"] if backwards else [])
    return prompt, trace, _SEPARATORS[sep_name].join(_CASES[case](ch) for ch in letters)


def _if_pick(rng: random.Random) -> tuple[str, list[str], str]:
    words = rng.sample(_WORDS, rng.randint(4, 5))
    k = rng.randint(2, 3)
    case, sep_name = rng.choice(list(_CASES)), rng.choice(list(_SEPARATORS))
    chosen = set(rng.sample(words, k))
    picked = [w for w in words if w in chosen]  # any k distinct words are valid; keep the prompt's order
    prompt = f"Write any {k} different words from: {' '.join(words)}. Use {case}, separated by {sep_name}."
    return prompt, [f"pick: {' '.join(picked)}"], _SEPARATORS[sep_name].join(_CASES[case](w) for w in picked)


_IF_KINDS = (_if_arrange, _if_repeat, _if_filter, _if_spell, _if_pick)


def _make_if(rng: random.Random) -> Task:
    prompt, trace, answer = rng.choice(_IF_KINDS)(rng)
    return Task("if", prompt, "\n".join(trace + [f"{ANSWER_PREFIX} {answer}"]), answer)


def _items(answer: str, sep_name: str) -> list[str] | None:
    """The answer split at the requested separator; spaces around a separator are allowed
    ("A, B" counts as comma-separated). None when an item is empty (e.g. "A,,B")."""
    sep = _SEPARATORS[sep_name]
    parts = answer.split() if sep == " " else [p.strip() for p in answer.split(sep)]
    return parts if parts and all(parts) else None


def _check_if(prompt: str, answer: str) -> bool:
    """Check an instruction-following answer against the constraints stated in the prompt."""
    if m := _ARRANGE_RE.fullmatch(prompt):
        words, order, case, sep_name = m.group(1).split(), m.group(2), m.group(3), m.group(4)
        ordered = {"the same": words, "reverse": words[::-1], "alphabetical": sorted(words)}[order]
        return _items(answer, sep_name) == [_CASES[case](w) for w in ordered]
    if m := _REPEAT_RE.fullmatch(prompt):
        word, n, case, sep_name = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        items = _items(answer, sep_name)  # compared item by item: a prompt asking for 10^13 builds no list
        return items is not None and len(items) == n and all(item == _CASES[case](word) for item in items)
    if m := _FILTER_RE.fullmatch(prompt):
        words, test, sep_name = m.group(1).split(), _filter_test(m.group(2)), m.group(3)
        items = _items(answer, sep_name)
        # any order, but each matching word exactly once and nothing else
        return items is not None and sorted(items) == sorted(w for w in words if test(w))
    if m := _SPELL_RE.fullmatch(prompt):
        word, backwards, case, sep_name = m.group(1), bool(m.group(2)), m.group(3), m.group(4)
        letters = list(word)[::-1] if backwards else list(word)
        return _items(answer, sep_name) == [_CASES[case](ch) for ch in letters]
    if m := _PICK_RE.fullmatch(prompt):
        k, words, case, sep_name = int(m.group(1)), m.group(2).split(), m.group(3), m.group(4)
        items = _items(answer, sep_name)
        return (items is not None and len(items) == k and len(set(items)) == k
                and all(_CASES[case](item.lower()) == item and item.lower() in words for item in items))
    raise ValueError(f"not an instruction-following prompt of zeda_toy.tasks: {prompt!r}")


# ----------------------------------------------------------------------------------------------
# Public API


def generate(family: str, split: str, n: int, seed: int = 0) -> list[Task]:
    """n distinct tasks of one family from one split, the same list in every process for a seed.

    Items are drawn from a `random.Random` seeded by (family, split, seed); an item whose prompt hashes
    to the other split, repeats a prompt, or is too long is skipped."""
    if family not in FAMILIES:
        raise UsageError(f"unknown task family {family!r}; expected one of {FAMILIES}")
    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r}; expected one of {SPLITS}")
    make = {"math": _make_math, "code": _make_code, "if": _make_if}[family]
    # str seeds hash with SHA-512: stable. "zeda.tasks" names the suite in every seed (it is not a module path):
    # another name would draw other items, and every measured number would change.
    rng = random.Random(f"zeda.tasks:{family}:{split}:{seed}")
    tasks: list[Task] = []
    seen: set[str] = set()
    max_draws = 50 * n + 1000  # far above what is needed; guards against an exhausted prompt space
    for _ in range(max_draws):
        if len(tasks) == n:
            break
        task = make(rng)
        if (split_of(family, task.prompt) != split or task.prompt in seen
                or len(task.prompt) > MAX_PROMPT_CHARS or len(task.response) > MAX_RESPONSE_CHARS):
            continue
        seen.add(task.prompt)
        tasks.append(task)
    if len(tasks) < n:
        raise RuntimeError(f"found only {len(tasks)} distinct {family}/{split} tasks in {max_draws} draws")
    return tasks


def verify(task: Task, output: str) -> bool:
    """Exact check of a model output (the full response text) for that task.

    math and code: the extracted final answer must equal the reference answer (the code reference is
    what Python printed). if: the extracted answer must satisfy the prompt's constraints."""
    answer = extract_answer(output)
    if answer is None:
        return False
    if task.family == "if":
        return _check_if(task.prompt, answer)
    if task.family in ("math", "code"):
        return answer == task.answer.strip()
    raise ValueError(f"unknown task family {task.family!r}")


def check_heldout_size(n: int) -> None:
    """ValueError unless n items per family fit in the held-out slice (the CLIs call this before any work)."""
    if n > HELDOUT_MAX:
        raise UsageError(f"the held-out slice has {HELDOUT_MAX} items per family, {n} asked for")


def heldout(family: str, n: int, task_seed: int = 0) -> list[Task]:
    """n items of the held-out slice: a pool of HELDOUT_MAX train-split items per family drawn with HELDOUT_SEED,
    its first n (task_seed 0) or a seeded sample of n. Every task_seed stays inside the pool, and the pool is what
    training prompts leave out (mixture(..., exclude=heldout_prompts()))."""
    check_heldout_size(n)
    pool = generate(family, "train", HELDOUT_MAX, seed=HELDOUT_SEED)
    return pool[:n] if task_seed == 0 else random.Random(f"zeda.tasks:heldout:{family}:{task_seed}").sample(pool, n)


def heldout_prompts(families: tuple[str, ...] = FAMILIES) -> set[str]:
    """Every prompt of the held-out slice's pools."""
    return {t.prompt for family in families for t in heldout(family, HELDOUT_MAX)}


def mixture(split: str, n_per_family: int, seed: int = 0, families: tuple[str, ...] = FAMILIES,
            exclude: set[str] = frozenset()) -> list[Task]:
    """n_per_family tasks of each family, shuffled together deterministically; prompts in `exclude` (such as
    the held-out slice) are left out, so a family can come out a few items short."""
    tasks = [task for family in families for task in generate(family, split, n_per_family, seed)
             if task.prompt not in exclude]
    random.Random(f"zeda.tasks:mixture:{split}:{seed}").shuffle(tasks)
    return tasks


def to_prompt_record(task: Task) -> dict:
    """A benchmark/prompt JSONL record in the authors' format (docs/method.md §7), plus answer and family."""
    return {"messages": [{"role": "user", "content": task.prompt}], "answer": task.answer, "family": task.family}


def to_rollout_record(task: Task, response: str) -> dict:
    """An SFT rollout JSONL record: the prompt and the (teacher's) response as the last message."""
    return {"messages": [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": response}]}


def task_from_record(record: dict) -> Task:
    """Rebuild a Task from a `to_prompt_record` record (response left empty), so exported benchmark
    files can be verified with `verify`."""
    return Task(record["family"], record["messages"][0]["content"], "", record["answer"])
