"""Preference examples from labelled conversations (WildFeedback 3.2; Don-Yehiya et al. 5).

For every user turn whose label says DSAT (or MIXED) about the assistant message before it:

- prompt = the conversation up to, not including, that assistant message;
- rejected = that message;
- chosen, by strategy:
  *natural*: the first later assistant message whose reaction is not DSAT: the user's next turn
  is SAT or moves on (NEUTRAL) (with ``accept_final_answer``, also a revision the conversation
  ends on);
  *regenerated*: a response from a generator given the user's preferences as system prompt plus
  "the response should be safe", kept only when the checklist judge prefers it to the rejected
  one (``Regenerator``).

KTO examples: the judged message is desirable when its reaction is SAT, undesirable when DSAT.

Every example carries the user's preferences as its checklist, and its lineage. Per-example
filters run here (confidence, unsafe requests, lengths, PII redaction); batch-level ones (near
duplicates, per-user and per-conversation caps, KTO balance) in ``learner.batch``. Every example
left out is counted by reason in ``Built.drops``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from learner.checklist import rubric_preferences, summarize_with_llm
from learner.corpus import LabelledConversation, Signal
from learner.records import ChatMessage, PreferencePairRecord, Source, UnpairedRecord
from learner.safety import looks_unsafe, redact_pii
from services.chat import ChatEndpoint, ChatError, ChatModel
from services.judging import ChecklistJudge
from services.settings import LearnerSettings

log = logging.getLogger(__name__)

PREFERENCE_SYSTEM_PROMPT = (
    "You are a helpful assistant. From this user's feedback we know what they prefer:\n"
    "{preferences}\n"
    "Answer the user's last message following these preferences. The response should be safe."
)


class _Pending:
    """A DSAT turn whose chosen response cannot be decided yet (see ``_accepted_revision``)."""


PENDING = _Pending()


@dataclass
class Built:
    pairs: list[PreferencePairRecord] = field(default_factory=list)
    unpaired: list[UnpairedRecord] = field(default_factory=list)
    drops: Counter[str] = field(default_factory=Counter)
    judged: Counter[str] = field(default_factory=Counter)  # regenerated: win/loss/tie/failed
    pending: set[str] = field(default_factory=set)  # conversations to build again later


class Regenerator:
    """Chosen responses for DSAT turns that have no accepted revision.

    ``generator`` answers the prompt with the user's preferences as system prompt (the policy
    itself for on-policy data, or a stronger model: WildFeedback's "expert" variant); ``judge``
    compares it with the rejected response by the same checklist and it is kept only on a win.
    ``summarizer``, when given, writes the preferences with the A.2 prompt.
    """

    def __init__(
        self,
        generator: ChatModel,
        judge: ChecklistJudge,
        *,
        max_tokens: int = 256,
        summarizer: ChatEndpoint | None = None,
    ) -> None:
        self.generator = generator
        self.judge = judge
        self.max_tokens = max_tokens
        self.summarizer = summarizer

    def preferences(self, messages: tuple[tuple[str, str], ...], fallback: list[str]) -> list[str]:
        if self.summarizer is None:
            return fallback
        return summarize_with_llm(self.summarizer, messages, fallback=fallback)

    def regenerate(
        self, prompt: list[ChatMessage], rejected: str, checklist: list[str]
    ) -> tuple[str | None, str]:
        """(chosen, outcome); chosen is None unless the judge prefers it to ``rejected``."""
        system = PREFERENCE_SYSTEM_PROMPT.format(preferences="\n".join(f"- {p}" for p in checklist))
        messages = [m.model_dump() for m in prompt]
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + system}
        else:
            messages.insert(0, {"role": "system", "content": system})
        try:
            chosen = self.generator.complete(messages, max_tokens=self.max_tokens, temperature=0.7)
        except ChatError as exc:
            log.info("regeneration failed: %s", exc)
            return None, "generation_failed"
        chosen = chosen.strip()
        if not chosen or chosen == rejected.strip():
            return None, "generation_unusable"
        history = [(m.role, m.content) for m in prompt[:-1]]
        comparison = self.judge.compare(history, prompt[-1].content, chosen, rejected, checklist)
        if comparison.failed:
            return None, "failed"
        return (chosen if comparison.candidate_wins else None), comparison.outcome


class Builder:
    def __init__(
        self,
        settings: LearnerSettings,
        *,
        regenerator: Regenerator | None = None,
        unsafe: Callable[[str], bool] = looks_unsafe,
        redact: Callable[[str], str] | None = redact_pii,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.settings = settings
        self.now = now
        self.regenerator = regenerator
        self.unsafe = unsafe
        self.redact = redact if settings.redact_pii else None
        self.natural = settings.strategy in ("natural", "natural+regenerated")
        self.regenerated = settings.strategy in ("regenerated", "natural+regenerated")

    def build(self, conversations: Iterable[LabelledConversation]) -> Built:
        built = Built()
        for conversation in conversations:
            self._conversation(conversation, built)
        return built

    # -- one conversation ------------------------------------------------------------------------
    def _conversation(self, conv: LabelledConversation, built: Built) -> None:
        messages = conv.messages
        for turn in sorted(conv.signals):
            signal = conv.signals[turn]
            if signal.polarity == "NEUTRAL":
                continue
            response = turn - 1
            # turn == len(messages): thumbs on the last answer, with no user message after it.
            if response < 1 or response >= len(messages) or messages[response][0] != "assistant":
                built.drops["no_judged_response"] += 1
                continue
            if signal.confidence < self.settings.min_confidence:
                built.drops["low_confidence"] += 1
                continue
            prompt = messages[:response]
            if prompt[-1][0] != "user":
                built.drops["no_user_query"] += 1
                continue
            if self.unsafe(prompt[-1][1]):
                # Liu et al.: praise often follows a successful jailbreak; never learn from it.
                built.drops["unsafe_request"] += 1
                continue
            if sum(len(c) for _, c in prompt) > self.settings.max_prompt_chars:
                built.drops["prompt_too_long"] += 1
                continue
            source = self._source(conv, turn, response, signal)
            self._unpaired(
                conv, turn=turn, signal=signal, prompt=prompt, source=source, built=built
            )
            if signal.is_dsat:
                self._pair(conv, turn, prompt, source, built)

    def _unpaired(
        self,
        conv: LabelledConversation,
        *,
        turn: int,
        signal: Signal,
        prompt: tuple[tuple[str, str], ...],
        source: Source,
        built: Built,
    ) -> None:
        completion = conv.messages[turn - 1][1]
        reason = self._length_problem(completion)
        if reason:
            built.drops[f"kto_{reason}"] += 1
            return
        checklist = self._checklist(conv, turn, turn) if signal.is_dsat else []
        built.unpaired.append(
            UnpairedRecord.build(
                prompt=self._messages(prompt),
                completion=self._messages((("assistant", completion),)),
                label=not signal.is_dsat,
                checklist=checklist,
                source=source,
            )
        )

    def _pair(
        self,
        conv: LabelledConversation,
        turn: int,
        prompt: tuple[tuple[str, str], ...],
        source: Source,
        built: Built,
    ) -> None:
        rejected = conv.messages[turn - 1][1]
        if reason := self._length_problem(rejected):
            built.drops[f"rejected_{reason}"] += 1
            return
        revision = self._accepted_revision(conv, turn) if self.natural else None
        if isinstance(revision, _Pending):
            built.pending.add(conv.conversation_id)  # built again when it has settled
            return
        last_feedback = revision[1] if revision else turn
        checklist = self._checklist(conv, turn, last_feedback)
        strategy = "natural"
        chosen: str | None = None
        if revision is not None:
            chosen = conv.messages[revision[0]][1]
            source = source.model_copy(update={"chosen_turn": revision[0]})
        elif self.regenerated:
            if self.regenerator is None:
                built.drops["no_generator_or_judge"] += 1
                return
            checklist = self.regenerator.preferences(conv.messages[: turn + 1], checklist)
            chosen, outcome = self.regenerator.regenerate(
                self._messages(prompt), self._clean(rejected), checklist
            )
            built.judged[outcome] += 1
            if chosen is None:
                built.drops[f"regenerated_{outcome}"] += 1
                return
            strategy = "regenerated"
        else:
            built.drops["no_accepted_revision"] += 1
            return
        if reason := self._length_problem(chosen):
            built.drops[f"chosen_{reason}"] += 1
            return
        if chosen.strip() == rejected.strip():
            built.drops["identical_responses"] += 1
            return
        built.pairs.append(
            PreferencePairRecord.build(
                prompt=self._messages(prompt),
                chosen=self._messages((("assistant", chosen),)),
                rejected=self._messages((("assistant", rejected),)),
                strategy=strategy,
                checklist=checklist,
                source=source,
            )
        )

    def _accepted_revision(
        self, conv: LabelledConversation, turn: int
    ) -> tuple[int, int] | _Pending | None:
        """(assistant index, index of the user turn that accepted it) of the first later answer
        whose reaction is not DSAT; the user turn is ``len(messages)`` for a final answer.

        ``PENDING`` while a live conversation may still settle it: a reaction not labelled yet,
        or no reaction yet, before the conversation has been quiet for ``settle_minutes``."""
        messages = conv.messages
        settled = self._settled(conv)
        for index in range(turn + 1, len(messages)):
            if messages[index][0] != "assistant":
                continue
            reaction = index + 1
            if reaction >= len(messages):
                if self.settings.accept_final_answer and settled:
                    return index, reaction
                return None if settled else PENDING
            signal = conv.signals.get(reaction)
            if signal is None:
                return None if settled else PENDING  # its label may be on its way
            if signal.confidence < self.settings.min_confidence:
                return None  # no trustworthy reaction: do not guess
            if not signal.is_dsat:
                return index, reaction
        return None if settled else PENDING

    def _settled(self, conv: LabelledConversation) -> bool:
        if conv.last_activity is None:  # a file: nothing more will arrive
            return True
        quiet = self.now() - conv.last_activity
        return quiet >= timedelta(minutes=self.settings.settle_minutes)

    def _checklist(self, conv: LabelledConversation, first: int, last: int) -> list[str]:
        """Preferences from the DSAT rubrics and words (messages and thumbs comments) of the
        user turns ``first``..``last``."""
        rubrics: list[str] = []
        words: list[str] = []
        for index in range(first, last + 1):
            signal = conv.signals.get(index)
            if signal is None or not signal.is_dsat:
                continue
            rubrics += signal.dsat
            if index < len(conv.messages) and conv.messages[index][0] == "user":
                words.append(self._clean(conv.messages[index][1]))
            if signal.comment:
                words.append(self._clean(signal.comment))
        return rubric_preferences(rubrics, words)

    def _length_problem(self, text: str) -> str | None:
        if len(text.strip()) < self.settings.min_response_chars:
            return "response_too_short"
        if len(text) > self.settings.max_response_chars:
            return "response_too_long"
        return None

    def _clean(self, text: str) -> str:
        return self.redact(text) if self.redact else text

    def _messages(self, messages: Iterable[tuple[str, str]]) -> list[ChatMessage]:
        return [ChatMessage(role=r, content=self._clean(c)) for r, c in messages]  # type: ignore[arg-type]

    @staticmethod
    def _source(conv: LabelledConversation, turn: int, response: int, signal: Signal) -> Source:
        return Source(
            conversation_id=conv.conversation_id,
            feedback_turn=turn,
            response_turn=response,
            tenant_id=conv.tenant_id,
            user_id=conv.user_id,
            polarity=signal.polarity,
            sat=list(signal.sat),
            dsat=list(signal.dsat),
            confidence=signal.confidence,
            tier=signal.tier,
            detector_version=signal.detector_version,
        )
