"""Batch on Ray Data: a processor that maps a Dataset's rows through K gridserve grids, an actor pool.

Each pool actor owns one `Replica` (its own placement group, as the batch job's grids). A row is read as a batch
line (`deployments.batch_io`): `prompt`, `prompt_token_ids` or `messages`, plus any sampling field; other columns
pass through. A row that cannot run gets an `error` value and the others go on; Ray Data streams the rows, shows
progress and applies backpressure.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from cluster.config import GridServeConfig
from cluster.generate import failed
from cluster.request import Limits, Result, SamplingOptions
from deployments.batch import seats
from deployments.batch_io import BatchLine, line_request, validate_line

if TYPE_CHECKING:
    import pyarrow as pa  # type: ignore[import-untyped]  # no type information shipped
    from ray.data import Dataset

    from cluster.replica import Replica

# Columns read as the row's request; `id` and any other column pass through untouched (a Ray Data row often
# carries keys and metadata of its own).
REQUEST_COLUMNS = frozenset(BatchLine.model_fields) - {"id"}
SAMPLING_FIELDS = frozenset(SamplingOptions.model_fields)
OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "num_input_tokens", "num_generated_tokens",
                  "finish_reason", "error")


def build_processor(config: GridServeConfig | dict[str, Any], grids: int = 1, batch_size: int | None = None,
                    sampling: dict[str, Any] | None = None) -> Callable[[Dataset], Dataset]:
    """A `ds -> ds` step that generates for every row over `grids` grids (an actor pool of that size).

    `config`: the grid, as `ray_config.yaml` args; `batch_size`: rows per Ray Data batch (default: what one grid
    holds at a time); `sampling`: defaults for the sampling fields a row leaves unset (e.g. temperature)."""
    cfg = config if isinstance(config, GridServeConfig) else GridServeConfig.from_args(config)
    if grids < 1:
        raise ValueError(f"grids={grids}: expected at least 1 (the actor pool's size)")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected at least 1 row, or None for the default")
    defaults = dict(sampling or {})
    unknown = sorted(set(defaults) - SAMPLING_FIELDS)
    if unknown:
        raise ValueError(f"sampling: unknown fields {unknown}; expected some of {sorted(SAMPLING_FIELDS)}")
    validate_line({**defaults, "prompt_token_ids": [0]})  # a bad default fails here, not once per row
    rows_per_batch = batch_size or seats(cfg)

    def process(ds: Dataset) -> Dataset:
        """Rows of `ds` with the output columns added."""
        from ray.data import ActorPoolStrategy

        return ds.map_batches(GridMapper, fn_constructor_args=(cfg, defaults), batch_size=rows_per_batch,
                              batch_format="pyarrow", compute=ActorPoolStrategy(size=grids),
                              num_cpus=cfg.replica_cpus)

    return process


class GridMapper:
    """One pool actor: a Replica, and the coroutine Ray Data calls per batch (several batches in flight at once)."""

    def __init__(self, cfg: GridServeConfig, defaults: dict[str, Any]) -> None:
        import ray

        from cluster.replica import Replica

        actor = ray.get_runtime_context().get_actor_id() or "driver"
        self.replica: Replica = Replica(cfg, f"ray-data-{actor[-8:]}")
        rcfg = self.replica.cfg  # max_model_len as this grid's KV cache fits it
        assert rcfg.max_model_len is not None, "GridServeConfig's validator fills max_model_len"
        self.limits = Limits(rcfg.max_model_len, rcfg.max_model_len, self.replica.spec.vocab_size)
        self.defaults = defaults
        # Rows handed to the replica at once, across batches: its batch and a queue behind it, never more than
        # its waiting queue takes (beyond that it would refuse rows as overloaded).
        self.seats = asyncio.Semaphore(seats(rcfg))

    async def __call__(self, batch: pa.Table) -> AsyncIterator[pa.Table]:
        """The batch with the output columns added, once every row finished."""
        rows = batch.to_pylist()
        results = await asyncio.gather(*(self.row(n, row) for n, row in enumerate(rows)))
        yield with_outputs(batch, results)

    async def row(self, n: int, row: dict[str, Any]) -> Result:
        """One row's generation, or a failed Result that says why."""
        fields = {k: v for k, v in row.items() if k in REQUEST_COLUMNS and v is not None}  # null = not set
        try:
            ids, params = line_request(validate_line({**self.defaults, **fields}), self.replica.tokenizer,
                                       self.limits)
        except Exception as exc:  # whatever a row holds (a template error too), it fails alone
            return failed(n, [], str(exc))
        async with self.seats:
            if not await self.replica.ready():  # a failed grid is rebuilt first; this one's rebuild failed
                return failed(n, ids, f"this actor's grid failed and could not be rebuilt "
                                      f"({self.replica.failure()}); rerun the rows whose error says so")
            return await self.replica.complete(n, ids, params)

    def __del__(self) -> None:
        """Stop the grid and free its placement group if Ray Data retires this actor gracefully."""
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.shutdown()


def with_outputs(batch: pa.Table, results: list[Result]) -> pa.Table:
    """`batch` with one output column per name in OUTPUT_COLUMNS (replacing input columns of those names)."""
    import pyarrow as pa  # type: ignore[import-untyped]  # no type information shipped

    def ok(value: Callable[[Result], Any]) -> list[Any]:
        return [None if r.error is not None else value(r) for r in results]

    columns = {"generated_text": (pa.string(), ok(lambda r: r.text)),
               "generated_token_ids": (pa.list_(pa.int64()), ok(lambda r: r.token_ids)),
               "num_input_tokens": (pa.int64(), ok(lambda r: len(r.prompt_ids))),
               "num_generated_tokens": (pa.int64(), ok(lambda r: len(r.token_ids))),
               "finish_reason": (pa.string(), ok(lambda r: r.finish_reason)),
               "error": (pa.string(), [r.error for r in results])}
    batch = batch.drop_columns([name for name in OUTPUT_COLUMNS if name in batch.column_names])
    for name in OUTPUT_COLUMNS:
        kind, values = columns[name]
        batch = batch.append_column(name, pa.array(values, type=kind))
    return batch
