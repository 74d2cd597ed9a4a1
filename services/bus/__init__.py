"""The event bus: one interface (``ports``), two backends (Kafka, embedded SQLite log)."""
