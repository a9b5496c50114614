"""The tuning database: tuned winners as human-readable JSON files under `tuning_db/`.

Layout: `tuning_db/<gpu-slug>/<kernel>-<key>.json`, one file per (GPU, kernel identity).
The key is a content hash of what decides a winner besides the shape: the kernel's static
parameters, the workload it was tuned for (heads, selected blocks) and the hash of every
backend template considered, so a changed template invalidates its entries. Inside, one
entry per (shape bucket, library versions) records the best config, its times and the
default config's time.

Files are written with sorted keys and indentation so they diff cleanly in git; writes are
atomic (temp file + rename) under a lock on the GPU directory with read-merge-write, so two
`tune` processes writing at once lose nothing. Every entry carries a checksum over its own
content and the file header: a corrupt or hand-edited file raises a DbError naming the file
and the entry, and is never overwritten.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SparsegenError

FORMAT = "sparsegen-tuning-db"
VERSION = 1
LIBRARIES = ("tilelang", "triton", "torch")
DEFAULT_ROOT = "tuning_db"


class DbError(SparsegenError):
    """A tuning-database file that cannot be trusted (corrupt, hand-edited, wrong schema)."""


# ---------------------------------------------------------------------------------------
# What an entry is keyed by: GPU, kernel identity, shape, library versions
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuId:
    name: str          # torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    capability: str    # "9.0"

    @property
    def slug(self) -> str:
        base = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{base}-sm{self.capability.replace('.', '')}"

    def as_dict(self) -> dict:
        return {"name": self.name, "capability": self.capability}

    def __str__(self) -> str:
        return f"{self.name} (sm_{self.capability.replace('.', '')})"

    @classmethod
    def parse(cls, text: str, source: str = "--gpu-name") -> GpuId:
        """'NAME@MAJOR.MINOR', e.g. 'NVIDIA H100 80GB HBM3@9.0'."""
        name, sep, cap = text.rpartition("@")
        if not sep or not name.strip() or not re.fullmatch(r"\d+\.\d+", cap.strip()):
            raise SparsegenError(
                f"{source} = {text!r}: give the GPU as NAME@MAJOR.MINOR, e.g. "
                "'NVIDIA H100 80GB HBM3@9.0' (name as torch.cuda.get_device_name prints it, "
                "then the compute capability)")
        return cls(name.strip(), cap.strip())


def detect_gpu(override: str | None = None) -> GpuId:
    """The GPU that results are keyed by: --gpu-name, else $SPARSEGEN_GPU, else device 0."""
    if override:
        return GpuId.parse(override)
    if os.environ.get("SPARSEGEN_GPU"):
        return GpuId.parse(os.environ["SPARSEGEN_GPU"], "$SPARSEGEN_GPU")
    found = _gpu_from_driver() or torch_gpu()
    if found is None:
        raise SparsegenError(
            "no CUDA GPU found: tuning measures kernels on a GPU. On a machine without one, "
            "name the GPU whose tuned results to use with --gpu-name 'NAME@9.0' (or "
            "$SPARSEGEN_GPU); then only a warm tuning database is read")
    return found


def torch_gpu(device="cuda:0") -> GpuId | None:
    """The GpuId of a torch device (name and capability as torch reports them), the key of
    its tuned configs; None off CUDA."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return GpuId(torch.cuda.get_device_name(device), f"{major}.{minor}")


def _gpu_from_driver() -> GpuId | None:
    """Device 0's name and capability from the CUDA driver (as torch reports them), in a
    few ms: a warm `tune` must not spend seconds importing torch to learn the GPU."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        if (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(dev), 0)
                or cuda.cuDeviceGetName(name, 256, dev)
                or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)   # CC major
                or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)):  # CC minor
            return None
    except (OSError, AttributeError):
        return None
    return GpuId(name.value.decode(errors="replace"), f"{major.value}.{minor.value}")


def library_versions() -> dict:
    """Versions of the libraries that decide a kernel's speed (read without importing them)."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def kernel_identity(kernel) -> dict:
    """Everything besides GPU, shape and versions that decides a KernelPlan's (or a
    RuleKernelPlan's) winner."""
    templates = {}
    for backend in kernel.backends:
        cls = kernel.adapter_cls(backend)
        templates[backend] = _source_identity(cls)
        # kernels it renders and calls (declared by the adapter; absent for most, so their
        # keys are what they always were)
        deps = [_source_identity(d) for d in getattr(cls, "depends_on", ())]
        if deps:
            templates[backend]["depends_on"] = deps
    return {
        "name": kernel.name,
        "static": kernel.static.as_dict(),
        "workload": {"num_q_heads": kernel.num_q_heads, "num_kv_heads": kernel.num_kv_heads,
                     "budget_blocks": kernel.budget_blocks,
                     "selected_fraction": kernel.selected_fraction,
                     "head_major": kernel.head_major},
        "templates": templates,
    }


def _source_identity(cls) -> dict:
    from ..codegen.render import template_hash

    # the adapter's Python decides launch parameters (split counts, ...) too
    return {"path": cls.template, "hash": template_hash(cls.template),
            "adapter": cls.__module__, "adapter_hash": source_hash(cls.__module__)}


def source_hash(module: str) -> str:
    """Hash of a module's source file, read without importing it ('' when not found)."""
    import importlib.util

    try:
        origin = importlib.util.find_spec(module).origin
        return hashlib.sha256(Path(origin).read_bytes()).hexdigest()[:16]
    except (ImportError, AttributeError, OSError, ValueError):
        return ""


def templates_current(templates: dict) -> bool:
    """Whether the installed templates and adapters are those an identity was made with."""
    from ..codegen.render import template_hash

    for t in templates.values():
        for source in [t, *t.get("depends_on", ())]:
            try:
                if template_hash(source["path"]) != source["hash"]:
                    return False
            except OSError:
                return False
            if "adapter" in source and source_hash(source["adapter"]) != source.get("adapter_hash"):
                return False
    return True


def identity_key(identity: dict) -> str:
    return _digest(identity)[:16]


def backend_label(backend: str, config: dict) -> str:
    """How a tuned winner's backend reads: the adapter's backend, plus the algorithm when its
    config picks one (block_select / entmax_tau record `triton` for their TileLang forms) and
    the thread-block cluster a row runs on when there is one (entmax_tau's `cluster`)."""
    algo, cluster = config.get("algo"), config.get("cluster", 1)
    parts = [algo] if algo and algo != backend else []
    if cluster != 1:
        parts.append(f"cluster {cluster}")
    return f"{backend} ({', '.join(parts)})" if parts else backend


def shape_key(shape: dict) -> str:
    return f"b{shape['batch']}_s{shape['seq_len']}"


def nearest_bucket(buckets, batch: int, seq_len: int):
    """The bucket (anything with .batch/.seq_len or ['batch']/['seq_len']) closest to a
    runtime shape in log space; ties go to the larger bucket (over- rather than
    under-provisioned splits). None when there are no buckets."""
    def get(b, k):
        return b[k] if isinstance(b, dict) else getattr(b, k)

    def distance(b):
        d = (abs(math.log2(get(b, "batch") / max(1, batch)))
             + abs(math.log2(get(b, "seq_len") / max(1, seq_len))))
        return (round(d, 9), -get(b, "batch"), -get(b, "seq_len"))

    return min(buckets, key=distance, default=None)


# ---------------------------------------------------------------------------------------
# The database
# ---------------------------------------------------------------------------------------
MERGE_PREFER = ("faster", "newer", "other", "this")  # TuningDB.merge: whose entry wins a conflict


class TuningDB:
    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or os.environ.get("SPARSEGEN_TUNING_DB") or DEFAULT_ROOT)
        if self.root.exists() and not self.root.is_dir():
            raise DbError(f"{self.root} is a file, not a tuning database (a directory of "
                          "<gpu>/<kernel>-<key>.json files); give --db (or "
                          "$SPARSEGEN_TUNING_DB) its directory")

    def path_for(self, gpu: GpuId, identity: dict) -> Path:
        return self.root / gpu.slug / f"{identity['name']}-{identity_key(identity)}.json"

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("*/*.json") if p.is_file())

    def load(self, path: Path) -> dict:
        """A validated file (raises DbError on anything untrustworthy)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DbError(f"{path}: is not UTF-8 text; {_RESTORE}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DbError(f"{path}: is not valid JSON (line {e.lineno}, column {e.colno}: "
                          f"{e.msg}); {_RESTORE}") from None
        _validate_file(data, Path(path))
        return data

    def load_all(self) -> list[tuple[Path, dict]]:
        return [(p, self.load(p)) for p in self.files()]

    def lookup(self, gpu: GpuId, identity: dict, shape: dict, versions: dict) -> dict | None:
        """The entry tuned for exactly this GPU, kernel, shape and library versions."""
        path = self.path_for(gpu, identity)
        if not path.exists():
            return None
        return _entry_for(self.load(path), shape, versions)

    def predecessor(self, gpu: GpuId, identity: dict, shape: dict) -> dict | None:
        """The newest entry for this GPU and shape recorded by an earlier version of this
        kernel: the same name, statics and workload, other templates or adapter code (a
        stale file `db prune --stale` would remove). Its winner is a good first guess
        after a template edit; files that do not load are passed over (they are only
        hints here; `db list` reports them)."""
        here = self.path_for(gpu, identity)
        keys = ("name", "static", "workload")
        # compared as stored (JSON): a static's tuple reads back as a list
        same = _digest({k: identity[k] for k in keys})
        found = []
        for path in sorted((self.root / gpu.slug).glob(f"{identity['name']}-*.json")):
            if path == here:
                continue
            try:
                data = self.load(path)
            except DbError:
                continue
            if _digest({k: data["kernel"].get(k) for k in keys}) != same:
                continue
            found += [e for e in data["entries"] if e["shape"] == shape]
        return max(found, key=lambda e: e["tuned_at"], default=None)

    def entries_for(self, identity: dict) -> list[tuple[dict, dict]]:
        """(gpu, entry) of every GPU tuned for this kernel identity, any versions."""
        name = f"{identity['name']}-{identity_key(identity)}.json"
        out = []
        if self.root.is_dir():
            for path in sorted(self.root.glob(f"*/{name}")):
                data = self.load(path)
                out += [(data["gpu"], e) for e in data["entries"]]
        return out

    def record(self, gpu: GpuId, identity: dict, entry: dict) -> Path:
        """Add or replace the entry for (shape, versions); other entries are kept."""
        path = self.path_for(gpu, identity)
        with self._locked(path.parent):
            data = self.load(path) if path.exists() else _new_file(gpu, identity)
            entry = dict(entry)
            entry.pop("checksum", None)
            keep = [e for e in data["entries"]
                    if (e["shape"], e["versions"]) != (entry["shape"], entry["versions"])]
            data["entries"] = _sorted_entries(keep + [entry])
            _seal(data)
            _validate_file(data, path)  # never write what a later load would reject
            _atomic_write(path, _dumps(data))
        return path

    def merge(self, other: "TuningDB", prefer: str = "faster",
              dry_run: bool = False) -> list[tuple[str, Path, dict]]:
        """Bring other's entries (e.g. a database tuned on another machine) into this one:
        an entry this database lacks is added; one it has for the same GPU, kernel, shape
        and versions is replaced when `prefer` is "faster" and other's winner timed faster,
        "newer" and other's was tuned later (a re-tune brought back in a copy of the whole
        database: its one new entry wins, its copies of older ones never do), or "other";
        kept for "this". Both databases are validated first, so a corrupt file
        on either side stops the merge before any write. Returns (action, destination file,
        entry) with action added / replaced / kept."""
        if prefer not in MERGE_PREFER:
            raise ValueError(f"prefer={prefer!r} is not one of {MERGE_PREFER}")
        if other.root.resolve() == self.root.resolve():
            raise DbError(f"{other.root}: is the database being merged into; name another")
        incoming = other.load_all()
        mine = dict(self.load_all())  # validated once; compared with as it was before
        out = []
        for _, data in incoming:
            gpu = GpuId(data["gpu"]["name"], data["gpu"]["capability"])
            identity = {k: v for k, v in data["kernel"].items() if k != "key"}
            path = self.path_for(gpu, identity)
            for entry in data["entries"]:
                have = (_entry_for(mine[path], entry["shape"], entry["versions"])
                        if path in mine else None)
                if have is None:
                    action = "added"
                elif have == entry:  # the same measurement (checksums included)
                    action = "kept"
                elif (prefer == "other"
                      or (prefer == "faster"
                          and entry["best"]["median_ms"] < have["best"]["median_ms"])
                      or (prefer == "newer" and entry["tuned_at"] > have["tuned_at"])):
                    action = "replaced"
                else:
                    action = "kept"
                if action != "kept" and not dry_run:
                    self.record(gpu, identity, entry)
                out.append((action, path, entry))
        return out

    def prune(self, keep_entry) -> list[tuple[Path, dict]]:
        """Remove entries for which keep_entry(file_data, entry) is false; returns them.
        Every file is validated first, so a corrupt one stops the prune before any write."""
        removed = []
        for path, _ in self.load_all():
            with self._locked(path.parent):
                data = self.load(path)
                kept = [e for e in data["entries"] if keep_entry(data, e)]
                gone = [e for e in data["entries"] if not keep_entry(data, e)]
                if not gone:
                    continue
                removed += [(path, e) for e in gone]
                if kept:
                    data["entries"] = kept
                    _seal(data)
                    _atomic_write(path, _dumps(data))
                else:
                    path.unlink()
        return removed

    @contextlib.contextmanager
    def _locked(self, directory: Path):
        # flock on the directory, not the file: the file is replaced by rename, and a lock
        # on a replaced inode would let two writers in at once
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


_RESTORE = ("sparsegen will not overwrite it: restore it from git (`git checkout -- FILE`) "
            "or delete it to tune again")


def _entry_for(data: dict, shape: dict, versions: dict) -> dict | None:
    """The entry of a loaded file for (shape, versions), or None."""
    return next((e for e in data["entries"]
                 if e["shape"] == shape and e["versions"] == versions), None)


def _digest(obj) -> str:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def _dumps(data: dict) -> str:
    return json.dumps(data, sort_keys=True, indent=2, allow_nan=False) + "\n"


def _new_file(gpu: GpuId, identity: dict) -> dict:
    return {"format": FORMAT, "version": VERSION, "gpu": gpu.as_dict(),
            "kernel": {**identity, "key": identity_key(identity)}, "entries": []}


def _header(data: dict) -> dict:
    return {k: data[k] for k in ("format", "version", "gpu", "kernel")}


def _entry_checksum(data: dict, entry: dict) -> str:
    body = {k: v for k, v in entry.items() if k != "checksum"}
    return "sha256:" + _digest({"header": _header(data), "entry": body})[:32]


def _seal(data: dict) -> None:
    for entry in data["entries"]:
        entry["checksum"] = _entry_checksum(data, entry)


def _sorted_entries(entries: list) -> list:
    return sorted(entries, key=lambda e: (e["shape"]["batch"], e["shape"]["seq_len"],
                                          json.dumps(e["versions"], sort_keys=True)))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# ---------------------------------------------------------------------------------------
# Validation: every field checked, each failure one clear line naming file and field
# ---------------------------------------------------------------------------------------
def _num(v, positive=True):
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > 0 if positive else True)


def _int(v, lo=1):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _str(v):
    return isinstance(v, str) and bool(v)


def _source(v):
    """A template reference of a file's identity: its path and hash."""
    return isinstance(v, dict) and _str(v.get("path")) and _str(v.get("hash"))


def _config(v):
    return isinstance(v, dict) and all(isinstance(k, str) for k in v) and all(
        v_ is None or isinstance(v_, (bool, int, float, str)) for v_ in v.values())


_RESULT = {"backend": _str, "config": _config, "median_ms": _num,
           "plain_ms": lambda v: v is None or _num(v), "graph_ms": lambda v: v is None or _num(v),
           "bandwidth_gbs": lambda v: v is None or _num(v)}
_DEFAULT = {"backend": _str, "config": _config, "median_ms": lambda v: v is None or _num(v)}
_ENTRY = {
    "shape": {"batch": _int, "seq_len": _int},
    "selected_blocks": _int,
    "versions": {lib: _str for lib in LIBRARIES},
    "best": _RESULT,
    "default": _DEFAULT,
    "trials": {"measured": lambda v: _int(v, 0), "failed": lambda v: _int(v, 0),
               "infeasible": lambda v: _int(v, 0)},
    "study": _str,
    "tuned_at": _str,
    "checksum": _str,
}
_HEADER = {
    "format": lambda v: v == FORMAT,
    "version": lambda v: v == VERSION,
    "gpu": {"name": _str, "capability": lambda v: isinstance(v, str) and bool(
        re.fullmatch(r"\d+\.\d+", v))},
    "kernel": {"name": _str, "key": _str, "static": lambda v: isinstance(v, dict),
               "workload": lambda v: isinstance(v, dict),
               "templates": lambda v: isinstance(v, dict) and bool(v) and all(
                   _source(t) and isinstance(t.get("depends_on", []), list)
                   and all(_source(d) for d in t.get("depends_on", [])) for t in v.values())},
    "entries": lambda v: isinstance(v, list),
}


def _check(obj, schema: dict, where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise DbError(f"{path}: {where or 'the top level'} must be a JSON object; {_RESTORE}")
    missing = [k for k in schema if k not in obj]
    extra = [k for k in obj if k not in schema]
    if missing or extra:
        what = []
        if missing:
            what.append(f"lacks {', '.join(missing)}")
        if extra:
            what.append(f"has unknown field(s) {', '.join(extra)}")
        raise DbError(f"{path}: {where or 'the top level'} {' and '.join(what)} "
                      f"(not written by this sparsegen); {_RESTORE}")
    for key, rule in schema.items():
        field = f"{where}.{key}" if where else key
        if isinstance(rule, dict):
            _check(obj[key], rule, field, path)
        elif not rule(obj[key]):
            raise DbError(f"{path}: {field} = {json.dumps(obj[key])[:80]} is not valid; "
                          f"{_RESTORE}")


def _validate_file(data, path: Path) -> None:
    if isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") != VERSION:
        raise DbError(f"{path}: is tuning-database version {data.get('version')!r}; this "
                      f"sparsegen reads version {VERSION}. Re-tune, or use the sparsegen "
                      "that wrote it")
    _check(data, _HEADER, "", path)
    kernel = data["kernel"]
    identity = {k: v for k, v in kernel.items() if k != "key"}
    if identity_key(identity) != kernel["key"]:
        raise DbError(f"{path}: kernel.key {kernel['key']} does not match the kernel it "
                      "describes (the header was edited by hand or corrupted); " + _RESTORE)
    want = f"{kernel['name']}-{kernel['key']}.json"
    if path.name.endswith(".json") and not path.name.startswith(".") and path.name != want:
        raise DbError(f"{path}: holds kernel {want}; a file renamed by hand is not trusted "
                      f"(rename it back to {want}); {_RESTORE}")
    seen = set()
    for i, entry in enumerate(data["entries"]):
        _check(entry, _ENTRY, f"entries[{i}]", path)
        if entry["checksum"] != _entry_checksum(data, entry):
            raise DbError(f"{path}: entries[{i}] ({shape_key(entry['shape'])}) fails its "
                          "checksum: it or the file header was edited by hand or corrupted; "
                          + _RESTORE)
        key = (shape_key(entry["shape"]), json.dumps(entry["versions"], sort_keys=True))
        if key in seen:
            raise DbError(f"{path}: entries[{i}] repeats shape {key[0]} with the same "
                          f"versions; {_RESTORE}")
        seen.add(key)
