"""watchtower: an out-of-band monitor that tells on-call what died, why, and what to do first."""

__version__ = "0.1.0"
