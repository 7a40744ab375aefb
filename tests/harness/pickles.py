"""Pickle-based model files for the pickle-policy tests (issue 17 item 12) and the molecule
origin. None of these is ever unpickled: the bytes are written by pickle.dumps of plain data,
or opcode by opcode."""

from __future__ import annotations

import io
import pickle
import zipfile


def harmless_pickle() -> bytes:
    """What torch.save of plain tensors-like lists looks like to a scanner: protocol 4, no import."""
    return pickle.dumps({"state_dict": {"w": [[0.25, 0.5], [0.75, 1.0]], "b": [0.0, 0.0]}}, protocol=4)


def malicious_pickle(command: str = "true") -> bytes:
    """A pickle whose loading calls os.system(command) (GLOBAL posix system; REDUCE), written by hand."""
    argument = command.encode()
    return b"\x80\x04" + b"cposix\nsystem\n" + b"\x8c" + bytes([len(argument)]) + argument + b"\x85R."


def torch_zip(data_pkl: bytes) -> bytes:
    """The layout of torch.save's zip format: <name>/data.pkl, <name>/version, <name>/data/0."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in (("model/data.pkl", data_pkl), ("model/version", b"3\n"), ("model/data/0", b"\0" * 64)):
            archive.writestr(zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0)), data)
    return buffer.getvalue()


def global_call(module: str, name: str, argument: bytes = b"") -> bytes:
    """A protocol-2 pickle whose loading calls module.name(argument) (GLOBAL; REDUCE), written by hand."""
    text = b"\x8c" + bytes([len(argument)]) + argument + b"\x85" if argument else b")"
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + text + b"R."


def text_pickle(command: str = "true") -> bytes:
    """Protocol 0 (text, no PROTO opcode): os.system(command)."""
    return b"cposix\nsystem\n(S'" + command.encode() + b"'\ntR."


def padded_pickle(padding: int = (1 << 20) + 10) -> bytes:
    """Protocol 2 whose first value is a BINUNICODE longer than the sniffed head, then a gadget."""
    filler = b"X" + padding.to_bytes(4, "little") + b"a" * padding + b"0"  # pushed, then POPped
    return b"\x80\x02" + filler + malicious_pickle()[2:]
