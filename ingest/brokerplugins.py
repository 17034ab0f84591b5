"""amqtt plugins that make the embedded broker (``ingest.broker``) enforce the rules of
``ingest.brokerauth``, as the generated mosquitto configuration does. Imported by amqtt
only when the embedded broker has a credentials file (amqtt's plugin base is slow to import).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from devices.topics import DEFAULT_PREFIX
from ingest.brokerauth import Credentials, TopicRules

log = logging.getLogger("ingest.broker")


class CredentialsAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]  # amqtt has no types
    """Every client authenticates with a password of the credentials file; a device's
    client id is its username, and its Will (if any) goes under its own id."""

    @dataclass
    class Config:
        credentials: Any = None  # a Credentials
        prefix: str = DEFAULT_PREFIX

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.credentials: Credentials = self.config.credentials
        self.rules = TopicRules(self.config.prefix, self.credentials.ingest_username)

    async def authenticate(self, *, session: Session) -> bool:
        user = session.username
        if not self.credentials.check(user, session.password):
            log.warning("embedded broker: refused %r (unknown user or wrong password)", user)
            return False
        if user != self.credentials.ingest_username and session.client_id != user:
            log.warning("embedded broker: refused %r: client id %r", user, session.client_id)
            return False
        if session.will_flag and not self.rules.may_publish(user, session.will_topic or ""):
            log.warning("embedded broker: refused %r: Will on %r", user, session.will_topic)
            return False
        return True


class TopicRulesPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt has no types
    """``TopicRules`` on every publish, subscribe and delivery."""

    @dataclass
    class Config:
        prefix: str = DEFAULT_PREFIX
        ingest_username: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.rules = TopicRules(self.config.prefix, self.config.ingest_username)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        user = session.username if session is not None else None
        if topic is None:
            return False
        if action == Action.PUBLISH:
            allowed = self.rules.may_publish(user, topic)
        else:  # SUBSCRIBE (a filter) and RECEIVE (a topic)
            allowed = self.rules.may_subscribe(user, topic)
        if not allowed and action != Action.RECEIVE:
            log.warning("embedded broker: %r may not %s %r", user, action, topic)
        return allowed
