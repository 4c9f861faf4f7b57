"""Files: `/v1/files` through the openai SDK, and `input_file` parts read into the prompt, on both stores.

What a file adds to the prompt is checked by token counts (`usage.input_tokens` against the chat template
rendered here), never by what the model says. Hostile files (a PDF bomb, a truncated PDF, too many pages,
oversized or undecodable bytes) must each be a 400 naming the field and leave the server and its store whole.
"""

from __future__ import annotations

import base64
import io
import json
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from conftest import (
    SPEC_PATH,
    OpenResponsesSchema,
    RunningServer,
    fixed_reply,
    free_port,
    prompt_tokens,
    sdk_client,
    serving,
)

from respserve.config import load_settings

KEYS = ["key-alice", "key-bob"]
MAX_FILE_BYTES = 1024 * 1024  # small, so that an oversized file is cheap to send
NOTES = "The launch code is 4417.\nThe meeting moved to Thursday, room 12."
QUESTION = "What does the file say?"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """API keys on, so files are scoped; SQLite in a data dir, and a fresh schema in PostgreSQL."""
    store = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    settings = load_settings(
        port=free_port(),
        data_dir=str(tmp_path_factory.mktemp(f"files-{request.param}")),
        store=store,
        api_keys=KEYS,
        max_file_bytes=MAX_FILE_BYTES,
        max_file_pages=20,
        max_file_chars=20_000,
    )
    yield from serving(settings)


@pytest.fixture(scope="module")
def alice(server: RunningServer) -> openai.OpenAI:
    return sdk_client(server, "key-alice")


@pytest.fixture(scope="module")
def bob(server: RunningServer) -> openai.OpenAI:
    return sdk_client(server, "key-bob")


@pytest.fixture(scope="module")
def http(server: RunningServer) -> Iterator[httpx.Client]:
    headers = {"Authorization": "Bearer key-alice"}
    with httpx.Client(base_url=server.base_url, timeout=120, headers=headers) as client:
        yield client


class OpenAISchema:
    """Validates bodies the Open Responses document does not cover against OpenAI's (files, item lists)."""

    def __init__(self) -> None:
        self._components = json.loads((SPEC_PATH.parent / "openai-openapi.json").read_text())["components"]

    def validate(self, instance: Any, name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": self._components}
        jsonschema.Draft202012Validator(schema).validate(instance)


@pytest.fixture(scope="module")
def openai_schema() -> OpenAISchema:
    return OpenAISchema()


def pdf(pages: list[bytes], compress: bool = False) -> bytes:
    """A PDF written byte by byte: one page per content stream, Helvetica as F1, a correct xref table."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for content in pages:
        stream = zlib.compress(content) if compress else content
        flate = b" /Filter /FlateDecode" if compress else b""
        objects.append(b"<< /Length %d%s >>\nstream\n%s\nendstream" % (len(stream), flate, stream))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >>"
            b" /Contents %d 0 R >>" % len(objects)
        )
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % kid for kid in kids), len(kids))
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def text_page(text: str) -> bytes:
    return b"BT /F1 12 Tf 72 720 Td (%s) Tj ET" % text.encode()


PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def ask(client: openai.OpenAI, server: RunningServer, *parts: dict[str, Any], **kwargs: Any) -> Any:
    """A short request whose reply is fixed ("ok"): only its input varies."""
    content = [{"type": "input_text", "text": QUESTION}, *parts]
    return client.responses.create(
        model=server.model,
        input=[{"role": "user", "content": content}],
        text=fixed_reply("ok"),
        max_output_tokens=16,
        **kwargs,
    )


def rendered(server: RunningServer, *texts: str) -> int:
    """Tokens of one user turn holding QUESTION and `texts`, joined as the server joins text parts."""
    return prompt_tokens(server, [{"role": "user", "content": "\n".join([QUESTION, *texts])}])


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_upload_retrieve_list_content_delete(
    alice: openai.OpenAI, http: httpx.Client, openai_schema: OpenAISchema
) -> None:
    uploaded = alice.files.create(file=("notes.txt", NOTES.encode(), "text/plain"), purpose="user_data")
    assert uploaded.id.startswith("file-") and uploaded.object == "file"
    assert (uploaded.filename, uploaded.bytes, uploaded.purpose) == ("notes.txt", len(NOTES.encode()), "user_data")
    image = alice.files.create(
        file=("dot.png", PNG), purpose="vision", expires_after={"anchor": "created_at", "seconds": 3600}
    )
    assert image.expires_at == image.created_at + 3600

    raw = http.get(f"/v1/files/{uploaded.id}")
    openai_schema.validate(raw.json(), "OpenAIFile")
    assert "expires_at" not in raw.json()  # never expires: absent, as the schema types it an integer
    openai_schema.validate(http.get(f"/v1/files/{image.id}").json(), "OpenAIFile")
    assert alice.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()

    listed = http.get("/v1/files")
    openai_schema.validate(listed.json(), "ListFilesResponse")
    ids = [file.id for file in alice.files.list()]
    assert ids.index(image.id) < ids.index(uploaded.id)  # newest first
    assert [file.id for file in alice.files.list(purpose="vision")] == [image.id]
    first = alice.files.list(limit=1, order="asc")
    assert first.has_more and len(first.data) == 1
    after = alice.files.list(limit=100, order="asc", after=first.data[0].id)
    assert [first.data[0].id, *[file.id for file in after.data]] == list(reversed(ids))

    content = http.get(f"/v1/files/{uploaded.id}/content")
    assert content.content == NOTES.encode() and content.headers["content-type"].startswith("text/plain")
    assert "notes.txt" in content.headers["content-disposition"]
    assert alice.files.content(image.id).read() == PNG

    deleted = http.delete(f"/v1/files/{image.id}")
    openai_schema.validate(deleted.json(), "DeleteFileResponse")
    assert deleted.json() == {"id": image.id, "object": "file", "deleted": True}
    for gone in (lambda: alice.files.retrieve(image.id), lambda: alice.files.delete(image.id)):
        with pytest.raises(openai.NotFoundError):
            gone()
    assert image.id not in [file.id for file in alice.files.list()]


def test_upload_errors_name_the_field(http: httpx.Client) -> None:
    small = {"file": ("a.txt", b"hello")}
    assert error_of(http.post("/v1/files", files=small, data={"purpose": "fine-tune"}), 400)["param"] == "purpose"
    assert error_of(http.post("/v1/files", data={"purpose": "user_data"}), 400)["param"] == "file"
    assert error_of(http.post("/v1/files", files=small, data={"purpose": "vision"}), 400)["param"] == "file"
    expiry = {"purpose": "user_data", "expires_after[anchor]": "created_at", "expires_after[seconds]": "60"}
    assert error_of(http.post("/v1/files", files=small, data=expiry), 400)["param"] == "expires_after.seconds"


def test_files_belong_to_their_key(alice: openai.OpenAI, bob: openai.OpenAI, server: RunningServer) -> None:
    secret = alice.files.create(file=("secret.txt", b"alice's secret"), purpose="user_data")
    bobs = bob.files.create(file=("mine.txt", b"bob's own"), purpose="user_data")
    for attempt in (
        lambda: bob.files.retrieve(secret.id),
        lambda: bob.files.content(secret.id),
        lambda: bob.files.delete(secret.id),
        lambda: ask(bob, server, {"type": "input_file", "file_id": secret.id}),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert secret.id not in [file.id for file in bob.files.list()]
    assert bobs.id not in [file.id for file in alice.files.list()]
    assert alice.files.content(secret.id).read() == b"alice's secret"  # untouched by Bob's attempts


def test_text_file_by_id_and_inline_is_in_the_prompt(
    alice: openai.OpenAI, server: RunningServer, schema: OpenResponsesSchema, http: httpx.Client
) -> None:
    uploaded = alice.files.create(file=("notes.txt", NOTES.encode()), purpose="user_data")
    without = ask(alice, server)
    assert without.usage.input_tokens == rendered(server)
    by_id = ask(alice, server, {"type": "input_file", "file_id": uploaded.id})
    assert by_id.usage.input_tokens == rendered(server, f"[notes.txt]\n{NOTES}") > without.usage.input_tokens
    encoded = base64.b64encode(NOTES.encode()).decode()
    for file_data in (encoded, f"data:text/plain;base64,{encoded}"):
        inline = ask(alice, server, {"type": "input_file", "filename": "notes.txt", "file_data": file_data})
        assert inline.usage.input_tokens == by_id.usage.input_tokens
    raw = http.post(
        "/v1/responses",
        json={
            "model": server.model,
            "input": [{"role": "user", "content": [{"type": "input_file", "file_id": uploaded.id}]}],
            "text": fixed_reply("ok"),
            "max_output_tokens": 16,
        },
    )
    assert raw.status_code == 200, raw.text
    schema.response(raw.json())


def test_pdf_text_is_in_the_prompt(alice: openai.OpenAI, server: RunningServer) -> None:
    document = pdf([text_page("Page one says hello."), text_page("Page two says goodbye.")])
    uploaded = alice.files.create(file=("report.pdf", document, "application/pdf"), purpose="user_data")
    assert alice.files.retrieve(uploaded.id).bytes == len(document)
    expected = rendered(server, "[report.pdf]\nPage one says hello.\n\nPage two says goodbye.")
    assert ask(alice, server, {"type": "input_file", "file_id": uploaded.id}).usage.input_tokens == expected
    inline = {"type": "input_file", "filename": "report.pdf", "file_data": base64.b64encode(document).decode()}
    assert ask(alice, server, inline).usage.input_tokens == expected
    compressed = pdf([text_page("Page one says hello."), text_page("Page two says goodbye.")], compress=True)
    inline["file_data"] = f"data:application/pdf;base64,{base64.b64encode(compressed).decode()}"
    assert ask(alice, server, inline).usage.input_tokens == expected


def test_stored_input_keeps_its_files_through_a_chain(
    alice: openai.OpenAI, server: RunningServer, http: httpx.Client, openai_schema: OpenAISchema
) -> None:
    uploaded = alice.files.create(file=("notes.txt", NOTES.encode()), purpose="user_data")
    first = ask(alice, server, {"type": "input_file", "file_id": uploaded.id})
    listed = http.get(f"/v1/responses/{first.id}/input_items")
    openai_schema.validate(listed.json(), "ResponseItemList")
    [message] = listed.json()["data"]
    assert message["content"][1] == {"type": "input_file", "file_id": uploaded.id}

    follow_up = "And again?"
    second = alice.responses.create(
        model=server.model,
        input=follow_up,
        previous_response_id=first.id,
        text=fixed_reply("ok"),
        max_output_tokens=16,
    )
    turns = [
        {"role": "user", "content": f"{QUESTION}\n[notes.txt]\n{NOTES}"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": follow_up},
    ]
    assert second.usage.input_tokens == prompt_tokens(server, turns)

    alice.files.delete(uploaded.id)  # the chain names a file that is gone
    with pytest.raises(openai.NotFoundError) as gone:
        alice.responses.create(model=server.model, input="More?", previous_response_id=first.id)
    assert gone.value.body["param"] == "previous_response_id"


def test_image_file_to_a_text_model_is_400_as_an_image_is(alice: openai.OpenAI, server: RunningServer) -> None:
    uploaded = alice.files.create(file=("dot.png", PNG), purpose="vision")
    inline = {"type": "input_file", "filename": "dot.png", "file_data": base64.b64encode(PNG).decode()}
    for part in ({"type": "input_file", "file_id": uploaded.id}, inline):
        with pytest.raises(openai.BadRequestError) as refused:
            ask(alice, server, part)
        assert refused.value.body["param"] == "input[0].content[1]"
        assert "text-only" in refused.value.body["message"]


def test_bad_parts_are_400s_naming_the_field(http: httpx.Client, server: RunningServer) -> None:
    def post(part: dict[str, Any]) -> httpx.Response:
        content = [{"type": "input_text", "text": QUESTION}, part]
        return http.post("/v1/responses", json={"input": [{"role": "user", "content": content}]})

    field = "input[0].content[1]"
    cases = [
        ({"type": "input_file"}, f"{field}", 400),
        ({"type": "input_file", "file_url": "https://example.com/a.pdf"}, f"{field}.file_url", 400),
        ({"type": "input_file", "file_id": "file-a", "file_data": "aGk="}, f"{field}.file_data", 400),
        ({"type": "input_file", "file_id": "file-nope"}, f"{field}.file_id", 404),
        ({"type": "input_file", "filename": "a.txt", "file_data": "not base64!"}, f"{field}.file_data", 400),
        ({"type": "input_file", "filename": "a.txt", "file_data": "data:text/plain,hi"}, f"{field}.file_data", 400),
        ({"type": "input_file", "filename": "a.bin", "file_data": "AAECAwQF/w=="}, f"{field}.file_data", 400),
    ]
    for part, param, status in cases:
        assert error_of(post(part), status)["param"] == param, part
    assert "not supported" in error_of(post(cases[1][0]), 400)["message"]


def _malicious() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the error code it must give)."""
    document = pdf([text_page("Fine so far."), text_page("This page is cut off.")])
    bomb = pdf([b"BT /F1 12 Tf 72 720 Td (" + b" " * 64 * 1024 * 1024 + b") Tj ET"], compress=True)
    wordy = pdf([b"BT /F1 12 Tf 72 720 Td " + b"(AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA) Tj " * 1000 + b"ET"], compress=True)
    return {
        "bomb.pdf": (bomb, "file_too_large"),  # 64 MiB of content stream inflated from about 64 KiB
        "truncated.pdf": (document[: len(document) // 2], "invalid_file"),
        "garbage.pdf": (b"%PDF-1.7\n" + bytes(range(256)) * 64 + b"\n%%EOF\n", "invalid_file"),
        "pages.pdf": (pdf([text_page("x")] * 21), "file_too_large"),
        "wordy.pdf": (wordy, "file_too_large"),  # 30,000 characters of text, past the 20,000 allowed
        "big.txt": (b"a" * (MAX_FILE_BYTES + 1), "file_too_large"),
    }


def test_malicious_files_are_400s_and_the_server_stays_whole(
    alice: openai.OpenAI, server: RunningServer, http: httpx.Client
) -> None:
    kept = alice.files.create(file=("kept.txt", NOTES.encode()), purpose="user_data")
    kept_response = ask(alice, server, {"type": "input_file", "file_id": kept.id})
    field = "input[0].content[1]"
    for name, (data, code) in _malicious().items():
        started = time.monotonic()
        inline = {"type": "input_file", "filename": name, "file_data": base64.b64encode(data).decode()}
        with pytest.raises(openai.BadRequestError) as refused:
            ask(alice, server, inline)
        assert (refused.value.body["param"], refused.value.body["code"]) == (f"{field}.file_data", code), name
        if name == "big.txt":  # too big to upload too: 413, naming the file
            with pytest.raises(openai.APIStatusError) as too_big:
                alice.files.create(file=(name, data), purpose="user_data")
            assert too_big.value.status_code == 413 and too_big.value.body["param"] == "file"
            continue
        uploaded = alice.files.create(file=(name, data), purpose="user_data")  # kept as bytes, refused when read
        with pytest.raises(openai.BadRequestError) as refused:
            ask(alice, server, {"type": "input_file", "file_id": uploaded.id})
        assert (refused.value.body["param"], refused.value.body["code"]) == (f"{field}.file_id", code), name
        assert time.monotonic() - started < 20, name

    far_too_big = http.post(
        "/v1/files", files={"file": ("huge.bin", b"b" * (3 * MAX_FILE_BYTES))}, data={"purpose": "user_data"}
    )
    assert error_of(far_too_big, 413)["param"] == "file"  # refused before the body is read
    assert http.get("/health").status_code == 200
    assert alice.files.content(kept.id).read() == NOTES.encode()
    assert alice.responses.retrieve(kept_response.id).usage == kept_response.usage
    again = ask(alice, server, {"type": "input_file", "file_id": kept.id})
    assert again.status == "completed" and again.usage.input_tokens == kept_response.usage.input_tokens
