"""The client helper workers use to call Triton: contract-aware requests and genimg errors.

:class:`InferenceClient` wraps tritonclient (gRPC or HTTP) and turns a dict of
numpy arrays (or prompt lists) into one or more valid requests:

* **dtype**: each input is cast to the model's declared dtype (float64 noise
  → FP32); casts that would change the kind of value (float → uint8) are
  refused, and float inputs must be finite.
* **batch axis**: an input with the item's rank gets a leading batch axis of
  1; one with rank + 1 is a batch. Every input must have the same batch size.
* **splitting**: a batch larger than the model's ``max_batch_size`` (or whose
  request would exceed ``max_message_bytes``) is sent as several requests of
  at most that size, in order, and the outputs are concatenated.
* **prompts** (``BYTES`` inputs): a ``str``, a list/tuple of ``str`` or
  ``bytes``, a numpy unicode (``<U``) array or an object array. Each prompt is
  sent as the UTF-8 bytes of the text, unchanged (non-ASCII text and NUL bytes
  included), shaped ``[B, 1]``. Prompts longer than ``max_prompt_chars`` (default
  2,000 code points) are rejected. Note that numpy fixed-width arrays (``<U``,
  ``S``) cannot hold trailing NUL characters (numpy drops them on access), so
  a prompt ending in NUL survives only in a list or an object array; ``S``
  arrays are refused for that reason.
* **errors**: tritonclient's exceptions are translated with ``raise ... from e``:
  unreachable / not ready / unknown model → :class:`InferenceUnavailableError`,
  deadline → :class:`InferenceTimeoutError`, rejected tensors →
  :class:`InferenceInvalidArgumentError`, oversize → :class:`PayloadTooLargeError`;
  bad caller input found before sending → :class:`ValidationError`.

Model metadata (input/output dtypes and shapes, ``max_batch_size``) is fetched
once per model and cached. A gRPC client may be shared by threads; an HTTP
client may not (one per thread).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from genimg.closing import Closing
from genimg.errors import (
    GenImgError,
    InferenceInvalidArgumentError,
    InferenceTimeoutError,
    InferenceUnavailableError,
    ModelError,
    PayloadTooLargeError,
    ValidationError,
)
from genimg.limits import MAX_PROMPT_CHARS

log = logging.getLogger(__name__)

VERSION_PARAMETER = "genimg_sha256"
"""Model config parameter holding the sha256 of the served model files (written by the repository builder)."""

_NP = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT8": np.int8,
       "INT32": np.int32, "INT64": np.int64, "UINT16": np.uint16, "INT16": np.int16, "BOOL": np.bool_,
       "UINT32": np.uint32, "UINT64": np.uint64, "BYTES": np.object_}
_POLL_S = 0.2


@dataclass(frozen=True)
class ModelMeta:
    """What the server declares for a model.

    Attributes:
        name: model name.
        inputs: ``{name: (dtype, item_dims)}`` with item dims excluding the batch axis (-1 = any).
        outputs: same, for outputs.
        max_batch_size: largest batch one request may carry (0 = model does not batch).
        version: the content hash genimg's repository builder records in the config's
            ``genimg_sha256`` parameter (first 16 hex digits), else Triton's version(s), e.g. ``"1"``.
    """

    name: str
    inputs: dict[str, tuple[str, tuple[int, ...]]]
    outputs: dict[str, tuple[str, tuple[int, ...]]]
    max_batch_size: int
    version: str = "1"


def _status(e: Exception) -> str:
    status = getattr(e, "status", None)
    return str(status() if callable(status) else status or "")


def translate(e: BaseException, what: str) -> GenImgError:
    """Map a tritonclient / transport exception to genimg's error for ``what`` (e.g. ``infer txt2img``)."""
    message = getattr(e, "message", None)
    detail = message() if callable(message) else str(e)
    msg = f"{what}: {detail or type(e).__name__}"
    status = _status(e) if isinstance(e, Exception) else ""
    text = f"{status} {msg}".lower()
    if isinstance(e, (TimeoutError, socket.timeout)) or "deadline_exceeded" in text or status in ("408", "504"):
        return InferenceTimeoutError(msg)
    if "resource_exhausted" in text or status == "413" or "larger than max" in text:
        return PayloadTooLargeError(msg)
    if "invalid_argument" in text or status == "400":
        return InferenceInvalidArgumentError(msg)
    return InferenceUnavailableError(msg)


def _prompts(value: Any, max_chars: int) -> np.ndarray:
    """Prompts as an object array of UTF-8 ``bytes``, shape ``[B, 1]``."""
    if isinstance(value, (str, bytes)):
        items: Iterable[Any] = [value]
    elif isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            raise ValidationError("numpy bytes ('S') arrays drop trailing NUL bytes; pass a list or an object "
                                  "array of str", field="PROMPT")
        if value.dtype.kind not in "UO":
            raise ValidationError(f"prompts must be text, got a {value.dtype} array", field="PROMPT")
        if value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]
        if value.ndim > 1:
            raise ValidationError(f"prompts must be 1-D or [B, 1], got shape {value.shape}", field="PROMPT")
        items = value.tolist()
    elif isinstance(value, (list, tuple)):
        items = [v[0] if isinstance(v, (list, tuple)) and len(v) == 1 else v for v in value]
    else:
        raise ValidationError(f"prompts must be str, a list of str or a numpy array, got {type(value).__name__}",
                              field="PROMPT")
    out = []
    for i, p in enumerate(items):
        if isinstance(p, bytes):
            try:
                text = p.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValidationError(f"prompt {i} is not valid UTF-8: {e}", field="PROMPT") from e
            data = p
        elif isinstance(p, str):
            text = p
            try:
                data = p.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates
                raise ValidationError(f"prompt {i} cannot be encoded as UTF-8: {e}", field="PROMPT") from e
        else:
            raise ValidationError(f"prompt {i} is {type(p).__name__}, not str", field="PROMPT")
        if len(text) > max_chars:
            raise ValidationError(f"prompt {i} has {len(text)} characters; the limit is {max_chars}", field="PROMPT")
        out.append(data)
    arr = np.empty((len(out), 1), dtype=np.object_)
    for i, data in enumerate(out):
        arr[i, 0] = data
    return arr


def _numeric(name: str, value: Any, dtype: str, dims: tuple[int, ...]) -> np.ndarray:
    """``value`` cast to ``dtype`` with a leading batch axis; checks rank, fixed dims, finiteness, range."""
    arr = np.asarray(value)
    target = np.dtype(_NP[dtype])
    if arr.ndim == len(dims):
        arr = arr[np.newaxis]
    if arr.ndim != len(dims) + 1:
        raise ValidationError(f"expected shape [B, {', '.join(map(str, dims))}] or one item, got {arr.shape}",
                              field=name)
    for got, want in zip(arr.shape[1:], dims, strict=True):
        if want != -1 and got != want:
            raise ValidationError(f"expected item shape {list(dims)}, got {list(arr.shape[1:])}", field=name)
    if arr.dtype == target:
        return np.ascontiguousarray(arr)
    src = arr.dtype
    ok = (src.kind in "biu" and target.kind in "iuf") or (src.kind == "f" and target.kind == "f")
    if not ok:
        raise ValidationError(f"cannot cast {src} to {dtype} without changing values", field=name)
    if target.kind == "f":
        out = arr.astype(target)
        if not np.isfinite(out).all():
            raise ValidationError(f"values must be finite in {dtype}", field=name)
        return np.ascontiguousarray(out)
    info = np.iinfo(target.type)  # type: ignore[type-var]  # target.kind is "i" or "u" here
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise ValidationError(f"values outside {dtype} range [{info.min}, {info.max}]", field=name)
    return np.ascontiguousarray(arr.astype(target))


def _item_bytes(arr: np.ndarray) -> int:
    """Largest wire size of one batch item of ``arr`` (BYTES: 4-byte length + data per element)."""
    if arr.dtype == np.object_:
        per = [sum(4 + len(x) for x in row.reshape(-1)) for row in arr]
        return max(per, default=0)
    return int(arr[0].nbytes) if len(arr) else 0


class InferenceClient(Closing):
    """Contract-aware Triton client (see the module docstring).

    Args:
        url: ``host:port`` of Triton's gRPC (default 8001) or HTTP (8000) endpoint.
        protocol: ``grpc`` or ``http``.
        timeout_s: per-request deadline in seconds (gRPC deadline; HTTP network timeout).
        max_message_bytes: gRPC send/receive limit and the size a single request is kept under.
        max_prompt_chars: longest prompt accepted, in code points.
        ssl: use TLS.
    """

    def __init__(self, url: str, protocol: str = "grpc", *, timeout_s: float = 60.0,
                 max_message_bytes: int = 256 * 1024 * 1024, max_prompt_chars: int = MAX_PROMPT_CHARS,
                 ssl: bool = False) -> None:
        if protocol not in ("grpc", "http"):
            raise ValidationError(f"must be grpc or http, got {protocol!r}", field="protocol")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        self.max_message_bytes, self.max_prompt_chars = max_message_bytes, max_prompt_chars
        self._meta: dict[str, ModelMeta] = {}
        self._lock = threading.Lock()
        if protocol == "grpc":
            import tritonclient.grpc as mod

            args = [("grpc.max_send_message_length", max_message_bytes),
                    ("grpc.max_receive_message_length", max_message_bytes),
                    ("grpc.keepalive_time_ms", 2**31 - 1), ("grpc.keepalive_timeout_ms", 20000)]
            self._client = mod.InferenceServerClient(url, ssl=ssl, channel_args=args)
        else:
            import tritonclient.http as mod

            self._client = mod.InferenceServerClient(url, ssl=ssl, connection_timeout=timeout_s,
                                                     network_timeout=timeout_s)
        self._mod = mod

    @classmethod
    def from_settings(cls, settings: Any = None) -> InferenceClient:
        """A client from :class:`genimg.settings.TritonSettings` (read from the environment by default)."""
        from genimg.settings import TritonSettings

        s = settings or TritonSettings.from_env()
        return cls(s.triton_url, s.triton_protocol, timeout_s=s.triton_timeout_s,
                   max_message_bytes=s.triton_max_message_bytes)

    def close(self) -> None:
        """Close connections (lets Triton shut down without waiting out its exit timeout)."""
        self._client.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self.protocol == "grpc":
            kwargs.setdefault("client_timeout", self.timeout_s)
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - translated below; every tritonclient/transport error
            raise translate(e, what) from e

    def wait_ready(self, models: Iterable[str], timeout_s: float = 120.0) -> None:
        """Poll until the server is live and each of ``models`` is ready.

        Raises:
            InferenceUnavailableError: not all ready within ``timeout_s`` (names the ones that are not).
        """
        models = list(models)
        deadline = time.monotonic() + timeout_s
        pending = models
        last: Exception | None = None
        while True:
            try:
                pending = self.not_ready(pending)
                if not pending:
                    return
            except InferenceUnavailableError as e:
                last = e
            if time.monotonic() >= deadline:
                raise InferenceUnavailableError(f"not ready within {timeout_s:g} s: {pending}"
                                                + (f" ({last})" if last else ""))
            time.sleep(_POLL_S)

    def not_ready(self, models: Iterable[str]) -> list[str]:
        """The models of ``models`` that are not ready, in order, from one repository-index request.

        One call whatever the number of models (a readiness check per model costs one round trip each,
        which on a loaded machine can outlast a short timeout). A model counts as ready when one of its
        versions is in state ``READY``.

        Raises:
            InferenceUnavailableError: the server is unreachable or not ready.
        """
        kw = {"as_json": True} if self.protocol == "grpc" else {}
        index = self._call("repository index", self._client.get_model_repository_index, **kw)
        entries = index.get("models", []) if isinstance(index, Mapping) else index
        ready = {e.get("name") for e in entries or [] if e.get("state") == "READY"}
        return [m for m in models if m not in ready]

    def model_metadata(self, model: str) -> ModelMeta:
        """The model's declared tensors and ``max_batch_size`` (fetched once, then cached).

        Raises:
            InferenceUnavailableError: the server or model is not available.
        """
        with self._lock:
            if model in self._meta:
                return self._meta[model]
        kw = {"as_json": True} if self.protocol == "grpc" else {}
        md = self._call(f"metadata {model}", self._client.get_model_metadata, model, **kw)
        cfg = self._call(f"config {model}", self._client.get_model_config, model, **kw)
        cfg = cfg.get("config", cfg)
        mbs = int(cfg.get("max_batch_size", 0))

        def dims(t: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
            shape = tuple(int(d) for d in t["shape"])
            return t["datatype"], shape[1:] if mbs > 0 else shape

        sha = (cfg.get("parameters") or {}).get(VERSION_PARAMETER, {}).get("string_value", "")
        version = sha[:16] if sha else ",".join(str(v) for v in md.get("versions") or ["1"])
        meta = ModelMeta(model, {t["name"]: dims(t) for t in md["inputs"]},
                         {t["name"]: dims(t) for t in md["outputs"]}, mbs, version)
        with self._lock:
            self._meta[model] = meta
        return meta

    def max_batch_size(self, model: str) -> int:
        """The model's ``max_batch_size`` (cached)."""
        return self.model_metadata(model).max_batch_size

    def prepare(self, model: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The request tensors ``infer`` would send: declared dtype, leading batch axis, all checked.

        Raises:
            ValidationError: a missing or unknown input, a bad shape, dtype or prompt, unequal batch sizes.
        """
        meta = self.model_metadata(model)
        unknown, missing = set(inputs) - set(meta.inputs), set(meta.inputs) - set(inputs)
        if unknown or missing:
            raise ValidationError(f"{model} takes inputs {sorted(meta.inputs)}; missing {sorted(missing)}, "
                                  f"unknown {sorted(unknown)}")
        if meta.max_batch_size == 0:
            raise ValidationError(f"{model} does not batch; genimg models all do", field="model")
        out: dict[str, np.ndarray] = {}
        for name, (dtype, dims) in meta.inputs.items():
            out[name] = (_prompts(inputs[name], self.max_prompt_chars) if dtype == "BYTES"
                         else _numeric(name, inputs[name], dtype, dims))
        sizes = {n: a.shape[0] for n, a in out.items()}
        if len(set(sizes.values())) > 1:
            raise ValidationError(f"inputs of {model} have different batch sizes {sizes}")
        return out

    def _chunk_size(self, meta: ModelMeta, tensors: dict[str, np.ndarray]) -> int:
        per_item = sum(_item_bytes(a) for a in tensors.values())
        out_item = 0
        for dtype, dims in meta.outputs.values():
            if dtype != "BYTES" and -1 not in dims:
                out_item += int(np.prod(dims, dtype=np.int64)) * np.dtype(_NP[dtype]).itemsize
        worst = max(per_item, out_item) + 1024
        if worst > self.max_message_bytes:
            raise PayloadTooLargeError(f"one item of {meta.name} needs ~{worst} bytes; the limit is "
                                       f"{self.max_message_bytes} (GENIMG_TRITON_MAX_MESSAGE_BYTES)")
        return max(1, min(meta.max_batch_size, self.max_message_bytes // worst))

    def infer(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None
              ) -> dict[str, np.ndarray]:
        """Run ``model`` on a batch of any size; returns ``{output: array [B, ...]}``.

        Args:
            model: model or ensemble name, e.g. ``txt2img``.
            inputs: ``{input name: array or prompts}`` (see the module docstring).
            outputs: output names to return; default all the model declares.

        Raises:
            ValidationError: the inputs do not fit the model (nothing was sent).
            InferenceUnavailableError, InferenceTimeoutError, InferenceInvalidArgumentError,
            PayloadTooLargeError: Triton or the transport failed (see the module docstring).
            ModelError: the server's response does not decode as the declared tensor.
        """
        meta = self.model_metadata(model)
        names = list(outputs) if outputs is not None else list(meta.outputs)
        unknown = set(names) - set(meta.outputs)
        if unknown:
            raise ValidationError(f"{model} has outputs {sorted(meta.outputs)}, not {sorted(unknown)}")
        tensors = self.prepare(model, inputs)
        batch = next(iter(tensors.values())).shape[0]
        if batch == 0:
            return {n: np.empty((0, *[max(d, 0) for d in meta.outputs[n][1]]), dtype=_NP[meta.outputs[n][0]])
                    for n in names}
        step = self._chunk_size(meta, tensors)
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        for start in range(0, batch, step):
            req = []
            for n, a in tensors.items():
                part = a[start:start + step]
                inp = self._mod.InferInput(n, list(part.shape), meta.inputs[n][0])
                inp.set_data_from_numpy(part)
                req.append(inp)
            wanted = [self._mod.InferRequestedOutput(n) for n in names]
            res = self._call(f"infer {model}", self._client.infer, model, req, outputs=wanted)
            for n in names:
                try:
                    parts[n].append(res.as_numpy(n))
                except ValueError as e:  # e.g. BYTES outputs of a stub running with numpy 2
                    raise ModelError(f"{model} returned a malformed {n}: {e}") from e
        if batch > step:
            log.debug("split %d items of %s into %d requests", batch, model, -(-batch // step))
        return {n: np.concatenate(p) if len(p) > 1 else p[0] for n, p in parts.items()}
