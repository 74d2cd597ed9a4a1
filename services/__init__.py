"""wildloop's shared core: settings, event contracts, event bus, store, metrics and CLI."""
