"""Shared pieces of the fuzz suite: fast + slow twins of a property, odd strings, and the one outcome check."""

from __future__ import annotations

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from qig.errors import QigError


def fast_and_slow(*strategies, examples: tuple[dict, ...] = (), fast_examples: int | None = None, **named):
    """Two tests from one property: the fast one (default profile) and its slow twin (``-m slow``, many examples).

    examples: inputs always tried first (``hypothesis.example``), e.g. the bugs the fuzzer found.
    fast_examples: the fast test's number of examples where the profile's does not suit (cheap properties).

    >>> test_x, test_x_slow = fast_and_slow(n=st.integers(), examples=({"n": -1},))(check_x)  # doctest: +SKIP
    """

    def wrap(check):
        def build():
            test = given(*strategies, **named)(check)
            for ex in reversed(examples):
                test = example(**ex)(test)
            return test

        fast = build()
        if fast_examples is not None:
            fast = settings(settings.get_profile("fast"), max_examples=fast_examples)(fast)
        slow = settings(settings.get_profile("slow"))(build())
        return fast, pytest.mark.slow(slow)

    return wrap


def outcome(text: str) -> None:
    """Count an outcome for ``--hypothesis-show-statistics``; outside a property (a plain test) it is dropped."""
    try:
        event(text)
    except InvalidArgument:
        pass


def ends_well(call, *args, **kwargs):
    """Run ``call``: its result, or None when it raised a QigError; any other exception fails the property."""
    name = getattr(call, "__name__", "call")
    try:
        out = call(*args, **kwargs)
    except QigError as exc:
        assert str(exc).strip(), "a QigError must say what was wrong"
        outcome(f"{name}: QigError")
        return None
    outcome(f"{name}: returned")
    return out


# Strings that have broken text handling somewhere: empty, blank, placeholders, special tokens, lone
# surrogates (JSON can carry them as \ud800), NUL, huge, right-to-left and zero-width characters.
ODD_STRINGS = [
    "",
    " ",
    "\n\n",
    "<image>",
    "<image><image>",
    "<|im_end|>",
    "<|im_start|>assistant",
    "\ud800",
    "a\x00b",
    "x" * 5000,
    "🙂" * 3,
    "\u202eabc",
    "\u200b",
    "nan",
    "-1",
    "../../etc",
]

odd_text = st.one_of(st.text(max_size=20), st.sampled_from(ODD_STRINGS))

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), odd_text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(odd_text, inner, max_size=3)),
    max_leaves=6,
)
