"""A small S3-compatible server on loopback for the object-storage tests (path-style addressing).

It answers what pyarrow's S3FileSystem asks of an input: HeadBucket, HeadObject, GetObject (with
Range) and ListObjectsV2 (pyarrow lists a prefix to tell a missing key from a "directory"). Requests
are signed with AWS Signature Version 4 and checked like S3 does: an unknown access key is
InvalidAccessKeyId, a wrong secret SignatureDoesNotMatch (both 403); a request without a signature is
served only from a bucket made public. `requests` records (method, path, query) of every request.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

_EPOCH_DATE = formatdate(0, usegmt=True)


class S3Server:
    """`with S3Server({"AKID": "secret"}) as s3: s3.put("bucket", "key", data)`; `s3.endpoint` is its URL."""

    def __init__(self, credentials: dict[str, str] | None = None) -> None:
        self.credentials = dict(credentials or {})
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.public: set[str] = set()
        self.requests: list[tuple[str, str, str]] = []
        # key -> byte offset: a GET of a range that starts at or past it sends its headers, then drops the
        # connection (a store that fails in the middle of a download)
        self.break_reads_from: dict[str, int] = {}
        self.hosts: list[str] = []  # the Host header of every request (virtual-hosted style names the bucket)
        self.unsigned_served = 0  # requests without a signature that were answered (a public bucket)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="s3-server", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def put(self, bucket: str, key: str, data: bytes) -> str:
        """Store an object (creating the bucket); returns its s3:// URI."""
        with self._lock:
            self.buckets.setdefault(bucket, {})[key] = data
        return f"s3://{bucket}/{key}"

    def __enter__(self) -> "S3Server":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


def _handler(server: S3Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_GET(self) -> None:
            self._serve(head=False)

        def _serve(self, *, head: bool) -> None:
            url = urlsplit(self.path)
            with server._lock:
                server.requests.append((self.command, unquote(url.path), url.query))
            host = self.headers.get("Host", "").rsplit(":", 1)[0]
            if host.endswith(".localhost"):  # virtual-hosted style: bucket.localhost:PORT/key
                bucket, key = host.removesuffix(".localhost"), unquote(url.path).lstrip("/")
            else:
                parts = unquote(url.path).lstrip("/").split("/", 1)
                bucket, key = parts[0], parts[1] if len(parts) > 1 else ""
            with server._lock:
                server.hosts.append(host)
            denied = self._auth_problem(url, bucket)
            if denied:
                return self._error(403, *denied, head=head)
            objects = server.buckets.get(bucket)
            if objects is None:
                return self._error(404, "NoSuchBucket", "The specified bucket does not exist", head=head)
            if not key:
                if head:
                    return self._send(200, b"", head=True)
                return self._list(bucket, objects, dict(parse_qsl(url.query, keep_blank_values=True)))
            data = objects.get(key)
            if data is None:
                return self._error(404, "NoSuchKey", "The specified key does not exist.", head=head)
            headers = {"Last-Modified": _EPOCH_DATE, "ETag": f'"{hashlib.md5(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            wanted = self.headers.get("Range")
            if wanted and not head:
                start_text, _, end_text = wanted.removeprefix("bytes=").partition("-")
                start = int(start_text)
                end = min(int(end_text) if end_text else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                if start >= server.break_reads_from.get(key, len(data) + 1):
                    self.send_response(206)
                    for name, value in {**headers, "Content-Length": str(end + 1 - start)}.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data[start:start + 100])
                    self.close_connection = True
                    return
                return self._send(206, data[start:end + 1], headers=headers)
            self._send(200, data, head=head, headers=headers)

        def _list(self, bucket: str, objects: dict[str, bytes], query: dict[str, str]) -> None:
            prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
            keys, common = [], set()
            for key in sorted(objects):
                if not key.startswith(prefix):
                    continue
                rest = key[len(prefix):]
                if delimiter and delimiter in rest:
                    common.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                else:
                    keys.append(key)
            body = ["<?xml version=\"1.0\" encoding=\"UTF-8\"?>",
                    "<ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
                    f"<Name>{escape(bucket)}</Name><Prefix>{escape(prefix)}</Prefix>",
                    f"<KeyCount>{len(keys) + len(common)}</KeyCount><MaxKeys>1000</MaxKeys>",
                    "<IsTruncated>false</IsTruncated>"]
            body += [f"<Contents><Key>{escape(k)}</Key><LastModified>1970-01-01T00:00:00.000Z</LastModified>"
                     f"<Size>{len(objects[k])}</Size><StorageClass>STANDARD</StorageClass></Contents>" for k in keys]
            body += [f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in sorted(common)]
            body.append("</ListBucketResult>")
            self._send(200, "".join(body).encode(), headers={"Content-Type": "application/xml"})

        def _auth_problem(self, url, bucket: str) -> tuple[str, str] | None:
            authorization = self.headers.get("Authorization")
            if authorization is None:
                if bucket not in server.public:
                    return "AccessDenied", "Access Denied"
                with server._lock:
                    server.unsigned_served += 1
                return None
            fields = dict(part.strip().split("=", 1) for part in authorization.split(" ", 1)[1].split(","))
            access_key, date, region, service, _ = fields["Credential"].split("/")
            secret = server.credentials.get(access_key)
            if secret is None:
                return "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
            signed = fields["SignedHeaders"].split(";")
            query = sorted(parse_qsl(url.query, keep_blank_values=True))
            canonical = "\n".join([
                self.command, quote(unquote(url.path), safe="/~"),
                "&".join(f"{quote(k, safe='~')}={quote(v, safe='~')}" for k, v in query),
                "".join(f"{h}:{' '.join(self.headers.get(h, '').split())}\n" for h in signed),
                fields["SignedHeaders"], self.headers.get("x-amz-content-sha256", "UNSIGNED-PAYLOAD")])
            scope = f"{date}/{region}/{service}/aws4_request"
            to_sign = "\n".join(["AWS4-HMAC-SHA256", self.headers["x-amz-date"], scope,
                                 hashlib.sha256(canonical.encode()).hexdigest()])
            key = ("AWS4" + secret).encode()
            for part in (date, region, service, "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, fields["Signature"]):
                return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
            return None

        def _error(self, status: int, code: str, message: str, *, head: bool) -> None:
            body = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code>"
                    f"<Message>{escape(message)}</Message><RequestId>test</RequestId></Error>").encode()
            self._send(status, body, head=head, headers={"Content-Type": "application/xml"})

        def _send(self, status: int, body: bytes, *, head: bool = False, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amz-request-id", "test")
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler
