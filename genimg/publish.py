"""What a finished job publishes beside its manifest, before ``_SUCCESS``: duplicates and the dataset card.

Called by the finaliser (:func:`genimg.jobs.finalize_if_complete`) under its
lock. ``dedup.json`` (:mod:`genimg.dedup`), ``contact_sheet.png`` and
``README.md`` (:mod:`genimg.card`); with the job's ``dedup``, the manifest parts
whose ``duplicate_of`` changes are rewritten. A job of more than
:data:`genimg.dedup.REPORT_MAX_ITEMS` items that did not ask for ``dedup`` is not
scanned, so a bulk job's finalisation reads only the first parts (the card's sheet).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import pyarrow as pa

from genimg import card, dedup
from genimg.layout import Layout
from genimg.manifest import PartPlan, iter_parts, job_schema, read_part, read_summary, write_part
from genimg.spec import JobSpec
from genimg.stores.base import ObjectStore

log = logging.getLogger(__name__)


def publish(store: ObjectStore, layout: Layout, spec: JobSpec, summary: Mapping[str, Any], *,
            lock: Callable[[int], AbstractContextManager[None]]) -> tuple[dedup.DedupReport, int | None]:
    """What a finished job publishes beside its manifest, before ``_SUCCESS``: duplicates and the card.

    One pass over the manifest's parts collects the dedup columns and what the card
    needs; with ``spec.dedup`` the parts whose ``duplicate_of`` changes are rewritten
    (:func:`genimg.dedup.mark_parts`); then ``dedup.json``, ``contact_sheet.png`` and
    ``README.md`` are written (:mod:`genimg.card`). Idempotent.

    Args:
        summary: the job's ``_SUCCESS`` summary so far (counts, seconds, throughput) for the card.
        lock: a part's compaction lock (:func:`genimg.jobs.finalize_if_complete` passes its Redis lock),
            held while a part is rewritten with ``duplicate_of``.

    Returns:
        The duplicates report, and the manifest's bytes when parts were rewritten (else ``None``).
    """
    started = time.perf_counter()
    plan, schema = PartPlan.for_spec(spec), job_schema(spec)
    facts, scan = card.CardFacts(), dedup.Scan()
    items = int(summary["items_ok"]) + int(summary["items_failed"])
    scan_all = spec.dedup is not None or items <= dedup.REPORT_MAX_ITEMS
    for table in iter_parts(store, layout, plan, schema=schema):
        facts.add(table)
        if scan_all:
            scan.add(table)
        elif facts.sheet_full:  # a bulk job that did not ask: its finalisation stays O(parts' summaries)
            break
    manifest_bytes = None
    if scan_all:
        found = scan.find(dedup.NEAR_DISTANCE)
        if spec.dedup is not None:
            def rewrite(part: int, table: pa.Table) -> None:
                old = read_summary(store, layout, part)
                write_part(store, layout, plan, part, table, old.shards_missing if old else ())

            if dedup.mark_parts(range(plan.num_parts), found, spec.dedup,
                                read=lambda p: read_part(store, layout, p, schema), write=rewrite, lock=lock):
                parts = [read_summary(store, layout, p) for p in range(plan.num_parts)]
                manifest_bytes = sum(s.bytes for s in parts if s is not None)
        report = found.report(spec.dedup)
    else:
        report = dedup.DedupReport.not_scanned_because(
            f"{items:,} items > {dedup.REPORT_MAX_ITEMS:,}: submit the job with dedup='exact' or 'near' to scan it")
    store.put_bytes(f"{layout.job_prefix}/{dedup.DEDUP_OBJECT}",
                    json.dumps(report.to_dict(), sort_keys=True, indent=1).encode(), "application/json")
    card.write_card(store, layout, spec, summary, facts, report)
    log.info("published job=%s scanned=%s exact_duplicates=%d near_duplicates=%d dedup_s=%.3f publish_s=%.3f",
             spec.job_id, scan_all, report.exact_duplicates, report.near_duplicates, report.seconds,
             time.perf_counter() - started)
    return report, manifest_bytes
