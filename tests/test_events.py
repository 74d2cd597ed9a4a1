"""Event contracts: versioned, round-trippable, and strict about what they define."""

from __future__ import annotations

import json

import pytest

from services.events.codec import DecodeError, decode, encode
from services.events.schemas import (
    AdapterAction,
    AdapterLifecycleChanged,
    DsatRubric,
    EventDeadLettered,
    FeedbackCategory,
    FeedbackSubmitted,
    Polarity,
    Rating,
    Role,
    SatRubric,
    TurnLabeled,
    TurnLogged,
)

EVENTS = [
    TurnLogged(
        conversation_id="c",
        turn=1,
        role=Role.ASSISTANT,
        content="hi",
        latency_ms=3.2,
        time_to_first_token_ms=1.0,
        prompt_tokens=5,
        completion_tokens=2,
        model="m",
        adapter_id="a",
        request_id="r",
        user_id="u",
    ),
    FeedbackSubmitted(conversation_id="c", turn=1, rating=Rating.UP, comment="great"),
    TurnLabeled(
        conversation_id="c",
        turn=2,
        polarity=Polarity.MIXED,
        sat=[SatRubric.GRATITUDE],
        dsat=[DsatRubric.STYLE],
        category=FeedbackCategory.POSITIVE,
        confidence=0.7,
        tier="rules",
        detector_version="d1",
    ),
    AdapterLifecycleChanged(adapter_id="a", action=AdapterAction.ROLLED_BACK, reason="DSAT up"),
    EventDeadLettered(
        source_topic="t",
        source_partition=0,
        source_offset=7,
        consumer_group="g",
        reason="bad",
        raw_base64="",
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.event_type)
def test_every_event_round_trips_through_the_wire_encoding(event: object) -> None:
    assert decode(encode(event)) == event  # type: ignore[arg-type]


def test_events_carry_a_unique_id_a_version_and_an_aware_timestamp() -> None:
    a, b = (TurnLogged(conversation_id="c", turn=0, role=Role.USER, content="x") for _ in "ab")
    assert a.event_id != b.event_id
    assert a.schema_version == 1 and a.occurred_at.tzinfo is not None
    assert json.loads(encode(a))["event_type"] == "turn.logged"


def test_conversation_events_are_keyed_by_conversation_and_adapter_events_by_adapter() -> None:
    assert EVENTS[0].partition_key == "c"
    assert EVENTS[2].partition_key == "c"
    assert EVENTS[3].partition_key == "a"


def test_rubric_and_category_names_match_the_published_label_format() -> None:
    assert [r.value for r in SatRubric] == [
        "Gratitude",
        "Learning",
        "Compliance",
        "Praise",
        "Personal_Details",
        "Humor",
        "Acknowledgment",
        "Positive_Closure",
        "Getting_There",
    ]
    assert [r.value for r in DsatRubric] == [
        "Negative_Feedback",
        "Revision",
        "Factual_Error",
        "Unrealistic_Expectation",
        "No_Engagement",
        "Ignored",
        "Lower_Quality",
        "Insufficient_Detail",
        "Style",
    ]
    assert {c.value for c in FeedbackCategory} == {
        "rephrase",
        "aware_with_correction",
        "aware_without_correction",
        "clarification",
        "positive",
        "none",
    }


def test_a_label_event_renders_the_turn_label_record() -> None:
    record = EVENTS[2].to_label_record()  # type: ignore[union-attr]
    assert record == {
        "conversation_id": "c",
        "turn": 2,
        "polarity": "MIXED",
        "sat": ["Gratitude"],
        "dsat": ["Style"],
        "category": "positive",
        "confidence": 0.7,
        "tier": "rules",
    }


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty record value"),
        (b"", "empty record value"),
        (b"\xc3\x28", "not UTF-8"),
        (b"[1, 2]", "JSON list, not an object"),
        (b"{", "not JSON"),
        (b'{"event_type": "turn.exploded"}', "unknown event_type 'turn.exploded'"),
        (b'{"event_type": "turn.logged", "schema_version": 2}', "unsupported schema_version 2"),
        (
            b'{"event_type": "turn.logged", "conversation_id": "c", "turn": 0, "role": "robot",'
            b' "content": "x"}',
            "invalid turn.logged: role",
        ),
        (
            b'{"event_type": "turn.labeled", "conversation_id": "c", "turn": 0, "polarity": "SAT",'
            b' "confidence": 1.5, "tier": "t", "detector_version": "v"}',
            "invalid turn.labeled: confidence",
        ),
    ],
)
def test_undecodable_records_are_refused_with_a_one_line_reason(
    raw: bytes | None, reason: str
) -> None:
    with pytest.raises(DecodeError) as exc:
        decode(raw)
    assert reason in exc.value.reason and "\n" not in exc.value.reason


def test_unknown_keys_are_ignored_so_older_consumers_read_newer_minor_additions() -> None:
    doc = json.loads(encode(EVENTS[1]))
    doc["new_field"] = 1
    assert decode(json.dumps(doc).encode()) == EVENTS[1]
