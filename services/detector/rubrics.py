"""The WildFeedback rubrics (appendix B.1, Tables 4 and 5), word for word, for prompts and docs."""

from __future__ import annotations

from services.events.schemas import DsatRubric, SatRubric

SAT_DEFINITIONS: dict[SatRubric, str] = {
    SatRubric.GRATITUDE: "The user thanks or compliments the AI agent for its responses.",
    SatRubric.LEARNING: (
        "The user learns something new or useful by indicating curiosity and satisfaction with "
        "the information provided."
    ),
    SatRubric.COMPLIANCE: (
        "The user follows the AI agent's suggestions or instructions when applicable."
    ),
    SatRubric.PRAISE: (
        "The user uses positive feedback words (e.g., excellent, amazing) or emojis, indicating "
        "enthusiasm and enjoyment of the conversation."
    ),
    SatRubric.PERSONAL_DETAILS: (
        "The user shares more personal details or opinions with the AI agent when satisfied "
        "with its responses."
    ),
    SatRubric.HUMOR: (
        "The user jokes with or challenges the AI agent in a friendly manner when suitable."
    ),
    SatRubric.ACKNOWLEDGMENT: (
        "The user acknowledges or confirms that they understood or agreed with the AI agent's "
        "explanations when relevant."
    ),
    SatRubric.POSITIVE_CLOSURE: (
        "The user ends the conversation on a positive note without asking for more information "
        "or assistance."
    ),
    SatRubric.GETTING_THERE: (
        "The user acknowledges that the model's response is getting better or has merit but is "
        "not fully satisfied."
    ),
}

DSAT_DEFINITIONS: dict[DsatRubric, str] = {
    DsatRubric.NEGATIVE_FEEDBACK: (
        "The user explicitly expresses dissatisfaction, frustration, annoyance, or anger with "
        "the AI agent's response or behavior."
    ),
    DsatRubric.REVISION: (
        "The user explicitly asks the AI agent to revise its previous response or repeatedly "
        "asks similar questions."
    ),
    DsatRubric.FACTUAL_ERROR: (
        "The user points out the AI agent's factual mistakes, inaccuracies, or self-contradiction "
        "in its information or output."
    ),
    DsatRubric.UNREALISTIC_EXPECTATION: (
        "The user has unrealistic expectations of what the AI agent can do and does not accept "
        "its limitations or alternatives."
    ),
    DsatRubric.NO_ENGAGEMENT: (
        "The user does not respond to the AI agent's questions, suggestions, feedback requests, "
        "etc."
    ),
    DsatRubric.IGNORED: (
        "The user implies that their query was ignored completely or that the response did not "
        "address their intent/goal at all."
    ),
    DsatRubric.LOWER_QUALITY: (
        "The user perceives a decline in quality of service compared to previous experience with "
        "other agents/tools, etc."
    ),
    DsatRubric.INSUFFICIENT_DETAIL: (
        "The user wants more specific/useful information than what is provided by the AI agent."
    ),
    DsatRubric.STYLE: (
        "The user feels that there is a mismatch between their preferred style (long vs short, "
        "bullet point vs paragraph, etc.) and what is provided by the AI agent."
    ),
}
