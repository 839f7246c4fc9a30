"""A local filesystem that answers like an object store: every metadata call and every open waits a fixed
latency first, and the calls are counted. For the planning benchmark and the tests that check the driver
does not make one serial round trip per file or shard (no object store is reachable from here)."""
from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.fs as pafs


class LatencyHandler(pafs.FileSystemHandler):
    def __init__(self, latency_s: float = 0.03):
        self.local = pafs.LocalFileSystem()
        self.latency_s = latency_s
        self.calls: dict[str, int] = {}
        self.bytes_read = 0  # through files opened for reading
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def _wait(self, kind: str) -> None:
        with self._lock:
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.latency_s)
        finally:
            with self._lock:
                self.in_flight -= 1

    def reset(self) -> None:
        with self._lock:
            self.calls, self.max_in_flight, self.bytes_read = {}, 0, 0

    def _count(self, n: int) -> None:
        with self._lock:
            self.bytes_read += n

    # ---- pyarrow.fs.FileSystemHandler ----
    def get_type_name(self) -> str:
        return "latency-local"

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths):
        self._wait("info")
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector):
        self._wait("list")
        return self.local.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self._wait("delete")
        self.local.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise NotImplementedError

    def delete_file(self, path):
        self._wait("delete")
        self.local.delete_file(path)

    def move(self, src, dest):
        self._wait("move")
        self.local.move(src, dest)

    def copy_file(self, src, dest):
        self._wait("copy")
        self.local.copy_file(src, dest)

    def open_input_stream(self, path):
        self._wait("open")
        return self.local.open_input_stream(path)

    def open_input_file(self, path):
        self._wait("open")
        return pa.PythonFile(_CountingReader(open(path, "rb"), self._count), mode="r")

    def open_output_stream(self, path, metadata):
        self._wait("open")
        return self.local.open_output_stream(path)

    def open_append_stream(self, path, metadata):
        raise NotImplementedError


class _CountingReader:
    """A local file that reports how many bytes each read returned (an object store bills by them)."""

    def __init__(self, raw, count):
        self.raw, self.count, self.closed = raw, count, False

    def read(self, n=-1):
        data = self.raw.read(n)
        self.count(len(data))
        return data

    def seek(self, offset, whence=0):
        return self.raw.seek(offset, whence)

    def tell(self):
        return self.raw.tell()

    def readable(self):
        return True

    def seekable(self):
        return True

    def close(self):
        self.raw.close()
        self.closed = True


def latency_fs(latency_s: float = 0.03) -> tuple[pafs.PyFileSystem, LatencyHandler]:
    handler = LatencyHandler(latency_s)
    return pafs.PyFileSystem(handler), handler
