"""Two defences applied to every example before it can enter a batch.

``looks_unsafe`` flags requests that positive feedback must not reward: Liu et al. find that
users often praise an assistant exactly when a jailbreak or a harmful request succeeded, so SAT
on such a turn is a signal to *not* learn from. It is a lexical screen (role-play jailbreak
markers, instructions to ignore rules, common harm categories in English); plug a moderation
model in through ``Builder(unsafe=...)`` where the stakes are higher.

``redact_pii`` masks e-mail addresses, phone numbers, payment card numbers, IBANs and IP
addresses before text is written to a dataset (``Builder(redact=...)`` replaces it).
"""

from __future__ import annotations

import re

_UNSAFE = re.compile(
    r"|".join(
        [
            # jailbreak framings
            r"\bignore (all |any )?(previous|prior|above|your) (instructions|rules|guidelines)",
            r"\b(DAN|do anything now)\b",
            r"\bjailbreak",
            r"\bdeveloper mode\b",
            r"\bwithout (any )?(restrictions|filters|censorship|limits)\b",
            r"\bpretend (you are|to be) .{0,40}(no|without) (rules|limits|restrictions)",
            # harm categories
            r"\b(make|build|assemble|synthesi[sz]e|produce) (a |an )?"
            r"(bomb|explosive|pipe bomb|nerve agent|bioweapon|chemical weapon|meth|ricin)"
            r"(?![\w-])",
            r"\b(write|create|code) (a |an )?(ransomware|keylogger|malware|virus|botnet)",
            r"\b(how (do i|to)) (kill|poison|stab|shoot) (someone|a person|my)",
            r"\b(steal|phish|skim) .{0,30}(credit card|password|identity|bank)",
            r"\b(child|minor)s? .{0,20}(sexual|nude|explicit)",
            r"\bsuicide (method|instructions)|\bhow to (kill|hurt) myself\b",
        ]
    ),
    re.IGNORECASE,
)

_PII = [
    (re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b"), "[EMAIL]"),
    (re.compile(r"\b(?:\d[ -]?){13,19}\b"), "[CARD]"),
    (re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b"), "[IBAN]"),
    (re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), "[IP]"),
    (re.compile(r"(?<![\w+])\+?\d{1,3}?[ .-]?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{3,4}\b"), "[PHONE]"),
]


def looks_unsafe(text: str) -> bool:
    return _UNSAFE.search(text) is not None


def redact_pii(text: str) -> str:
    for pattern, mask in _PII:
        text = pattern.sub(mask, text)
    return text
