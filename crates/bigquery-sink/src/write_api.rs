//! The Storage Write API's transport: the gRPC channel (TLS to Google, or
//! plain to an emulator), an OAuth token on every call, the `AppendRows`
//! connection on which a write stream's appends are pipelined (the one
//! long-lived connection of a service instance to the table's `_default`
//! stream, or one per batch to its PENDING stream), and the calls that
//! create, finalize and commit PENDING streams.
//!
//! [`AppendStream::append`] queues one request and waits for its reply.
//! A single task owns the bidirectional stream: it sends requests as they
//! come, without waiting for earlier replies, and hands each reply to its
//! request in order (the API answers a stream's requests in order). When
//! the stream fails, every request waiting on it gets the error (their rows
//! may or may not be stored: the caller sends them again, and the
//! de-duplicated view absorbs a repeat); the next append opens a new stream
//! with a fresh token. A stream is also replaced, between requests, once it
//! is [`MAX_STREAM_AGE`] old, so no stream outlives the token it was opened
//! with.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use gcp_bigquery_client::auth::Authenticator;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_request::{
    ProtoData, Rows,
};
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_response::Response;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::big_query_write_client::BigQueryWriteClient;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::{
    storage_error, write_stream, AppendRowsRequest, AppendRowsResponse,
    BatchCommitWriteStreamsRequest, BatchCommitWriteStreamsResponse, CreateWriteStreamRequest,
    FinalizeWriteStreamRequest, GetWriteStreamRequest, ProtoRows, ProtoSchema, WriteStream,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::config::Target;
use crate::error::{self, describe, describe_status, Class};
use crate::proto;

/// Google's Storage Write API endpoint.
pub const GOOGLE_ENDPOINT: &str = "https://bigquerystorage.googleapis.com";

/// Largest message either way: an append request is at most 10 MB.
const MAX_MESSAGE_BYTES: usize = 20 * 1024 * 1024;

/// Connecting the channel: past this, the append fails and is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A stream older than this is replaced before its next request (Google's
/// access tokens live an hour; the server also closes streams on its own).
pub const MAX_STREAM_AGE: Duration = Duration::from_secs(10 * 60);

/// Requests queued for the stream's task, beyond which `append` waits.
const QUEUE: usize = 64;

/// A channel to `endpoint` (Google's when `None`): TLS with the webpki
/// roots for `https://`, plain for `http://` (an emulator). Connects on
/// first use, so an unreachable endpoint fails appends (retried), not the
/// start.
///
/// # Errors
///
/// An endpoint that is not an http(s) URL.
pub fn channel(endpoint: Option<&str>) -> anyhow::Result<Channel> {
    let url = endpoint.unwrap_or(GOOGLE_ENDPOINT);
    let mut endpoint = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("{url:?} is not a gRPC endpoint URL"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .user_agent(concat!("bigquery-sink/", env!("CARGO_PKG_VERSION")))
        .context("user agent")?;
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().with_webpki_roots())
            .context("TLS settings of the Storage Write API channel")?;
    }
    Ok(endpoint.connect_lazy())
}

/// The generated client over `channel`, with message limits the API's
/// request limit fits in.
pub fn client(channel: Channel) -> BigQueryWriteClient<Channel> {
    BigQueryWriteClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// `message` as a request carrying a fresh token and the routing header
/// Google's front end wants for `stream`.
///
/// # Errors
///
/// `UNAUTHENTICATED` when no token could be had (with why).
pub async fn authorized<T>(
    auth: &dyn Authenticator,
    stream: &str,
    message: T,
) -> Result<Request<T>, Status> {
    let token = auth.access_token().await.map_err(|err| {
        let message = format!("no OAuth token for BigQuery: {}", describe(&err));
        // As for insertAll: an unreachable token endpoint passes on its
        // own, refused credentials need an operator.
        match error::class(&err) {
            Class::Transient(_) => Status::unavailable(message),
            _ => Status::unauthenticated(message),
        }
    })?;
    let mut request = Request::new(message);
    let metadata = request.metadata_mut();
    let bearer = MetadataValue::try_from(format!("Bearer {token}"))
        .map_err(|_| Status::unauthenticated("the OAuth token is not a valid header value"))?;
    metadata.insert("authorization", bearer);
    if let Ok(params) = MetadataValue::try_from(format!("write_stream={stream}")) {
        metadata.insert("x-goog-request-params", params);
    }
    Ok(request)
}

/// `projects/P/datasets/D/tables/T`, as the Storage Write API names it.
pub fn table_path(target: &Target) -> String {
    format!(
        "projects/{}/datasets/{}/tables/{}",
        target.project, target.dataset, target.table
    )
}

/// `projects/P/datasets/D/tables/T/streams/_default`.
pub fn default_stream_name(target: &Target) -> String {
    format!("{}/streams/_default", table_path(target))
}

/// Creates a PENDING stream on the table: what is appended to it becomes
/// visible, all at once, when it is committed. Returns its name.
///
/// # Errors
///
/// The API's status.
pub async fn create_pending(
    client: &BigQueryWriteClient<Channel>,
    auth: &dyn Authenticator,
    target: &Target,
    timeout: Duration,
) -> Result<String, Status> {
    let table = table_path(target);
    let message = CreateWriteStreamRequest {
        parent: table.clone(),
        write_stream: Some(WriteStream {
            r#type: write_stream::Type::Pending as i32,
            ..WriteStream::default()
        }),
    };
    let mut request = authorized_on(auth, "parent", &table, message).await?;
    request.set_timeout(timeout);
    let stream = client
        .clone()
        .create_write_stream(request)
        .await?
        .into_inner();
    if stream.name.is_empty() {
        return Err(Status::internal(
            "CreateWriteStream answered a stream without a name",
        ));
    }
    Ok(stream.name)
}

/// Finalizes a stream: nothing more can be appended, and it may be committed.
///
/// # Errors
///
/// The API's status.
pub async fn finalize(
    client: &BigQueryWriteClient<Channel>,
    auth: &dyn Authenticator,
    stream: &str,
    timeout: Duration,
) -> Result<(), Status> {
    let message = FinalizeWriteStreamRequest {
        name: stream.to_owned(),
    };
    let mut request = authorized_on(auth, "name", stream, message).await?;
    request.set_timeout(timeout);
    client.clone().finalize_write_stream(request).await?;
    Ok(())
}

/// What committing a PENDING stream found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Commit {
    /// Its rows are in the table: committed now, or before.
    Visible,
    /// Its rows will never be: the stream is gone (or was never finalized).
    Gone(String),
    /// The API refused for another reason (the table, permissions).
    Refused(String),
}

/// Commits a finalized PENDING stream, or finds out it was committed before
/// (a retry after a lost reply, a new owner finishing the last one's write).
///
/// # Errors
///
/// The API's status.
pub async fn commit(
    client: &BigQueryWriteClient<Channel>,
    auth: &dyn Authenticator,
    target: &Target,
    stream: &str,
    timeout: Duration,
) -> Result<Commit, Status> {
    // The stream's own table: a stream recorded before the sink was
    // pointed at another table is committed where it was written.
    let table = stream
        .rsplit_once("/streams/")
        .map_or_else(|| table_path(target), |(table, _)| table.to_owned());
    let message = BatchCommitWriteStreamsRequest {
        parent: table.clone(),
        write_streams: vec![stream.to_owned()],
    };
    let mut request = authorized_on(auth, "parent", &table, message).await?;
    request.set_timeout(timeout);
    let found = match client.clone().batch_commit_write_streams(request).await {
        Ok(response) => sort_commit(response.get_ref()),
        // Said of the call rather than of the stream (in `stream_errors`):
        // the stream itself says below whether it was committed.
        Err(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition
            ) =>
        {
            Commit::Gone(describe_status(&status))
        }
        Err(status) => return Err(status),
    };
    if !matches!(found, Commit::Gone(_)) {
        return Ok(found);
    }
    // Not committable: committed long ago, or gone. Google says which with
    // the stream's commit time.
    let message = GetWriteStreamRequest {
        name: stream.to_owned(),
        ..GetWriteStreamRequest::default()
    };
    let mut request = authorized_on(auth, "name", stream, message).await?;
    request.set_timeout(timeout);
    match client.clone().get_write_stream(request).await {
        Ok(got) if got.get_ref().commit_time.is_some() => Ok(Commit::Visible),
        Ok(_) => Ok(found),
        Err(status) if status.code() == tonic::Code::NotFound => Ok(found),
        Err(status) => Err(status),
    }
}

/// Sorts a `BatchCommitWriteStreams` reply for one stream.
pub fn sort_commit(response: &BatchCommitWriteStreamsResponse) -> Commit {
    use storage_error::StorageErrorCode as Code;
    let Some(error) = response.stream_errors.first() else {
        return if response.commit_time.is_some() {
            Commit::Visible
        } else {
            Commit::Refused(
                "BatchCommitWriteStreams answered neither a commit time nor an error".into(),
            )
        };
    };
    let why = format!(
        "{}: {}",
        Code::try_from(error.code).map_or("unknown", |c| c.as_str_name()),
        error.error_message
    );
    match Code::try_from(error.code) {
        Ok(Code::StreamAlreadyCommitted) => Commit::Visible,
        Ok(Code::StreamNotFound | Code::InvalidStreamState) => Commit::Gone(why),
        _ => Commit::Refused(why),
    }
}

/// `message` as a request with a fresh token, routed by `key=value`.
async fn authorized_on<T>(
    auth: &dyn Authenticator,
    key: &str,
    value: &str,
    message: T,
) -> Result<Request<T>, Status> {
    let mut request = authorized(auth, "", message).await?;
    if let Ok(params) = MetadataValue::try_from(format!("{key}={value}")) {
        request
            .metadata_mut()
            .insert("x-goog-request-params", params);
    }
    Ok(request)
}

/// What the task needs to open a stream.
struct Opener {
    client: BigQueryWriteClient<Channel>,
    auth: Arc<dyn Authenticator>,
    stream: String,
    timeout: Duration,
}

/// One append waiting for the task.
struct Queued {
    rows: Vec<Vec<u8>>,
    reply: oneshot::Sender<Result<AppendRowsResponse, Status>>,
}

/// A write stream's appends: the table's `_default` stream, shared by
/// every write of the instance, or a batch's PENDING stream. The task
/// owning the connection stops when the last clone is dropped.
#[derive(Clone)]
pub struct AppendStream {
    queue: mpsc::Sender<Queued>,
}

impl AppendStream {
    /// Starts the task owning the connection to write stream `stream`
    /// (opened at the first append). A reply not back within `timeout`
    /// fails its append and every later one on that connection, which is
    /// then replaced.
    pub fn start(
        client: BigQueryWriteClient<Channel>,
        auth: Arc<dyn Authenticator>,
        stream: String,
        timeout: Duration,
    ) -> Self {
        let (queue, incoming) = mpsc::channel(QUEUE);
        let opener = Opener {
            client,
            auth,
            stream,
            timeout,
        };
        tokio::spawn(run(opener, incoming));
        Self { queue }
    }

    /// Appends `rows` (serialized by [`proto::write`]) and waits for the
    /// reply: `Ok` with the API's response (which may carry an error for
    /// the rows), or the status that ended the stream.
    ///
    /// # Errors
    ///
    /// The stream failed or was closed before the reply came; the rows may
    /// or may not be stored.
    pub async fn append(&self, rows: Vec<Vec<u8>>) -> Result<AppendRowsResponse, Status> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Queued { rows, reply })
            .await
            .map_err(|_| Status::unavailable("the append stream's task has stopped"))?;
        answer
            .await
            .map_err(|_| Status::unavailable("the append stream's task has stopped"))?
    }
}

async fn run(opener: Opener, mut incoming: mpsc::Receiver<Queued>) {
    while let Some(first) = incoming.recv().await {
        serve_one_stream(&opener, first, &mut incoming).await;
    }
}

/// Opens a stream with `first`, pipelines what comes next on it, and
/// returns when it fails, closes or ages out.
async fn serve_one_stream(opener: &Opener, first: Queued, incoming: &mut mpsc::Receiver<Queued>) {
    let (requests, outgoing) = mpsc::unbounded_channel();
    let request = match authorized(
        opener.auth.as_ref(),
        &opener.stream,
        tokio_stream::wrappers::UnboundedReceiverStream::new(outgoing),
    )
    .await
    {
        Ok(request) => request,
        Err(status) => {
            let _ = first.reply.send(Err(status));
            return;
        }
    };
    let opened = Instant::now();
    metrics::counter!(sink_core::metrics::APPEND_STREAMS).increment(1);
    tracing::debug!(stream = %opener.stream, "opening an append stream");
    let mut waiting: VecDeque<(Instant, oneshot::Sender<_>)> = VecDeque::new();
    // When the stream last answered: a request behind others is overdue
    // only once the stream has made no progress for the timeout.
    let mut answered = Instant::now();
    let mut with_schema = true;
    let mut send = |queued: Queued, waiting: &mut VecDeque<_>| {
        let _ = requests.send(append_request(&opener.stream, queued.rows, with_schema));
        with_schema = false;
        waiting.push_back((Instant::now(), queued.reply));
    };
    send(first, &mut waiting);

    let mut client = opener.client.clone();
    let call = client.append_rows(request);
    tokio::pin!(call);
    // The call resolves when the server answers the first request; later
    // ones are sent meanwhile.
    let opened_call = loop {
        tokio::select! {
            result = &mut call => break result,
            Some(queued) = incoming.recv() => send(queued, &mut waiting),
            () = overdue(&waiting, answered, opener.timeout) => break Err(no_reply(opener.timeout)),
        }
    };
    let mut replies = match opened_call {
        Ok(response) => response.into_inner(),
        Err(status) => return fail_all(waiting, &status),
    };
    // No new request goes on a retiring stream; it ends once it has
    // answered those it has.
    let mut retiring = false;
    loop {
        if waiting.is_empty() && (retiring || opened.elapsed() >= MAX_STREAM_AGE) {
            return;
        }
        tokio::select! {
            reply = replies.message() => match reply {
                Ok(Some(response)) => {
                    answered = Instant::now();
                    let renew = refused_as_invalid(&response);
                    match waiting.pop_front() {
                        Some((_, reply)) => { let _ = reply.send(Ok(response)); }
                        None => tracing::warn!("the Storage Write API answered a request never sent"),
                    }
                    if renew && !retiring {
                        // A connection may keep the table's schema as it was
                        // when it opened: after a fix, only a new one sees
                        // it. Replies already due still come on this one.
                        tracing::debug!("retiring the append stream after an append refused as invalid");
                        retiring = true;
                    }
                }
                Ok(None) => {
                    return fail_all(waiting, &Status::unavailable("the server closed the append stream"));
                }
                Err(status) => return fail_all(waiting, &status),
            },
            queued = incoming.recv(), if !retiring && opened.elapsed() < MAX_STREAM_AGE => match queued {
                Some(queued) => send(queued, &mut waiting),
                None => return,
            },
            () = overdue(&waiting, answered, opener.timeout) => {
                return fail_all(waiting, &no_reply(opener.timeout));
            }
            // An idle stream ages out too, not only one in use.
            () = tokio::time::sleep_until(opened + MAX_STREAM_AGE), if waiting.is_empty() => return,
        }
    }
}

/// Whether a reply refuses its append as `INVALID_ARGUMENT` without naming
/// rows: about the request or the table's schema as the stream knows it.
fn refused_as_invalid(response: &AppendRowsResponse) -> bool {
    matches!(&response.response, Some(Response::Error(status))
        if status.code == tonic::Code::InvalidArgument as i32
            && !status.message.contains("request too large"))
        && response.row_errors.is_empty()
}

/// Resolves when the oldest request has waited `timeout` since it was sent
/// or since the stream last answered, whichever is later (never when none
/// waits).
async fn overdue(
    waiting: &VecDeque<(Instant, oneshot::Sender<Result<AppendRowsResponse, Status>>)>,
    answered: Instant,
    timeout: Duration,
) {
    match waiting.front() {
        Some((sent, _)) => tokio::time::sleep_until((*sent).max(answered) + timeout).await,
        None => std::future::pending().await,
    }
}

fn no_reply(timeout: Duration) -> Status {
    Status::deadline_exceeded(format!(
        "no reply to an append within {} s (--request-timeout-secs); replacing the stream",
        timeout.as_secs()
    ))
}

fn fail_all(
    waiting: VecDeque<(Instant, oneshot::Sender<Result<AppendRowsResponse, Status>>)>,
    status: &Status,
) {
    if !waiting.is_empty() {
        tracing::debug!(waiting = waiting.len(), code = ?status.code(), message = status.message(), "append stream failed");
    }
    for (_, reply) in waiting {
        let _ = reply.send(Err(Status::new(status.code(), status.message())));
    }
}

/// An append of `rows` to `stream`. The stream is named in every request
/// (the emulator needs it; Google allows it); the schema only in the first
/// of a connection.
fn append_request(stream: &str, rows: Vec<Vec<u8>>, with_schema: bool) -> AppendRowsRequest {
    AppendRowsRequest {
        write_stream: stream.to_owned(),
        rows: Some(Rows::ProtoRows(ProtoData {
            writer_schema: with_schema.then(|| ProtoSchema {
                proto_descriptor: Some(proto::descriptor()),
            }),
            rows: Some(ProtoRows {
                serialized_rows: rows,
            }),
        })),
        ..AppendRowsRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use gcp_bigquery_client::google::cloud::bigquery::storage::v1::StorageError;
    use storage_error::StorageErrorCode as Code;

    use super::*;

    fn with_error(code: Code) -> BatchCommitWriteStreamsResponse {
        BatchCommitWriteStreamsResponse {
            commit_time: None,
            stream_errors: vec![StorageError {
                code: code as i32,
                entity: "s".into(),
                error_message: "why".into(),
            }],
        }
    }

    #[test]
    fn a_commit_is_visible_when_done_now_or_before() {
        let done = BatchCommitWriteStreamsResponse {
            commit_time: Some(Default::default()),
            stream_errors: Vec::new(),
        };
        assert_eq!(sort_commit(&done), Commit::Visible);
        assert_eq!(
            sort_commit(&with_error(Code::StreamAlreadyCommitted)),
            Commit::Visible
        );
    }

    #[test]
    fn a_stream_that_cannot_be_committed_is_gone_and_other_errors_are_refusals() {
        for code in [Code::StreamNotFound, Code::InvalidStreamState] {
            assert!(
                matches!(sort_commit(&with_error(code)), Commit::Gone(_)),
                "{code:?}"
            );
        }
        let Commit::Refused(why) = sort_commit(&with_error(Code::TableNotFound)) else {
            panic!("not refused")
        };
        assert_eq!(why, "TABLE_NOT_FOUND: why");
        // Neither a commit time nor an error: not done.
        let neither = BatchCommitWriteStreamsResponse::default();
        assert!(matches!(sort_commit(&neither), Commit::Refused(_)));
    }
}
