"""Batch-level filters: near duplicates, per-conversation and per-user caps, a flooding user's
share, and KTO balance."""

from __future__ import annotations

from collections import Counter

from learner.batch import assemble
from learner.builder import Builder
from learner.dedupe import NearDuplicates
from services.settings import LearnerSettings
from tests.learner.corpus import CONVERSATIONS, LABELS, flood, honest, labelled


def built_from(convs, labels, settings):  # type: ignore[no-untyped-def]
    return Builder(settings).build(labelled(c, labels) for c in convs)


def test_one_user_flooding_complaints_cannot_dominate_a_batch() -> None:
    settings = LearnerSettings(strategy="natural", max_pairs_per_user=8, max_user_share=0.2)
    convs, labels = flood("mallory", 24)
    for k, user in enumerate(("u1", "u2", "u3", "u4", "u5")):
        more_convs, more_labels = honest(user, 2, start=2 * k)
        convs += more_convs
        labels += more_labels
    built = built_from(convs, labels, settings)
    assert sum(1 for p in built.pairs if p.source.user_id == "mallory") == 24

    batch = assemble(built.pairs, built.unpaired, settings, built.drops)

    users = Counter(p.source.user_id for p in batch.pairs)
    assert users["mallory"] / len(batch.pairs) <= 0.2
    assert all(users[u] == 2 for u in ("u1", "u2", "u3", "u4", "u5"))
    assert batch.drops["pair_user_cap"] == 24 - 8
    assert batch.drops["pair_user_share"] == 8 - users["mallory"]


def test_the_per_user_cap_holds_even_with_too_few_users_for_a_share() -> None:
    settings = LearnerSettings(strategy="natural", max_pairs_per_user=3)
    convs, labels = flood("mallory", 10)
    built = built_from(convs, labels, settings)

    batch = assemble(built.pairs, built.unpaired, settings)

    assert len(batch.pairs) == 3
    assert batch.drops["pair_user_cap"] == 7


def test_near_duplicate_prompts_enter_a_batch_once() -> None:
    settings = LearnerSettings(strategy="natural", max_pairs_per_user=100, max_user_share=1.0)
    convs, labels = flood("u", 2)
    # The same question again, differing in one trailing character.
    twin, twin_labels = flood("u", 1)
    twin[0]["conversation_id"] = "twin"
    twin[0]["messages"][0]["content"] += "!"
    twin[0]["messages"][1]["content"] = "A different bad answer."
    for lb in twin_labels:
        lb["conversation_id"] = "twin"
    built = built_from(convs + twin, labels + twin_labels, settings)
    assert len(built.pairs) == 3

    batch = assemble(built.pairs, built.unpaired, settings)

    assert len(batch.pairs) == 2
    assert batch.drops["pair_near_duplicate_prompt"] == 1


def test_near_duplicates_are_found_by_hamming_distance_not_only_equality() -> None:
    seen = NearDuplicates(distance=3)
    text = "Tell me about the history of the Roman empire and its fall in the west " * 3
    assert not seen.seen(text)
    assert seen.seen(text + " please")
    assert not seen.seen("An entirely different question about baking sourdough bread at home")


def test_kto_batches_are_class_balanced() -> None:
    settings = LearnerSettings(strategy="natural", max_user_share=1.0)
    built = built_from(CONVERSATIONS, LABELS, settings)
    desirable = sum(u.label for u in built.unpaired)
    undesirable = len(built.unpaired) - desirable
    assert desirable != undesirable

    batch = assemble(built.pairs, built.unpaired, settings)

    kept = Counter(u.label for u in batch.unpaired)
    assert kept[True] == kept[False] == min(desirable, undesirable)
    assert batch.drops["kto_class_balance"] == abs(desirable - undesirable)


def test_the_same_input_gives_the_same_batch() -> None:
    settings = LearnerSettings(strategy="natural", max_pairs_per_user=3)
    convs, labels = flood("mallory", 10)
    built = built_from(convs, labels, settings)
    first = assemble(built.pairs, built.unpaired, settings)
    second = assemble(list(reversed(built.pairs)), built.unpaired, settings)
    assert [p.id for p in first.pairs] == [p.id for p in second.pairs]
