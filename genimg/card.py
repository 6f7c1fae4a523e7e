"""The dataset card of a finished job: ``README.md`` and ``contact_sheet.png`` beside the manifest.

The job's output folder (``{output}/{job_id}/``) can then be uploaded as a
Hugging Face dataset repository as it is. The card's YAML front matter
(https://huggingface.co/docs/hub/datasets-cards) declares:

- ``configs``: ``default``, the images and their JSON as WebDataset shards
  (``shards/*.tar``), with ``dataset_info`` features as ``datasets``' webdataset
  loader reads them (:func:`item_features`). The manifest's Parquet parts
  (``manifest/part-*.parquet``) are not a second config: ``datasets`` (5.2,
  ``load.py``) infers one loader for a whole repository from its first config's
  files, so a parquet config beside a webdataset one fails to load; the body
  shows how to load them (``load_dataset("parquet", data_files=...)``) and lists
  their columns (:func:`hub_features`);
- ``license``: the profile's ``licence`` mapped to a Hub licence id
  (:func:`hub_licence`), else ``other`` with ``license_name`` and ``license_link``;
- ``size_categories`` from the number of ok images, ``task_categories``
  (``text-to-image`` for text profiles, ``unconditional-image-generation`` for
  noise profiles) and ``tags: [synthetic, genimg]``.

The body gives the job's spec, profile, model versions, counts (failures by
reason), throughput, duplicates (:mod:`genimg.dedup`) and the contact sheet of
the first :data:`SHEET_ITEMS` ok images. The card is written by the finaliser
just before ``_SUCCESS`` (:func:`genimg.jobs.finalize_if_complete`); the same
job gives the same bytes apart from the measured throughput line.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from genimg.dedup import DedupReport
from genimg.errors import StorageError, StorageUnavailableError, ValidationError
from genimg.imaging import contact_sheet, decode, encode
from genimg.index import STATUS_OK
from genimg.layout import Layout
from genimg.stores.base import ObjectStore

log = logging.getLogger(__name__)

CARD_OBJECT = "README.md"
SHEET_OBJECT = "contact_sheet.png"
SHEET_ITEMS = 64
"""Most images on the contact sheet (the first ok items)."""
SHEET_COLUMNS = 8
SHARDS_GLOB = "shards/*.tar"
"""The images' ``data_files``, relative to the job's folder (the dataset repository's root)."""
MANIFEST_GLOB = "manifest/part-*.parquet"

HUB_LICENCES = {
    "apache-2.0": "apache-2.0", "mit": "mit", "bsd-2-clause": "bsd-2-clause", "bsd-3-clause": "bsd-3-clause",
    "cc0-1.0": "cc0-1.0", "cc-by-4.0": "cc-by-4.0", "cc-by-sa-3.0": "cc-by-sa-3.0", "cc-by-sa-4.0": "cc-by-sa-4.0",
    "cc-by-nc-4.0": "cc-by-nc-4.0", "cc-by-nc-sa-4.0": "cc-by-nc-sa-4.0", "gpl-3.0": "gpl-3.0",
    "lgpl-3.0": "lgpl-3.0", "mpl-2.0": "mpl-2.0", "unlicense": "unlicense", "openrail": "openrail",
    "creativeml-openrail-m": "creativeml-openrail-m", "openrail++": "openrail++",
}
"""SPDX identifier (lower case) → Hugging Face Hub licence id (https://hf.co/docs/hub/repositories-licenses)."""

_LICENCE_RE = re.compile(r"^\s*([A-Za-z0-9.+-]+)\s*(\([^()]*\))?\s*$")

SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))
"""Upper bound (exclusive) → the Hub's ``size_categories`` value."""

_HUB_DTYPES = {pa.string(): "string", pa.int64(): "int64", pa.int32(): "int32", pa.uint64(): "uint64",
               pa.float64(): "float64", pa.float32(): "float32", pa.bool_(): "bool"}


def hub_licence(licence: str) -> str | None:
    """The Hub licence id of a profile's ``licence`` string, or ``None`` when it names none exactly.

    A licence maps when it is one SPDX identifier the Hub knows, optionally followed by
    one parenthesised note (``"Apache-2.0 (weights trained on MNIST)"`` → ``apache-2.0``);
    anything more (``"MIT (package); trained on X, whose terms restrict use"``) does not,
    because the extra terms may restrict the dataset.
    """
    m = _LICENCE_RE.match(licence)
    return HUB_LICENCES.get(m.group(1).lower()) if m else None


def licence_fields(profiles: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The card's ``license`` (and ``license_name``/``license_link`` when it is ``other``).

    Args:
        profiles: ``{"name", "licence"}`` of each profile the job ran.
    """
    ids = {hub_licence(p["licence"]) for p in profiles}
    if len(ids) == 1 and None not in ids:
        return {"license": str(ids.pop())}
    name = "-".join(sorted(re.sub(r"[^a-z0-9.-]+", "-", p["name"].lower()) for p in profiles))
    return {"license": "other", "license_name": f"genimg-{name}", "license_link": CARD_OBJECT}


def size_category(items: int) -> str:
    """The Hub's ``size_categories`` value for ``items`` examples (``1234`` → ``"1K<n<10K"``)."""
    for bound, name in SIZE_CATEGORIES:
        if items < bound:
            return name
    return "1B<n<10B"


_TYPE_DTYPES = {"int": "int64", "float": "float64", "bool": "bool", "str": "string"}


def hub_features(schema: pa.Schema) -> list[dict[str, str]]:
    """Features of a Parquet table (the manifest): ``[{"name", "dtype"}]`` per column."""
    return [{"name": f.name, "dtype": _HUB_DTYPES.get(f.type, "string")} for f in schema]


def item_features(spec: Any) -> list[dict[str, Any]]:
    """``dataset_info.features`` of the WebDataset config, as ``datasets``' webdataset loader reads the shards.

    Columns: the image (named by its file extension), ``json`` (the item JSON's fields, sorted by name,
    :meth:`genimg.shards.ShardItem.json_metadata`), ``__key__`` and ``__url__``.
    """
    from genimg.imaging import EXTENSIONS

    fields: dict[str, Any] = {name: "string" for name in ("job_id", "key", "seed", "model", "model_version",
                                                          "profile", "format", "sha256")}
    fields.update(item_index="int64", width="int64", height="int64")
    if spec.profile.task == "text":
        fields["prompt"] = "string"
    if spec.negative_prompt is not None:
        fields["negative_prompt"] = "string"
    fields.update({name: _TYPE_DTYPES[kind] for name, kind in spec.metadata_columns.items()})
    params = [{"name": n, "dtype": _TYPE_DTYPES[p.type]} for n, p in sorted(spec.profile.params.items())]
    json_fields = [{"name": n, "dtype": d} for n, d in fields.items()] + [{"name": "params", "struct": params}]
    json_fields.sort(key=lambda f: f["name"])
    return [{"name": EXTENSIONS[spec.image_format], "dtype": "image"}, {"name": "json", "struct": json_fields},
            {"name": "__key__", "dtype": "string"}, {"name": "__url__", "dtype": "string"}]


# --------------------------------------------------------------------------- what the card reads


@dataclass
class CardFacts:
    """What the card needs from the manifest, collected part by part (:meth:`add`).

    Attributes:
        model_versions: distinct ``model_version`` values of the ok items seen, sorted (every item's unless
            the finaliser stopped reading at a full sheet: a bulk job not scanned for duplicates).
        sheet_rows: the first :data:`SHEET_ITEMS` ok rows (where their images are, prompt, metadata).
        schema: the manifest's schema (of the last part seen).
    """

    model_versions: set[str] = field(default_factory=set)
    sheet_rows: list[dict[str, Any]] = field(default_factory=list)
    schema: pa.Schema | None = None

    @property
    def sheet_full(self) -> bool:
        """Whether the contact sheet has all its rows."""
        return len(self.sheet_rows) >= SHEET_ITEMS

    def add(self, table: pa.Table) -> None:
        self.schema = table.schema
        ok = table.filter(pc.equal(table["status"], STATUS_OK))
        self.model_versions.update(str(v) for v in pc.unique(ok["model_version"]).to_pylist())
        room = SHEET_ITEMS - len(self.sheet_rows)
        if room > 0:
            self.sheet_rows += ok.slice(0, room).to_pylist()


def contact_sheet_png(store: ObjectStore, rows: Sequence[Mapping[str, Any]],
                      metadata: Sequence[str] = ()) -> bytes | None:
    """A PNG contact sheet of ``rows``' images (ranged reads from their tars), captioned, or ``None`` if none.

    Raises:
        StorageError: an image cannot be read.
    """
    if not rows:
        return None
    images, captions = [], []
    for row in rows:
        images.append(decode(store.get_range(row["tar_key"], row["tar_offset"], row["tar_size"])))
        extra = " ".join(f"{m}={_short_value(row.get(m))}" for m in metadata[:2] if row.get(m) is not None)
        captions.append(" ".join(x for x in (f"#{row['item_index']}", extra, row.get("prompt") or "") if x))
    sheet = contact_sheet(images, captions, cols=SHEET_COLUMNS, caption_lines=2, min_cell_width_px=112)
    return encode(np.asarray(sheet), "png")


def _short_value(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)[:20]


# --------------------------------------------------------------------------- the card


def front_matter(spec: Any, items_ok: int, schema: pa.Schema) -> dict[str, Any]:
    """The card's YAML front matter as a dict (see the module docstring)."""
    profile = spec.profile
    text = profile.task == "text"
    return {
        **licence_fields([{"name": profile.name, "licence": profile.licence}]),
        "pretty_name": spec.name or f"genimg {profile.name} {spec.job_id[:8]}",
        "size_categories": [size_category(items_ok)],
        "task_categories": ["text-to-image" if text else "unconditional-image-generation"],
        "tags": ["synthetic", "genimg"],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": SHARDS_GLOB}]}],
        "dataset_info": {"config_name": "default", "features": item_features(spec)},
    }


def render(spec: Any, summary: Mapping[str, Any], facts: CardFacts, dedup: DedupReport | None,
           *, sheet: bool) -> str:
    """The whole ``README.md``: YAML front matter, then the markdown body.

    Args:
        spec: the job's :class:`~genimg.spec.JobSpec`.
        summary: the ``_SUCCESS`` summary (counts, failures by reason, seconds, images/s).
        facts: what the manifest holds (:class:`CardFacts`).
        dedup: the duplicates report, or ``None``.
        sheet: whether ``contact_sheet.png`` was written.
    """
    from genimg.manifest import job_schema

    profile = spec.profile
    schema = facts.schema or job_schema(spec)
    meta = front_matter(spec, int(summary.get("items_ok", 0)), schema)
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1000)
    fmt = {"png": "png", "webp": "webp", "jpeg": "jpg"}[spec.image_format]
    lines = [
        "---", head.rstrip("\n"), "---", "",
        f"# {meta['pretty_name']}", "",
        f"Synthetic images made by genimg with the model profile `{profile.name}`: {profile.description}.", "",
        "## Model", "",
        "| | |", "| --- | --- |",
        f"| profile | `{profile.name}` ({profile.task}) |",
        f"| Triton model | `{profile.triton_model}` |",
        f"| model_version | {', '.join(f'`{v}`' for v in sorted(facts.model_versions)) or '-'} |",
        f"| licence | {_cell(profile.licence)} |",
        f"| source | {_cell(profile.source or '-')} |", "",
        "## Counts", "",
        "| | |", "| --- | --- |",
        f"| items | {spec.total_items:,} |",
        f"| ok | {int(summary.get('items_ok', 0)):,} |",
        f"| failed | {int(summary.get('items_failed', 0)):,} |",
    ]
    for reason, n in sorted(dict(summary.get("items_failed_by_reason") or {}).items()):
        lines.append(f"| failed: `{reason}` | {int(n):,} |")
    lines.append(f"| shards | {int(summary.get('num_shards', 0)):,} ({int(summary.get('shards_failed', 0)):,} "
                 "failed) |")
    lines += ["", "## Throughput", "",
              f"{float(summary.get('images_per_s', 0.0)):,.1f} images/s over "
              f"{float(summary.get('seconds', 0.0)):,.1f} s from submit to the last shard (measured).", ""]
    lines += _dedup_section(dedup)
    lines += [
        "## Files", "",
        f"- `shards/NNNNNN.tar`: WebDataset shards; each item is `KEY.{fmt}` (the image) and `KEY.json` "
        "(its metadata; `seed` is a decimal string, a uint64), `KEY` its 9-digit item index.",
        "- `manifest/part-NNNNN.parquet`: one row per item (failed items included, `status`, `reason`), "
        "with where each image lies in its tar (`tar_key`, `tar_offset`, `tar_size`), its `sha256` and "
        "`phash`" + (", and `duplicate_of`" if spec.dedup else "") + ".",
        "- `dedup.json`: the duplicates report; `job.json`: the job's spec; `_SUCCESS`: the job's summary.", "",
        "```python",
        "from datasets import load_dataset",
        f"images = load_dataset(\"webdataset\", data_files=\"{SHARDS_GLOB}\", split=\"train\")  # or the folder",
        f"manifest = load_dataset(\"parquet\", data_files=\"{MANIFEST_GLOB}\", split=\"train\")",
        "```", "",
        "Manifest columns:", "", "| column | type |", "| --- | --- |",
        *(f"| `{f['name']}` | {f['dtype']} |" for f in hub_features(schema)), "",
    ]
    if sheet:
        lines += ["## Contact sheet", "", f"The first {min(SHEET_ITEMS, int(summary.get('items_ok', 0)))} ok "
                  "images.", "", f"![contact sheet]({SHEET_OBJECT})", ""]
    lines += ["## Licence", "", f"Profile `{profile.name}`: {profile.licence}", ""]
    spec_doc = json.loads(spec.to_json())
    spec_doc.pop("profile", None)
    lines += ["## Job spec", "", "```json", json.dumps(spec_doc, indent=2, sort_keys=True, ensure_ascii=False),
              "```", ""]
    return "\n".join(lines)


def _dedup_section(dedup: DedupReport | None) -> list[str]:
    if dedup is None:
        return []
    if dedup.not_scanned:
        return ["## Duplicates", "", f"Not scanned: {dedup.not_scanned}.", ""]
    lines = ["## Duplicates", "",
             f"Of {dedup.items:,} ok images, {dedup.exact_duplicates:,} are byte-identical to an image at a lower "
             f"item index (sha256) and {dedup.near_duplicates:,} are near duplicates (pHash within "
             f"{dedup.near_distance} of 64 bits, exact ones included; {dedup.near_groups:,} groups).",
             ""]
    if dedup.marked:
        lines += [f"The manifest's `duplicate_of` column marks them ({dedup.marked}); nothing was deleted.", ""]
    if dedup.exact_examples:
        lines += ["Exact pairs (kept, duplicate): " + ", ".join(f"({a}, {b})" for a, b in dedup.exact_examples),
                  ""]
    if dedup.near_examples:
        lines += ["Near pairs (kept, duplicate, bits apart): "
                  + ", ".join(f"({a}, {b}, {d})" for a, b, d in dedup.near_examples), ""]
    return lines


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_card(store: ObjectStore, layout: Layout, spec: Any, summary: Mapping[str, Any], facts: CardFacts,
               dedup: DedupReport | None) -> str:
    """Write ``contact_sheet.png`` (when there is an ok image), then ``README.md``; returns the card's key.

    Idempotent: the same job gives the same bytes, apart from the throughput line.

    Raises:
        StorageUnavailableError: a retryable storage fault.
        StorageError: another storage fault.
    """
    try:
        png = contact_sheet_png(store, facts.sheet_rows, list(spec.profile.metadata))
    except StorageUnavailableError:
        raise
    except (StorageError, ValidationError) as e:  # a bad image must not keep the job from finishing
        log.warning("no contact sheet for job %s: %s", layout.job_id, e)
        png = None
    if png is not None:
        store.put_bytes(f"{layout.job_prefix}/{SHEET_OBJECT}", png, "image/png")
    key = f"{layout.job_prefix}/{CARD_OBJECT}"
    text = render(spec, summary, facts, dedup, sheet=png is not None)
    store.put_bytes(key, text.encode("utf-8"), "text/markdown; charset=utf-8")
    return key
