"""Patches bqemulator 1.4.0: its Storage Write API runs beside its REST API,
and a write does not copy the whole table.

The emulator keeps one DuckDB connection. Its REST API uses it on the event
loop's thread; its Storage Write API's handlers run on grpc.aio's thread
pool and use it from there. Used at once, the two clobber each other's
results (a COUNT(*) answered with another query's rows, rows inserted
three times) and deadlock (every thread waiting; seen with py-spy). The
patch runs each write handler's DuckDB work on the event loop's thread,
as the REST API's runs, so the connection is used by one thread at a
time.

Also: grpc.aio runs those sync handlers on the event loop's default
executor (min(32, CPUs + 4) threads: 6 here), and a handler whose
connection is cut or whose client is killed stays blocked in its request
iterator for good. After six such streams, every new AppendRows waits for
a thread forever (seen: a test cutting connections five times). The patch
gives the loop an executor of 1,024 threads (made as needed), so a test
run's killed clients never use them up.

And two answers made Google's, which exactly-once bigquery-sink relies on
to learn that a stream it committed before (a lost reply, a crash) is
committed: BatchCommitWriteStreams on a committed stream answers
STREAM_ALREADY_COMMITTED (the emulator said INVALID_STREAM_STATE, which
Google uses for a stream that cannot be committed), and GetWriteStream of
a committed PENDING stream carries a commit_time (the time of the call:
the emulator does not keep when it was).

And every write (an insertAll request, an append, a load) made the
emulator copy the whole table into a snapshot kept seven days, for time
travel: memory grows with the square of the rows. `make bench`'s 600,000
emulator rows took it to 19.9 GB, DuckDB's default limit (80 % of this
machine's RAM), and a broker starved beside it stopped answering. Nothing
here reads a snapshot; the patch keeps the change event (it marks
materialized views stale) and drops the copy. Time travel (`FOR
SYSTEM_TIME AS OF`), the one reader of those copies, would then answer
with today's rows: the patch makes it fail with an error that says why.

Idempotent; run by scripts/stack.sh after installing the emulator, and
by deploy/bqemulator/Dockerfile (the compose stack's emulator).
"""

import pathlib
import sys

import bqemulator.grpc_api.write_servicer as servicer
import bqemulator.versioning.snapshots as snapshots
import bqemulator.versioning.time_travel as time_travel

# Bumped whenever the patch changes: an emulator patched by an older version
# must be reinstalled first (exit 3 says so; scripts/stack.sh does it).
MARK = "# movielog-stack patch v6"
ANY_VERSION = "# movielog-stack patch"

REPLACEMENTS = [
    (
        """        self._write_lock = RLock()
""",
        f"""        self._write_lock = RLock()
        {MARK}: DuckDB work runs on the event loop's thread.
        import asyncio as _asyncio

        try:
            self._movielog_loop = _asyncio.get_running_loop()
        except RuntimeError:
            self._movielog_loop = None
        if self._movielog_loop is not None:
            import concurrent.futures as _futures

            self._movielog_loop.set_default_executor(
                _futures.ThreadPoolExecutor(max_workers=1024, thread_name_prefix="bqemu-grpc")
            )

    def _movielog_on_loop(self, fn):
        import asyncio as _asyncio

        loop = self._movielog_loop
        if loop is None:
            raise RuntimeError("movielog-stack patch: the write handler was built outside the event loop")
        try:
            running = _asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            # Some unary calls reach the handler on the loop's own thread:
            # waiting there for the loop would never return.
            return fn()

        async def call():
            return fn()

        return _asyncio.run_coroutine_threadsafe(call(), loop).result()

    def _movielog_unary(self, handler):
        return lambda request, context: self._movielog_on_loop(lambda: handler(request, context))
""",
    ),
    (
        """            bound_ctx = self._ensure_stream_bound(
                request.write_stream,
                bound_ctx,
                context,
            )
""",
        """            bound_ctx = self._movielog_on_loop(
                lambda bound_ctx=bound_ctx: self._ensure_stream_bound(
                    request.write_stream, bound_ctx, context
                ),
            )
""",
    ),
    (
        """            yield self._perform_append(
                bound_stream,
                rows_table,
                offset,
                max_buffered_rows,
            )
""",
        """            yield self._movielog_on_loop(
                lambda: self._perform_append(bound_stream, rows_table, offset, max_buffered_rows),
            )
""",
    ),
]
REPLACEMENTS += [
    (
        """            if stream.state is not WriteStreamState.FINALIZED:
""",
        f"""            if stream.state is WriteStreamState.COMMITTED:  {MARK}: Google's answer
                stream_errors.append(
                    types.StorageError(
                        code=types.StorageError.StorageErrorCode.STREAM_ALREADY_COMMITTED,
                        entity=stream_name,
                        error_message=f"Stream already committed: {{stream_name}}",
                    )
                )
                continue
            if stream.state is not WriteStreamState.FINALIZED:
""",
    ),
    (
        """            create_time=_now_timestamp(),
            table_schema=_table_meta_to_proto_schema(table_meta) if table_meta else None,
""",
        """            create_time=_now_timestamp(),
            commit_time=_now_timestamp() if stream.state is WriteStreamState.COMMITTED else None,
            table_schema=_table_meta_to_proto_schema(table_meta) if table_meta else None,
""",
    ),
]
for name in [
    "_handle_create_write_stream",
    "_handle_get_write_stream",
    "_handle_finalize_write_stream",
    "_handle_flush_rows",
]:
    REPLACEMENTS.append(
        (
            f"grpc.unary_unary_rpc_method_handler(self.{name})",
            f"grpc.unary_unary_rpc_method_handler(self._movielog_unary(self.{name}))",
        )
    )
REPLACEMENTS.append(
    (
        """                self._handle_batch_commit_write_streams,
            )""",
        """                self._movielog_unary(self._handle_batch_commit_write_streams),
            )""",
    )
)

SNAPSHOT_REPLACEMENTS = [
    (
        """        meta = self.capture(project_id, dataset_id, table_id, kind="AUTO")
""",
        f"""        meta = None  {MARK}: no copy of the whole table per write
""",
    ),
]

TIME_TRAVEL_REPLACEMENTS = [
    (
        """        snap = snapshots.resolve_time_travel(
""",
        f"""        raise InvalidQueryError(  {MARK}
            "FOR SYSTEM_TIME AS OF: this emulator keeps no table history "
            "(deploy/bqemulator/patch_bqemulator.py removed it)"
        )
        snap = snapshots.resolve_time_travel(
""",
    ),
]


def patch(module, replacements):
    """Applies `replacements` to `module`'s file, once."""
    path = pathlib.Path(module.__file__)
    text = path.read_text()
    if MARK in text:
        return
    if ANY_VERSION in text:
        print(f"{path}: patched by an older version of this script; reinstall bqemulator", file=sys.stderr)
        sys.exit(3)
    for old, new in replacements:
        if text.count(old) != 1:
            sys.exit(f"{path}: the code to patch is not there (another bqemulator version?):\n{old}")
        text = text.replace(old, new)
    path.write_text(text)
    print(f"patched {path}")


patch(servicer, REPLACEMENTS)
patch(snapshots, SNAPSHOT_REPLACEMENTS)
patch(time_travel, TIME_TRAVEL_REPLACEMENTS)
