"""The rules tier (tier 1), specified by behaviour: one test per rule family or hard case.

Every example is written here; nothing reads the dataset splits (and never the test split).
"""

# Multilingual examples: Cyrillic letters and full-width punctuation are intended.
# ruff: noqa: RUF001
from __future__ import annotations

import time

import pytest

from services.detector.judgement import Message, Tier, TurnContext, Verdict
from services.detector.tiers.rules import (
    CALIBRATION,
    RulesTier,
    describe_context,
    fit_calibration,
)
from services.events.schemas import DsatRubric, FeedbackCategory, Polarity, SatRubric

D = DsatRubric
S = SatRubric
ANSWER = "The capital of Australia is Sydney, its largest city."
RULES = RulesTier()


def judge(
    user: str,
    answer: str | None = ANSWER,
    history: tuple[Message, ...] = (),
) -> Verdict:
    (verdict,) = RULES.judge([TurnContext("c-1", 2, user, answer, history)])
    return verdict


# --- the tier contract ----------------------------------------------------------------------


def test_is_a_tier_named_rules() -> None:
    assert isinstance(RULES, Tier)
    assert RULES.name == "rules"
    assert judge("thanks!").tier == "rules"


def test_batch_keeps_order_and_length() -> None:
    texts = ["thank you so much!", "this is wrong", "and what about New Zealand?", ""] * 5
    contexts = [TurnContext("c", i, t, ANSWER) for i, t in enumerate(texts)]
    verdicts = RULES.judge(contexts)
    assert [v.polarity for v in verdicts] == [judge(t).polarity for t in texts]
    assert RULES.judge([]) == []


def test_is_deterministic() -> None:
    contexts = [TurnContext("c", 1, "great, another wrong answer", ANSWER)] * 3
    assert RULES.judge(contexts) == RULES.judge(contexts) == [RulesTier().judge(contexts)[0]] * 3


# --- the hard cases from the issue ------------------------------------------------------------


def test_thanks_then_a_new_question_is_gratitude_not_dsat() -> None:
    verdict = judge("thanks! and how would I do the same for a string?")
    assert verdict.polarity is Polarity.SAT
    assert S.GRATITUDE in verdict.sat
    assert verdict.category is FeedbackCategory.POSITIVE


def test_answering_the_assistants_clarifying_question_is_neutral() -> None:
    answer = "I can look that up. Could you confirm the postal code of the delivery address?"
    verdict = judge("10115", answer)
    assert verdict.polarity is Polarity.NEUTRAL
    assert verdict.category is FeedbackCategory.NONE
    # An answered question is a confident NEUTRAL, surer than a turn with no cue at all.
    assert verdict.confidence > judge("the report is due on friday", "Noted.").confidence


@pytest.mark.parametrize(
    "user", ["ok and what about new zealand", "next one: 180 km in 2.5 hours", "now 3(x-2) = 2x"]
)
def test_continuing_the_task_is_neutral(user: str) -> None:
    assert judge(user).polarity is Polarity.NEUTRAL


@pytest.mark.parametrize(
    "user", ["great, another wrong answer", "wow, super helpful 🙄", "thanks for nothing"]
)
def test_sarcasm_is_negative_feedback_not_praise(user: str) -> None:
    verdict = judge(user)
    assert verdict.polarity is Polarity.DSAT
    assert D.NEGATIVE_FEEDBACK in verdict.dsat
    assert not verdict.sat


@pytest.mark.parametrize("user", ["not helpful", "that wasn't helpful at all", "doesn't work"])
def test_negated_praise_is_negative_feedback(user: str) -> None:
    verdict = judge(user)
    assert verdict.polarity is Polarity.DSAT
    assert D.NEGATIVE_FEEDBACK in verdict.dsat


@pytest.mark.parametrize("user", ["no thanks", "no, thanks", "No thank you."])
def test_no_thanks_declines_an_offer_and_is_neither_gratitude_nor_dsat(user: str) -> None:
    verdict = judge(user, "Would you like a version addressed to your manager?")
    assert verdict.polarity is Polarity.NEUTRAL


def test_no_thanks_with_a_friendly_goodbye_is_a_positive_closure() -> None:
    verdict = judge("no thanks, that's all. have a nice day!", "Anything else?")
    assert verdict.polarity is Polarity.SAT
    assert S.POSITIVE_CLOSURE in verdict.sat
    assert S.GRATITUDE not in verdict.sat


@pytest.mark.parametrize(
    "user",
    [
        "thanks, but the capital is actually Canberra",
        "thanks but that's wrong",
        "thank you, but Antarctica is technically the largest desert",
    ],
)
def test_thanks_as_a_softener_before_a_correction_is_dsat(user: str) -> None:
    verdict = judge(user)
    assert verdict.polarity is Polarity.DSAT
    assert S.GRATITUDE not in verdict.sat


def test_softened_correction_is_a_factual_error_with_correction() -> None:
    verdict = judge("thanks, but the capital is actually Canberra")
    assert verdict.dsat == {D.FACTUAL_ERROR}
    assert verdict.category is FeedbackCategory.AWARE_WITH_CORRECTION


@pytest.mark.parametrize(
    "user",
    [
        "great explanation, but the code you gave doesn't work",
        "closer, but still not compiling",
        "much better. the rubber feet thing isn't real though",
        "mejor, pero todavía no funciona",
    ],
)
def test_real_praise_plus_a_real_complaint_is_mixed(user: str) -> None:
    assert judge(user).polarity is Polarity.MIXED


# --- SAT rubric families (English and other languages) --------------------------------------

SAT_EXAMPLES = [
    (S.GRATITUDE, "thank you so much!"),
    (S.GRATITUDE, "muchas gracias"),
    (S.GRATITUDE, "merci beaucoup"),
    (S.GRATITUDE, "vielen Dank!"),
    (S.GRATITUDE, "muito obrigado"),
    (S.GRATITUDE, "спасибо большое"),
    (S.GRATITUDE, "谢谢！"),
    (S.GRATITUDE, "ありがとうございます"),
    (S.PRAISE, "perfect, exactly the tone I wanted 👌"),
    (S.PRAISE, "¡Excelente explicación!"),
    (S.PRAISE, "Super, das ist perfekt"),
    (S.PRAISE, "Идеально"),
    (S.PRAISE, "太棒了"),
    (S.ACKNOWLEDGMENT, "ah right, that makes sense"),
    (S.ACKNOWLEDGMENT, "entendi! então são duas divisões"),
    (S.ACKNOWLEDGMENT, "なるほど"),
    (S.LEARNING, "huh, I didn't know that"),
    (S.LEARNING, "je ne savais pas, intéressant"),
    (S.LEARNING, "知らなかった"),
    (S.COMPLIANCE, "that worked, thx"),
    (S.COMPLIANCE, "Funktioniert jetzt"),
    (S.COMPLIANCE, "可以了"),
    (S.HUMOR, "lmao I have bigger splinters than that"),
    (S.HUMOR, "jajaja buenísimo"),
    (S.POSITIVE_CLOSURE, "that's all for today, bye"),
    (S.POSITIVE_CLOSURE, "bonne journée !"),
    (S.GETTING_THERE, "much better"),
    (S.GETTING_THERE, "уже лучше, почти"),
    (S.PERSONAL_DETAILS, "I'm a nurse, so this was very helpful"),
]


@pytest.mark.parametrize(("rubric", "user"), SAT_EXAMPLES)
def test_sat_rubric_cues(rubric: SatRubric, user: str) -> None:
    verdict = judge(user)
    assert rubric in verdict.sat
    assert verdict.polarity in (Polarity.SAT, Polarity.MIXED)
    assert verdict.category is FeedbackCategory.POSITIVE


def test_personal_details_alone_are_not_a_satisfaction_signal() -> None:
    assert judge("my son is 14").polarity is Polarity.NEUTRAL


# --- DSAT rubric families --------------------------------------------------------------------

DSAT_EXAMPLES = [
    (D.NEGATIVE_FEEDBACK, "this is useless"),
    (D.NEGATIVE_FEEDBACK, "ugh, you're supposed to know these things"),
    (D.NEGATIVE_FEEDBACK, "no sirve para nada"),
    (D.NEGATIVE_FEEDBACK, "c'est nul"),
    (D.NEGATIVE_FEEDBACK, "Das funktioniert nicht"),
    (D.NEGATIVE_FEEDBACK, "não funciona"),
    (D.NEGATIVE_FEEDBACK, "бесполезно"),
    (D.NEGATIVE_FEEDBACK, "没用"),
    (D.NEGATIVE_FEEDBACK, "役に立たない"),
    (D.FACTUAL_ERROR, "this is wrong"),
    (D.FACTUAL_ERROR, "actually it's Canberra"),
    (D.FACTUAL_ERROR, "no, the capital is Canberra"),
    (D.FACTUAL_ERROR, "i've been there 3 years not 2"),
    (D.FACTUAL_ERROR, "eso es incorrecto"),
    (D.FACTUAL_ERROR, "c'est faux"),
    (D.FACTUAL_ERROR, "Der Name ist Krüger, nicht Weber"),
    (D.FACTUAL_ERROR, "Это Достоевский, а не Толстой"),
    (D.FACTUAL_ERROR, "不对，是堪培拉"),
    (D.FACTUAL_ERROR, "間違っています"),
    (D.REVISION, "try again"),
    (D.REVISION, "can you make it shorter"),
    (D.REVISION, "otra vez por favor"),
    (D.REVISION, "перепиши"),
    (D.REVISION, "もう一度お願いします"),
    (D.IGNORED, "i literally said not museums"),
    (D.IGNORED, "that's not what i asked"),
    (D.IGNORED, "ce n'est pas ce que j'ai demandé"),
    (D.INSUFFICIENT_DETAIL, "can you elaborate with examples?"),
    (D.INSUFFICIENT_DETAIL, "that's it?"),
    (D.INSUFFICIENT_DETAIL, "más detalles, por favor"),
    (D.INSUFFICIENT_DETAIL, "подробнее"),
    (D.STYLE, "way too long, just the code please"),
    (D.STYLE, "its for a SLIDE. bullets, max 5 words each"),
    (D.STYLE, "muy largo, máximo 5 líneas"),
    (D.STYLE, "太长了"),
    (D.LOWER_QUALITY, "chatgpt gave me a better one, this is kinda basic"),
    (D.LOWER_QUALITY, "useless. other bots would just do it"),
]


@pytest.mark.parametrize(("rubric", "user"), DSAT_EXAMPLES)
def test_dsat_rubric_cues(rubric: DsatRubric, user: str) -> None:
    verdict = judge(user)
    assert rubric in verdict.dsat
    assert verdict.polarity in (Polarity.DSAT, Polarity.MIXED)


# --- rules that need the context ------------------------------------------------------------

QUESTION = "Deductions depend on where you live. Which country or state are you in?"


def test_ignoring_the_assistants_question_is_no_engagement() -> None:
    verdict = judge("what counts as damage vs wear and tear", QUESTION)
    assert verdict.dsat == {D.NO_ENGAGEMENT}
    assert verdict.category is FeedbackCategory.NONE


@pytest.mark.parametrize("user", ["California", "I'm in the state of Texas?", "yes, Germany"])
def test_answering_the_assistants_question_is_not_no_engagement(user: str) -> None:
    assert judge(user, QUESTION).polarity is Polarity.NEUTRAL


def test_a_new_question_after_an_offer_is_neutral() -> None:
    answer = "Use `df.nunique()`. Anything else you'd like to do with the data?"
    assert judge("how do i filter rows by a list of values", answer).polarity is Polarity.NEUTRAL


def test_repeating_the_previous_request_is_revision_by_rephrase() -> None:
    history = (Message("user", "how do I debug a docker container that exits immediately"),)
    verdict = judge("how can I debug my container, it exits immediately", "Docker is...", history)
    assert D.REVISION in verdict.dsat
    assert verdict.category is FeedbackCategory.REPHRASE


def test_a_follow_up_on_the_same_topic_is_not_a_repeat() -> None:
    history = (Message("user", "What's the capital of Australia?"),)
    assert judge("and the capital of New Zealand?", ANSWER, history).polarity is Polarity.NEUTRAL


def test_the_context_is_described_for_the_learned_tier() -> None:
    history = (Message("user", "which country has the most time zones"),)
    asked = TurnContext("c", 2, "Germany", QUESTION, history)
    assert {"<ctx:asked>", "<ctx:from-answer:0>", "<ctx:from-previous:0>"} <= set(
        describe_context(asked)
    )
    offer = TurnContext("c", 2, "time zones of russia?", "Russia. Want me to list them?", history)
    assert {"<ctx:asked-offer>", "<ctx:from-previous:2>"} <= set(describe_context(offer))
    refusal = TurnContext("c", 2, "just do it", "I can't access your router.", ())
    assert "<ctx:refusal>" in describe_context(refusal)
    assert describe_context(TurnContext("c", 2, "hi", None, ())) == ["<ctx:no-answer>"]


def test_insisting_after_a_refusal_is_an_unrealistic_expectation() -> None:
    refusal = "I can't make it bypass two-factor authentication; that would undermine security."
    verdict = judge("just do it, other bots would", refusal)
    assert D.UNREALISTIC_EXPECTATION in verdict.dsat
    assert D.UNREALISTIC_EXPECTATION not in judge("just do it", "Here is the script.").dsat


# --- Don-Yehiya categories -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "category"),
    [
        ("what do you mean by lowest terms?", FeedbackCategory.CLARIFICATION),
        ("this is wrong", FeedbackCategory.AWARE_WITHOUT_CORRECTION),
        ("that's wrong, it's Canberra, not Sydney", FeedbackCategory.AWARE_WITH_CORRECTION),
        ("make it shorter", FeedbackCategory.AWARE_WITH_CORRECTION),
        ("i asked how to debug it, not what docker is", FeedbackCategory.REPHRASE),
        ("perfect, thanks", FeedbackCategory.POSITIVE),
        ("and what about the second one?", FeedbackCategory.NONE),
    ],
)
def test_feedback_category(user: str, category: FeedbackCategory) -> None:
    assert judge(user).category is category


# --- confidence ------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["thank you so much!", "this is wrong"])
def test_strong_explicit_cues_are_highly_confident(user: str) -> None:
    assert judge(user).confidence >= 0.9


def test_no_cue_is_neutral_with_moderate_confidence() -> None:
    verdict = judge("the meeting is at 3 pm in room 4", "Noted.")
    assert verdict.polarity is Polarity.NEUTRAL
    assert 0.3 <= verdict.confidence < 0.85  # the rules cannot be sure: the next tier decides


def test_weak_cues_are_less_confident_than_strong_ones() -> None:
    assert judge("again").confidence < judge("try again, that's wrong").confidence
    assert judge("cool").confidence < judge("thank you so much!").confidence


def test_confidences_are_probabilities() -> None:
    assert all(0.0 <= value <= 1.0 for value in CALIBRATION.values())


def test_fit_calibration_is_smoothed_precision_per_bucket() -> None:
    pairs = [(TurnContext("c", 1, "thank you so much!", ANSWER), "SAT")] * 6
    pairs.append((TurnContext("c", 1, "thank you so much!", ANSWER), "NEUTRAL"))
    table = fit_calibration(pairs)
    assert 0.8 < table["sat:3"] < 0.95  # 6/7 right, pulled toward the prior
    assert table["neutral:none"] == pytest.approx(0.55)  # unseen: the prior


# --- robustness ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "user",
    [
        "",
        "   \n\t ",
        "\x00\x01\x02\x1b[31m\x7f",
        "\ud800 lone surrogate \udfff",
        "👍🏽" * 50,
        "ｔｈａｎｋｓ",  # full-width letters
        "\u202e\u200b\ufeff right-to-left override",
        "?" * 1000,
        "'" * 500 + '"' * 500,
    ],
)
def test_odd_text_never_raises(user: str) -> None:
    verdict = judge(user)
    assert 0.0 <= verdict.confidence <= 1.0


def test_empty_turn_is_neutral_with_low_confidence() -> None:
    verdict = judge("   ")
    assert verdict.polarity is Polarity.NEUTRAL
    assert verdict.confidence <= 0.5


def test_missing_assistant_answer_is_judged_from_the_text_alone() -> None:
    assert judge("thank you so much!", None).polarity is Polarity.SAT


def test_huge_turn_is_cut_and_stays_fast() -> None:
    huge = "thank you so much! " + "lorem ipsum dolor " * 200_000 + " this is wrong"
    started = time.perf_counter()
    verdict = judge(huge, "x" * 1_000_000)
    assert time.perf_counter() - started < 0.2
    assert verdict.polarity is Polarity.DSAT  # first and last parts are read: thanks + wrong
