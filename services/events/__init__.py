"""Event contracts (schemas) and their wire encoding."""
