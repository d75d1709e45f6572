"""The reviewer's groups: clusters picked from the report and combined for display.

A small YAML file names each group and its clusters, and optionally objects to leave out::

    groups:
      - name: shoes
        clusters: [3, 17]
        exclude_objects: [1234]      # object_id, as shown on the report's cluster pages
      - name: bags
        clusters: [42, 57]
        include_removed: true        # 57 was removed by post-processing: rescue it

It is checked against the run once, at the edge (:func:`check_groups`): every cluster must
be a kept cluster of the run (or, with ``include_removed``, a removed one), a cluster belongs
to at most one group, names are unique and no group is empty. Every problem is reported at
once, one line each, naming the file, the YAML line and column, and the key (an
:class:`~pipeline.errors.InputError`). :func:`apply_groups` then writes
``ins_posts_groups.csv`` and ``.parquet``: the selected objects (rows of
``ins_posts_clusters``) of every group, with a ``group`` column; a removed cluster brings its
members after the dedupe step. The Parquet metadata records the model's fingerprint, and
:func:`set_aside_stale` moves groups outputs of an earlier clustering out of the way.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from . import schema, sinks
from .catalog import Catalog, run_metadata
from .config import Config, _format_validation_error, _NoAliasLoader, read_yaml_mapping
from .errors import ConfigError, InputError, MissingInputError, PipelineError, StageOrderError

log = logging.getLogger("pipeline")


class GroupSpec(BaseModel):
    """One group: a display name and the clusters it combines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    clusters: list[int]
    exclude_objects: list[int] = []
    include_removed: bool = False
    note: str | None = None


class GroupsSpec(BaseModel):
    """The whole groups file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    groups: list[GroupSpec]


@dataclass(frozen=True)
class GroupsResult:
    """What :func:`apply_groups` wrote: the grouped table and where it went."""

    table: pd.DataFrame
    csv: str
    parquet: str
    source: str

    def counts(self) -> pd.Series:
        """Objects per group, in file order."""
        return self.table.groupby(schema.GROUP, sort=False).size()


def groups_file_of(cfg: Config, groups_file: str | Path | None = None) -> str:
    """The groups file to use: ``groups_file`` if given, else ``report.groups_file``."""
    chosen = groups_file if groups_file is not None else cfg.report.groups_file
    if chosen is None:
        raise ConfigError(
            "No groups file: report.groups_file is not set. Set it in the config or pass --file."
        )
    return str(chosen)


def load_groups(path: str | Path) -> GroupsSpec:
    """Read and type-check a groups YAML file (no run needed).

    Raises
    ------
    MissingInputError
        The file does not exist.
    InputError
        Not YAML, not a mapping, an unknown key or a value of the wrong type (one line each).
    """
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(
            f"Groups file {source} does not exist. Write it (the format: 'pipeline groups "
            "--help') or fix report.groups_file."
        )
    expected = "a mapping with a 'groups' list"
    data = read_yaml_mapping(p, source, InputError, expected)
    if data is None:
        raise InputError(f"{source}: the top level must be {expected}. Got NoneType instead.")
    try:
        return GroupsSpec.model_validate(data)
    except ValidationError as exc:
        raise InputError(with_positions(_format_validation_error(exc, source), p)) from None


def key_positions(text: str) -> dict[str, tuple[int, int]]:
    r"""The 1-based line and column of every key path of a YAML text (``groups.0.clusters``
    names the key ``clusters`` of the first group; ``groups.0.clusters.1`` its 2nd item).

    >>> key_positions("groups:\n  - name: a\n    clusters: [3, 4]\n")["groups.0.clusters.1"]
    (3, 19)
    """
    try:
        root = yaml.compose(text, Loader=_NoAliasLoader)  # noqa: S506 - no aliases
    except yaml.YAMLError:
        return {}
    out: dict[str, tuple[int, int]] = {}

    def walk(node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                out[child] = (key.start_mark.line + 1, key.start_mark.column + 1)
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                child = f"{path}.{i}" if path else str(i)
                out[child] = (item.start_mark.line + 1, item.start_mark.column + 1)
                walk(item, child)

    if root is not None:
        walk(root, "")
    return out


def with_positions(message: str, path: str | Path) -> str:
    """Put ``:line:column`` after the file name of each line that names a key (the key's
    own place, or its nearest parent's when the key is missing)."""
    try:
        positions = key_positions(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return message
    lines = []
    for line in message.splitlines():
        match = re.search(r"key '([^']+)'", line)
        if match and positions:
            key = match.group(1)
            while key and key not in positions:
                key = key.rpartition(".")[0]
            if key:
                row, column = positions[key]
                source = str(path)
                if line.startswith(f"{source}: "):
                    line = f"{source}:{row}:{column}: " + line[len(source) + 2 :]
        lines.append(line)
    return "\n".join(lines)


def drop_gone_clusters(
    spec: GroupsSpec,
    gone: set[int],
    source: str = "<groups>",
    unkept: set[int] = frozenset(),
    level: int = logging.WARNING,
) -> GroupsSpec:
    """``spec`` without the clusters a re-fit retired (``gone``, :mod:`pipeline.ids`) or
    that the previous run kept and the re-fit's post-processing no longer keeps
    (``unkept``), with one warning line per cluster dropped; a group left without clusters
    is dropped too (one line).

    >>> spec = GroupsSpec(groups=[{"name": "a", "clusters": [0, 5]}, {"name": "b", "clusters": [5]}])
    >>> [g.clusters for g in drop_gone_clusters(spec, {5}).groups]
    [[0]]
    """
    dropped = set(gone) | set(unkept)
    if not any(c in dropped for g in spec.groups for c in g.clusters):
        return spec
    groups = []
    for i, group in enumerate(spec.groups):
        for cluster in group.clusters:
            if cluster in gone:
                why = "is gone: the re-fit has no centre matching it"
            elif cluster in unkept:
                why = "is no longer kept: the re-fit's post-processing removed it"
            else:
                continue
            log.log(level, "%s: cluster %d of group %r (groups.%d) %s; dropped from the group.",
                    source, cluster, group.name, i, why)  # fmt: skip
        left = [c for c in group.clusters if c not in dropped]
        if left:
            groups.append(group.model_copy(update={"clusters": left}))
        else:
            log.log(
                level, "%s: group %r (groups.%d) has no cluster left; dropped.", source,
                group.name, i,
            )  # fmt: skip
    return GroupsSpec(groups=groups)


def check_groups(spec: GroupsSpec, summary: pd.DataFrame, source: str = "<groups>") -> None:
    """Check ``spec`` against the run's cluster summary; raise once with every problem.

    Each group needs a unique non-empty name and at least one cluster; each cluster must be
    kept by post-processing (``size_final > 0``), or removed with members left after the
    dedupe step when the group says ``include_removed: true``, and belong to one group only.

    >>> summary = pd.DataFrame({"cluster": [0, 1, 2], "size": [5, 4, 3],
    ...                         "size_final": [5, 0, 3]})
    >>> check_groups(GroupsSpec(groups=[{"name": "a", "clusters": [0, 2]}]), summary)
    >>> check_groups(GroupsSpec(groups=[{"name": "a", "clusters": [1]}]), summary)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    pipeline.errors.InputError: <groups>: key 'groups.0.clusters.0' (group 'a') must name ...
    """
    if not spec.groups:
        raise InputError(f"{source}: key 'groups' must list at least one group. Got [] instead.")
    problems: list[str] = []
    sizes = summary.set_index("cluster")
    kept = set(sizes.index[sizes["size_final"] > 0].tolist())
    deduped = sizes["size_after_dedupe"] if "size_after_dedupe" in sizes else sizes["size"]
    rescuable = set(sizes.index[(sizes["size_final"] == 0) & (deduped > 0)].tolist())
    names: dict[str, int] = {}
    owner: dict[int, tuple[int, str]] = {}
    for i, group in enumerate(spec.groups):
        key = f"groups.{i}"
        if not group.name.strip():
            problems.append(
                f"{source}: key '{key}.name' must be a non-empty name. Got {group.name!r} instead."
            )
        elif group.name in names:
            problems.append(
                f"{source}: key '{key}.name' must be unique. Got {group.name!r} instead, "
                f"already the name of groups.{names[group.name]}."
            )
        else:
            names[group.name] = i
        if not group.clusters:
            problems.append(
                f"{source}: key '{key}.clusters' (group {group.name!r}) must list at least one "
                "cluster. Got [] instead."
            )
        for j, cluster in enumerate(group.clusters):
            label = f"{source}: key '{key}.clusters.{j}' (group {group.name!r})"
            if cluster not in kept and not (group.include_removed and cluster in rescuable):
                if cluster not in sizes.index:
                    why = "no such cluster in the run"
                elif sizes.at[cluster, "size"] > 0:
                    why = "removed by post-processing"
                    if cluster not in rescuable:
                        why += ", with no member left after the dedupe step"
                    else:
                        why += "; add 'include_removed: true' to the group to rescue it"
                else:
                    why = "an empty cluster"
                problems.append(
                    f"{label} must name kept clusters of the run. Got {cluster} instead ({why}). "
                    "Pick ids from the report's cluster index."
                )
            if cluster in owner:
                other_i, other = owner[cluster]
                where = (
                    "listed twice"
                    if other_i == i
                    else f"already in group {other!r} (groups.{other_i})"
                )
                problems.append(
                    f"{label} must not repeat a cluster. Got {cluster} instead, {where}."
                )
            owner.setdefault(cluster, (i, group.name))
    if problems:
        raise InputError("\n".join(problems))


def assign_groups(
    spec: GroupsSpec,
    selected: pd.DataFrame,
    source: str = "<groups>",
    refit: bool = False,
    level: int = logging.WARNING,
) -> pd.DataFrame:
    """The selected objects of every group with a ``group`` column (pure).

    ``selected`` holds rows of ``ins_posts_clusters`` (with ``object_id``); ``spec`` must
    have passed :func:`check_groups`. Rows come in file order of the groups, then by
    cluster, descending ``sim`` and ``object_id``. With ``refit`` (the run's model was
    numbered after a previous one, so the file may predate it), an excluded object that
    is not a selected object of its group's clusters any more is skipped with one warning
    line each: the re-fit moved it to another cluster or post-processing removed it, so
    there is nothing left to exclude.

    Raises
    ------
    InputError
        An excluded object is not a selected object of its group's clusters (unless
        ``refit``), or the exclusions leave a group empty.
    """
    parts, problems = [], []
    for i, group in enumerate(spec.groups):
        members = selected[selected["cluster"].isin(group.clusters)]
        excluded = set(group.exclude_objects)
        unknown = sorted(excluded - set(members[schema.OBJECT_ID].tolist()))
        label = f"{source}: key 'groups.{i}.exclude_objects' (group {group.name!r})"
        if unknown and refit:
            for obj in unknown:
                log.log(
                    level,
                    "%s: object %d excluded by group %r (groups.%d) is not a selected object "
                    "of its clusters %s after the re-fit (moved to another cluster or "
                    "removed by post-processing); skipped.",
                    source, obj, group.name, i, group.clusters,
                )  # fmt: skip
            excluded -= set(unknown)
        elif unknown:
            problems.append(
                f"{label} must name selected objects of the group's clusters "
                f"{group.clusters}. Got {', '.join(map(str, unknown[:5]))} instead."
            )
        members = members[~members[schema.OBJECT_ID].isin(excluded)]
        if members.empty:
            problems.append(
                f"{label} must leave at least one object. Got all {len(excluded)} objects excluded."
            )
            continue
        order = members.sort_values(
            ["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True]
        )
        parts.append(order.assign(**{schema.GROUP: group.name}))
    if problems:
        raise InputError("\n".join(problems))
    return pd.concat(parts, ignore_index=True)


def resolve_groups(
    catalog: Catalog, groups_file: str | Path, level: int = logging.WARNING
) -> pd.DataFrame:
    """Load, check and assign the groups of ``groups_file`` against the run (no writes);
    what a re-fit dropped (clusters, exclusions) is logged at ``level``, one line each."""
    source = str(groups_file)
    spec = load_groups(source)
    if not catalog.exists(catalog.cluster_summary):
        raise StageOrderError(
            f"Groups need the outputs of 'postprocess', which has not completed in "
            f"{catalog.root}. Run 'pipeline run' first."
        )
    summary = sinks.read_parquet(
        catalog.cluster_summary, columns=["cluster", "size", "size_after_dedupe", "size_final"]
    )
    kept_now = set(summary.loc[summary["size_final"] > 0, "cluster"].tolist())
    unkept = catalog.previously_kept_cluster_ids() - kept_now
    spec = drop_gone_clusters(spec, catalog.retired_cluster_ids(), source, unkept, level)
    try:
        check_groups(spec, summary, source)
    except InputError as exc:
        raise InputError(with_positions(str(exc), source)) from None
    clusters = sorted({c for group in spec.groups for c in group.clusters})
    selected = sinks.read_parquet(catalog.clusters_parquet, filters=[("cluster", "in", clusters)])
    kept = set(summary.loc[summary["size_final"] > 0, "cluster"].tolist())
    rescued = sorted({c for g in spec.groups if g.include_removed for c in g.clusters} - kept)
    if rescued:
        removed = sinks.read_parquet(catalog.postprocessed, filters=[("cluster", "in", rescued)])
        removed = removed[removed[schema.STATUS] != schema.STATUS_DUPLICATE]
        selected = pd.concat([selected, removed[list(selected.columns)]], ignore_index=True)
    refit = catalog.read_model_description().get("ids", {}).get("previous_model") is not None
    try:
        return assign_groups(spec, selected, source, refit=refit, level=level)
    except InputError as exc:
        raise InputError(with_positions(str(exc), source)) from None


#: Groups files whose re-fit warnings :func:`apply_groups` printed in this process, by
#: (path, contents, model fingerprint): the report that ``pipeline groups`` builds next
#: resolves the same file against the same model and logs them at debug level only, so
#: each gone cluster or object is one warning line.
_announced: set[tuple[str, str, str]] = set()


def _announcement(catalog: Catalog, source: str) -> tuple[str, str, str]:
    import hashlib

    try:
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    except OSError:
        digest = ""
    return str(Path(source).resolve()), digest, catalog.model_fingerprint()


def warning_level(catalog: Catalog, groups_file: str | Path) -> int:
    """``logging.DEBUG`` when :func:`apply_groups` already printed this file's re-fit
    warnings against this model in this process, else ``logging.WARNING``."""
    announced = _announcement(catalog, str(groups_file)) in _announced
    return logging.DEBUG if announced else logging.WARNING


def apply_groups(cfg: Config, groups_file: str | Path | None = None) -> GroupsResult:
    """Check the groups file and write ``ins_posts_groups.csv`` and ``.parquet`` (atomic).

    Parameters
    ----------
    groups_file : str or Path, default=None
        The reviewer's YAML; ``None`` uses ``report.groups_file``.
    """
    source = groups_file_of(cfg, groups_file)
    catalog = Catalog.from_config(cfg.output)
    table = resolve_groups(catalog, source)
    _announced.add(_announcement(catalog, source))
    csv_url, parquet_url = catalog.groups_csv, catalog.groups_parquet
    metadata = run_metadata(
        cfg, {"groups_file": source, "model_fingerprint": catalog.model_fingerprint()}
    )
    sinks.write_csv(table, csv_url, schema.GROUPS_CSV_FIELDS, schema.GROUPS_SCHEMA)
    sinks.write_parquet(
        table[[*schema.GROUPS_SCHEMA.names, schema.OBJECT_ID, schema.SOURCE_ROW]],
        parquet_url, schema.GROUPS_SCHEMA, metadata,
    )  # fmt: skip
    result = GroupsResult(table=table, csv=csv_url, parquet=parquet_url, source=source)
    log.info(
        "groups: %d objects in %d groups written to %s", len(table), len(result.counts()), csv_url
    )
    return result


def set_aside_stale(catalog: Catalog) -> str | None:
    """Move groups outputs made against another model (their ``model_fingerprint``
    differs from the current centres') to ``stale_groups/<fingerprint>/``, with a warning,
    so they are never read as groups of the new clustering. Returns the folder, if any."""
    import os

    from . import store

    if not store.is_local(catalog.groups_parquet) or not catalog.exists(catalog.groups_parquet):
        return None
    try:
        made_for = sinks.read_run_metadata(catalog.groups_parquet).get("model_fingerprint")
        current = catalog.model_fingerprint()
    except (PipelineError, OSError, ValueError):
        return None
    if made_for == current:
        return None
    folder = os.path.join(catalog.root, "stale_groups", str(made_for or "unknown"))
    os.makedirs(folder, exist_ok=True)
    for url in (catalog.groups_csv, catalog.groups_parquet):
        if os.path.exists(url):
            os.replace(url, os.path.join(folder, os.path.basename(url)))
    log.warning(
        "groups: %s and %s were made for model %s, not the current %s (the clustering "
        "changed); moved to %s. Check the groups file against the new report and run "
        "'pipeline groups' again.",
        catalog.groups_csv, catalog.groups_parquet, made_for or "unknown", current, folder,
    )  # fmt: skip
    return folder


def applied_groups_file(catalog: Catalog) -> str | None:
    """The groups file the last ``pipeline groups`` applied to this run (recorded in
    ``ins_posts_groups.parquet``), if it still exists: the report shows it when
    ``report.groups_file`` is not set, so a rebuild keeps the groups."""
    if not catalog.exists(catalog.groups_parquet):
        return None
    try:
        source = sinks.read_run_metadata(catalog.groups_parquet).get("groups_file")
    except (OSError, ValueError):
        return None
    return source if source and Path(source).is_file() else None
