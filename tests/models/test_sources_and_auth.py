"""Hugging Face and Civitai sources, tokens and redirects (AU-01..AU-05)."""

from __future__ import annotations

import os
from pathlib import Path

from harness.mockhub import MockHub, VirtualFile
from harness.models import CANARY_CIVITAI, CANARY_HF, Run, no_leftovers, safetensors, sha256
from harness.tls import make_tls

REPO = "org/gated-model"
AUTH_HEADERS = ("authorization", "cookie", "x-api-key")


def assert_no_credentials(server: MockHub) -> None:
    for request in server.requests():
        assert not {h.lower() for h in request.headers} & set(AUTH_HEADERS), request
        assert "token=" not in request.query, request


def test_hf_lfs_file_uses_the_published_hash_and_strips_the_token_at_the_cdn(
    run: Run, hub: MockHub, cdn: MockHub, store: Path
) -> None:
    """AU-01 (Hub): the CDN on another host rejects any credential; the download succeeds."""
    body = safetensors(os.urandom(2 << 20))
    digest = hub.add_hf(REPO, "unet/model.safetensors", body, cdn=cdn, token=CANARY_HF, gated=True)
    result = run.one([{"url": f"hf://{REPO}/unet/model.safetensors@main", "dest": "unet/"}])
    assert (result.action, result.sha256) == ("downloaded", digest)
    assert (store / "unet" / "model.safetensors").read_bytes() == body
    assert cdn.bytes_served == len(body)
    assert_no_credentials(cdn)
    assert all(r.headers.get("Authorization") == f"Bearer {CANARY_HF}" for r in hub.requests())


def test_hf_resolve_urls_count_as_the_hub(run: Run, hub: MockHub, cdn: MockHub, store: Path) -> None:
    body = safetensors()
    hub.add_hf(REPO, "vae.safetensors", body, cdn=cdn, token=CANARY_HF)
    url = f"{hub.url}/{REPO}/resolve/main/vae.safetensors"
    assert run.one([{"url": url, "dest": "vae/vae.safetensors"}]).action == "downloaded"
    assert_no_credentials(cdn)


def test_hf_manifest_hash_that_disagrees_with_the_hub_fails_before_download(
    run: Run, hub: MockHub, cdn: MockHub, store: Path
) -> None:
    body = safetensors()
    hub.add_hf(REPO, "a.safetensors", body, cdn=cdn)
    result = run.one([{"url": f"hf://{REPO}/a.safetensors@main", "dest": "loras/", "sha256": "ab" * 32}])
    assert result.action == "failed"
    assert f"the source publishes {sha256(body)}" in (result.msg or "")
    assert cdn.bytes_served == 0
    no_leftovers(store)


def test_hf_non_lfs_file_needs_a_hash(run: Run, hub: MockHub, store: Path) -> None:
    """Small git files publish a git SHA-1, not a SHA-256: the entry must give one."""
    body = b'{"model_type": "x"}'
    hub.add_hf(REPO, "config.json", body, lfs=False)
    result = run.one([{"url": f"hf://{REPO}/config.json@main", "dest": "configs/"}])
    assert result.action == "failed"
    assert "no sha256" in (result.msg or "")
    result = run.one([{"url": f"hf://{REPO}/config.json@main", "dest": "configs/", "sha256": sha256(body)}])
    assert result.action == "downloaded"


def test_hub_errors_are_distinct(run: Run, hub: MockHub, cdn: MockHub) -> None:
    """AU-03: gated without token, no grant, bad token, not found; never retried, never echoed."""
    body = safetensors()
    hub.add_hf("org/gated", "m.safetensors", body, cdn=cdn, token=CANARY_HF, gated=True)
    hub.add_hf("org/nogrant", "m.safetensors", body, cdn=cdn, token=CANARY_HF, gated=True, granted=False)
    hub.add_hf("org/private", "m.safetensors", body, cdn=cdn, token="hf_other", private=True)
    hub.add_hf_missing("org/missing")

    def message(repo: str, **overrides: object) -> str:
        result = run.one(
            [{"url": f"hf://{repo}/m.safetensors@main", "dest": f"x/{repo.split('/')[1]}.safetensors"}],
            retries=3,
            **overrides,
        )
        assert result.action == "failed"
        return result.msg or ""

    assert "token missing or invalid for org/gated" in message("org/gated", hf_token=None)
    assert "accept the licence at https://huggingface.co/org/nogrant" in message("org/nogrant")
    assert "authentication failed for org/private (401; HF also uses 401 for private or missing repos)" in message(
        "org/private"
    )
    assert "repo/file not found" in message("org/missing")
    assert len(hub.requests()) == 4, "an auth or not-found error was retried"
    assert cdn.bytes_served == 0


def test_civitai_version_with_token_and_presigned_redirect(run: Run, hub: MockHub, cdn: MockHub, store: Path) -> None:
    """AU-01 (Civitai): the API's hash and file name; the CDN gets no token."""
    body = safetensors(seed=3)
    hub.add_civitai(128713, "detail-tweaker.safetensors", body, token=CANARY_CIVITAI, cdn=cdn)
    result = run.one([{"url": "civitai://128713", "dest": "loras/"}])
    first = len(hub.requests())
    assert (result.action, result.sha256) == ("downloaded", sha256(body))
    assert (store / "loras" / "detail-tweaker.safetensors").read_bytes() == body
    assert_no_credentials(cdn)
    again = run.one([{"url": "civitai://128713", "dest": "loras/"}])
    assert (again.action, again.bytes) == ("present", 0)
    assert len(hub.requests()) == first, "a recorded folder download was resolved again"


def test_civitai_without_token(run: Run, hub: MockHub, cdn: MockHub) -> None:
    hub.add_civitai(5, "x.safetensors", safetensors(), token=CANARY_CIVITAI, cdn=cdn)
    result = run.one([{"url": "civitai://5", "dest": "loras/"}], civitai_token=None)
    assert result.action == "failed"
    assert "token missing or invalid for civitai model version 5" in (result.msg or "")


def test_https_to_http_redirect_is_refused(tmp_path: Path, store: Path) -> None:
    """AU-02: no request reaches the http URL."""
    tls = make_tls(tmp_path / "tls")
    with MockHub("127.0.0.1", tls=tls) as secure, MockHub("127.0.0.2") as plain:
        plain.add("/x.bin", b"x")
        secure.add_hf(REPO, "m.bin", b"x", lfs=False)
        secure.add(f"/{REPO}/resolve/main/m.bin", b"", redirect=f"{plain.url}/x.bin")
        runner = Run(secure, store)
        result = runner.one(
            [{"url": f"hf://{REPO}/m.bin@main", "dest": "x/m.bin", "sha256": "0" * 64}],
            ca_bundle=str(tls.ca),
            allow_http=True,
        )
        assert result.action == "failed"
        assert "refusing https→http redirect" in (result.msg or "")
        assert plain.requests() == []
        assert CANARY_HF not in repr(result)


def test_token_for_a_foreign_host_is_refused_at_validation(run: Run) -> None:
    """AU-05: no network call at all."""
    message = run.error([{"url": "https://example.invalid/x.safetensors", "dest": "x/", "auth": "hf"}])
    assert "refusing to send the hf token to example.invalid" in message


def test_plain_http_needs_permission(run: Run, hub: MockHub) -> None:
    message = run.error([{"url": f"{hub.url}/m.bin", "dest": "x/m.bin"}], allow_http=False)
    assert "refusing plain http" in message
    assert "allow_http" in message


def test_a_new_source_for_the_same_dest_is_fetched(run: Run, hub: MockHub, cdn: MockHub, store: Path) -> None:
    """Without a sha256 in the manifest, a record vouches only for the source it was fetched from."""
    first, second = safetensors(seed=8), safetensors(seed=9)
    hub.add_hf("org/one", "m.safetensors", first, cdn=cdn)
    hub.add_hf("org/two", "m.safetensors", second, cdn=cdn)
    assert run.one([{"url": "hf://org/one/m.safetensors@main", "dest": "unet/m.safetensors"}]).action == "downloaded"
    assert run.one([{"url": "hf://org/one/m.safetensors@main", "dest": "unet/m.safetensors"}]).action == "present"
    result = run.one([{"url": "hf://org/two/m.safetensors@main", "dest": "unet/m.safetensors"}])
    assert (result.action, result.sha256, result.replaced) == ("downloaded", sha256(second), sha256(first))
    assert (store / "unet" / "m.safetensors").read_bytes() == second


def test_an_expired_presigned_url_is_renewed_without_refetching(
    run: Run, hub: MockHub, cdn: MockHub, store: Path
) -> None:
    """The CDN URL stops working mid-download: ask the Hub again and carry on from where it was."""
    body = VirtualFile(12 << 20, seed=11)
    hub.add_hf(REPO, "big.bin", body, cdn=cdn, token=CANARY_HF, cdn_expire_after=4)
    report = run([{"url": f"hf://{REPO}/big.bin@main", "dest": "unet/big.bin"}], connections=2)
    assert report.results[0].action == "downloaded"
    assert any("the download URL expired" in w for w in report.warnings)
    model_bytes = sum(r.body_bytes for r in cdn.requests() if r.status == 206)
    assert model_bytes == body.size, "bytes were fetched twice after the renewal"
    assert [r.status for r in cdn.requests()].count(403) >= 1
    assert_no_credentials(cdn)


ECHOES = ("error-code", "request-id", "redirect", "scheme")


def test_a_token_the_origin_echoes_is_redacted_from_every_message(
    run: Run, hub: MockHub, cdn: MockHub, store: Path
) -> None:
    """Issue 17, defect 7: an origin reflects the request's token into an error header or a redirect
    path; no message carries it (the HF token, and a mirror's password, through warnings too)."""
    for how in ECHOES:
        hub.add_echo(f"/echo/{how}", how)
    report = run([{"url": f"{hub.url}/echo/{how}", "dest": f"vae/{how}.bin"} for how in ECHOES])
    assert all(r.headers.get("Authorization") == f"Bearer {CANARY_HF}" for r in hub.requests(f"/echo/{ECHOES[0]}"))
    messages = [result.msg or "" for result in report.results]
    assert [result.action for result in report.results] == ["failed"] * len(ECHOES), messages
    for message in messages:
        assert CANARY_HF not in message and "<redacted>" in message, message
    password = "mirror-pass-0451"
    body = os.urandom(3000)
    hub.add("/files/a.bin", body)
    cdn.add_echo("/mirror/vae/a.bin", "request-id")
    report = run(
        [{"url": f"{hub.url}/files/a.bin", "dest": "vae/a.bin", "sha256": sha256(body)}],
        mirrors=[f"http://user:{password}@{cdn.host}:{cdn.port}/mirror"],
    )
    assert report.results[0].action == "downloaded", report.results[0].msg
    assert any("mirror" in warning and "<redacted>" in warning for warning in report.warnings), report.warnings
    assert all(password not in text for text in [*report.warnings, *run.outputs])
