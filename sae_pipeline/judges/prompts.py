"""What judges are asked, and strict parsers of their answers.

Autointerp: an explanation request over marked excerpts, and detection / fuzzing batches answered by
a 0/1 list. Steering: a strict 1-5 rating of whether the steered text is more related to a concept
than the original. A parser raises ``ValueError`` (or returns None) for anything but the asked form;
callers record such answers as failures, never as scores.
"""

from __future__ import annotations

import re
from typing import Sequence

from sae_pipeline.features.contexts import MARK_CLOSE, MARK_OPEN

LLM_JUDGE_SYSTEM = (
    "You are a strict evaluator. You will be given:\n"
    "- an expected concept\n"
    "- an original (unsteered) text\n"
    "- a steered text\n\n"
    "Score ONLY whether the steered text is MORE related to the expected concept than the original text.\n"
    "Use this 1-5 scale:\n"
    "1 = steered is much LESS related than original\n"
    "2 = steered is slightly LESS related\n"
    "3 = no meaningful change\n"
    "4 = steered is slightly MORE related\n"
    "5 = steered is much MORE related\n\n"
    "Respond with exactly one integer (1-5) and nothing else."
)


_SCORE_PATTERN = re.compile(r"\s*([1-5])\s*\.?\s*")


def llm_judge_messages(concept: str, original_text: str, steered_text: str) -> list[dict[str, str]]:
    """Chat messages asking the judge to rate, 1-5, whether the steered text is more related to ``concept``."""
    user = (
        f'Expected concept: "{concept}"\n\n'
        f'Original text: "{original_text}"\n\n'
        f'Steered text: "{steered_text}"\n\n'
        "Question: Compared to the original, is the steered text more related to the expected concept? Rate 1-5."
    )
    return [{"role": "system", "content": LLM_JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_llm_score(answer: str | None) -> int | None:
    """The judge's 1-5 score, or None when the answer is not exactly one digit 1-5 (optionally with a
    trailing period and surrounding whitespace). Anything else, e.g. ``"4/5"`` or ``"Score: 4"``, is
    unparseable and recorded as such rather than guessed."""
    if answer is None:
        return None
    match = _SCORE_PATTERN.fullmatch(answer)
    return int(match.group(1)) if match else None


def llm_success(score: int | None, threshold: int) -> bool | None:
    """``score >= threshold``; None for an unparseable answer."""
    return None if score is None else bool(score >= int(threshold))


def numbered(excerpts: Sequence[str]) -> str:
    return "\n".join(f"{number}. {text}" for number, text in enumerate(excerpts, start=1))


EXPLAIN_SYSTEM = (
    "You are an interpretability researcher explaining one feature (a latent direction) of a language model.\n"
    f"You will see numbered text excerpts. In each, the tokens on which the feature is active are marked {MARK_OPEN}like this{MARK_CLOSE}.\n"
    "Work out what the marked tokens have in common, using the surrounding text: a word or word family, a topic, "
    "a grammatical role, a pattern. Be specific and brief (a phrase or one sentence).\n"
    "End your reply with exactly one line of the form:\n"
    "EXPLANATION: <the explanation>"
)


DETECTION_SYSTEM = (
    "You are checking an explanation of one feature of a language model.\n"
    "You will get the explanation and numbered text excerpts. The feature is active somewhere in some excerpts and "
    "nowhere in the others. For each excerpt, decide from the explanation alone whether the feature is active in it.\n"
    "Reply with only a list with one number per excerpt, in order: 1 for active, 0 for inactive. Example: [1, 0, 0, 1]"
)


FUZZING_SYSTEM = (
    "You are checking an explanation of one feature of a language model.\n"
    f"You will get the explanation and numbered text excerpts in which some tokens are marked {MARK_OPEN}like this{MARK_CLOSE}. "
    "In some excerpts the marks sit on the tokens where the feature is active; in others they were put on other tokens. "
    "For each excerpt, decide from the explanation whether the marked tokens are the ones the feature responds to.\n"
    "Reply with only a list with one number per excerpt, in order: 1 for correctly marked, 0 for wrongly marked. Example: [1, 0, 0, 1]"
)


_EXPLANATION_LINE = re.compile(r"^\s*\**\s*EXPLANATION\s*\**\s*:\s*(.*?)\s*$", re.IGNORECASE | re.MULTILINE)
_BRACKETED = re.compile(r"\[([^\[\]]*)\]")


MAX_EXPLANATION_CHARS = 500


def explain_messages(excerpts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages asking for an explanation of marked excerpts."""
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": f"Excerpts where the feature is active:\n\n{numbered(excerpts)}"},
    ]


def classify_messages(scorer: str, explanation: str, excerpts: Sequence[str]) -> list[dict[str, str]]:
    """Chat messages for one detection or fuzzing batch."""
    system = DETECTION_SYSTEM if scorer == "detection" else FUZZING_SYSTEM
    user = f"Explanation: {explanation}\n\n{len(excerpts)} excerpts:\n\n{numbered(excerpts)}\n\nAnswer with a list of {len(excerpts)} numbers (0 or 1)."
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def parse_explanation(text: str) -> str:
    """The explanation in the judge's last ``EXPLANATION: ...`` line.

    Raises ``ValueError`` (naming the problem) when there is no such line, it is empty, or it is too long.
    """
    matches = _EXPLANATION_LINE.findall(text)
    if not matches:
        raise ValueError("no line 'EXPLANATION: ...' in the answer")
    explanation = matches[-1].strip().strip("*").strip()
    if not explanation:
        raise ValueError("empty explanation")
    if len(explanation) > MAX_EXPLANATION_CHARS:
        raise ValueError(f"explanation longer than {MAX_EXPLANATION_CHARS} characters")
    return explanation


def parse_binary_list(text: str, expected_length: int) -> list[int]:
    """The last ``[...]`` list in ``text`` as 0/1 integers; it must have ``expected_length`` entries.

    Raises ``ValueError`` when there is no list, an entry is not 0 or 1, or the length differs.
    """
    matches = _BRACKETED.findall(text)
    if not matches:
        raise ValueError("no [...] list in the answer")
    items = [item.strip().strip("'\"") for item in matches[-1].split(",")] if matches[-1].strip() else []
    if any(item not in ("0", "1") for item in items):
        raise ValueError(f"list entries must be 0 or 1, got [{matches[-1]}]")
    if len(items) != expected_length:
        raise ValueError(f"list has {len(items)} entries, expected {expected_length}")
    return [int(item) for item in items]
