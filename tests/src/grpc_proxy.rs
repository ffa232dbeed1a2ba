//! A Storage Write API proxy with fault injection, for `--write-api
//! storage` what [`FaultProxy`](crate::bigquery::FaultProxy) is for
//! insertAll: a gRPC server on loopback that takes the sink's `AppendRows`
//! streams and, request by request, forwards to the emulator or answers a
//! fault instead. It records every append (rows, bytes, when it arrived,
//! the stream's `authorization`). With no upstream it answers every append
//! at once and stores nothing: the instant endpoint the benchmark measures
//! the sink's own ceiling against.
//!
//! Each sink stream gets its own upstream stream, opened at its first
//! forwarded append; the writer schema of the sink's first request is
//! passed on with it, whichever request that is.
//!
//! The calls around PENDING streams (create, finalize, commit, get) are
//! forwarded too, or answered at once without an upstream, and can be
//! failed, or forwarded and never answered ([`CallFault`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use futures::Stream;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_request::Rows;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::append_rows_response::{
    AppendResult, Response as Answer,
};
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::big_query_write_client::BigQueryWriteClient;
use gcp_bigquery_client::google::cloud::bigquery::storage::v1::{
    AppendRowsRequest, AppendRowsResponse, BatchCommitWriteStreamsRequest,
    BatchCommitWriteStreamsResponse, CreateWriteStreamRequest, FinalizeWriteStreamRequest,
    FinalizeWriteStreamResponse, GetWriteStreamRequest, ProtoSchema, RowError, WriteStream,
};
use gcp_bigquery_client::google::rpc;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;
use tonic::{Code, Status};

const SERVICE: &str = "/google.cloud.bigquery.storage.v1.BigQueryWrite/";

/// What the proxy does with every call of one method other than
/// `AppendRows`, until cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallFault {
    /// Forward the call, then never answer: it took effect, and the sink
    /// cannot know (its timeout ends the wait).
    HangAfterForward,
    /// Answer with this error, forward nothing.
    Fail(Code, &'static str),
}

/// What the proxy does with one append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcFault {
    /// Forward it.
    Forward,
    /// Answer it with this error, forward nothing; the stream stays open.
    Reply(Code, &'static str),
    /// End the whole stream with this status, forward nothing.
    EndStream(Code, &'static str),
    /// Forward it (the rows are stored), then end the stream without
    /// passing the answer on: the sink cannot know, and sends them again.
    EndStreamAfterForward,
    /// Refuse the append as too large, in Google's words
    /// (`INVALID_ARGUMENT`, "AppendRows request too large"), when it holds
    /// more than this many rows (nothing stored); forward smaller ones.
    TooLargeAbove(usize),
    /// Refuse the append naming its first row as bad, as BigQuery does
    /// (`row_errors`, nothing stored).
    RefuseFirstRow,
}

impl GrpcFault {
    fn label(&self) -> String {
        match self {
            Self::Reply(code, _) => format!("Reply({code:?})"),
            Self::EndStream(code, _) => format!("EndStream({code:?})"),
            other => format!("{other:?}"),
        }
    }
}

/// One append the proxy received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendSeen {
    /// Rows in it.
    pub rows: usize,
    /// Its encoded size.
    pub bytes: usize,
    /// When the proxy had read it.
    pub at: Instant,
    /// Its stream's `authorization` header.
    pub authorization: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    pattern: Vec<GrpcFault>,
    next: usize,
    served: BTreeMap<String, usize>,
    appends: Vec<AppendSeen>,
    streams: usize,
    call_faults: BTreeMap<&'static str, CallFault>,
    /// Calls other than `AppendRows`, by method.
    calls: BTreeMap<String, usize>,
}

/// The proxy, on `127.0.0.1:<free port>`, until dropped.
pub struct GrpcFaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Proxy {
    upstream: Option<BigQueryWriteClient<Channel>>,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

impl GrpcFaultProxy {
    /// A proxy in front of `upstream` (`http://host:port`), or answering
    /// every append at once without one.
    pub async fn start(upstream: Option<&str>) -> anyhow::Result<Self> {
        let upstream = match upstream {
            Some(url) => Some(
                BigQueryWriteClient::new(
                    tonic::transport::Endpoint::from_shared(url.to_owned())?.connect_lazy(),
                )
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
            ),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let proxy = Proxy {
            upstream,
            state: Arc::clone(&state),
        };
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .serve_with_incoming(
                    proxy,
                    // TCP_NODELAY, as gRPC servers set it: tonic's own
                    // default applies only to `serve`, not to an incoming
                    // stream given here, and without it each small reply
                    // waited on Nagle's algorithm (storage-mode benches
                    // idled, docs/benchmarks.md).
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                )
                .await;
            if let Err(err) = served {
                eprintln!("gRPC fault proxy: {err}");
            }
        });
        Ok(Self { addr, state, task })
    }

    /// The URL to give the sink as `--bigquery-grpc-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Applies `pattern` in turn to the next appends, cycling.
    pub fn set_faults(&self, pattern: Vec<GrpcFault>) {
        let mut state = lock(&self.state);
        state.pattern = pattern;
        state.next = 0;
    }

    /// Forwards everything from now on.
    pub fn clear_faults(&self) {
        self.set_faults(Vec::new());
    }

    /// Faults served so far, by kind (`Forward` not counted).
    pub fn served(&self) -> BTreeMap<String, usize> {
        lock(&self.state).served.clone()
    }

    /// Faults served so far.
    pub fn faults_served(&self) -> usize {
        lock(&self.state).served.values().sum()
    }

    /// Every append received so far.
    pub fn appends(&self) -> Vec<AppendSeen> {
        lock(&self.state).appends.clone()
    }

    /// `AppendRows` streams opened so far.
    pub fn streams(&self) -> usize {
        lock(&self.state).streams
    }

    /// Applies `fault` to every call of `method` (`"BatchCommitWriteStreams"`,
    /// `"CreateWriteStream"`, ...) from now on.
    pub fn set_call_fault(&self, method: &'static str, fault: CallFault) {
        lock(&self.state).call_faults.insert(method, fault);
    }

    /// Forwards every call from now on.
    pub fn clear_call_faults(&self) {
        lock(&self.state).call_faults.clear();
    }

    /// Calls other than `AppendRows` received so far, by method.
    pub fn calls(&self) -> BTreeMap<String, usize> {
        lock(&self.state).calls.clone()
    }
}

impl Drop for GrpcFaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Body = tonic::body::Body;

impl tonic::server::NamedService for Proxy {
    const NAME: &'static str = "google.cloud.bigquery.storage.v1.BigQueryWrite";
}

impl<B> tower_service::Service<http::Request<B>> for Proxy
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let proxy = self.clone();
        let method = request
            .uri()
            .path()
            .strip_prefix(SERVICE)
            .unwrap_or_default()
            .to_owned();
        Box::pin(async move {
            Ok(match method.as_str() {
                "AppendRows" => grpc().streaming(AppendRowsCall(proxy), request).await,
                "CreateWriteStream" => {
                    let call = Unary::new(move |r| proxy.clone().create(r));
                    grpc().unary(call, request).await
                }
                "FinalizeWriteStream" => {
                    let call = Unary::new(move |r| proxy.clone().finalize(r));
                    grpc().unary(call, request).await
                }
                "BatchCommitWriteStreams" => {
                    let call = Unary::new(move |r| proxy.clone().commit(r));
                    grpc().unary(call, request).await
                }
                "GetWriteStream" => {
                    let call = Unary::new(move |r| proxy.clone().get(r));
                    grpc().unary(call, request).await
                }
                other => Status::unimplemented(format!("the fault proxy does not serve {other:?}"))
                    .into_http(),
            })
        })
    }
}

/// The server side of a call. Above the API's 10 MB, so that the sink's
/// limit is what is tested.
fn grpc<T, U>() -> tonic::server::Grpc<tonic_prost::ProstCodec<T, U>>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    tonic::server::Grpc::new(tonic_prost::ProstCodec::default())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// A unary method of the proxy.
struct Unary<Req, Resp>(Box<dyn FnMut(Req) -> BoxFuture<'static, Result<Resp, Status>> + Send>);

impl<Req, Resp> Unary<Req, Resp> {
    fn new<F, Fut>(mut f: F) -> Self
    where
        F: FnMut(Req) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        Self(Box::new(move |r| Box::pin(f(r))))
    }
}

impl<Req, Resp: Send + 'static> tonic::server::UnaryService<Req> for Unary<Req, Resp> {
    type Response = Resp;
    type Future = BoxFuture<'static, Result<tonic::Response<Resp>, Status>>;

    fn call(&mut self, request: tonic::Request<Req>) -> Self::Future {
        let answer = (self.0)(request.into_inner());
        Box::pin(async move { answer.await.map(tonic::Response::new) })
    }
}

impl Proxy {
    /// Counts a call of `method` and applies its fault: forwards it (or
    /// answers `instant` without an upstream), fails it, or forwards it and
    /// never answers.
    async fn unary<Req, Resp, Fut>(
        &self,
        method: &'static str,
        request: Req,
        forward: impl FnOnce(BigQueryWriteClient<Channel>, Req) -> Fut,
        instant: impl FnOnce(Req) -> Resp,
    ) -> Result<Resp, Status>
    where
        Fut: std::future::Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let fault = {
            let mut state = lock(&self.state);
            *state.calls.entry(method.to_owned()).or_default() += 1;
            let fault = state.call_faults.get(method).copied();
            if let Some(fault) = fault {
                *state
                    .served
                    .entry(format!("{method}:{fault:?}"))
                    .or_default() += 1;
            }
            fault
        };
        if let Some(CallFault::Fail(code, message)) = fault {
            return Err(Status::new(code, message));
        }
        let answer = match &self.upstream {
            Some(client) => forward(client.clone(), request).await?.into_inner(),
            None => instant(request),
        };
        if fault == Some(CallFault::HangAfterForward) {
            std::future::pending::<()>().await;
        }
        Ok(answer)
    }

    async fn create(self, request: CreateWriteStreamRequest) -> Result<WriteStream, Status> {
        let n = lock(&self.state)
            .calls
            .get("CreateWriteStream")
            .copied()
            .unwrap_or(0);
        self.unary(
            "CreateWriteStream",
            request,
            |mut c, r| async move { c.create_write_stream(r).await },
            |r| WriteStream {
                name: format!("{}/streams/instant-{n}", r.parent),
                ..r.write_stream.unwrap_or_default()
            },
        )
        .await
    }

    async fn finalize(
        self,
        request: FinalizeWriteStreamRequest,
    ) -> Result<FinalizeWriteStreamResponse, Status> {
        self.unary(
            "FinalizeWriteStream",
            request,
            |mut c, r| async move { c.finalize_write_stream(r).await },
            |_| FinalizeWriteStreamResponse::default(),
        )
        .await
    }

    async fn commit(
        self,
        request: BatchCommitWriteStreamsRequest,
    ) -> Result<BatchCommitWriteStreamsResponse, Status> {
        self.unary(
            "BatchCommitWriteStreams",
            request,
            |mut c, r| async move { c.batch_commit_write_streams(r).await },
            |_| BatchCommitWriteStreamsResponse {
                commit_time: Some(Default::default()),
                stream_errors: Vec::new(),
            },
        )
        .await
    }

    async fn get(self, request: GetWriteStreamRequest) -> Result<WriteStream, Status> {
        self.unary(
            "GetWriteStream",
            request,
            |mut c, r| async move { c.get_write_stream(r).await },
            |r| WriteStream {
                name: r.name,
                commit_time: Some(Default::default()),
                ..WriteStream::default()
            },
        )
        .await
    }
}

struct AppendRowsCall(Proxy);

type Replies = Pin<Box<dyn Stream<Item = Result<AppendRowsResponse, Status>> + Send>>;

impl tonic::server::StreamingService<AppendRowsRequest> for AppendRowsCall {
    type Response = AppendRowsResponse;
    type ResponseStream = Replies;
    type Future = BoxFuture<'static, Result<tonic::Response<Replies>, Status>>;

    fn call(
        &mut self,
        request: tonic::Request<tonic::Streaming<AppendRowsRequest>>,
    ) -> Self::Future {
        let proxy = self.0.clone();
        Box::pin(async move {
            let authorization = request
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            lock(&proxy.state).streams += 1;
            let (replies, out) = mpsc::channel(64);
            tokio::spawn(proxy.serve(request.into_inner(), authorization, replies));
            Ok(tonic::Response::new(
                Box::pin(ReceiverStream::new(out)) as Replies
            ))
        })
    }
}

/// The sink's stream's way to the emulator.
struct Upstream {
    requests: mpsc::UnboundedSender<AppendRowsRequest>,
    replies: tonic::Streaming<AppendRowsResponse>,
}

impl Proxy {
    async fn serve(
        self,
        mut incoming: tonic::Streaming<AppendRowsRequest>,
        authorization: Option<String>,
        replies: mpsc::Sender<Result<AppendRowsResponse, Status>>,
    ) {
        let mut schema: Option<ProtoSchema> = None;
        let mut upstream: Option<Upstream> = None;
        while let Ok(Some(mut request)) = incoming.message().await {
            let rows = row_count(&request);
            if let Some(Rows::ProtoRows(data)) = &request.rows {
                if schema.is_none() {
                    schema.clone_from(&data.writer_schema);
                }
            }
            let bytes = request.encoded_len();
            let fault = {
                let mut state = lock(&self.state);
                state.appends.push(AppendSeen {
                    rows,
                    bytes,
                    at: Instant::now(),
                    authorization: authorization.clone(),
                });
                let fault = if state.pattern.is_empty() {
                    GrpcFault::Forward
                } else {
                    let i = state.next % state.pattern.len();
                    state.next += 1;
                    state.pattern[i].clone()
                };
                let fault = match fault {
                    GrpcFault::TooLargeAbove(n) if rows <= n => GrpcFault::Forward,
                    other => other,
                };
                if fault != GrpcFault::Forward {
                    *state.served.entry(fault.label()).or_default() += 1;
                }
                fault
            };
            let reply = match fault {
                GrpcFault::Forward | GrpcFault::EndStreamAfterForward => {
                    let Some(client) = &self.upstream else {
                        let _ = replies.send(Ok(stored())).await;
                        continue;
                    };
                    if upstream.is_none() {
                        // The upstream connection's first request carries
                        // the schema, whichever of the sink's this is.
                        if let (Some(Rows::ProtoRows(data)), Some(schema)) =
                            (&mut request.rows, &schema)
                        {
                            data.writer_schema = Some(schema.clone());
                        }
                    }
                    match forward(client, &mut upstream, request).await {
                        Ok(reply) if fault == GrpcFault::EndStreamAfterForward => {
                            drop(reply);
                            Err(Status::unavailable(
                                "the fault proxy ended the stream after forwarding",
                            ))
                        }
                        other => other,
                    }
                }
                GrpcFault::Reply(code, message) => Ok(error_reply(code, message, Vec::new())),
                GrpcFault::EndStream(code, message) => Err(Status::new(code, message)),
                GrpcFault::TooLargeAbove(_) => Ok(error_reply(
                    Code::InvalidArgument,
                    &format!("AppendRows request too large: {bytes} limit 10485760"),
                    Vec::new(),
                )),
                GrpcFault::RefuseFirstRow => Ok(error_reply(
                    Code::InvalidArgument,
                    "Errors found while processing rows.",
                    vec![RowError {
                        index: 0,
                        code: 1,
                        message: "Field event_time: refused by the fault proxy".into(),
                    }],
                )),
            };
            let ends = reply.is_err();
            if replies.send(reply).await.is_err() || ends {
                return;
            }
        }
    }
}

async fn forward(
    client: &BigQueryWriteClient<Channel>,
    upstream: &mut Option<Upstream>,
    request: AppendRowsRequest,
) -> Result<AppendRowsResponse, Status> {
    if upstream.is_none() {
        let (requests, outgoing) = mpsc::unbounded_channel();
        let _ = requests.send(request);
        let replies = client
            .clone()
            .append_rows(UnboundedReceiverStream::new(outgoing))
            .await?
            .into_inner();
        *upstream = Some(Upstream { requests, replies });
    } else if let Some(up) = upstream.as_ref() {
        let _ = up.requests.send(request);
    }
    let Some(up) = upstream.as_mut() else {
        return Err(Status::internal("no upstream"));
    };
    match up.replies.message().await {
        Ok(Some(reply)) => Ok(reply),
        Ok(None) => Err(Status::unavailable("the emulator closed the stream")),
        Err(status) => Err(status),
    }
}

fn row_count(request: &AppendRowsRequest) -> usize {
    match &request.rows {
        Some(Rows::ProtoRows(data)) => data.rows.as_ref().map_or(0, |r| r.serialized_rows.len()),
        _ => 0,
    }
}

fn stored() -> AppendRowsResponse {
    AppendRowsResponse {
        response: Some(Answer::AppendResult(AppendResult { offset: None })),
        ..AppendRowsResponse::default()
    }
}

fn error_reply(code: Code, message: &str, row_errors: Vec<RowError>) -> AppendRowsResponse {
    AppendRowsResponse {
        response: Some(Answer::Error(rpc::Status {
            code: code as i32,
            message: message.to_owned(),
            details: Vec::new(),
        })),
        row_errors,
        ..AppendRowsResponse::default()
    }
}
