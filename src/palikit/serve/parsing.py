"""Request parsing for the HTTP server: `read_fields` (a JSON body, its nesting checked before parsing
and the cached body dropped afterwards; or a multipart form with the image upload), `build_prompt`
(task + fields -> PaliGemma prompt and labels through the task table; labels by the one label rule
of `tasks.labels`, capped per request) and the OpenAPI request bodies of the task endpoints."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from .errors import ApiError, bad_request, clean_message
from .schemas import ServerSettings


async def read_fields(request: Request, settings: ServerSettings) -> tuple[dict[str, Any], bytes | None, bool]:
    """(fields, uploaded image bytes or None, is_json) from a JSON or multipart body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return await _read_json(request, settings), None, True
    if ctype == "multipart/form-data":
        fields, upload = await _read_form(request, settings)
        return fields, upload, False
    if not ctype:
        raise ApiError(415, "unsupported_media_type",
                       "missing Content-Type: send application/json or multipart/form-data.")
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {ctype[:80]!r} is not accepted: send application/json (image as base64) or "
                   "multipart/form-data (image as a file upload).")


async def _read_json(request: Request, settings: ServerSettings) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object (see /docs).", type="invalid_json")
    depth = settings.max_json_depth
    too_deep = bad_request(f"the JSON body is nested more than {depth} levels deep; send a flat object "
                           "(see /docs).", type="invalid_json")
    if _json_depth_exceeds(body, depth):
        raise too_deep
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise bad_request(f"the request body is not valid JSON{where}.", type="invalid_json") from None
    except RecursionError:
        raise too_deep from None
    _drop_body(request)
    if not isinstance(data, dict):
        raise bad_request("the request body must be a JSON object.", type="invalid_json")
    return data


async def _read_form(request: Request, settings: ServerSettings) -> tuple[dict[str, Any], bytes | None]:
    await request.body()  # read (under the size cap) before parsing
    max_fields = settings.max_labels + 32  # labels may come one field each
    try:
        try:
            form = await request.form(max_files=settings.max_images_per_request, max_fields=max_fields,
                                      max_part_size=settings.max_upload_bytes + 1)
        except TypeError:  # starlette < 0.40 has no max_part_size (the body is capped anyway)
            form = await request.form(max_files=settings.max_images_per_request, max_fields=max_fields)
    except ClientDisconnect:
        raise
    except Exception as e:  # noqa: BLE001 - malformed multipart, or over starlette's part / field limits
        detail = clean_message(str(getattr(e, "message", "") or ""))[:200]
        raise bad_request("malformed multipart/form-data body" + (f": {detail}" if detail else ".")) from None
    fields: dict[str, Any] = {}
    upload: bytes | None = None
    for key in set(form.keys()):
        values = form.getlist(key)
        files = [v for v in values if hasattr(v, "read")]
        if files:
            if key not in ("image", "file"):
                raise bad_request(f"unexpected file field {key!r}; upload the image as 'image'.", key)
            if len(files) > 1:
                raise bad_request("upload one image per request.", key)
            upload = await files[0].read()
            fields["image"] = "<upload>"
        elif key == "labels":
            if len(values) > settings.max_labels:
                raise bad_request(f"{len(values)} labels; at most {settings.max_labels} per request.", key)
            fields[key] = values if len(values) > 1 else values[0]
        elif len(values) > 1:
            raise bad_request(f"field {key!r} was given {len(values)} times.", key)
        else:
            fields[key] = values[0]
    if upload is None and "image" not in fields:
        raise bad_request("no image: upload it as the multipart file field 'image'.", "image")
    await form.close()
    _drop_body(request)
    return fields, upload


_DEPTH_CHARS = re.compile(rb'[\[\]{}"\\]')


def _json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether brackets nest deeper than `limit` (strings skipped), without recursing; a regex finds
    the few interesting bytes, so a 27 MB base64 string costs one C-level scan."""
    depth, in_string, skip_at = 0, False, -1
    for m in _DEPTH_CHARS.finditer(body):
        i = m.start()
        if i == skip_at:  # the character after a backslash inside a string
            continue
        c = body[i]
        if in_string:
            if c == 0x5C:  # backslash
                skip_at = i + 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _drop_body(request: Request) -> None:
    """Forget the raw body Starlette caches on the request, so a request waiting for the model holds
    only its decoded, model-size image (not megabytes of base64)."""
    for attr in ("_body", "_json"):
        if hasattr(request, attr):
            delattr(request, attr)
    if getattr(request, "_form", None) is not None:
        request._form = None  # already closed by _read_form; Starlette's close() checks for None


def build_prompt(task: str, req, max_labels: int = 64) -> tuple[str, list[str] | None]:
    """(prompt, requested labels) of a task endpoint's request, through the task table; a bad field
    answers 400 naming it (`param`)."""
    from ..tasks.registry import get_task

    t = get_task(task)
    values = {a.name: getattr(req, a.name, None) for a in t.args}
    for a in t.args:
        if a.max_chars is not None and isinstance(values[a.name], str) and len(values[a.name]) > a.max_chars:
            raise bad_request(f"{a.name} is too long", a.name)
    try:
        return t.prompt(values, getattr(req, "lang", "en"), max_labels)
    except ValueError as e:
        msg = str(e)
        labels = next((a.name for a in t.args if a.kind == "labels"), None)
        if t.lang and "language" in msg:
            param = "lang"
        elif labels is not None and "label" in msg:
            param = labels
        else:
            param = t.main_arg.name if t.main_arg is not None else ("lang" if t.lang else "prompt")
        raise bad_request(clean_message(msg), param) from None


def request_choices(req, pg):
    """The request's `choices` checked and tokenized once (`tasks.choices.ChoiceSet`), None when it has
    none; a 400 naming `choices` says what is wrong (none, more than 64, repeated, empty, untokenizable)."""
    value = getattr(req, "choices", None)
    if value is None:
        return None
    from ..tasks.choices import prepare_choices
    from ..tasks.labels import split_labels

    try:
        return prepare_choices(pg.tokenizer, split_labels(value) if isinstance(value, str) else value)
    except ValueError as e:
        raise bad_request(clean_message(str(e)), "choices") from None


def prompt_param(task: str) -> str:
    """The request field a prompt-length error names: the task's first argument, else "prompt"."""
    from ..tasks.registry import get_task

    main = get_task(task).main_arg
    return main.name if main is not None else "prompt"


def _openapi_body(model) -> dict:
    schema = model.model_json_schema()
    form = {"type": "object", "required": ["image"], "properties": {
        **{k: v for k, v in schema["properties"].items() if k != "image"},
        "image": {"type": "string", "format": "binary", "description": "The image file."}}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                           "multipart/form-data": {"schema": form}}}}
