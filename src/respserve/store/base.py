"""The store interface. A shared backend (Postgres, Redis) for several replicas implements the same.

Every method is a coroutine, run on the server's event loop: a backend waits on its database without
holding a thread (PostgreSQL: asyncio connections), or hands the work to a thread of its own (SQLite), so
store calls never queue for the default executor that the rest of the server uses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Item = dict[str, Any]  # an input or output item, as on the wire
Order = Literal["asc", "desc"]
Channel = Literal["events", "cancel"]


@dataclass(frozen=True)
class ItemPage:
    items: list[Item]
    has_more: bool


@dataclass(frozen=True)
class StoredImage:
    id: str
    response_id: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's record; its bytes are read apart (`read_file`)."""

    id: str
    filename: str
    purpose: str
    media_type: str
    bytes: int
    created_at: int
    expires_at: int | None = None


@dataclass(frozen=True)
class FilePage:
    files: list[StoredFile]
    has_more: bool


@dataclass(frozen=True)
class StoredConversation:
    id: str
    created_at: int
    metadata: dict[str, str]


class ResponseStore(ABC):
    """Responses (resource JSON, input items, output items, stream events, images), conversations and files."""

    @abstractmethod
    async def open(self) -> None:
        """Connects and brings the schema up to date; called once, on the event loop that will use the store."""

    # ---- responses --------------------------------------------------------------------------------------
    @abstractmethod
    async def save_response(self, resource: dict[str, Any], input_items: list[Item], owner: str | None) -> None:
        """Inserts or replaces a response; its output items are read from `resource["output"]`."""

    @abstractmethod
    async def get_response(self, response_id: str, owner: str | None) -> dict[str, Any] | None: ...

    @abstractmethod
    async def delete_response(self, response_id: str, owner: str | None) -> bool: ...

    @abstractmethod
    async def list_input_items(
        self, response_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None: ...

    @abstractmethod
    async def chain_items(self, response_id: str, owner: str | None) -> list[Item] | None:
        """Input and output items of the chain ending at `response_id`, oldest first, in one read.

        None when the response is not stored (or belongs to another owner).
        """

    # Whether other processes (replicas) share this store: then a starting replica must not fail the
    # responses the others are running, and leases (below) tell the dead from the living.
    shared: bool = False

    @abstractmethod
    async def fail_unfinished(self, message: str) -> int:
        """Marks responses left queued or in progress (by a restart) as failed; returns how many."""

    # ---- between replicas (a shared store only; one process needs no messages) ------------------------
    @abstractmethod
    async def notify(self, channel: Channel, response_id: str) -> None:
        """Tells every replica: new stream events of a response (`events`), or a request to cancel it."""

    @abstractmethod
    async def listen(self, callback: Callable[[Channel, str], None]) -> None:
        """From now on calls `callback(channel, response_id)`, on the event loop, for each notification."""

    @abstractmethod
    async def renew_leases(self, replica: str, response_ids: list[str], expires_at: int) -> None:
        """Records that `replica` is still running these responses, until `expires_at` (Unix seconds)."""

    @abstractmethod
    async def fail_expired(self, now: int, unleased_before: int, message: str) -> int:
        """Marks failed the queued or in-progress responses whose lease ran out before `now` (their replica
        died), and those never leased though created before `unleased_before`; returns how many."""

    # ---- stream events of background responses ---------------------------------------------------------
    @abstractmethod
    async def append_events(self, response_id: str, events: list[tuple[int, str]]) -> None:
        """Records (sequence_number, event JSON) pairs."""

    @abstractmethod
    async def events_after(self, response_id: str, sequence_number: int) -> list[tuple[int, str]]: ...

    # ---- images served by URL (`response_format: url`) --------------------------------------------------
    @abstractmethod
    async def save_image(self, image: StoredImage, owner: str | None) -> None:
        """Kept whether or not the response is stored: its URL is the answer. Deleting the response deletes it."""

    @abstractmethod
    async def get_image(self, image_id: str, owner: str | None) -> StoredImage | None: ...

    # ---- uploaded files (`/v1/files`); an expired file is gone for every read -------------------------
    @abstractmethod
    async def save_file(self, file: StoredFile, data: bytes, owner: str | None) -> None: ...

    @abstractmethod
    async def get_file(self, file_id: str, owner: str | None) -> StoredFile | None: ...

    @abstractmethod
    async def read_file(self, file_id: str, owner: str | None) -> tuple[StoredFile, bytes] | None: ...

    @abstractmethod
    async def list_files(
        self, owner: str | None, purpose: str | None, limit: int, order: Order, after: str | None
    ) -> FilePage:
        """Oldest first (`asc`) or newest first; `after` is a file id, as for items."""

    @abstractmethod
    async def delete_file(self, file_id: str, owner: str | None) -> bool: ...

    # ---- conversations ---------------------------------------------------------------------------------
    @abstractmethod
    async def create_conversation(
        self, conversation: StoredConversation, items: list[Item], owner: str | None
    ) -> None: ...

    @abstractmethod
    async def get_conversation(self, conversation_id: str, owner: str | None) -> StoredConversation | None: ...

    @abstractmethod
    async def update_conversation(
        self, conversation_id: str, metadata: dict[str, str], owner: str | None
    ) -> StoredConversation | None: ...

    @abstractmethod
    async def delete_conversation(self, conversation_id: str, owner: str | None) -> bool: ...

    @abstractmethod
    async def add_conversation_items(self, conversation_id: str, items: list[Item], owner: str | None) -> bool: ...

    @abstractmethod
    async def list_conversation_items(
        self, conversation_id: str, owner: str | None, limit: int, order: Order, after: str | None
    ) -> ItemPage | None: ...

    @abstractmethod
    async def all_conversation_items(self, conversation_id: str, owner: str | None) -> list[Item] | None: ...

    @abstractmethod
    async def get_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> Item | None: ...

    @abstractmethod
    async def delete_conversation_item(self, conversation_id: str, item_id: str, owner: str | None) -> bool: ...

    @abstractmethod
    async def close(self) -> None: ...
