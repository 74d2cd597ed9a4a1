"""The SAT/DSAT detector: judges each user turn's reaction to the assistant's previous answer.

``judgement`` holds the types every tier shares (``TurnContext`` in, ``Verdict`` out), ``tiers``
the three tiers (rules, classifier, llm), ``cascade`` how they are chained, ``extract`` how
conversations become turn contexts, ``service`` the streaming consumer and ``batch`` the offline
``wildloop detect`` command.
"""
