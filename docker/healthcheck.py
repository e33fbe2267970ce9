"""The images' HEALTHCHECK: healthy while the clrsearch server answers `/healthz`.

`server`: the server in this container, on CLRSEARCH_PORT. `worker`: the server the
worker talks to (CLRSEARCH_SERVER_URL), since a worker that cannot reach it does no
work. Only the standard library: it runs every 30 s and must start fast.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def health_url(role: str) -> str:
    if role == "server":
        return f"http://127.0.0.1:{os.environ.get('CLRSEARCH_PORT', '8000')}/healthz"
    base = os.environ.get("CLRSEARCH_SERVER_URL", "http://127.0.0.1:8000")
    return base.rstrip("/") + "/healthz"


def main(role: str) -> int:
    url = health_url(role)
    try:
        with urllib.request.urlopen(url, timeout=8) as response:
            status = response.status
    except OSError as error:
        print(f"{url}: {error}", file=sys.stderr)
        return 1
    print(f"{url}: HTTP {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "server"))
