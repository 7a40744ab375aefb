"""Output sinks (jobs/outputs.py): which /history entries are outputs and of what kind, inline
base64, and S3 uploads to moto's S3 server answered with presigned URLs that work."""

from __future__ import annotations

import asyncio
import base64

import pytest
import requests
from harness.jobs import S3Server

from comfybake.jobs import outputs
from comfybake.jobs.outputs import OutputError, OutputFile

HISTORY_OUTPUTS = {
    "9": {"images": [{"filename": "ComfyUI_00001_.png", "subfolder": "", "type": "output"}]},
    "10": {"images": [{"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "", "type": "temp"}]},
    "11": {"gifs": [{"filename": "clip_00001.mp4", "subfolder": "vid", "type": "output", "format": "video/h264-mp4"}]},
    "12": {"audio": [{"filename": "voice_00001_.wav", "subfolder": "audio", "type": "output"}]},
    "13": {"text": ["a caption"], "animated": [False]},
    "14": {"gifs": [{"filename": "face.png", "subfolder": "comfybake-other-job", "type": "input"}]},
}


def test_outputs_are_sorted_into_images_videos_and_files_and_previews_and_inputs_skipped() -> None:
    found = outputs.collect(HISTORY_OUTPUTS)
    assert found == [
        OutputFile("images", "9", "ComfyUI_00001_.png", "", "output"),
        OutputFile("videos", "11", "clip_00001.mp4", "vid", "output"),
        OutputFile("files", "12", "voice_00001_.wav", "audio", "output"),
    ]


def test_inline_gives_the_bytes_as_base64() -> None:
    item = OutputFile("images", "9", "a.png", "", "output")
    stored = asyncio.run(outputs.Inline().store("job", item, b"\x89PNG data"))
    assert stored == {"filename": "a.png", "subfolder": "", "node": "9", "type": "base64",
                      "data": base64.b64encode(b"\x89PNG data").decode()}  # fmt: skip


def test_s3_uploads_and_answers_a_presigned_url_that_works(s3_server: S3Server) -> None:
    sink = outputs.S3.from_environment(
        {**s3_server.environ(), "COMFYBAKE_JOBS_S3_PREFIX": "/serve/", "COMFYBAKE_JOBS_S3_EXPIRES": "60"}
    )
    assert sink is not None and (sink.prefix, sink.expires) == ("serve", 60)
    item = OutputFile("videos", "11", "clip_00001.mp4", "vid", "output")
    stored = asyncio.run(sink.store("job-1", item, b"\x00\x00\x00\x18ftypmp42"))
    assert {key: stored[key] for key in ("filename", "subfolder", "node", "type")} == {
        "filename": "clip_00001.mp4", "subfolder": "vid", "node": "11", "type": "s3_url"}  # fmt: skip
    response = requests.get(stored["url"], timeout=10)
    assert response.status_code == 200 and response.content == b"\x00\x00\x00\x18ftypmp42"
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key="serve/job-1/vid/clip_00001.mp4")
    assert head["ContentType"] == "video/mp4"


def test_an_upload_to_a_missing_bucket_names_it_without_credentials(s3_server: S3Server) -> None:
    sink = outputs.S3.from_environment({**s3_server.environ(), "COMFYBAKE_JOBS_S3_BUCKET": "no-such-bucket"})
    assert sink is not None
    with pytest.raises(OutputError) as raised:
        asyncio.run(sink.store("job-1", OutputFile("images", "9", "a.png", "", "output"), b"x"))
    message = str(raised.value)
    assert message.startswith(
        f"cannot upload a.png to s3://no-such-bucket/comfybake/jobs/job-1/a.png at {s3_server.endpoint_url}: "
    )
    assert "testing" not in message


def test_the_environment_configures_s3_or_nothing() -> None:
    assert outputs.S3.from_environment({}) is None
    assert list(outputs.sinks_from_environment({})) == ["inline"]
    runpod = outputs.S3.from_environment(
        {
            "BUCKET_ENDPOINT_URL": "https://media.s3.eu-west-1.amazonaws.com",
            "BUCKET_ACCESS_KEY_ID": "id",
            "BUCKET_SECRET_ACCESS_KEY": "secret",
            "COMFYBAKE_JOBS_S3_BUCKET": "media",
        }
    )
    assert runpod is not None
    assert (runpod.bucket, runpod.endpoint_url, runpod.region) == (
        "media", "https://media.s3.eu-west-1.amazonaws.com", "eu-west-1")  # fmt: skip
    with pytest.raises(OutputError, match=r"COMFYBAKE_JOBS_S3_EXPIRES '2w' is not a number of seconds"):
        outputs.S3.from_environment({"COMFYBAKE_JOBS_S3_BUCKET": "b", "COMFYBAKE_JOBS_S3_EXPIRES": "2w"})
    with pytest.raises(OutputError, match=r"presigned URLs expire after 604801 seconds: give 1 to 604800"):
        outputs.S3("b", expires=604801)
