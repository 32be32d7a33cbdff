"""Answer scoring: the VQA answer normalisation and accuracy, exact match, multiple-choice letters,
agreement with the baseline. Pure functions of strings; no model anywhere.

Normalisation (`normalize_answer`) follows the official VQA evaluation script (vqaEval.py, the VQA
challenge's, which EvalAI runs): newlines and tabs to spaces; punctuation `; / [ ] " { } ( ) = + \\ _
- > < @ ` , ? !` removed where it touches a space (or anywhere when the answer has a digit-comma-digit,
"1,000" -> "1000"), else replaced by a space ("red-white" -> "red white"); a period not followed by a
digit removed ("3.5" stays); lower case; number words zero..ten and "none" to digits; the articles
a, an, the dropped; apostrophe-less contractions restored ("dont" -> "don't"). Two deliberate
differences, both documented in docs/EVAL.md: the script's contraction table is taken as the set of
canonical contractions below with every apostrophe-dropped spelling mapped to it (the script's table
lists some capitalised keys, "Im", that never match after lower-casing, and maps "somebody'd" to
"somebodyd"); and the human answers are always normalised too (the script normalises them only when
the ten disagree, which is the same when they arrive normalised, as VQAv2's do).

VQA accuracy (`vqa_accuracy`) is the official one: min(#humans who gave the answer / 3, 1) averaged
over the ten leave-one-out subsets of the human answers (so 1, 2, 3 matching humans of ten score 0.3,
0.6, 0.9, not 1/3, 2/3, 1); `vqa_accuracy_min3` is the plain formula without the averaging.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# the script's pattern "(?!<=\d)(\.)(?!\d)" has a typo for a look-behind that never constrains: in
# effect, a period not followed by a digit
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = frozenset(("a", "an", "the"))
_CANONICAL_CONTRACTIONS = """
ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's
should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll
why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've
""".split()


def _spellings_without_apostrophes(word: str) -> set[str]:
    """Every spelling of `word` with some (at least one) of its apostrophes dropped."""
    parts = word.split("'")
    out = set()
    for keep in itertools.product((True, False), repeat=len(parts) - 1):
        s = parts[0] + "".join(("'" if k else "") + p for k, p in zip(keep, parts[1:]))
        if s != word:
            out.add(s)
    return out


_CONTRACTIONS = {v: c for c in _CANONICAL_CONTRACTIONS for v in _spellings_without_apostrophes(c)}


def _punctuation(text: str) -> str:
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for p in _PUNCTUATION:  # the script tests the original text for each mark, and edits the copy
        out = out.replace(p, "" if glued or f"{p} " in text or f" {p}" in text else " ")
    return _PERIOD.sub("", out)


def _words(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """The official VQA answer normalisation (module docstring): "The two dogs!" -> "2 dogs"."""
    return _words(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the human answers (normally ten)."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if not gts:
        raise ValueError("vqa_accuracy: no human answers")
    matches = sum(g == pred for g in gts)
    # leave human i out: the matches among the other len-1, each subset's min(matches / 3, 1)
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)


def vqa_accuracy_min3(prediction: str, answers: Sequence[str]) -> float:
    """min(#humans who gave the answer / 3, 1), without the leave-one-out averaging."""
    pred = normalize_answer(prediction)
    return min(1.0, sum(normalize_answer(a) == pred for a in answers) / 3)


def majority_answer(answers: Sequence[str]) -> str:
    """The most common normalised human answer (ties: the one given first)."""
    counts = Counter(normalize_answer(a) for a in answers)
    best = max(counts.values())
    return next(a for a in map(normalize_answer, answers) if counts[a] == best)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction is the majority human answer (normalised), else 0.0."""
    return float(normalize_answer(prediction) == majority_answer(answers))


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def choice_prompt(question: str, choices: Sequence[str]) -> str:
    """The question with its options, one a line: "A. dog" (LLaVA's multiple-choice layout)."""
    return "\n".join([question, *(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))])


def gold_letter(answers: Sequence[str], choices: Sequence[str]) -> str:
    """The correct option's letter: the majority answer, given as a letter ("B") or as an option's text."""
    letters = LETTERS[: len(choices)]
    votes = Counter(_as_letter(a, choices) for a in answers)
    votes.pop(None, None)
    if not votes:
        raise ValueError(f"none of the answers {list(answers)!r} is a letter {letters[0]}..{letters[-1]} or an option")
    return votes.most_common(1)[0][0]


def _as_letter(text: str, choices: Sequence[str]) -> str | None:
    t = text.strip()
    if len(t) == 1 and t.upper() in LETTERS[: len(choices)]:
        return t.upper()
    norm = normalize_answer(t)
    hits = [LETTERS[i] for i, c in enumerate(choices) if normalize_answer(c) == norm]
    return hits[0] if len(hits) == 1 else None


_LEADING_LETTER = re.compile(r"^\(?([A-Za-z])(?:[.):]|\s*$)")  # "B", "b.", "(B)", "B) red", "B: red"
_SAID_LETTER = re.compile(r"\b(?i:answer|option|choice)(?: is)?:?\s*\(?([A-Z])\b")  # "The answer is B"


def predicted_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option a free-text answer picks, tried in this order: a leading letter ("B", "b.", "(B)",
    "B) red"); "answer/option/choice (is) B" ("Answer: B", "The answer is B"); the one option whose
    text the normalised answer equals ("A red car." picks "red car"). None when nothing picks one."""
    letters = LETTERS[: len(choices)]
    text = prediction.strip()
    for pattern in (_LEADING_LETTER, _SAID_LETTER):
        m = pattern.search(text)
        if m and m.group(1).upper() in letters:
            return m.group(1).upper()
    return _as_letter(text, choices)


def mc_accuracy(prediction: str, answers: Sequence[str], choices: Sequence[str]) -> float:
    return float(predicted_letter(prediction, choices) == gold_letter(answers, choices))


def same_answer(a: str, b: str, choices: Sequence[str] | None = None) -> bool:
    """Whether two engines gave the same answer: the same option for a multiple-choice item (an
    unreadable option compares by text), else the same normalised text."""
    if choices:
        la, lb = predicted_letter(a, choices), predicted_letter(b, choices)
        if la is not None or lb is not None:
            return la == lb
    return normalize_answer(a) == normalize_answer(b)
