"""The reviewer's groups: clusters picked from the report and combined for display.

A small YAML file names each group and its clusters, and optionally objects to leave out::

    groups:
      - name: shoes
        clusters: [3, 17]
        exclude_objects: [1234]      # object_id, as shown on the report's cluster pages
      - name: bags
        clusters: [42]

It is checked against the run once, at the edge (:func:`check_groups`): every cluster must
be a kept cluster of the run, a cluster belongs to at most one group, names are unique and
no group is empty. Each problem is a one-line :class:`~pipeline.errors.InputError` naming
the file and the key. :func:`apply_groups` then writes ``ins_posts_groups.csv`` and
``.parquet``: the selected objects (rows of ``ins_posts_clusters``) of every group, with a
``group`` column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from . import schema, sinks
from .catalog import Catalog, run_metadata
from .config import Config, _format_validation_error, read_yaml_mapping
from .errors import ConfigError, InputError, MissingInputError, StageOrderError

log = logging.getLogger("pipeline")


class GroupSpec(BaseModel):
    """One group: a display name and the clusters it combines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    clusters: list[int]
    exclude_objects: list[int] = []
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
        raise InputError(_format_validation_error(exc, source)) from None


def drop_gone_clusters(
    spec: GroupsSpec, gone: set[int], source: str = "<groups>", unkept: set[int] = frozenset()
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
            log.warning("%s: cluster %d of group %r (groups.%d) %s; dropped from the group.",
                        source, cluster, group.name, i, why)  # fmt: skip
        left = [c for c in group.clusters if c not in dropped]
        if left:
            groups.append(group.model_copy(update={"clusters": left}))
        else:
            log.warning(
                "%s: group %r (groups.%d) has no cluster left; dropped.", source, group.name, i
            )
    return GroupsSpec(groups=groups)


def check_groups(spec: GroupsSpec, summary: pd.DataFrame, source: str = "<groups>") -> None:
    """Check ``spec`` against the run's cluster summary; raise on the first problem.

    Each group needs a unique non-empty name and at least one cluster; each cluster must be
    kept by post-processing (``size_final > 0``) and belong to one group only.

    >>> summary = pd.DataFrame({"cluster": [0, 1, 2], "size": [5, 4, 3],
    ...                         "size_final": [5, 0, 3]})
    >>> check_groups(GroupsSpec(groups=[{"name": "a", "clusters": [0, 2]}]), summary)
    >>> check_groups(GroupsSpec(groups=[{"name": "a", "clusters": [1]}]), summary)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    pipeline.errors.InputError: <groups>: key 'groups.0.clusters' (group 'a') must name ...
    """
    if not spec.groups:
        raise InputError(f"{source}: key 'groups' must list at least one group. Got [] instead.")
    sizes = summary.set_index("cluster")
    kept = set(sizes.index[sizes["size_final"] > 0].tolist())
    names: dict[str, int] = {}
    owner: dict[int, tuple[int, str]] = {}
    for i, group in enumerate(spec.groups):
        key = f"groups.{i}"
        if not group.name.strip():
            raise InputError(
                f"{source}: key '{key}.name' must be a non-empty name. Got {group.name!r} instead."
            )
        if group.name in names:
            raise InputError(
                f"{source}: key '{key}.name' must be unique. Got {group.name!r} instead, "
                f"already the name of groups.{names[group.name]}."
            )
        names[group.name] = i
        label = f"{source}: key '{key}.clusters' (group {group.name!r})"
        if not group.clusters:
            raise InputError(f"{label} must list at least one cluster. Got [] instead.")
        for cluster in group.clusters:
            if cluster not in kept:
                if cluster not in sizes.index:
                    why = "no such cluster in the run"
                elif sizes.at[cluster, "size"] > 0:
                    why = "removed by post-processing"
                else:
                    why = "an empty cluster"
                raise InputError(
                    f"{label} must name kept clusters of the run. Got {cluster} instead ({why}). "
                    "Pick ids from the report's cluster index."
                )
            if cluster in owner:
                j, other = owner[cluster]
                where = "listed twice" if j == i else f"already in group {other!r} (groups.{j})"
                raise InputError(
                    f"{label} must not repeat a cluster. Got {cluster} instead, {where}."
                )
            owner[cluster] = (i, group.name)


def assign_groups(
    spec: GroupsSpec, selected: pd.DataFrame, source: str = "<groups>"
) -> pd.DataFrame:
    """The selected objects of every group with a ``group`` column (pure).

    ``selected`` holds rows of ``ins_posts_clusters`` (with ``object_id``); ``spec`` must
    have passed :func:`check_groups`. Rows come in file order of the groups, then by
    cluster, descending ``sim`` and ``object_id``.

    Raises
    ------
    InputError
        An excluded object is not a selected object of its group's clusters, or the
        exclusions leave a group empty.
    """
    parts = []
    for i, group in enumerate(spec.groups):
        members = selected[selected["cluster"].isin(group.clusters)]
        excluded = set(group.exclude_objects)
        unknown = sorted(excluded - set(members[schema.OBJECT_ID].tolist()))
        label = f"{source}: key 'groups.{i}.exclude_objects' (group {group.name!r})"
        if unknown:
            raise InputError(
                f"{label} must name selected objects of the group's clusters "
                f"{group.clusters}. Got {unknown[0]} instead."
            )
        members = members[~members[schema.OBJECT_ID].isin(excluded)]
        if members.empty:
            raise InputError(
                f"{label} must leave at least one object. Got all {len(excluded)} objects excluded."
            )
        order = members.sort_values(
            ["cluster", "sim", schema.OBJECT_ID], ascending=[True, False, True]
        )
        parts.append(order.assign(**{schema.GROUP: group.name}))
    return pd.concat(parts, ignore_index=True)


def resolve_groups(catalog: Catalog, groups_file: str | Path) -> pd.DataFrame:
    """Load, check and assign the groups of ``groups_file`` against the run (no writes)."""
    source = str(groups_file)
    spec = load_groups(source)
    if not catalog.exists(catalog.cluster_summary):
        raise StageOrderError(
            f"Groups need the outputs of 'postprocess', which has not completed in "
            f"{catalog.root}. Run 'pipeline run' first."
        )
    summary = sinks.read_parquet(catalog.cluster_summary, columns=["cluster", "size", "size_final"])
    kept_now = set(summary.loc[summary["size_final"] > 0, "cluster"].tolist())
    unkept = catalog.previously_kept_cluster_ids() - kept_now
    spec = drop_gone_clusters(spec, catalog.retired_cluster_ids(), source, unkept)
    check_groups(spec, summary, source)
    clusters = sorted({c for group in spec.groups for c in group.clusters})
    selected = sinks.read_parquet(catalog.clusters_parquet, filters=[("cluster", "in", clusters)])
    return assign_groups(spec, selected, source)


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
