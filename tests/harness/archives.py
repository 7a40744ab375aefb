"""Archives for the extraction tests, built in memory: good ones, and every unsafe kind."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile

EPOCH = (2024, 1, 1, 0, 0, 0)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name, EPOCH), data)
    return buffer.getvalue()


def _zip_special(name: str, data: bytes, mode: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(name, EPOCH)
        info.external_attr = mode << 16
        archive.writestr(info, data)
    return buffer.getvalue()


def tar_bytes(members: dict[str, bytes], *, gz: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_704_067_200
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _tar_special(name: str, kind: bytes, linkname: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        good = tarfile.TarInfo("ok.onnx")
        good.size = 2
        archive.addfile(good, io.BytesIO(b"ok"))
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mtime = kind, linkname, 1_704_067_200
        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            info.devmajor, info.devminor = 1, 3
        archive.addfile(info)
    return buffer.getvalue()


def zip_slip() -> bytes:
    return zip_bytes({"ok.onnx": b"ok", "../x.txt": b"slip"})


def zip_absolute() -> bytes:
    return zip_bytes({"/abs/x.txt": b"abs"})


def zip_symlink() -> bytes:
    return _zip_special("etc", b"/etc", stat.S_IFLNK | 0o777)


def tar_slip() -> bytes:
    return tar_bytes({"ok.onnx": b"ok", "../x.txt": b"slip"})


def tar_symlink() -> bytes:
    return _tar_special("etc", tarfile.SYMTYPE, "/etc")


def tar_hardlink() -> bytes:
    return _tar_special("passwd", tarfile.LNKTYPE, "/etc/passwd")


def tar_fifo() -> bytes:
    return _tar_special("fifo", tarfile.FIFOTYPE)


def tar_device() -> bytes:
    return _tar_special("null", tarfile.CHRTYPE)


def zip_bomb(uncompressed: int) -> bytes:
    """One member of zeros: a few KiB that expand to `uncompressed` bytes."""
    buffer = io.BytesIO()
    block = b"\0" * (1 << 20)
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive,
        archive.open(zipfile.ZipInfo("zeros.bin", EPOCH), "w", force_zip64=True) as member,
    ):
        for _ in range(uncompressed // len(block)):
            member.write(block)
    return buffer.getvalue()


def zip_many(count: int) -> bytes:
    return zip_bytes({f"m{i:06d}.onnx": b"" for i in range(count)})


ANTELOPEV2 = ("1k3d68.onnx", "2d106det.onnx", "genderage.onnx", "glintr100.onnx", "scrfd_10g_bnkps.onnx")


def antelopev2_zip() -> bytes:
    """The InsightFace pack as published: everything under a nested antelopev2/ folder."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(zipfile.ZipInfo("antelopev2/", EPOCH), b"")
        for index, name in enumerate(ANTELOPEV2):
            archive.writestr(zipfile.ZipInfo(f"antelopev2/{name}", EPOCH), f"onnx-{index}".encode() * 100)
    return buffer.getvalue()
