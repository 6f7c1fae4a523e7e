"""One shard, end to end: seeds → Triton → encode → commit (no Celery here; ``workers/`` wraps it).

Within a shard the sub-batches flow through two thread pools: up to
``infer_inflight`` Triton requests are in flight at once (so Triton's dynamic
batcher can merge them and the model never waits on encoding), and each
answered sub-batch is encoded by ``encode_threads`` threads while the next
is being inferred (PIL's zlib/libwebp release the GIL). The shard's tar and
index are uploaded once all items are encoded; with several worker processes
one process uploads while the others keep Triton busy.

Every item's seed depends on ``(job seed, item index)`` only (case C11), so a
shard computed twice, or with another sub-batch size, gives the same bytes.

With the job's ``keep_if`` (:mod:`genimg.keepif`), the shard's items are first
made as without it (attempt 0); the items whose metadata fails the predicate
are made again together, in rounds (attempt 1, 2, ..., with
:func:`genimg.seeds.attempt_seed`, the same prompt and revised prompt), until
each passes or ``regenerate`` rounds are spent. Which items a round holds
depends on each item's own images only, so the result does not depend on
sub-batch size, shards or retries either.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from genimg import imaging, metrics
from genimg.errors import NonFiniteOutputError
from genimg.index import index_schema
from genimg.inputs import decode_prompt_chunk, prompt_chunk_key, prompt_chunks_for_items
from genimg.keepif import KEEP_IF_UNMET
from genimg.layout import Layout
from genimg.profiles.params import batch_key
from genimg.profiles.schema import ModelProfile
from genimg.profiles.tensors import (
    build_inputs,
    check_served,
    check_stage,
    item_values,
    read_images,
    read_metadata,
    stage_outputs,
)
from genimg.seeds import attempt_seeds, item_seeds
from genimg.shardplan import item_to_prompt_index
from genimg.shards import ShardItem, commit_shard
from genimg.spec import JobSpec
from genimg.stores.base import ObjectStore

log = logging.getLogger(__name__)

NON_FINITE = NonFiniteOutputError.reason


def ensemble_for(spec: JobSpec) -> str:
    """The Triton model or ensemble that serves ``spec``: its resolved profile's ``triton_model``."""
    return spec.profile.triton_model


@dataclass(frozen=True)
class ShardResult:
    """What :func:`run_shard` did."""

    job_id: str
    shard_index: int
    items_ok: int
    items_failed: int
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_written: int = 0
    model: str = ""
    failed_by_reason: dict[str, int] = field(default_factory=dict)
    regenerated: int = 0
    """Extra seeds tried for ``keep_if`` (the sum of ``tries - 1`` over the shard's items)."""


def count_committed(result: ShardResult, image_format: str) -> None:
    """Add a newly committed shard to the metrics (call once per shard, not per run)."""
    metrics.SHARDS_COMMITTED.inc()
    metrics.IMAGES_WRITTEN.labels(result.model, image_format).inc(result.items_ok)
    metrics.BYTES_WRITTEN.labels(result.model).inc(result.bytes_written)
    for reason, n in result.failed_by_reason.items():
        metrics.ITEMS_FAILED.labels(reason).inc(n)
    if result.regenerated:
        metrics.REGENERATIONS.labels(result.model).inc(result.regenerated)


def result_from_index(spec: JobSpec, shard_index: int, index) -> ShardResult:
    """What a committed shard holds, read back from its index (a shard committed by an earlier run).

    Args:
        spec: the job.
        shard_index: the shard.
        index: the shard's index (:data:`genimg.index.INDEX_SCHEMA` table).
    """
    rows = index.select(["status", "reason", "tar_size", "model"]).to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    tries = index["tries"].to_pylist() if "tries" in index.column_names else []
    return ShardResult(spec.job_id, shard_index, len(ok), len(rows) - len(ok),
                       bytes_written=sum(int(r["tar_size"] or 0) for r in ok),
                       model=rows[0]["model"] if rows else ensemble_for(spec),
                       failed_by_reason=dict(Counter(str(r["reason"]) for r in rows if r["status"] != "ok")),
                       regenerated=sum(int(t or 1) - 1 for t in tries))


class Infer:
    """A callable ``(model, inputs, outputs) -> outputs`` bound to an InferenceClient.

    Before a profile's first request it checks the served model's tensors against the
    profile (:func:`genimg.profiles.tensors.check_served`), once per model.
    """

    def __init__(self, client) -> None:
        self.client = client
        self._checked: set[tuple[str, str]] = set()

    def check(self, profile: ModelProfile) -> str:
        """Check the served model against ``profile``; returns the served model's version hash.

        Raises:
            ProfileMismatchError: a tensor differs (the shard fails permanently, naming it).
            InferenceUnavailableError: Triton or the model is not available.
        """
        meta = self.client.model_metadata(profile.triton_model)
        key = (profile.triton_model, profile.model_dump_json())
        if key not in self._checked:
            check_served(profile, meta.inputs, meta.outputs)
            if profile.prompt_stage is not None:
                stage = self.client.model_metadata(profile.prompt_stage.model)
                check_stage(profile, stage.inputs, stage.outputs)
            self._checked.add(key)
        if profile.prompt_stage is None:
            return meta.version
        stage_version = self.client.model_metadata(profile.prompt_stage.model).version
        return hashlib.sha256(f"{stage_version}+{meta.version}".encode()).hexdigest()[:16]

    def check_expander(self, model: str) -> str:
        """Check the served prompt expander's tensors against :data:`genimg.contract.EXPANDER`.

        Returns:
            its version hash (the repository's ``genimg_sha256``, first 16 hex digits).

        Raises:
            ProfileMismatchError: a tensor differs (the shard fails permanently, naming it).
            InferenceUnavailableError: Triton or the model is not available.
        """
        from genimg.contract import EXPANDER
        from genimg.profiles.tensors import ProfileMismatchError

        meta = self.client.model_metadata(model)
        if ("expander", model) not in self._checked:
            for kind, want, got in (("input", EXPANDER.inputs, meta.inputs), ("output", EXPANDER.outputs,
                                                                                meta.outputs)):
                for t in want:
                    if t.name not in got or got[t.name][0] != t.dtype:
                        raise ProfileMismatchError(f"expander {model}: {kind} {t.name} {t.dtype} is "
                                                   f"{got.get(t.name, ('missing',))[0]}")
            self._checked.add(("expander", model))
        return meta.version

    def __call__(self, model: str, inputs: dict, outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        return self.client.infer(model, inputs, outputs=outputs)


def load_prompts(store: ObjectStore, layout: Layout, spec: JobSpec, start: int, stop: int) -> list[str | None]:
    """Prompts of items ``[start, stop)``, read from the stored chunks (``None`` for noise profiles)."""
    if spec.profile.task != "text":
        return [None] * (stop - start)
    chunk = spec.prompt_chunk_size
    assert chunk is not None
    prompts: dict[int, str] = {}
    for c in prompt_chunks_for_items(start, stop, spec.images_per_prompt, chunk):
        for j, p in enumerate(decode_prompt_chunk(store.get_bytes(f"{layout.job_prefix}/{prompt_chunk_key(c)}"))):
            prompts[c * chunk + j] = p
    return [prompts[item_to_prompt_index(i, spec.images_per_prompt)] for i in range(start, stop)]


class PromptStageCache:
    """The prompt stage's outputs for each distinct prompt of one shard, each computed once.

    Requests in flight share the cache: the thread that first needs a prompt
    computes it (in batches of at most ``batch`` distinct prompts); another
    thread that needs it waits for that result. A failure fails every waiter
    (the shard is retried whole).
    """

    def __init__(self, profile: ModelProfile, infer: Callable[..., dict[str, np.ndarray]], batch: int) -> None:
        assert profile.prompt_stage is not None
        self.stage, self.infer, self.batch = profile.prompt_stage, infer, max(1, batch)
        self.outputs = stage_outputs(profile)
        self._rows: dict[str, Future] = {}
        self._lock = threading.Lock()
        self.computed = 0

    def gather(self, prompts: list[str | None]) -> dict[str, np.ndarray]:
        """``{stage output: array [len(prompts), ...]}``, row ``k`` for ``prompts[k]``.

        Raises:
            whatever the stage's inference raises (RetryableError or PermanentError subclasses).
        """
        texts = [p or "" for p in prompts]
        mine: list[tuple[str, Future]] = []
        with self._lock:
            for p in dict.fromkeys(texts):
                if p not in self._rows:
                    self._rows[p] = Future()
                    mine.append((p, self._rows[p]))
        try:
            for i in range(0, len(mine), self.batch):
                chunk = mine[i:i + self.batch]
                out = self.infer(self.stage.model, {self.stage.prompt_input: [p for p, _ in chunk]}, self.outputs)
                for k, (_, f) in enumerate(chunk):
                    f.set_result({o: out[o][k] for o in self.outputs})
                self.computed += len(chunk)
        except BaseException as e:
            for _, f in mine:
                if not f.done():
                    f.set_exception(e)
            raise
        rows = {p: self._rows[p].result() for p in dict.fromkeys(texts)}
        return {o: np.stack([rows[p][o] for p in texts]) for o in self.outputs}


def plan_requests(spec: JobSpec, indices: np.ndarray, seeds: np.ndarray, prompts: list[str | None],
                  attempt: int = 0) -> list[_SubBatch]:
    """Cut a shard's items (or one ``keep_if`` round's) into requests of at most ``sub_batch_size`` items.

    Items are taken in order; items whose shape-changing parameters differ
    (:func:`genimg.profiles.params.batch_key`) never share a request. ``attempt``
    is the round the seeds belong to (0: the items' own seeds).
    """
    values = item_values(spec.params, indices)
    keys = [batch_key(spec.profile, v) for v in values]
    groups: dict[tuple, list[int]] = {}
    for j, k in enumerate(keys):
        groups.setdefault(k, []).append(j)
    out = []
    for members in groups.values():
        for i in range(0, len(members), spec.sub_batch_size):
            sel = np.array(members[i:i + spec.sub_batch_size], dtype=np.int64)
            out.append(_SubBatch(indices[sel], seeds[sel], [prompts[j] for j in sel], [values[j] for j in sel],
                                 attempt=attempt))
    out.sort(key=lambda b: int(b.indices[0]))
    return out


@dataclass
class _SubBatch:
    indices: np.ndarray
    seeds: np.ndarray
    prompts: list[str | None]
    values: list[dict]
    out: dict[str, np.ndarray] | None = None
    infer_s: float = 0.0
    expansions: list | None = None
    attempt: int = 0


def load_wildcards(store: ObjectStore, layout: Layout, spec: JobSpec) -> dict[str, list[str]]:
    """The job's stored wildcard options (``inputs/wildcards.json``), checked against the spec's sha256.

    Raises:
        StorageNotFoundError: the file is missing (the shard fails permanently).
        ValidationError: its sha256 differs from the one the spec pins.
    """
    import json

    from genimg.errors import ValidationError
    from genimg.expand import WILDCARDS_OBJECT

    assert spec.expand is not None
    if not spec.expand.wildcards:
        return {}
    data = store.get_bytes(f"{layout.job_prefix}/{WILDCARDS_OBJECT}")
    if hashlib.sha256(data).hexdigest() != spec.expand.wildcards_sha256:
        raise ValidationError("the stored wildcards differ from the ones the job was validated with",
                              field="expand.wildcards_sha256")
    return json.loads(data)


def expansion_columns(expansion, source: str | None, expander: str, version: str) -> dict:
    """An item's expansion columns (:data:`genimg.expand.EXPANSION_COLUMNS`)."""
    return {"source_prompt": source, "revised_prompt": expansion.revised, "expander": expander,
            "expander_version": version, "expand_tokens": int(expansion.tokens)}


def _start_expansion(spec: JobSpec, store: ObjectStore, layout: Layout, infer, indices: np.ndarray,
                     prompts: list[str | None]):
    """``(ShardExpander or None, expander name, version)`` for a shard; expansion starts at once in its thread.

    Raises:
        ProfileMismatchError: the served expander's tensors differ from the contract.
        InferenceUnavailableError: the expander is not served or not ready (the shard is retried).
    """
    from genimg.expand import TEMPLATE_EXPANDER, ShardExpander

    if spec.expand is None:
        return None, "", ""
    opts = spec.expand
    if opts.uses_model:
        assert opts.model is not None
        name = opts.model
        version = infer.check_expander(name) if isinstance(infer, Infer) else "1"
    else:
        name = TEMPLATE_EXPANDER
        version = hashlib.sha256(f"{opts.template}\0{opts.wildcards_sha256 or ''}".encode()).hexdigest()[:16]
    wildcards = load_wildcards(store, layout, spec)

    def observe(tokens: int, seconds: float) -> None:
        metrics.EXPAND_TOKENS.labels(name).observe(tokens)
        metrics.EXPAND_SECONDS.labels(name).observe(seconds)

    return ShardExpander(spec, indices, prompts, infer, wildcards, on_expanded=observe), name, version


def run_shard(spec: JobSpec, shard_index: int, *, store: ObjectStore, layout: Layout,
              infer: Callable[..., dict[str, np.ndarray]], model_version: str | None = None,
              infer_inflight: int = 2, encode_threads: int = 2) -> ShardResult:
    """Generate, encode and commit one shard; idempotent (same bytes on every run).

    Everything model-specific comes from ``spec.profile``: the request's inputs
    (:func:`genimg.profiles.tensors.build_inputs`), the image and its conversion
    to uint8 HWC, the finiteness flag and the metadata columns.

    Args:
        spec: the job.
        shard_index: which shard of ``spec.shard_plan()``.
        store: the job's object store; layout: its key layout.
        infer: ``(model, inputs, outputs) -> {tensor: array [B, ...]}``; an :class:`Infer`
            also checks the served model against the profile before the first request.
        model_version: recorded in each item's metadata; default the served model's hash
            (``Infer.check``), else ``"1"``.
        infer_inflight: Triton requests in flight at once.
        encode_threads: encoder threads.

    Raises:
        RetryableError subclasses (Triton or storage unavailable): retry the shard.
        PermanentError subclasses: the shard cannot succeed (e.g. ``ProfileMismatchError``).
    """
    t0 = time.perf_counter()
    profile = spec.profile
    start, stop = spec.shard_plan().shard_range(shard_index)
    model = profile.triton_model
    if isinstance(infer, Infer):
        served = infer.check(profile)
        model_version = model_version or served
    model_version = model_version or "1"
    wanted = profile.output_tensors
    prompts = load_prompts(store, layout, spec, start, stop)
    indices = np.arange(start, stop, dtype=np.int64)
    seeds = item_seeds(spec.seed, indices)
    batches = plan_requests(spec, indices, seeds, prompts)

    stage = PromptStageCache(profile, infer, spec.sub_batch_size) if profile.prompt_stage else None
    expander, expander_name, expander_version = _start_expansion(spec, store, layout, infer, indices, prompts)
    sources = dict(zip(indices.tolist(), prompts, strict=True))

    def run_infer(b: _SubBatch) -> _SubBatch:
        if expander is not None:  # waits only for the expansion requests holding this sub-batch's items
            b.expansions = expander.get((b.indices - start).tolist())
            b.prompts = [e.revised if e.revised is not None else "" for e in b.expansions]
        per_prompt = stage.gather(b.prompts) if stage is not None else None
        inputs = build_inputs(profile, seeds=b.seeds, prompts=b.prompts, item_values=b.values,
                              negative_prompt=spec.negative_prompt, per_prompt=per_prompt)
        t = time.perf_counter()
        b.out = infer(model, inputs, wanted)
        b.infer_s = time.perf_counter() - t
        metrics.STAGE_SECONDS.labels("infer").observe(b.infer_s)
        return b

    rule = spec.keep_rule
    spent: dict[int, float] = {}  # inference seconds of an item's earlier keep_if attempts

    def encode(b: _SubBatch) -> tuple[list[ShardItem], list[int]]:
        """The sub-batch's finished items, and the item indices that ``keep_if`` sends to the next round."""
        t = time.perf_counter()
        assert b.out is not None
        images, finite = read_images(profile, b.out)
        out = b.out
        if not finite.all():  # retry the non-finite items once, alone (case C9)
            bad = np.flatnonzero(~finite)
            retry = run_infer(_SubBatch(b.indices[bad], b.seeds[bad], [b.prompts[i] for i in bad],
                                        [b.values[i] for i in bad], attempt=b.attempt))
            assert retry.out is not None
            r_images, r_finite = read_images(profile, retry.out)
            images, finite = images.copy(), finite.copy()
            images[bad], finite[bad] = r_images, r_finite
            out = {k: np.array(v, copy=True) for k, v in out.items()}
            for k in out:
                out[k][bad] = retry.out[k]
        items: list[ShardItem] = []
        again: list[int] = []
        kept: list[tuple[int, dict[str, Any], dict[str, Any]]] = []  # to encode: (row, common fields, extra)
        per_item_infer = b.infer_s / max(len(b.indices), 1)
        tries = {"tries": b.attempt + 1} if rule is not None else {}
        for j, idx in enumerate(b.indices):
            common: dict[str, Any] = dict(
                item_index=int(idx), seed=int(b.seeds[j]), model=model, model_version=model_version,
                profile=profile.name, params=b.values[j], prompt=b.prompts[j],
                negative_prompt=spec.negative_prompt, infer_s=per_item_infer + spent.pop(int(idx), 0.0))
            if b.expansions is not None:  # prompt: the job's; revised_prompt: what the image model saw
                e = b.expansions[j]
                common["prompt"] = sources[int(idx)]
                columns = {**expansion_columns(e, sources[int(idx)], expander_name, expander_version), **tries}
                if e.reason is not None:  # its image (made from "") is dropped
                    items.append(ShardItem(reason=e.reason, extra=columns, **common))
                    continue
            else:
                columns = dict(tries)
            if not finite[j]:
                items.append(ShardItem(reason=NON_FINITE, extra=columns, **common))
                continue
            meta = read_metadata(profile, out, j)
            if rule is not None and not rule.passes(meta):
                if b.attempt < spec.regenerate:
                    again.append(int(idx))  # made again next round, from its next seed
                    spent[int(idx)] = float(common["infer_s"])
                else:  # the last seed tried, and its image's metadata
                    items.append(ShardItem(reason=KEEP_IF_UNMET, extra={**meta, **columns}, **common))
                continue
            kept.append((j, common, {**meta, **columns}))
        hashes = imaging.phashes([images[j] for j, _, _ in kept])
        for (j, common, extra), phash in zip(kept, hashes, strict=True):
            te = time.perf_counter()
            data = imaging.encode(images[j], spec.image_format, spec.quality)
            items.append(ShardItem(image=data, format=spec.image_format, width=int(images.shape[2]),
                                   height=int(images.shape[1]), extra=extra, phash=phash,
                                   encode_s=time.perf_counter() - te, **common))
        metrics.STAGE_SECONDS.labels("encode").observe(time.perf_counter() - t)
        return items, again

    items: list[ShardItem] = []
    regenerated = 0
    try:
        with ThreadPoolExecutor(max(1, infer_inflight), thread_name_prefix="infer") as ipool, \
                ThreadPoolExecutor(max(1, encode_threads), thread_name_prefix="encode") as epool:
            attempt = 0
            while batches:  # one round per attempt; rounds after the first only with keep_if
                inferred = [ipool.submit(run_infer, b) for b in batches]
                encoded = [epool.submit(encode, f.result()) for f in inferred]
                again: list[int] = []
                for f in encoded:
                    done, redo = f.result()
                    items.extend(done)
                    again.extend(redo)
                attempt += 1
                regenerated += len(again)
                again.sort()
                redo_idx = np.array(again, dtype=np.int64)
                batches = plan_requests(spec, redo_idx, attempt_seeds(spec.seed, redo_idx, attempt),
                                        [sources[i] for i in again], attempt=attempt) if again else []
    finally:
        if expander is not None:
            expander.close()
    gen_s = time.perf_counter() - t0
    stage_seconds = {"generate": gen_s}
    if expander is not None:
        stage_seconds["expand"] = expander.seconds
        metrics.STAGE_SECONDS.labels("expand").observe(expander.seconds)
    schema = index_schema(spec.metadata_columns)
    extra_stats = keep_if_stats(spec, items, regenerated) if rule is not None else None
    commit = commit_shard(store, layout, shard_index, items, stage_seconds=stage_seconds, schema=schema,
                          extra_stats=extra_stats)
    upload_s = float(commit.stats["seconds"].get("upload", 0.0))
    metrics.STAGE_SECONDS.labels("upload").observe(upload_s)
    ok = [it for it in items if it.ok]
    total_s = time.perf_counter() - t0
    metrics.STAGE_SECONDS.labels("shard").observe(total_s)
    return ShardResult(spec.job_id, shard_index, len(ok), len(items) - len(ok),
                       {**stage_seconds, "upload": upload_s, "shard": total_s},
                       bytes_written=sum(len(it.image or b"") for it in ok), model=model,
                       failed_by_reason=dict(Counter(it.reason or "" for it in items if not it.ok)),
                       regenerated=regenerated)


def keep_if_stats(spec: JobSpec, items: list[ShardItem], regenerated: int) -> dict:
    """The ``keep_if`` block of a shard's stats JSON.

    Returns:
        ``{"keep_if": {"rule", "regenerate", "regenerated" (extra seeds tried), "passed" (items kept),
        "unmet" (items failed keep_if_unmet), "tries" ({tries: items kept after that many seeds})}}``.
    """
    kept = Counter(int(it.extra["tries"]) for it in items if it.ok)
    return {"keep_if": {"rule": spec.keep_if, "regenerate": spec.regenerate, "regenerated": regenerated,
                        "passed": sum(kept.values()), "unmet": sum(1 for it in items if it.reason == KEEP_IF_UNMET),
                        "tries": {str(k): kept[k] for k in sorted(kept)}}}
