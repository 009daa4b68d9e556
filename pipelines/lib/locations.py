"""Local folders and object-store URIs through one interface.

A *location* is a local path (absolute or relative) or a URI that `pyarrow.fs` resolves
(`s3://bucket/photos/`, `gs://…`, `file:///…`, …). Credentials and endpoints come from the
environment, as for every pyarrow client: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a
profile, or the instance's role), AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3) for an S3-compatible store such as MinIO. Ray workers inherit the
environment of the process that started Ray (or take it from a job's `runtime_env`), so every
process that opens a location sees the same store. Nothing here knows a particular store.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def absolute(location: str | Path) -> str:
    """A local path made absolute (Ray workers run in other folders; `file://` becomes a path);
    any other URI as given."""
    location = str(location)
    if location.startswith("file://"):
        location = location[len("file://"):]
    return location if is_uri(location) else str(Path(location).resolve())


_LOCAL = pafs.LocalFileSystem()


@functools.lru_cache(maxsize=64)
def _store(authority: str) -> pafs.FileSystem:
    """One filesystem object (for S3: one client, its connection pool and its bucket's region,
    found once) per `scheme://bucket` in this process, reused by every read and write of a task
    or actor instead of a new client per file."""
    return pafs.FileSystem.from_uri(authority)[0]


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path on it). A local path is kept as given; a URI's filesystem is shared by
    every location of the same `scheme://bucket` in this process."""
    location = str(location)
    if not is_uri(location):
        return _LOCAL, location
    scheme, rest = location.split("://", 1)
    if scheme in ("s3", "gs", "gcs") and "?" not in rest:
        bucket = rest.split("/", 1)[0]
        return _store(f"{scheme}://{bucket}"), rest.rstrip("/") or bucket
    return pafs.FileSystem.from_uri(location)


def join(location: str | Path, *parts: str) -> str:
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(location, *parts))


def from_fs_path(base: str | Path, fs_path: str) -> str:
    """The location of `fs_path`, a path on the filesystem of `base` (as Ray's checkpoint paths
    are: `bucket/key` without the scheme), so that it resolves again from a string alone."""
    if not is_uri(base) or is_uri(fs_path):
        return fs_path
    return f"{str(base).split('://', 1)[0]}://{fs_path}"


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes:
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def write_bytes(location: str | Path, data: bytes) -> None:
    """The whole file at once: locally through a temporary file renamed into place (creating the
    folder), on an object store as one object (a reader sees the old object or the new one, never
    a part)."""
    if not is_uri(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_bytes(data)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def delete(location: str | Path, missing_ok: bool = True) -> None:
    """Remove a file or a folder (recursively)."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        if not missing_ok:
            raise FileNotFoundError(str(location))
        return
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    else:
        fs.delete_file(path)


def entries(location: str | Path) -> tuple[list[str], list[str]]:
    """(file names, folder names) directly inside a folder, each sorted; names starting with '.'
    skipped. Locally as os.walk sees them: a symbolic link to a folder is neither (os.walk does
    not descend into it), any other link is a file (a broken one fails when read, naming it). FileNotFoundError / OSError when the folder cannot be listed."""
    location = str(location)
    files, folders = [], []
    if not is_uri(location):
        with os.scandir(location) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if is_dir and not e.is_symlink():
                    folders.append(e.name)
                elif not is_dir:
                    files.append(e.name)
        return sorted(files), sorted(folders)
    fs, base = resolve(location)
    for info in fs.get_file_info(pafs.FileSelector(base.rstrip("/"), recursive=False)):
        if info.base_name.startswith(".") or not info.base_name:
            continue
        if info.type == pafs.FileType.Directory:
            folders.append(info.base_name)
        elif info.type == pafs.FileType.File:
            files.append(info.base_name)
    return sorted(files), sorted(folders)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def _walk_order(rel: str) -> tuple:
    """Sort key that lists a folder's files before its subfolders, each by name (os.walk's order)."""
    parts = rel.split("/")
    return tuple((1, p) for p in parts[:-1]) + ((0, parts[-1]),)


def list_files(root: str | Path) -> list[tuple[str, str]]:
    """Every file under `root`, recursively, as (path relative to root with '/', location), in
    os.walk order (a folder's files by name, then its subfolders by name); names starting with
    '.' (files and folders) are skipped. A local folder is walked with os.walk, which also lists
    broken symbolic links (their read fails later, naming them) and does not follow links to
    folders; pyarrow's local listing would drop the former and follow the latter. FileNotFoundError
    / OSError when the root cannot be listed."""
    root = str(root)
    if not is_uri(root):
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if not name.startswith("."):
                    path = Path(dirpath) / name
                    out.append((path.relative_to(root).as_posix(), str(path)))
        return out
    fs, base = resolve(root)
    base = base.rstrip("/")
    found = []
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        rel = info.path[len(base) + 1:]
        if info.type == pafs.FileType.File and rel and not any(p.startswith(".") for p in rel.split("/")):
            found.append(rel)
    return [(rel, join(root, rel)) for rel in sorted(found, key=_walk_order)]


def subfolders(location: str | Path, prefix: str = "") -> list[str]:
    """The locations of the folders directly under `location` whose names start with `prefix`,
    sorted by name; [] when `location` does not exist."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [join(location, i.base_name) for i in sorted(infos, key=lambda i: i.base_name)
            if i.type == pafs.FileType.Directory and i.base_name.startswith(prefix)]


def upload(local_dir: str | Path, location: str | Path) -> None:
    """Copy the local folder `local_dir` to `location` (a folder or a URI)."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download(location: str | Path, local_dir: str | Path) -> Path:
    """Copy the folder at `location` into the local folder `local_dir`; returns it."""
    fs, path = resolve(location)
    Path(local_dir).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local_dir), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local_dir)
