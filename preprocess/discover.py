"""Find the inputs of a shard build: class folders, a path list, or a Kinetics CSV.

Every input becomes a `Source` (absolute path, path relative to the root, class name); the
list is sorted by relative path so that the same inputs always give the same shards, and
labels are class indices in sorted class order.
"""
from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from tcore.preprocess.errors import TcoreWarning

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
# Containers a downloaded clip comes in, and what downloaders (yt-dlp) leave beside a clip
# under its name: partial downloads, metadata, descriptions, thumbnails, subtitles.
VIDEO_EXTENSIONS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg",
                    ".3gp", ".ogv", ".ts", ".wmv"}
DOWNLOADER_SIDE_FILES = (".json", ".json3", ".description", ".jpg", ".jpeg", ".png", ".webp",
                         ".vtt", ".srt", ".ass", ".ssa", ".ttml", ".srv1", ".srv2", ".srv3",
                         ".sbv", ".lrc", ".txt", ".annotations.xml")
DOWNLOADS_UNDER_WAY = (".part", ".ytdl", ".temp")   # anywhere in the suffix: .mp4.part-Frag3


@dataclass(frozen=True)
class Source:
    path: str | None  # absolute path, None when the file could not be found
    relative: str  # path relative to the input root (or the list's text) for the json
    class_name: str
    problem: str | None = None  # why it cannot be a sample, when discovery already knows
    # What names the input whatever file is found for it (a Kinetics row: label/id_start_end,
    # the same before and after its clip is downloaded, in any container); else `relative`.
    identity: str | None = None

    @property
    def key(self) -> str:
        """The input's name for the build's order and its input-set digest."""
        return self.identity or self.relative


@dataclass
class Inputs:
    sources: list[Source]
    classes: list[str]

    def label(self, class_name: str) -> int:
        if not hasattr(self, "_labels"):
            self._labels = {name: index for index, name in enumerate(self.classes)}
        return self._labels[class_name]


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def discover_class_folders(root, kind: str = "video") -> Inputs:
    """`root/<class>/<file>`: every regular, non-hidden file is an input, so that broken or
    mislabelled files reach failures.jsonl rather than vanish: videos are not filtered by
    extension, in an image build a file without an image extension is an input that fails
    with that reason, and a broken symbolic link is an input that fails as a missing file.
    Symlinked folders are followed at every level, except one leading back to a folder
    above it (`self -> .`), which would list the same files again, or forever."""
    root = Path(root)
    if not root.is_dir():
        if root.exists():
            raise NotADirectoryError(f"input {root} is a file, not a directory (a list of "
                                     "inputs goes after --list)")
        raise FileNotFoundError(f"input directory {root} does not exist")
    top = [Path(os.path.realpath(root))]
    entries = sorted(entry for entry in root.iterdir() if not _is_hidden(entry))
    broken = [entry for entry in entries if entry.is_symlink() and not entry.exists()]
    if broken:   # a class folder that vanished would shift every later class's label
        warnings.warn(f"{broken[0]}: a broken symbolic link (to {os.readlink(broken[0])}) "
                      f"where class folders are{f' (and {len(broken) - 1} more)' if len(broken) > 1 else ''}: "
                      "left out; if it was a class, every later class's label shifts",
                      TcoreWarning)
    loose = [entry.name for entry in entries if entry.is_file()]
    if loose:
        warnings.warn(f"{root}: {len(loose)} file(s) outside class folders, not inputs "
                      f"(e.g. {loose[0]}): inputs are {root}/<class>/<file>", TcoreWarning)
    class_dirs = [d for d in entries if d.is_dir() and not _leads_back(d, top)]
    if not class_dirs:
        raise ValueError(f"{root} holds no class folders (expected {root}/<class>/<file>)")
    sources = []
    for class_dir in class_dirs:
        for path in _files_below(class_dir, [*top, Path(os.path.realpath(class_dir))]):
            relative = path.relative_to(root).as_posix()
            if not path.exists():   # a broken symbolic link
                sources.append(Source(None, relative, class_dir.name, _not_a_file(path)))
                continue
            problem = _not_an_image(path) if kind == "image" else None
            sources.append(Source(str(path.resolve()), relative, class_dir.name, problem))
    if not sources:
        raise ValueError(f"the class folders of {root} hold no files (expected {root}/<class>/<file>)")
    sources.sort(key=lambda source: source.relative)
    _refuse_files_reached_twice(root, sources)
    return Inputs(sources, [d.name for d in class_dirs])


def _refuse_files_reached_twice(root: Path, sources: list[Source]) -> None:
    """A symbolic link into a sibling folder or another class reaches a file twice: two
    samples of it (in two classes, maybe), as a list naming it twice would be. Refused,
    naming both paths."""
    seen: dict[str, str] = {}
    for source in sources:
        if source.path is None:
            continue
        if source.path in seen:
            raise ValueError(f"{root}: {seen[source.path]} and {source.relative} are one file "
                             f"({source.path}, reached through a symbolic link); each would be "
                             "a sample: remove the link")
        seen[source.path] = source.relative


def _leads_back(folder: Path, chain: list[Path]) -> bool:
    """Whether `folder` is, or holds, one of the folders `chain` (real paths) walks down."""
    real = Path(os.path.realpath(folder))
    return any(walked.is_relative_to(real) for walked in chain)


def _files_below(folder: Path, chain: list[Path]):
    """The non-hidden regular files and broken symbolic links below `folder` (a hidden folder,
    .git or .cache, hides its files too), following symlinked folders that do not lead back
    up `chain`. Other entries (a fifo, a socket) are no inputs."""
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:   # unreadable: skipped, as pathlib's rglob did
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = folder / entry.name
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
        except OSError:   # a loop of links (a -> b -> a): broken, as a dangling link is
            is_dir, is_file = False, False
        if is_dir:
            if not _leads_back(path, chain):
                yield from _files_below(path, [*chain, Path(os.path.realpath(path))])
        elif is_file or (entry.is_symlink() and not path.exists()):
            yield path


def _not_a_file(path: Path) -> str:
    """The failure reason of an input path that is not a regular file."""
    if path.is_dir():
        return "a directory, not a file (list the files in it)"
    if path.exists():
        return "not a regular file"
    if path.is_symlink():
        return f"file not found (a broken symbolic link to {os.readlink(path)})"
    return "file not found"


def _not_an_image(path: Path) -> str | None:
    """The failure reason of a file an image build does not read (None for an image)."""
    if path.suffix.lower() in IMAGE_EXTENSIONS:
        return None
    found = f"extension {path.suffix}" if path.suffix else "no extension"
    return f"not an image file ({found}; --kind image reads {', '.join(sorted(IMAGE_EXTENSIONS))})"


def _looks_like_kinetics_header(row: list[str]) -> bool:
    return [cell.strip() for cell in row[:4]] == list(KINETICS_COLUMNS)


class _FolderFiles:
    """Each folder's file names, listed once: a Kinetics CSV names ~240k clips in ~400
    folders, and a glob per row read a folder of ~600 names for every row (15 s for 24k
    rows on a local disk; a network file system pays a directory read each time)."""

    def __init__(self):
        self._by_stem: dict[Path, dict[str, list[str]]] = {}

    def matching(self, folder: Path, stem: str) -> list[str]:
        """Sorted names of the files `<stem>.<anything>` in `folder` (none if no folder)."""
        if folder not in self._by_stem:
            by_stem: dict[str, list[str]] = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        if "." in entry.name and not entry.name.startswith(".") and entry.is_file():
                            by_stem.setdefault(entry.name.split(".", 1)[0], []).append(entry.name)
            except OSError:     # no such folder, or unreadable: its rows go to failures.jsonl
                by_stem = {}
            self._by_stem[folder] = by_stem
        by_stem = self._by_stem[folder]
        if "." not in stem:
            return sorted(by_stem.get(stem, []))
        return sorted(name for names in by_stem.values() for name in names    # rare: a dot in the id
                      if name.startswith(stem + "."))


def _find_kinetics_file(video_root: Path, label: str, youtube_id: str, start: int, end: int,
                        files: _FolderFiles) -> Path | None:
    """Downloaded Kinetics clips are `<id>_<start:06d>_<end:06d>.<any ext>`, under
    `<video_root>/<label>/` or `<video_root>/`: a video container's extension first (of
    several, the newest: a clip downloaded again beside a broken one), else any file of that
    name but a downloader's side files and unfinished downloads."""
    stem = f"{youtube_id}_{start:06d}_{end:06d}"
    for folder in (video_root / label, video_root / label.replace(" ", "_"), video_root):
        matches = [name for name in files.matching(folder, stem)
                   if not _downloader_side_file(_extension(name, stem))]
        videos = [name for name in matches if _extension(name, stem) in VIDEO_EXTENSIONS]
        if len(videos) > 1:
            return folder / max(videos, key=lambda name: (_modified(folder / name), name))
        if videos or matches:
            return folder / (videos or matches)[0]
    return None


def _extension(name: str, stem: str) -> str:
    return name[len(stem):].lower()


def _downloader_side_file(extension: str) -> bool:
    return (extension.endswith(DOWNLOADER_SIDE_FILES)
            or any(marker in extension for marker in DOWNLOADS_UNDER_WAY))


def _modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def discover_list(list_file, video_root=None, kind: str = "video") -> Inputs:
    """`list_file` is either one path per line (class = the parent folder name; relative
    paths are relative to `video_root` or the list's folder) or the Kinetics CSV
    `label,youtube_id,time_start,time_end,split` (needs `video_root`). A file listed twice
    is refused (ValueError); a line naming a folder or a missing file is an input that fails."""
    list_file = Path(list_file)
    text = list_file.read_text()
    rows = list(csv.reader(text.splitlines()))
    if rows and _looks_like_kinetics_header(rows[0]):
        if video_root is None:
            raise ValueError(f"{list_file} is a Kinetics CSV: pass --video-root")
        return _discover_kinetics(rows[1:], Path(video_root), list_file)
    root = Path(video_root) if video_root is not None else list_file.parent
    sources, lines = [], {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line) if Path(line).is_absolute() else root / line
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            relative = path.as_posix()
        resolved = os.path.realpath(path)   # unlike Path.resolve, no error for a link loop
        lines.setdefault(resolved, []).append(line_number)
        if path.is_file():
            sources.append(Source(resolved, relative, path.parent.name))
        else:
            sources.append(Source(None, relative, path.parent.name, _not_a_file(path)))
    if not sources:
        raise ValueError(f"{list_file} lists no inputs")
    _refuse_repeats(list_file, lines)
    sources.sort(key=lambda source: source.relative)
    return Inputs(sources, sorted({source.class_name for source in sources}))


def _kinetics_seconds(cell: str, list_file: Path, line_number: int, column: str) -> int:
    try:
        return int(float(cell))
    except (ValueError, OverflowError):
        raise ValueError(f"{list_file}:{line_number}: column {column} is {cell.strip()!r}, "
                         "not a number of seconds") from None


def _discover_kinetics(rows: list[list[str]], video_root: Path, list_file: Path) -> Inputs:
    sources, files, lines = [], _FolderFiles(), {}
    for line_number, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 4:
            raise ValueError(f"{list_file}:{line_number}: expected label,youtube_id,time_start,time_end,...")
        label, youtube_id = row[0].strip(), row[1].strip()
        start, end = (_kinetics_seconds(row[column], list_file, line_number, KINETICS_COLUMNS[column])
                      for column in (2, 3))
        path = _find_kinetics_file(video_root, label, youtube_id, start, end, files)
        row = f"{label}/{youtube_id}_{start:06d}_{end:06d}"
        if path is not None:
            try:
                relative = path.relative_to(video_root).as_posix()
            except ValueError:
                relative = path.as_posix()
            sources.append(Source(str(path.resolve()), relative, label, identity=row))
        else:
            sources.append(Source(None, row, label, identity=row))
        # a clip not found is told by its name: a row repeated is refused either way
        lines.setdefault(sources[-1].path or sources[-1].relative, []).append(line_number)
    if not sources:
        raise ValueError(f"{list_file} lists no videos")
    _refuse_repeats(list_file, lines)
    sources.sort(key=lambda source: source.key)   # a row keeps its place when its clip comes
    return Inputs(sources, sorted({source.class_name for source in sources}))


def _refuse_repeats(list_file: Path, lines: dict[str, list[int]]) -> None:
    """An input listed twice (the same line twice, or a relative and an absolute path to one
    file) would be two samples of it, read twice an epoch: refuse, naming the first one
    repeated and its lines. `lines`: line numbers by resolved path."""
    repeated = [(path, numbers) for path, numbers in lines.items() if len(numbers) > 1]
    if not repeated:
        return
    path, numbers = repeated[0]   # the first in the file (dicts keep their insertion order)
    shown = ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"
    name = "both name" if len(numbers) == 2 else "all name"
    more = f"; {len(repeated) - 1} more input(s) are listed more than once" if len(repeated) > 1 else ""
    raise ValueError(f"{list_file}: lines {shown} {name} {path}{more}; list each input once "
                     "(each line is a sample)")


def sample_key(index: int, source: Source) -> str:
    """A tar key: the input index (unique, keeps sort order) and a readable slug of the
    relative path, with no path separators, dots or `..`, short enough for one tar header."""
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", source.relative.rsplit(".", 1)[0]).strip("_")
    return f"{index:08d}-{slug[:60]}" if slug else f"{index:08d}"
