"""Typed, frozen configuration: one pydantic model per ``config.yaml`` section.

Constraints live in the field types, so a bad value is rejected once, at load time, with
the YAML key path in the message. Derived values (the effective number of clusters, the
batch size actually used) are computed in :mod:`pipeline.plan`, never written back here.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator

from .errors import ConfigError, MissingInputError, clip


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputConfig(_Section):
    """Where the objects table, the embeddings and (optionally) the images live."""

    objects_csv: str = "data/demo/ins_posts_object_tags_cleaned.csv"
    embeddings_root: str = "data/demo/ins_posts"
    embeddings_template: str = "{username}/embeddings/{image_name}.npy"
    embeddings_matrix: str | None = None
    images_root: str | None = "data/demo/images"
    image_template: str = "{username}/{image_name}.jpg"

    @field_validator("embeddings_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        allowed = {"username", "image_name", "batch_folder", "res_name"}
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(value) if name}
        except ValueError as exc:
            raise ValueError(f"is not a valid format template ({exc})") from None
        unknown = fields - allowed
        if unknown:
            raise ValueError(f"may only use the fields {sorted(allowed)}; got {sorted(unknown)}")
        return value


class SelectConfig(_Section):
    """Which objects of the CSV are clustered (the write-up's 'selected objects')."""

    tags: list[str] | None = None
    exclude_tags: list[str] = []
    min_score: float = Field(0.0, ge=0.0, le=1.0)


class IngestConfig(_Section):
    """How embeddings are checked and laid out on disk."""

    dim: PositiveInt | None = None
    chunk_rows: PositiveInt = 8192
    compression: Literal["none", "lz4", "zstd"] = "none"
    on_bad_object: Literal["reject", "fail"] = "reject"
    on_bad_bbox: Literal["keep", "reject"] = "keep"
    keep_memmap: bool = False
    shuffle_seed: int | None = None
    fingerprint: Literal["stat", "content"] = "stat"
    #: Read the embedding files and write the store chunks on the dask workers (a
    #: distributed scheduler only): ``auto`` does so whenever the executor has workers.
    on_workers: bool | Literal["auto"] = "auto"


class TrainConfig(_Section):
    """Mini-batch k-means over the shuffled store: Euclidean (``MiniBatchKMeans.partial_fit``)
    or spherical (``metric: cosine``, rows and centres on the unit sphere)."""

    metric: Literal["euclidean", "cosine"] = "cosine"
    n_clusters: PositiveInt | Literal["auto"] = 600
    target_cluster_size: PositiveInt = 100
    batch_size: PositiveInt = 8192
    epochs: PositiveInt = 1
    init_size: PositiveInt | None = None
    init_projection_dim: PositiveInt | None = 256
    refine_iterations: Annotated[int, Field(ge=0)] | None = None
    strategy: Literal["sequential", "parallel"] = "sequential"
    sample_blocks: PositiveInt | None = None
    reassignment_ratio: float = Field(0.0, ge=0.0, le=1.0)
    reseed_min_members: Annotated[int, Field(ge=0)] = 2
    sink_split: bool = True
    seed: int = 0
    blas_threads: PositiveInt | None = None
    #: A model folder whose cluster ids the new fit keeps (``None``: the output folder's
    #: model, when there is one); see :mod:`pipeline.ids`.
    previous_model: str | None = None
    #: Keep the previous model's cluster ids for centres that match it (else number 0..k-1).
    keep_ids: bool = True


class PostprocessConfig(_Section):
    """The write-up's three post-processing steps, in order."""

    dedupe_key: str | None = "image_name"
    min_similarity: float = Field(0.7, ge=-1.0, le=1.0)
    min_cluster_size: PositiveInt = 10


class OutputConfig(_Section):
    """Where outputs go; ``dir`` may be a local path or an fsspec URL."""

    dir: str = "out/demo"
    staging_dir: str | None = None
    csv_name: str = "ins_posts_clusters.csv"

    @field_validator("csv_name")
    @classmethod
    def _plain_csv_name(cls, value: str) -> str:
        if (
            "/" in value or "\\" in value or "\0" in value
            or value.startswith(".") or not value.endswith(".csv") or len(value) <= 4
        ):  # fmt: skip
            raise ValueError("must be a plain file name ending in .csv (no folders)")
        return value


class ReportConfig(_Section):
    """The summary tables and the HTML review report."""

    top_n: PositiveInt = 10
    samples_per_cluster: PositiveInt = 8
    thumbnail_px: PositiveInt = 96
    groups_file: str | None = None


class ExecutorConfig(_Section):
    """Where the dask work runs; the only section :mod:`pipeline.executor` reads."""

    scheduler: str = "threads"
    n_workers: PositiveInt | None = None
    threads_per_worker: PositiveInt | None = None
    connect_timeout_s: float = Field(10.0, gt=0)
    #: Distributed schedulers: stop with one line when no task finishes for this long.
    stall_timeout_s: float | None = Field(900.0, gt=0)
    progress: bool = True

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        known = {"threads", "synchronous", "processes", "local-cluster"}
        if value in known or "://" in value or ":" in value:
            return value
        raise ValueError(
            f"must be one of {sorted(known)} or a scheduler address like tcp://host:8786"
        )


class Config(_Section):
    """The whole run configuration, mirroring ``config.yaml``."""

    input: InputConfig = InputConfig()
    select: SelectConfig = SelectConfig()
    ingest: IngestConfig = IngestConfig()
    train: TrainConfig = TrainConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    output: OutputConfig = OutputConfig()
    report: ReportConfig = ReportConfig()
    executor: ExecutorConfig = ExecutorConfig()


def _format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad key; a union's alternatives are merged into one line."""
    problems: dict[str, list[str]] = {}
    values: dict[str, object] = {}
    for err in exc.errors():
        # Union members add tags such as 'constrained-int' to the location: drop them.
        parts = [str(p) for p in err["loc"] if isinstance(p, int) or str(p).isidentifier()]
        key = ".".join(parts) or "<root>"
        if err["type"] == "extra_forbidden":
            problems.setdefault(key, []).append("unknown")
        else:
            problems.setdefault(key, []).append(err["msg"])
            values[key] = err.get("input")
    lines = []
    for key, messages in problems.items():
        if messages == ["unknown"]:
            lines.append(f"{source}: unknown key '{key}'. Remove it or check its spelling.")
        else:
            detail = " or ".join(dict.fromkeys(messages))
            lines.append(
                f"{source}: key '{key}': {detail}. Got {clip(repr(values.get(key)), 200)}."
            )
    return "\n".join(lines)


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors' aliases: a config or groups file never
    needs them, and nested aliases expand exponentially (a "billion laughs" file)."""

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed; write the value out", mark
            )
        return super().compose_node(parent, index)


def read_yaml_mapping(
    path: Path, source: str, error: type[Exception], expected: str
) -> dict[str, Any] | None:
    """Parse a YAML file whose top level must be a mapping (``None`` for an empty file).

    Raises ``error`` with one line naming ``source`` for bad YAML or another top level.
    """
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{source}: not valid YAML ({first}).") from None
    if data is not None and not isinstance(data, dict):
        raise error(
            f"{source}: the top level must be {expected}. Got {type(data).__name__} instead."
        )
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``section.key=value`` override; the value is read as YAML.

    >>> parse_override("train.n_clusters=50")
    (['train', 'n_clusters'], 50)
    """
    if "=" not in text:
        raise ConfigError(f"Override {text!r} must look like section.key=value.")
    key, raw = text.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_NoAliasLoader) if raw else None  # noqa: S506
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Override key '{'.'.join(path)}': '{part}' is not a section.")
        node = child
    node[path[-1]] = value


#: Config keys holding a file or folder: relative values are resolved when loading.
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("input", "objects_csv"), ("input", "embeddings_root"), ("input", "embeddings_matrix"),
    ("input", "images_root"), ("output", "dir"), ("output", "staging_dir"),
    ("report", "groups_file"), ("train", "previous_model"),
)  # fmt: skip


def resolve_path(value: Any, base: Path) -> Any:
    """``value`` made absolute against ``base`` when it is a relative local path; URLs,
    absolute paths, ``None`` and non-strings are returned unchanged.

    >>> resolve_path("data/x.csv", Path("/cfg")), resolve_path("s3://b/k", Path("/cfg"))
    ('/cfg/data/x.csv', 's3://b/k')
    """
    if not isinstance(value, str) or not value or "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)


def _resolve_paths(data: dict, base: Path, only_present: bool) -> None:
    """Resolve the path keys of ``data`` in place (defaults too, unless ``only_present``)."""
    for section, key in PATH_KEYS:
        values = data.get(section)
        if values is None and only_present:
            continue
        if values is None:
            values = data[section] = {}
        if not isinstance(values, dict):
            continue  # validation reports it
        if key in values:
            values[key] = resolve_path(values[key], base)
        elif not only_present:
            default = getattr(Config.model_fields[section].default, key)
            values[key] = resolve_path(default, base)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load, override and validate the configuration once.

    Relative paths in the file (and its defaults) are resolved against the file's folder,
    so a config works from any working directory; paths given as overrides, against the
    working directory, as the shell would.

    Parameters
    ----------
    path : str or Path, default=None
        YAML file; ``None`` uses the built-in defaults (relative to the working directory).
    overrides : list of str, default=None
        ``section.key=value`` strings applied on top of the file.
    """
    source = str(path) if path is not None else "<defaults>"
    data: Any = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise MissingInputError(
                f"Config file {p.absolute()} does not exist. Pass an existing YAML file."
            )
        data = read_yaml_mapping(p, source, ConfigError, "a mapping of sections") or {}
        base = p.absolute().parent
    _resolve_paths(data, base, only_present=False)
    cwd = Path.cwd()
    for text in overrides or []:
        key_path, value = parse_override(text)
        if tuple(key_path) in PATH_KEYS:
            value = resolve_path(value, cwd)
        _apply_override(data, key_path, value)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
