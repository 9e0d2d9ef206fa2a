"""The engine: when paths run, what their results mean, and (later) what the site as a whole is doing."""
