"""A loopback stand-in for Civitai's images API, Lexica's search API and their image CDNs, with faults.

Binds 127.0.0.1 only, runs in a daemon thread (or its own process: `python tests/civitai_server.py`)
and stops by itself after `lifetime` seconds.

API (`/api/v1/images`): items in three `meta` shapes, cursor paging (`metadata.nextCursor`, absent on
the last page). `server.api_faults` is a queue; each API request takes one: `429` (with Retry-After),
`500`, `503`, `400`, `malformed` (cut-off JSON), `html`, `bad_shape`, `junk_items`.

Images (`/img/...`): `ok/<i>.<png|jpg|webp>[?size=N&noise=1]`, `status/<code>/<key>`,
`flaky/<code>/<key>?n=K` (K failures, 429s carry Retry-After, then the image), `slow/<key>?s=S`,
`drip/<key>`, `truncated/<key>?n=K`, `html/<key>`, `fake-jpeg/<key>`, `corrupt/<key>`, `bomb/<key>`,
`huge/<key>` (50 MB, Content-Length), `huge-chunked/<key>` (50 MB, no length), `redirect?to=URL`,
`redirect-loop/<key>`. `server.image_faults` (a queue of statuses) fails the next `ok/` requests.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import random
import struct
import threading
import zlib
from collections import Counter, deque
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image

HUGE_BYTES = 50 * 1024 * 1024
RETRY_AFTER = 1
REASONS = {
    200: "OK",
    302: "Found",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


# --- content ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=20_000)
def image_bytes(index: int, fmt: str = "png", size: int = 32, noise: bool = False) -> bytes:
    """A distinct image for every index; `noise` makes it incompressible (large files)."""
    color = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    if noise:
        img = Image.frombytes("RGB", (size, size), random.Random(index).randbytes(size * size * 3))
    else:
        img = Image.new("RGB", (size, size), color)
    img.putpixel((index % size, (index // size) % size), (255 - color[0], 0, 0))
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt])
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=1)
def bomb_png(side: int = 10_000) -> bytes:
    """A ~15 kB 1-bit PNG that decodes to `side`² pixels (100 MP by default)."""
    row = b"\x00" * (1 + side // 8)
    raw = zlib.compress(row * side, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b"")


def corrupt_png() -> bytes:
    good = image_bytes(0, "png", 64)
    return good[:60] + bytes(range(256)) * 4  # a valid header, then garbage where the pixels should be


def civitai_item(i: int, image_base: str) -> dict[str, Any]:
    """Item i of the fake gallery; `meta` cycles through the shapes the real API returns."""
    params = {
        "prompt": f"masterpiece, castle {i}, (detailed:1.2)",
        "negativePrompt": "blurry",
        "seed": 1000 + i,
        "steps": 20 + i % 10,
        "cfgScale": 7,
        "sampler": "Euler a",
        "Model": "dreamshaper",
    }
    shape = i % 7
    if shape == 0:
        meta: Any = None
    elif shape == 1:
        meta = params
    elif shape == 2:
        meta = {"id": 90000 + i, "meta": params}
    elif shape == 3:  # mixed types: numbers as strings, Model as an object
        meta = {**params, "seed": str(1000 + i), "cfgScale": "7.5", "Model": {"name": "dreamshaper", "hash": "abc"}}
    elif shape == 4:
        meta = {k: v for k, v in params.items() if k != "prompt"}
    elif shape == 5:
        meta = {"id": 90000 + i, "meta": None}
    else:
        meta = {**params, "prompt": f"ünïcödé 城 {i}", "Clip skip": 2, "resources": [{"name": "x", "weight": 0.5}]}
    return {
        "id": 5000 + i,
        "url": f"{image_base}/img/ok/{i}.png",
        "hash": "UKHU@6H?_ND*_3M{t84o^+%MD%xuXSxasAt7",
        "width": 32,
        "height": 32,
        "nsfw": False,
        "nsfwLevel": "None",
        "browsingLevel": 1,
        "createdAt": "2025-04-17T21:28:57.225Z",
        "postId": 70000 + i,
        "username": f"user{i % 5}",
        "baseModel": "SD 1.5",
        "type": "image",
        "stats": {
            "cryCount": 0,
            "laughCount": 0,
            "likeCount": i,
            "dislikeCount": 0,
            "heartCount": 0,
            "commentCount": 0,
        },
        "meta": meta,
    }


def has_prompt(i: int) -> bool:
    """Whether item i carries a prompt (independent of the parser under test)."""
    return i % 7 not in (0, 4, 5)


def lexica_results(query: str, image_base: str, per_query: int = 10) -> list[dict[str, Any]]:
    """Lexica search results; queries share part of a 30-image pool, so results overlap."""
    start = sum(query.encode()) % 30
    out = []
    for k in range(per_query):
        n = (start + 2 * k) % 30
        out.append(
            {
                "id": f"lx-{n:04d}",
                "gallery": f"https://lexica.art/prompt/p{n}",
                "src": f"{image_base}/img/ok/{n}.jpg",
                "srcSmall": f"{image_base}/img/ok/{n}.jpg?size=16",
                "prompt": f"a lighthouse at dusk, style {n}",
                "width": 32,
                "height": 32,
                "seed": str(4242 + n),
                "grid": False,
                "model": "lexica-aperture-v2",
                "guidance": 7,
                "promptid": f"p{n}",
                "nsfw": False,
            }
        )
    return out


# --- the server ------------------------------------------------------------------------------------


class FakeCivitai:
    def __init__(self, n_items: int = 200, *, lifetime: float = 300.0, numeric_cursor: bool = False) -> None:
        self.n_items = n_items
        self.lifetime = lifetime
        self.numeric_cursor = numeric_cursor
        self.api_faults: deque[str] = deque()
        # crafted paging: the page at an offset also lists these earlier items / returns this nextCursor instead
        self.also_list: dict[int, list[int]] = {}
        self.next_cursor: dict[int, str] = {}
        self.image_faults: deque[int] = deque()  # HTTP statuses for the next `ok/` image requests
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.hits: Counter[str] = Counter()
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.base}/api/v1"

    def api_requests(self) -> list[tuple[str, dict[str, str]]]:
        return [r for r in self.requests if r[0].startswith("/api/")]

    def start(self) -> FakeCivitai:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", self.port), self._loop)
        self._server = future.result(timeout=10)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop.call_soon_threadsafe(self._loop.call_later, self.lifetime, self._begin_shutdown)
        return self

    def _begin_shutdown(self) -> None:
        self._loop.create_task(self._shutdown())

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.stop()

    def stop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._begin_shutdown)
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeCivitai:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                _method, target, _version = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                self.requests.append((target, headers))
                keep = await self._route(target, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes = b"",
        ctype: str = "application/json",
        extra: dict[str, str] | None = None,
    ) -> bool:
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'X')}",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
        ] + [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
        return True

    async def _route(self, target: str, writer: asyncio.StreamWriter) -> bool:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if url.path == "/api/v1/images":
            return await self._images_api(query, writer)
        if url.path == "/api/v1/search":
            body = {"images": lexica_results(query.get("q", ""), self.base)}
            return await self._send(writer, 200, json.dumps(body).encode())
        if parts[0] == "img" and len(parts) >= 2:
            return await self._image(parts[1], parts[2:], query, writer)
        return await self._send(writer, 404, b"not found", "text/plain")

    async def _images_api(self, query: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        fault = self.api_faults.popleft() if self.api_faults else None
        if fault in ("429", "500", "503", "400"):
            extra = {"Retry-After": str(RETRY_AFTER)} if fault == "429" else None
            return await self._send(writer, int(fault), b'{"error": "nope"}', extra=extra)
        limit = min(int(query.get("limit", 100)), 200)
        cursor = query.get("cursor")
        offset = int(cursor.split("|")[0]) if cursor else 0
        items = [civitai_item(i, self.base) for i in range(offset, min(offset + limit, self.n_items))]
        items += [civitai_item(i, self.base) for i in self.also_list.get(offset, [])]
        metadata: dict[str, Any] = {}
        if offset + limit < self.n_items:
            nxt = offset + limit
            metadata["nextCursor"] = nxt if self.numeric_cursor else f"{nxt}|{5000 + nxt}|{(nxt * 7919) % 1000}"
        if offset in self.next_cursor:
            metadata["nextCursor"] = self.next_cursor[offset]
        if "nextCursor" in metadata:
            metadata["nextPage"] = f"{self.api_base}/images?limit={limit}&cursor={metadata['nextCursor']}"
        if fault == "junk_items":
            items = items + ["junk", None, {"url": "https://x/y.png"}, {"id": True}]
        body = json.dumps({"items": items, "metadata": metadata}).encode()
        if fault == "malformed":
            body = body[: len(body) // 2]
        elif fault == "html":
            return await self._send(writer, 200, b"<html>Just a moment...</html>", "text/html")
        elif fault == "bad_shape":
            body = json.dumps({"items": "none", "metadata": []}).encode()
        return await self._send(writer, 200, body)

    async def _image(self, kind: str, rest: list[str], query: dict[str, str], writer: asyncio.StreamWriter) -> bool:
        key = "/".join([kind, *rest])
        self.hits[key] += 1
        n = int(query.get("n", 10**9))
        if kind == "ok" and self.image_faults:
            return await self._send(writer, self.image_faults.popleft(), b"busy", "text/plain")
        if kind == "ok":
            stem, _, ext = rest[0].partition(".")
            body = image_bytes(int(stem), ext or "png", int(query.get("size", 32)), query.get("noise") == "1")
            return await self._send(writer, 200, body, f"image/{'jpeg' if ext == 'jpg' else ext or 'png'}")
        if kind == "status":
            return await self._send(writer, int(rest[0]), b"no", "text/plain")
        if kind == "flaky":
            code = int(rest[0])
            if self.hits[key] <= n:
                extra = {"Retry-After": str(RETRY_AFTER)} if code == 429 else None
                return await self._send(writer, code, b"later", "text/plain", extra)
            return await self._send(writer, 200, image_bytes(7), "image/png")
        if kind == "slow":
            await asyncio.sleep(float(query.get("s", 5)))
            return await self._send(writer, 200, image_bytes(8), "image/png")
        if kind == "drip":  # headers at once, then a byte every 0.2 s: defeats a read timeout alone
            body = image_bytes(9)
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            for b in body:
                writer.write(bytes([b]))
                await writer.drain()
                await asyncio.sleep(0.2)
            return True
        if kind == "truncated":
            body = image_bytes(10)
            if self.hits[key] > n:
                return await self._send(writer, 200, body, "image/png")
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n\r\n".encode())
            writer.write(body[: len(body) // 2])
            await writer.drain()
            return False
        if kind == "html":
            return await self._send(writer, 200, b"<!doctype html><title>login</title>", "text/html; charset=utf-8")
        if kind == "fake-jpeg":
            return await self._send(writer, 200, b"<!doctype html><title>login</title>", "image/jpeg")
        if kind == "corrupt":
            return await self._send(writer, 200, corrupt_png(), "image/png")
        if kind == "bomb":
            return await self._send(writer, 200, bomb_png(), "image/png")
        if kind in ("huge", "huge-chunked"):
            return await self._huge(writer, chunked=kind == "huge-chunked")
        if kind == "redirect":
            return await self._send(writer, 302, b"", "text/plain", {"Location": query["to"]})
        if kind == "redirect-loop":
            return await self._send(writer, 302, b"", "text/plain", {"Location": f"/img/redirect-loop/{rest[0]}"})
        return await self._send(writer, 404, b"no such fault", "text/plain")

    async def _huge(self, writer: asyncio.StreamWriter, chunked: bool) -> bool:
        first = image_bytes(11, "jpg")
        chunk = b"\x00" * 65536
        head = "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {HUGE_BYTES}\r\n\r\n"
        writer.write(head.encode())
        sent = 0
        while sent < HUGE_BYTES:
            piece = first if sent == 0 else chunk[: HUGE_BYTES - sent]
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            await writer.drain()
            sent += len(piece)
        if chunked:
            writer.write(b"0\r\n\r\n")
        return False


def main() -> None:
    """Serve in this process (benchmarks): prints the port, serves until `--lifetime` runs out."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--lifetime", type=float, default=600.0)
    parser.add_argument("--warm", type=int, default=0, help="pre-encode ok/<i>.jpg for i < WARM")
    parser.add_argument("--size", type=int, default=32, help="side of the pre-encoded images")
    args = parser.parse_args()
    for i in range(args.warm):
        image_bytes(i, "jpg", args.size)
    server = FakeCivitai(lifetime=args.lifetime).start()
    print(server.port, flush=True)
    server._thread.join()


if __name__ == "__main__":
    main()
