"""The notification peers live in the package (the demo uses them too); tests import them from here."""

from watchtower.lab.sinks import (
    MAIL_FROM,
    MAIL_TO,
    SIGNAL_FROM,
    SMS_TO,
    SMSEAGLE_TOKEN,
    HttpRequest,
    HttpSink,
    SmtpMessage,
    SmtpSink,
    mailto_url,
    signal_url,
    smseagle_url,
)

__all__ = [
    "MAIL_FROM",
    "MAIL_TO",
    "SIGNAL_FROM",
    "SMSEAGLE_TOKEN",
    "SMS_TO",
    "HttpRequest",
    "HttpSink",
    "SmtpMessage",
    "SmtpSink",
    "mailto_url",
    "signal_url",
    "smseagle_url",
]
