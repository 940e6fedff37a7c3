"""Inputs on object storage: `[input] path = "s3://bucket/key"` (Amazon S3, Alibaba Cloud OSS, MinIO...).

The object is read through pyarrow's S3FileSystem on the machine that runs `runner run`, streamed:
Parquet by ranged reads of the row groups it needs, text formats as one sequential download per pass.
Where the store is and how to sign come from `[input] s3_endpoint`, `s3_region`, `s3_addressing`,
`s3_anonymous` and `s3_credentials`; credentials never come from the job file. By default they come
only from the environment, the AWS way (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN):
read here and handed to pyarrow explicitly, so it never falls back to ~/.aws files or a cloud metadata
service (whose probe also costs seconds on a machine that has none). `s3_credentials = "aws-chain"`
opts into that fallback, the AWS SDK's default chain, for machines that hold a role or a profile.

Every error from the store becomes a one-line SourceError naming the URI (exit 2). pyarrow's own text
is never shown whole: it is classified (not found, no such bucket, access denied, cannot connect) and
anything left is cut to one line with the credentials' values scrubbed out.
"""

from __future__ import annotations

import gzip
import io
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit

from .errors import SourceError

if TYPE_CHECKING:
    import pyarrow as pa

SCHEME = "s3://"
ADDRESSING = ("path", "virtual")
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# [input] s3_credentials: "environment" (the default) takes only the AWS_* variables above, and stops the
# run without them; "aws-chain" lets the AWS SDK in pyarrow look where AWS tools look (those variables,
# AWS_PROFILE and ~/.aws, web identity, a container's or an EC2 instance's role), for machines that
# hold a role rather than keys. Either way nothing secret is in the job file.
CREDENTIAL_SOURCES = ("environment", "aws-chain")
# Any "scheme://" at the start of a path: a URI, not a file name (a local file is never written so).
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CREDENTIALS_HINT = ("credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) "
                     "in the environment; for a public bucket set [input] s3_anonymous = true")
STREAM_BUFFER_BYTES = 1 << 20


def looks_like_uri(text: str) -> bool:
    return bool(_URI.match(text))


@dataclass(frozen=True)
class ObjectUri:
    """`s3://bucket/key`: where an input lives in object storage. Stands where a local input's Path does, so
    it has the `name` that messages and the job fingerprint use."""

    bucket: str
    key: str

    @classmethod
    def parse(cls, text: str) -> "ObjectUri":
        """The URI's parts; ValueError (with the reason) for another scheme or a URI without bucket or key."""
        if not text.startswith(SCHEME):
            scheme = text.split("://", 1)[0]
            raise ValueError(f"{scheme}:// inputs are not supported; object storage is read through its S3 API "
                             "(s3://bucket/key; for Alibaba Cloud OSS also set s3_endpoint)")
        bucket, _, key = text[len(SCHEME):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise ValueError(f"expected s3://bucket/key naming one object, got {text!r}")
        return cls(bucket, key)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectStoreSettings:
    """[input] s3_* keys: which store, how to address it, whether to sign. No secrets here."""

    endpoint: str | None = None  # None: Amazon S3 itself
    region: str | None = None
    anonymous: bool = False
    addressing: str | None = None  # "path" or "virtual"; None: the default for the endpoint (see addressing_for)
    credentials: str = "environment"  # one of CREDENTIAL_SOURCES

    def addressing_for(self) -> str:
        """OSS answers only virtual-hosted requests (bucket.s3.oss-cn-hangzhou.aliyuncs.com); pyarrow's default for a
        custom endpoint is path style (what MinIO and most self-hosted stores want). Amazon S3 without an endpoint is
        always addressed the SDK's way (virtual)."""
        if self.addressing:
            return self.addressing
        if not self.endpoint:
            return "virtual"  # Amazon S3 itself: the SDK's own default
        return "virtual" if (urlsplit(self.endpoint).hostname or "").endswith(".aliyuncs.com") else "path"


class ObjectInput:
    """One object opened for reading: `check()` it up front, then open it as often as the reader needs."""

    def __init__(self, uri: ObjectUri, settings: ObjectStoreSettings) -> None:
        self.uri = uri
        self.settings = settings
        self._fs = None

    @property
    def _path(self) -> str:
        return f"{self.uri.bucket}/{self.uri.key}"

    def filesystem(self):
        if self._fs is None:
            self._fs = _filesystem(self.uri, self.settings)
        return self._fs

    def check(self) -> int:
        """The object's size; SourceError when it is missing, a prefix ("folder"), or unreachable."""
        import pyarrow.fs as pafs

        fs = self.filesystem()
        try:
            info = fs.get_file_info(self._path)
            if info.type == pafs.FileType.NotFound:
                bucket = fs.get_file_info(self.uri.bucket)
                if bucket.type == pafs.FileType.NotFound:
                    raise SourceError(f"{self.uri}: no such bucket {self.uri.bucket!r}", hint=self._where_hint())
                raise SourceError(f"{self.uri}: input file not found (no such key in bucket {self.uri.bucket!r})")
        except OSError as exc:
            raise self.error(exc) from None
        if info.type == pafs.FileType.Directory:
            raise SourceError(f"{self.uri}: names a prefix (a folder of objects), not one object",
                              hint="name one object, e.g. s3://bucket/prompts/part-0.parquet")
        return info.size

    def open_stream(self) -> BinaryIO:
        """The object's bytes from the start, as a buffered binary file (read, readline); one GET."""
        try:
            native = self.filesystem().open_input_stream(self._path, compression=None)
        except OSError as exc:
            raise self.error(exc) from None
        return io.BufferedReader(_RawStream(native), buffer_size=STREAM_BUFFER_BYTES)

    def open_native_stream(self) -> "pa.NativeFile":
        """The object's bytes from the start as pyarrow's own stream (for readers that run in Arrow's threads)."""
        try:
            return self.filesystem().open_input_stream(self._path, compression=None,
                                                       buffer_size=STREAM_BUFFER_BYTES)
        except OSError as exc:
            raise self.error(exc) from None

    def open_random_access(self) -> "pa.NativeFile":
        """A seekable file whose reads become ranged GETs (Parquet reads its footer, then the row groups)."""
        try:
            return self.filesystem().open_input_file(self._path)
        except OSError as exc:
            raise self.error(exc) from None

    def error(self, exc: BaseException, doing: str = "cannot read input file", *, midway: bool = False) -> SourceError:
        """A store error as a one-line SourceError naming the URI, never quoting a credential. `midway`: the read
        had started (the message says the input became unreadable, then why)."""
        reason, hint = self._reason(exc, midway)
        if reason is None:
            return SourceError(f"{self.uri}: {doing} ({scrub(str(exc))})")
        return SourceError(f"{self.uri}: {doing} ({reason})" if midway else f"{self.uri}: {reason}", hint=hint)

    def _reason(self, exc: BaseException, midway: bool) -> tuple[str | None, str | None]:
        """What went wrong in the user's words, and a hint; (None, None) for an error not recognised here."""
        upper = str(exc).upper()
        if isinstance(exc, FileNotFoundError) or "NO_SUCH_KEY" in upper or "NOSUCHKEY" in upper:
            return f"input file not found (no such key in bucket {self.uri.bucket!r})", None
        if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
            return f"no such bucket {self.uri.bucket!r}", self._where_hint()
        if any(word in upper for word in ("ACCESS_DENIED", "ACCESSDENIED", "INVALIDACCESSKEYID",
                                          "SIGNATUREDOESNOTMATCH", "FORBIDDEN", "EXPIREDTOKEN", "INVALID_ACCESS_KEY")):
            if self.settings.anonymous:
                return "access denied (anonymous)", ("the bucket is not public: remove [input] s3_anonymous and set "
                                                     "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment")
            if self.settings.credentials == "aws-chain":
                return "access denied (credentials from the AWS chain)", (
                    "the AWS SDK's chain found none this store accepts: check AWS_PROFILE and ~/.aws/credentials, "
                    "the AWS_* variables, or the machine's role")
            return "access denied", _CREDENTIALS_HINT
        if "NETWORK_CONNECTION" in upper or "CURLCODE" in upper or "COULD NOT CONNECT" in upper:
            where = self.settings.endpoint or "Amazon S3"
            if midway:
                return f"the connection to the object store at {where} failed", \
                    "run the same command again once the store answers: it resumes from the rows committed so far"
            return f"cannot connect to the object store at {where}", self._where_hint()
        return None, None

    def _where_hint(self) -> str:
        if self.settings.endpoint:
            return "check [input] s3_endpoint (and s3_region); for Alibaba Cloud OSS it is e.g. " \
                   "https://s3.oss-cn-hangzhou.aliyuncs.com"
        return "without [input] s3_endpoint the input is read from Amazon S3; set s3_endpoint for another store"


def open_bytes(path, store: ObjectInput | None, *, gzipped: bool) -> BinaryIO:
    """A binary file of the input's (decompressed) bytes: the local file at `path`, or the object `store` reads.
    Closing it closes the download too."""
    if store is None:
        return gzip.open(path, "rb") if gzipped else open(path, "rb", buffering=STREAM_BUFFER_BYTES)
    raw = store.open_stream()
    if not gzipped:
        return raw
    unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
    unzipped.myfileobj = raw  # what gzip.open(filename) sets: GzipFile.close() closes it
    return unzipped


def scrub(text: str, limit: int = 300) -> str:
    """One line of an error's text with the credentials' values (from the environment) replaced by ***."""
    line = " ".join(text.split())
    for name in CREDENTIAL_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            line = line.replace(value, "***")
    # An Authorization header or a signature quoted by the SDK would name the key id and a signature.
    line = re.sub(r"(?i)(authorization|signature|credential|x-amz-security-token)([=:]\s*)\S+", r"\1\2***", line)
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _filesystem(uri: ObjectUri, settings: ObjectStoreSettings):
    import pyarrow.fs as pafs

    options: dict = {"region": settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                     or "us-east-1"}
    if settings.endpoint:
        options["endpoint_override"] = settings.endpoint
    if settings.addressing_for() == "virtual":
        options["force_virtual_addressing"] = True
    if settings.anonymous:
        options["anonymous"] = True
    elif settings.credentials == "environment":  # "aws-chain" passes no keys: the AWS SDK's default chain
        key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        if not key_id or not secret:
            missing = " and ".join(n for n, v in zip(CREDENTIAL_ENV, (key_id, secret)) if not v)
            raise SourceError(f"{uri}: no credentials for object storage ({missing} not set)", hint=_CREDENTIALS_HINT)
        options.update(access_key=key_id, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN") or None)
    try:
        return pafs.S3FileSystem(**options)
    except TypeError:  # force_virtual_addressing came with pyarrow 16
        raise SourceError(f"{uri}: virtual-hosted addressing needs pyarrow 16 or later",
                          hint="pip install -U pyarrow") from None
    except (OSError, ValueError) as exc:
        raise SourceError(f"{uri}: cannot set up object storage access ({scrub(str(exc))})") from None


class _RawStream(io.RawIOBase):
    """A pyarrow input stream as a raw Python file, so io.BufferedReader (readline) and gzip can read it."""

    def __init__(self, native) -> None:
        self._native = native

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._native.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._native.close()
        super().close()
