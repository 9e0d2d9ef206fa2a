"""HTTP side: /metrics, /healthz, /api/v1, the status page. It only reads the engine's state."""
