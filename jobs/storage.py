"""Storage through `pyarrow.fs`: local paths and any URI it resolves (s3://, gs://, hdfs://).

Writes are atomic: a file is written under a temporary name beside its target, then renamed, so a
reader (or a rerun) sees either the whole file or none of it.
"""
from __future__ import annotations

import fnmatch
import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

TMP_MARK = ".tmp-"
# Concurrent metadata calls: an object store answers each in tens of milliseconds, so the driver's per-file
# and per-shard calls (footers, stats) go in parallel; 5,000 serial calls at 40 ms are over three minutes.
IO_THREADS = 32


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # path inside fs, no scheme
    uri: str  # what the user wrote (or a child of it), for messages

    def child(self, *parts: str) -> "Location":
        sub = "/".join(p.strip("/") for p in parts)
        return Location(self.fs, f"{self.path.rstrip('/')}/{sub}", f"{self.uri.rstrip('/')}/{sub}")


def locate(uri: str) -> Location:
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return Location(fs, path, uri)
    path = os.path.abspath(uri)
    return Location(pafs.LocalFileSystem(), path, path)


def _has_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def list_parquet(inputs: list[str], exclude: Location | None = None) -> list[Location]:
    """Every Parquet file named by the inputs (files, directories, globs), sorted, each once (see
    list_parquet_mtimes)."""
    return [loc for loc, _ in list_parquet_mtimes(inputs, exclude)]


def _mtime_ns(info: pafs.FileInfo) -> int | None:
    return info.mtime_ns if info.mtime is not None else None


def list_parquet_mtimes(inputs: list[str], exclude: Location | None = None) -> list[tuple[Location, int | None]]:
    """Every Parquet file named by the inputs (files, directories, globs), sorted, each once, with its
    modification time in ns (from the listing: no extra call; None where the store keeps none).

    A path that exists is taken as written, glob characters in its name or not. In a glob, `*`, `?` and
    `[...]` stay within one folder and a `**` segment spans any number of folders. Under a directory, and
    wherever a glob's wildcards reach, names starting with `_` or `.` are skipped (`_SUCCESS`, `_tmp/`,
    `.hidden/`), and so is `exclude` (the job's own output, which may sit inside an input folder).
    """
    found: dict[str, tuple[Location, int | None]] = {}

    def keep(loc: Location, path: str) -> bool:
        return exclude is None or type(loc.fs) is not type(exclude.fs) or not _under(path, exclude.path)

    for spec in inputs:
        loc = locate(spec)
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound and _has_glob(spec):
            head = spec[: min(spec.index(c) for c in "*?[" if c in spec)]
            root = locate(head.rsplit("/", 1)[0] if "/" in head else ".")
            pats = loc.path[len(root.path.rstrip("/")):].strip("/").split("/")
            recursive = len(pats) > 1 or "**" in pats
            infos = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=recursive, allow_not_found=True))
            hits = [i for i in infos if i.type == pafs.FileType.File and keep(root, i.path)
                    and _glob_match(i.path[len(root.path.rstrip("/")):].strip("/").split("/"), pats)]
            if not hits:
                raise FileNotFoundError(f"--input {spec}: the pattern matches no file")
            for i in hits:
                found[i.path] = Location(root.fs, i.path, _uri_of(spec, root, i.path)), _mtime_ns(i)
            continue
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"--input {spec}: no such file or directory")
        if info.type == pafs.FileType.Directory:
            infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
            files = [i for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                     and not _hidden(i.path[len(loc.path):]) and keep(loc, i.path)]
            if not files:
                raise FileNotFoundError(f"--input {spec}: the directory holds no .parquet file")
            for i in files:
                found[i.path] = Location(loc.fs, i.path, _uri_of(spec, loc, i.path)), _mtime_ns(i)
        else:
            found[loc.path] = loc, _mtime_ns(info)
    return [found[k] for k in sorted(found)]


def _glob_match(parts: list[str], pats: list[str]) -> bool:
    """Path segments against pattern segments: fnmatch within a segment, `**` for any run of folders; a
    wildcard never reaches a `_` or `.` name unless its own segment starts so."""
    if not pats:
        return not parts
    head, rest = pats[0], pats[1:]
    if head == "**":
        return any(_glob_match(parts[i:], rest) for i in range(len(parts) + 1)
                   if not any(_hidden(p) for p in parts[:i]))
    if not parts:
        return False
    part = parts[0]
    if _hidden(part) and _has_glob(head) and not head.startswith(part[0]):
        return False
    return fnmatch.fnmatchcase(part, head) and _glob_match(parts[1:], rest)


def _under(path: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.strip("/").split("/"))


def _uri_of(spec: str, root: Location, path: str) -> str:
    if "://" in spec:
        return f"{spec.split('://', 1)[0]}://{path}"
    return path


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def makedirs(loc: Location) -> None:
    loc.fs.create_dir(loc.path, recursive=True)


def parallel(fn, items: list, threads: int = IO_THREADS) -> list:
    """`[fn(x) for x in items]`, run on `threads` threads, in order; the first exception propagates."""
    if len(items) < 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="storage") as pool:
        return list(pool.map(fn, items))


def list_files(loc: Location) -> dict[str, list[str]]:
    """Every file under `loc` in one recursive listing (paginated on object stores, not one call per folder),
    grouped by the folder it sits in relative to `loc` ("" for loc itself); temporary files excluded."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    root = loc.path.rstrip("/") + "/"
    tree: dict[str, list[str]] = {}
    for i in infos:
        if i.type == pafs.FileType.File and TMP_MARK not in i.base_name:
            folder = i.path[len(root):].rpartition("/")[0]
            tree.setdefault(folder, []).append(i.base_name)
    return {k: sorted(v) for k, v in tree.items()}


def list_dir(loc: Location) -> list[str]:
    """Names of the entries in a directory (none if it does not exist), temporary files excluded."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True))
    return sorted(i.base_name for i in infos if TMP_MARK not in i.base_name)


# Fault injection (tests): called between a temporary file's write and its rename, e.g. to hang there.
before_rename = None


def _atomic(loc: Location, write) -> None:
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/{TMP_MARK}{uuid.uuid4().hex[:12]}-{loc.path.rsplit('/', 1)[1]}"
    try:
        write(tmp)
        if before_rename is not None:
            before_rename()
        loc.fs.move(tmp, loc.path)  # a rename on local disks and HDFS; on object stores a copy then delete
    except BaseException:
        try:
            loc.fs.delete_file(tmp)
        except Exception:
            pass
        raise


def write_parquet(table: pa.Table, loc: Location) -> None:
    def write(tmp: str) -> None:
        with loc.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f, compression="zstd", row_group_size=128 * 1024)

    _atomic(loc, write)


def write_bytes(data: bytes, loc: Location) -> None:
    def write(tmp: str) -> None:
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)

    _atomic(loc, write)


def write_json(obj, loc: Location) -> None:
    write_bytes(json.dumps(obj, indent=2, default=str).encode(), loc)


def read_json(loc: Location):
    with loc.fs.open_input_stream(loc.path) as f:
        return json.loads(f.read().decode())


def read_parquet(loc: Location, columns: list[str] | None = None) -> pa.Table:
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_table(f, columns=columns)


def remove_temporaries(loc: Location) -> int:
    """Delete half-written files a killed run left under `loc`; returns how many."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    stale = [i.path for i in infos if i.type == pafs.FileType.File and TMP_MARK in i.base_name]
    for p in stale:
        loc.fs.delete_file(p)
    return len(stale)


def delete_file(loc: Location) -> bool:
    """Delete one file if it is there; returns whether it was."""
    if not exists(loc):
        return False
    loc.fs.delete_file(loc.path)
    return True


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_dir(loc.path)
