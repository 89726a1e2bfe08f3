"""The API docs pages: /docs (Swagger UI 5, which reads the OpenAPI 3.1 that FastAPI emits) and /redoc,
both from the files the fastapi-offline package ships, served by this server (no CDN: self-hosted
servers are often offline). The description carries the curl forms that keep every label."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from fastapi.staticfiles import StaticFiles


CURL_HELP = """
**Multipart from curl.** `curl -F` cuts a value at `;` (it reads `;type=...` there), so
`-F labels="cat ; dog"` silently becomes `cat`. Send labels as a JSON list, or with `--form-string`:

    curl -H "Authorization: Bearer $KEY" -F image=@cat.jpg -F 'labels=["cat","dog"]' http://127.0.0.1:8000/v1/detect
    curl -H "Authorization: Bearer $KEY" -F image=@cat.jpg --form-string "labels=cat ; dog" http://127.0.0.1:8000/v1/detect

Images: PNG, JPEG, WebP, GIF, BMP or TIFF (others: 415). `temperature` or `top_p` below 1e-5 is greedy.
"""


def mount_docs(app: FastAPI) -> None:
    """/docs (Swagger UI 5, reads OpenAPI 3.1) and /redoc from the files the fastapi-offline package
    ships, served by this server: no CDN (self-hosted servers are often offline). Without that
    package /docs says how to get it and /redoc is off."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    try:
        import fastapi_offline
    except ImportError:
        @app.get("/docs", include_in_schema=False)
        async def docs_missing():
            return PlainTextResponse("The API docs need the fastapi-offline package (pip install fastapi-offline); "
                                     "the OpenAPI schema is at /openapi.json.", status_code=404)
        return
    assets = Path(fastapi_offline.__file__).resolve().parent / "static"
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")
    app.description = (app.description or "") + CURL_HELP

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="palikit API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None})

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="palikit API", redoc_js_url="/docs-assets/redoc."
                              "standalone.js", redoc_favicon_url="/docs-assets/favicon.png", with_google_fonts=False)
