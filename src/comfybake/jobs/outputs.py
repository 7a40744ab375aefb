"""Where a job's output files go: inline (base64 in the result) or S3-compatible storage (URLs).

ComfyUI reports each output node's files in `/history/<prompt id>` under a key per kind; a job's
result groups them as `{"images": [...], "videos": [...], "files": [...]}`:

- `images` -> images, except previews (type `temp`, PreviewImage's);
- `gifs`, `videos`, `video` -> videos (VideoHelperSuite's VHS_VideoCombine writes `gifs`);
- any other list of `{filename, subfolder, type}` -> files (audio, meshes, text files, ...).

Each item is `{"filename", "subfolder", "node", ...}` plus what its sink adds: `{"type":
"base64", "data"}` (`Inline`) or `{"type": "s3_url", "url"}` (`S3`, a presigned GET URL).
"""

from __future__ import annotations

import asyncio
import base64
import mimetypes
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

VIDEO_KEYS = frozenset({"gifs", "videos", "video"})
KINDS = ("images", "videos", "files")
OUTPUT_FOLDERS = frozenset({"output", "temp"})  # ComfyUI's folders a job's nodes write to
DEFAULT_PREFIX = "comfybake/jobs"
MAX_EXPIRES = 604800  # seconds: SigV4's longest presigned URL (7 days)


class OutputError(Exception):
    """An output could not be stored; the message names the file and what to do."""


@dataclass(frozen=True)
class OutputFile:
    """One file an output node wrote: `kind` is the result's list (images, videos, files), `type`
    ComfyUI's folder (output, temp)."""

    kind: str
    node: str
    filename: str
    subfolder: str
    type: str

    def item(self) -> dict[str, Any]:
        return {"filename": self.filename, "subfolder": self.subfolder, "node": self.node}


def collect(outputs: Mapping[str, Any]) -> list[OutputFile]:
    """The files of a /history entry's `outputs` (node id to its output), in node then key order."""
    found = []
    for node, output in outputs.items():
        if not isinstance(output, dict):
            continue
        for key, values in output.items():
            if not isinstance(values, list):
                continue
            kind = "images" if key == "images" else "videos" if key in VIDEO_KEYS else "files"
            for value in values:
                if not isinstance(value, dict) or not isinstance(value.get("filename"), str):
                    continue  # not a file: text outputs, flags (SaveAnimatedWEBP's `animated`)
                folder = str(value.get("type") or "output")
                if folder not in OUTPUT_FOLDERS:
                    continue  # not written by the job: input/ holds other jobs' uploads
                if kind == "images" and folder == "temp":
                    continue  # a preview
                found.append(OutputFile(kind, str(node), value["filename"], str(value.get("subfolder") or ""), folder))
    return found


def empty_result() -> dict[str, list[dict[str, Any]]]:
    return {kind: [] for kind in KINDS}


class OutputSink(Protocol):
    async def store(self, job_id: str, item: OutputFile, data: bytes) -> dict[str, Any]: ...


class Inline:
    """The file's bytes in the result, base64-encoded (as RunPod's ComfyUI worker returns them)."""

    async def store(self, job_id: str, item: OutputFile, data: bytes) -> dict[str, Any]:
        return {**item.item(), "type": "base64", "data": base64.b64encode(data).decode("ascii")}


class S3:
    """Each file uploaded to `<bucket>/<prefix>/<job id>/<subfolder>/<filename>` (boto3, in a
    thread), answered with a presigned GET URL valid `expires` seconds. Credentials come from
    boto3's chain (AWS_ACCESS_KEY_ID, ~/.aws, an instance role) unless given."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        endpoint_url: str | None = None,
        region: str | None = None,
        expires: int = MAX_EXPIRES,
        client: Any = None,
        access_key: str | None = None,
        secret_key: str | None = None,
    ) -> None:
        if not bucket:
            raise OutputError("the S3 output sink needs a bucket: set COMFYBAKE_JOBS_S3_BUCKET")
        if not 1 <= expires <= MAX_EXPIRES:
            raise OutputError(
                f"presigned URLs expire after {expires} seconds: give 1 to {MAX_EXPIRES} "
                "(COMFYBAKE_JOBS_S3_EXPIRES; S3 signs URLs for at most 7 days)"
            )
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        self.expires = expires
        self.access_key, self.secret_key = access_key, secret_key
        self.client = client

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> S3 | None:
        """The sink the environment configures, None when it configures none:

        - COMFYBAKE_JOBS_S3_BUCKET, _ENDPOINT_URL (an S3-compatible store), _PREFIX, _EXPIRES,
          _REGION; credentials by boto3's chain;
        - or RunPod's BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, BUCKET_SECRET_ACCESS_KEY (its
          uploader's names), the bucket named by COMFYBAKE_JOBS_S3_BUCKET or, as RunPod's
          uploader does, the month (`MM-YY`)."""
        runpod = environ.get("BUCKET_ENDPOINT_URL", "")
        bucket = environ.get("COMFYBAKE_JOBS_S3_BUCKET", "")
        if not bucket and not runpod:
            return None
        expires_text = environ.get("COMFYBAKE_JOBS_S3_EXPIRES", str(MAX_EXPIRES))
        try:
            expires = int(expires_text)
        except ValueError:
            raise OutputError(
                f"COMFYBAKE_JOBS_S3_EXPIRES {expires_text!r} is not a number of seconds (1 to {MAX_EXPIRES})"
            ) from None
        return cls(
            bucket or time.strftime("%m-%y"),
            prefix=environ.get("COMFYBAKE_JOBS_S3_PREFIX", DEFAULT_PREFIX),
            endpoint_url=environ.get("COMFYBAKE_JOBS_S3_ENDPOINT_URL") or runpod or None,
            region=environ.get("COMFYBAKE_JOBS_S3_REGION") or _runpod_region(runpod),
            expires=expires,
            access_key=environ.get("BUCKET_ACCESS_KEY_ID") or None,
            secret_key=environ.get("BUCKET_SECRET_ACCESS_KEY") or None,
        )

    def _client(self) -> Any:
        if self.client is None:
            import boto3  # type: ignore[import-untyped]  # the serving extra's; imported on first use
            from botocore.config import Config  # type: ignore[import-untyped]

            self.client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=Config(signature_version="s3v4", retries={"max_attempts": 3, "mode": "standard"}),
            )
        return self.client

    def key(self, job_id: str, item: OutputFile) -> str:
        parts = [self.prefix, job_id, item.subfolder.strip("/"), item.filename]
        return "/".join(part for part in parts if part)

    def _put(self, key: str, data: bytes, filename: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        client = self._client()
        content_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        try:
            client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
            url: str = client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.expires
            )
        except (BotoCoreError, ClientError) as error:
            where = f"s3://{self.bucket}/{key}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
            raise OutputError(
                f"cannot upload {filename} to {where}: {error}; check the bucket, its endpoint and the credentials"
            ) from None
        return url

    async def store(self, job_id: str, item: OutputFile, data: bytes) -> dict[str, Any]:
        url = await asyncio.to_thread(self._put, self.key(job_id, item), data, item.filename)
        return {**item.item(), "type": "s3_url", "url": url}


def _runpod_region(endpoint_url: str) -> str | None:
    """The region in an AWS-style endpoint (`https://x.s3.eu-west-1.amazonaws.com`), as RunPod reads it."""
    if ".s3." in endpoint_url:
        return endpoint_url.split(".s3.", 1)[1].split(".")[0] or None
    return None


def sinks_from_environment(environ: Mapping[str, str]) -> dict[str, OutputSink]:
    """`inline` always; `s3` when the environment configures it."""
    sinks: dict[str, OutputSink] = {"inline": Inline()}
    s3 = S3.from_environment(environ)
    if s3 is not None:
        sinks["s3"] = s3
    return sinks
