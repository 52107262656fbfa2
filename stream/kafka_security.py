"""How every Kafka client of the project authenticates and encrypts: one typed setting, rendered per client.

``deploy/config.py`` builds a :class:`KafkaSecurity` from ``ZENITH_KAFKA_*`` settings; confluent-kafka clients
(producers, consumers, admin) take ``security.confluent()``, the Faust app (aiokafka underneath) takes
``security.faust_credentials()``. The default is PLAINTEXT, what the local single-node broker speaks.

>>> KafkaSecurity().confluent()
{'security.protocol': 'PLAINTEXT'}
>>> KafkaSecurity(protocol=SecurityProtocol.SASL_SSL, sasl_username="app", sasl_password="s3cret")
KafkaSecurity(protocol=<SecurityProtocol.SASL_SSL: 'SASL_SSL'>, sasl_mechanism=<SaslMechanism.SCRAM_SHA_512: \
'SCRAM-SHA-512'>, sasl_username='app', ssl_cafile=None, ssl_certfile=None, ssl_keyfile=None)
"""

from __future__ import annotations

import enum
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class SecurityProtocol(enum.StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"

    @property
    def sasl(self) -> bool:
        return self in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL)

    @property
    def tls(self) -> bool:
        return self in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL)


class SaslMechanism(enum.StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


@dataclass(frozen=True)
class KafkaSecurity:
    protocol: SecurityProtocol = SecurityProtocol.PLAINTEXT
    sasl_mechanism: SaslMechanism = SaslMechanism.SCRAM_SHA_512
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)  # never in logs or reprs
    ssl_cafile: Path | None = None  # CA bundle that signed the brokers' certificates (None: system CAs)
    ssl_certfile: Path | None = None  # client certificate, for brokers that require mutual TLS
    ssl_keyfile: Path | None = None

    def __post_init__(self) -> None:
        if self.protocol.sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"Kafka security protocol {self.protocol.value} needs a SASL username and password "
                             "(ZENITH_KAFKA_SASL_USERNAME / ZENITH_KAFKA_SASL_PASSWORD)")
        if not self.protocol.tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ValueError(f"TLS files are set but Kafka security protocol {self.protocol.value} does not use "
                             "TLS: set ZENITH_KAFKA_SECURITY_PROTOCOL=SSL or SASL_SSL")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("a Kafka client certificate needs both ssl_certfile and ssl_keyfile")

    def confluent(self) -> dict[str, Any]:
        """librdkafka properties (confluent-kafka Producer, Consumer, AdminClient)."""
        out: dict[str, Any] = {"security.protocol": self.protocol.value}
        if self.protocol.sasl:
            out |= {"sasl.mechanism": self.sasl_mechanism.value, "sasl.username": self.sasl_username,
                    "sasl.password": self.sasl_password}
        if self.ssl_cafile:
            out["ssl.ca.location"] = str(self.ssl_cafile)
        if self.ssl_certfile and self.ssl_keyfile:
            out |= {"ssl.certificate.location": str(self.ssl_certfile), "ssl.key.location": str(self.ssl_keyfile)}
        return out

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.protocol.tls:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
        if self.ssl_certfile and self.ssl_keyfile:
            ctx.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile))
        return ctx

    def faust_credentials(self) -> Any:
        """``broker_credentials`` for ``faust.App`` (None for PLAINTEXT)."""
        import faust

        if self.protocol.sasl:
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password,
                                         mechanism=self.sasl_mechanism.value, ssl_context=self.ssl_context())
        if self.protocol.tls:
            return faust.SSLCredentials(self.ssl_context())
        return None
