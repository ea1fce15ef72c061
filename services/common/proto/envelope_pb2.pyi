from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class Envelope(_message.Message):
    __slots__ = ("schema_version", "source_id", "message_id", "received_at_ms", "client_ip", "user_agent", "request_id", "path", "event")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_ID_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IP_FIELD_NUMBER: _ClassVar[int]
    USER_AGENT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    source_id: str
    message_id: str
    received_at_ms: int
    client_ip: str
    user_agent: str
    request_id: str
    path: str
    event: bytes
    def __init__(self, schema_version: _Optional[int] = ..., source_id: _Optional[str] = ..., message_id: _Optional[str] = ..., received_at_ms: _Optional[int] = ..., client_ip: _Optional[str] = ..., user_agent: _Optional[str] = ..., request_id: _Optional[str] = ..., path: _Optional[str] = ..., event: _Optional[bytes] = ...) -> None: ...
