"""Alerting: texts (messages), delivery through apprise (sender), the durable outbox (outbox)."""
