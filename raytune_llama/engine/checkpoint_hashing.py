"""SHA-256 and size of checkpoint files computed while they are written, so a save never reads
its own files back (README, "Atomic, verified checkpoints"; bench/RESULTS.md, checkpoint cost).

`HashingStream` wraps a binary file opened for writing and updates a SHA-256 and a byte count
as the bytes go through. Both writers of a checkpoint write sequentially: torch.save into a
file object only calls write() (torch/serialization.py, `_open_zipfile_writer_buffer`), and
torch.distributed.checkpoint's FileSystemWriter appends items one after another, asking
`tell()` for offsets but never seeking (`_write_item` / `_write_files_from_queue` in
torch/distributed/checkpoint/filesystem.py, torch 2.13). Should a writer ever seek, the stream
notices and that one file is hashed by reading it back after it is closed (logged), so the
recorded hash is right either way.

`HashedFiles` records {path: {"bytes", "sha256"}} for the files one rank wrote, following
renames (DCP writes `.metadata.tmp` and renames it); `HashingFileSystemWriter` is DCP's
FileSystemWriter with every file it creates going through a HashingStream."""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
from pathlib import Path
from typing import Iterator

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

log = logging.getLogger(__name__)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file on disk, read in 1 MiB chunks (verification, and the fallback for a
    file that was not written sequentially)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class HashingStream(io.IOBase):
    """A binary file opened for writing that hashes what is written through it. `sequential`
    turns False if anything moves the position (then the running hash no longer describes the
    file, and HashedFiles hashes it from disk instead)."""

    def __init__(self, raw: io.IOBase):
        super().__init__()
        self._raw, self._sha, self.bytes, self.sequential = raw, hashlib.sha256(), 0, True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return self._raw.seekable()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")  # tensors' buffers come as typed memoryviews
        written = self._raw.write(view)
        written = view.nbytes if written is None else written
        self._sha.update(view[:written])
        self.bytes += written
        return written

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        position = self._raw.seek(offset, whence)
        if position != self.bytes:
            self.sequential = False
        return position

    def flush(self) -> None:
        if not self._raw.closed:
            self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()  # os.fsync(stream.fileno()) in DCP and our atomic writers

    def close(self) -> None:
        if not self.closed:
            try:
                self.flush()
                self._raw.close()
            finally:
                super().close()

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


class HashedFiles:
    """The files one rank wrote for a checkpoint and their {"bytes", "sha256"}, recorded as the
    bytes were written (thread-safe: DCP may write from several threads, async saves from a
    background one)."""

    def __init__(self):
        self._entries: dict[Path, dict] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def open(self, path: str | os.PathLike) -> Iterator[HashingStream]:
        """Open `path` for writing through a HashingStream; its entry is recorded once the block
        ends without an error (a file left by a failed write is never recorded)."""
        path = Path(path)
        stream = HashingStream(open(path, "wb"))
        try:
            yield stream
        finally:
            stream.close()
        self._record(path, stream)

    def _record(self, path: Path, stream: HashingStream) -> None:
        if stream.sequential:
            entry = {"bytes": stream.bytes, "sha256": stream.hexdigest()}
        else:
            log.warning("%s was not written sequentially: hashing it after writing instead", path)
            entry = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        with self._lock:
            self._entries[path] = entry

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        """Follow a rename (a temp file moved into place)."""
        with self._lock:
            entry = self._entries.pop(Path(path), None)
            if entry is not None:
                self._entries[Path(new_path)] = entry

    def discard(self, path: str | os.PathLike) -> None:
        with self._lock:
            self._entries.pop(Path(path), None)

    def entry(self, path: str | os.PathLike) -> dict:
        """{"bytes", "sha256"} of one recorded file."""
        with self._lock:
            return dict(self._entries[Path(path)])

    def entries_in(self, directory: str | os.PathLike) -> dict[str, dict]:
        """{file name: {"bytes", "sha256"}} of the recorded files directly inside `directory`
        (leftover temp files excluded): a rank manifest's "files"."""
        d = Path(directory)
        with self._lock:
            return {p.name: dict(e) for p, e in sorted(self._entries.items())
                    if p.parent == d and not p.name.endswith(".tmp")}


class _HashingFileSystem(FileSystem):
    """DCP's local FileSystem, except that files opened for writing go through HashedFiles."""

    def __init__(self, hashed: HashedFiles):
        super().__init__()
        self.hashed = hashed

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if mode != "wb":  # reads (and anything else) are not ours to hash
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with self.hashed.open(path) as stream:
            yield stream

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        self.hashed.rename(path, new_path)

    def rm_file(self, path: str | os.PathLike) -> None:
        super().rm_file(path)
        self.hashed.discard(path)


class HashingFileSystemWriter(FileSystemWriter):
    """torch.distributed.checkpoint's FileSystemWriter whose files are hashed while written;
    `.hashed` holds this rank's files after the save (and, on the coordinator, `.metadata`)."""

    def __init__(self, path: str | os.PathLike, **kwargs):
        super().__init__(path, **kwargs)
        self.hashed = HashedFiles()
        self.fs = _HashingFileSystem(self.hashed)
