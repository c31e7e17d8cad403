"""Hot-loading a trained adapter into a running loradock server through its admin API."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path


class RegisterError(RuntimeError):
    """The server could not be reached."""


def register_adapter(url: str, name: str, path: Path, token: str, timeout: float = 300.0) -> tuple[int, str]:
    """POST {url}/v1/adapters {"name", "path"} with the admin bearer token; return the HTTP status and the body.

    The server loads and validates the adapter before answering (201 with its description). It refuses a path
    outside its --adapters directory (403) unless it runs with --allow-adapter-paths, and a name already loaded
    (409).
    """
    request = urllib.request.Request(
        url.rstrip("/") + "/v1/adapters",
        data=json.dumps({"name": name, "path": str(Path(path).resolve())}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as error:
        raise RegisterError(f"cannot reach the server at {url}: {getattr(error, 'reason', error)}") from None
