//! A scripted fake of the Anthropic Messages API on `127.0.0.1`, for driving
//! the real Claude Code agent offline.
//!
//! [`FakeAnthropic::start`] binds `127.0.0.1:0` and serves every request on
//! one catch-all handler:
//!
//! | request | answer | [`RequestKind`] |
//! | --- | --- | --- |
//! | `POST /v1/messages` with non-empty `tools` and `max_tokens > 1` | the next scripted [`Reply`] (or the default reply) | `Model` |
//! | any other `POST /v1/messages` | the side text ([`FakeAnthropic::set_side_text`]) | `Side` |
//! | `POST /v1/messages/count_tokens` | `{"input_tokens": body length / 4}` | `CountTokens` |
//! | `CONNECT host:port`, or an absolute-form URI naming another host | `502`, nothing forwarded | `Proxy` |
//! | anything else (`HEAD /` preconnect, other `GET`s) | `200` with `{}` (empty for `HEAD`) | `Other` |
//!
//! `/v1/messages` answers as server-sent events when the body has
//! `"stream": true` (`message_start`, `content_block_start`,
//! `content_block_delta`, `content_block_stop`, `message_delta` with the stop
//! reason and usage, `message_stop`), and as one JSON message otherwise.
//!
//! Point `HTTPS_PROXY`/`HTTP_PROXY` at [`FakeAnthropic::base_url`] (with
//! `NO_PROXY=127.0.0.1,localhost`) to have every attempt to reach another
//! host recorded as a `Proxy` request and refused.
//!
//! Main and side requests: Claude Code's agent loop always sends its tool
//! list and a large `max_tokens`. Its side requests (quota probe with
//! `max_tokens: 1`, title/summary generation, prefix extraction, ...) send no
//! tools. Side requests are answered from [`FakeAnthropic::set_side_text`]
//! and never consume the scripted queue.
//!
//! Every request is recorded as a [`RecordedRequest`] (path, query, headers
//! without `x-api-key`/`authorization`, JSON body) before it is answered.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// How often a [`Reply::Hang`] stream sends an SSE `ping`; a write to a
/// closed connection is what makes the server notice the disconnect.
const PING_EVERY: Duration = Duration::from_millis(100);

/// One scripted answer to a main (`Model`) request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A text block, streamed as the pieces of [`chunks`]; stop reason `end_turn`.
    Text(String),
    /// A thinking block (with a signature) followed by a text block.
    Thinking { thinking: String, text: String },
    /// A `tool_use` block whose input is streamed as `input_json_delta`
    /// pieces; stop reason `tool_use`.
    ToolUse { name: String, input: Value },
    /// Starts a text block with one delta, then only pings until the client
    /// disconnects.
    Hang,
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Reply::Text(text.into())
    }

    pub fn tool(name: impl Into<String>, input: Value) -> Self {
        Reply::ToolUse {
            name: name.into(),
            input,
        }
    }
}

/// How a request was classified (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Model,
    Side,
    CountTokens,
    Proxy,
    Other,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// 1-based arrival number.
    pub seq: usize,
    pub at: Instant,
    pub kind: RequestKind,
    pub method: String,
    /// Path without the query (for `CONNECT`, the `host:port` target; for an
    /// absolute-form URI, the whole URI).
    pub path: String,
    pub query: Option<String>,
    /// Lower-case header names; `x-api-key` and `authorization` are left out.
    pub headers: BTreeMap<String, String>,
    /// Which credential header the request carried, if any.
    pub credential_header: Option<String>,
    /// The JSON body, or `Value::Null` for an empty or non-JSON body.
    pub body: Value,
    /// The reply used for a `Model` request.
    pub reply: Option<Reply>,
}

impl RecordedRequest {
    /// The `messages` array of a Messages API body, serialised, for
    /// substring checks.
    pub fn messages_json(&self) -> String {
        self.body
            .get("messages")
            .map(Value::to_string)
            .unwrap_or_default()
    }

    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }
}

/// Counts of [`Reply::Hang`] streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HangState {
    /// Hang streams whose first delta has been handed to the connection.
    pub started: usize,
    /// Hang streams whose client went away.
    pub disconnected: usize,
}

struct Inner {
    queue: Mutex<VecDeque<Reply>>,
    default_reply: Mutex<Reply>,
    side_text: Mutex<String>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Bumped after every recorded request.
    recorded: watch::Sender<usize>,
    hangs: watch::Sender<HangState>,
    own_authority: String,
    minimal_usage: AtomicBool,
}

/// A running fake server; stopped when dropped.
pub struct FakeAnthropic {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for FakeAnthropic {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeAnthropic {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            default_reply: Mutex::new(Reply::text("ok")),
            side_text: Mutex::new("Fake side reply".to_string()),
            requests: Mutex::new(Vec::new()),
            recorded: watch::channel(0).0,
            hangs: watch::channel(HangState::default()).0,
            own_authority: addr.to_string(),
            minimal_usage: AtomicBool::new(false),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake anthropic server stopped: {e}");
            }
        });
        Self { addr, inner, task }
    }

    /// `http://127.0.0.1:<port>`, for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Appends a scripted reply for the next main request.
    pub fn push(&self, reply: Reply) {
        self.inner.queue.lock().unwrap().push_back(reply);
    }

    /// Number of scripted replies not used yet.
    pub fn pending_replies(&self) -> usize {
        self.inner.queue.lock().unwrap().len()
    }

    /// The reply for a main request when the queue is empty (default: text `ok`).
    pub fn set_default_reply(&self, reply: Reply) {
        *self.inner.default_reply.lock().unwrap() = reply;
    }

    /// The text of every side request's answer.
    pub fn set_side_text(&self, text: impl Into<String>) {
        *self.inner.side_text.lock().unwrap() = text.into();
    }

    /// With `true`, `usage` objects carry only `input_tokens` and
    /// `output_tokens` (no `cache_*_input_tokens`), as some gateways send.
    pub fn set_minimal_usage(&self, minimal: bool) {
        self.inner.minimal_usage.store(minimal, Ordering::Relaxed);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.inner.requests.lock().unwrap().clone()
    }

    /// The requests of one kind, in arrival order.
    pub fn requests_of(&self, kind: RequestKind) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.kind == kind)
            .collect()
    }

    /// Waits until `done` holds for the recorded requests; returns them.
    /// Panics after `limit`.
    pub async fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        done: impl Fn(&[RecordedRequest]) -> bool,
    ) -> Vec<RecordedRequest> {
        let mut rx = self.inner.recorded.subscribe();
        let wait = async {
            loop {
                {
                    let requests = self.inner.requests.lock().unwrap();
                    if done(&requests) {
                        return requests.clone();
                    }
                }
                rx.changed().await.expect("server state alive");
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(requests) => requests,
            Err(_) => panic!(
                "fake anthropic: no {what} within {limit:?}; requests: {:#?}",
                self.summary()
            ),
        }
    }

    /// Hang stream counters.
    pub fn hangs(&self) -> HangState {
        *self.inner.hangs.borrow()
    }

    /// Waits until `done` holds for the hang counters. Panics after `limit`.
    pub async fn wait_hangs(
        &self,
        limit: Duration,
        done: impl Fn(&HangState) -> bool,
    ) -> HangState {
        let mut rx = self.inner.hangs.subscribe();
        let reached = tokio::time::timeout(limit, rx.wait_for(|s| done(s)))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|state| *state);
        match reached {
            Some(state) => state,
            None => panic!(
                "fake anthropic: hang state {:?} did not reach the condition within {limit:?}",
                self.hangs()
            ),
        }
    }

    /// One line per request: `seq kind METHOD path model`.
    pub fn summary(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| {
                format!(
                    "{} {:?} {} {} {}",
                    r.seq,
                    r.kind,
                    r.method,
                    r.path,
                    r.model().unwrap_or("-")
                )
            })
            .collect()
    }
}

/// The pieces a text is streamed in: up to three, split at spaces.
pub fn chunks(text: &str) -> Vec<String> {
    let words: Vec<&str> = text.split_inclusive(' ').collect();
    if words.len() < 2 {
        return vec![text.to_string()];
    }
    let per = words.len().div_ceil(3);
    words.chunks(per).map(|c| c.concat()).collect()
}

/// Splits `s` into two pieces at a char boundary near the middle.
fn halves(s: &str) -> Vec<String> {
    let mut mid = s.len() / 2;
    while !s.is_char_boundary(mid) {
        mid -= 1;
    }
    [&s[..mid], &s[mid..]]
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn classify(method: &Method, path: &str, body: &Value, absolute_foreign: bool) -> RequestKind {
    if *method == Method::CONNECT || absolute_foreign {
        return RequestKind::Proxy;
    }
    match (method.as_str(), path) {
        ("POST", "/v1/messages/count_tokens") => RequestKind::CountTokens,
        ("POST", "/v1/messages") => {
            let has_tools = body
                .get("tools")
                .and_then(Value::as_array)
                .is_some_and(|t| !t.is_empty());
            let max_tokens = body.get("max_tokens").and_then(Value::as_u64).unwrap_or(0);
            if has_tools && max_tokens > 1 {
                RequestKind::Model
            } else {
                RequestKind::Side
            }
        }
        _ => RequestKind::Other,
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let at = Instant::now();
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let authority = parts.uri.authority().map(|a| a.to_string());
    let absolute_foreign = parts.uri.scheme().is_some()
        && authority
            .as_deref()
            .is_some_and(|a| a != inner.own_authority);
    let path = if parts.method == Method::CONNECT {
        authority.clone().unwrap_or_default()
    } else if absolute_foreign {
        parts.uri.to_string()
    } else {
        parts.uri.path().to_string()
    };
    let kind = classify(&parts.method, &path, &body, absolute_foreign);
    let (headers, credential_header) = record_headers(&parts.headers);
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);

    let reply = match kind {
        RequestKind::Model => Some(
            inner
                .queue
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| inner.default_reply.lock().unwrap().clone()),
        ),
        _ => None,
    };
    let seq = {
        let mut requests = inner.requests.lock().unwrap();
        let seq = requests.len() + 1;
        requests.push(RecordedRequest {
            seq,
            at,
            kind,
            method: parts.method.to_string(),
            path: path.clone(),
            query: parts.uri.query().map(str::to_string),
            headers,
            credential_header,
            body: body.clone(),
            reply: reply.clone(),
        });
        seq
    };
    inner.recorded.send_modify(|n| *n += 1);

    match kind {
        RequestKind::Model => {
            let reply = reply.expect("model requests have a reply");
            respond_messages(&inner, seq, &body, reply, stream)
        }
        RequestKind::Side => {
            let text = inner.side_text.lock().unwrap().clone();
            respond_messages(&inner, seq, &body, Reply::Text(text), stream)
        }
        RequestKind::CountTokens => json_response(
            StatusCode::OK,
            json!({ "input_tokens": (bytes.len() / 4).max(1) }),
        ),
        RequestKind::Proxy => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::empty())
            .unwrap(),
        RequestKind::Other => {
            let body = if parts.method == Method::HEAD {
                Body::empty()
            } else {
                Body::from("{}")
            };
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(body)
                .unwrap()
        }
    }
}

fn record_headers(headers: &HeaderMap) -> (BTreeMap<String, String>, Option<String>) {
    let mut out = BTreeMap::new();
    let mut credential = None;
    for (name, value) in headers {
        let name = name.as_str().to_ascii_lowercase();
        if name == "x-api-key" || name == "authorization" {
            credential = Some(name);
            continue;
        }
        out.insert(name, String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    (out, credential)
}

fn json_response(status: StatusCode, value: Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(value.to_string()))
        .unwrap()
}

fn usage(inner: &Inner, output_tokens: usize) -> Value {
    if inner.minimal_usage.load(Ordering::Relaxed) {
        return json!({ "input_tokens": 25, "output_tokens": output_tokens });
    }
    json!({
        "input_tokens": 25,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    })
}

fn model_of(body: &Value) -> String {
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or("claude-fake")
        .to_string()
}

fn respond_messages(
    inner: &Arc<Inner>,
    seq: usize,
    body: &Value,
    reply: Reply,
    stream: bool,
) -> Response {
    let id = format!("msg_fake_{seq}");
    let model = model_of(body);
    if !stream {
        if reply == Reply::Hang {
            // A non-streaming hang: the body never arrives.
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1);
            let inner = inner.clone();
            tokio::spawn(async move {
                inner.hangs.send_modify(|s| s.started += 1);
                tx.closed().await;
                inner.hangs.send_modify(|s| s.disconnected += 1);
            });
            return Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from_stream(ReceiverStream::new(rx)))
                .unwrap();
        }
        let (content, stop_reason) = content_of(seq, &reply);
        return json_response(
            StatusCode::OK,
            json!({
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": stop_reason,
                "stop_sequence": null,
                "usage": usage(inner, 5),
            }),
        );
    }

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let inner = inner.clone();
    tokio::spawn(async move {
        stream_reply(&inner, tx, seq, id, model, reply).await;
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("request-id", format!("req_fake_{seq}"))
        .body(Body::from_stream(ReceiverStream::new(rx)))
        .unwrap()
}

/// The non-streaming `content` array and stop reason of a reply.
fn content_of(seq: usize, reply: &Reply) -> (Value, &'static str) {
    match reply {
        Reply::Text(text) => (json!([{ "type": "text", "text": text }]), "end_turn"),
        Reply::Thinking { thinking, text } => (
            json!([
                { "type": "thinking", "thinking": thinking, "signature": "fake-signature" },
                { "type": "text", "text": text },
            ]),
            "end_turn",
        ),
        Reply::ToolUse { name, input } => (
            json!([{ "type": "tool_use", "id": tool_use_id(seq), "name": name, "input": input }]),
            "tool_use",
        ),
        Reply::Hang => (json!([]), "end_turn"),
    }
}

/// The `tool_use` id used for the main request number `seq`.
pub fn tool_use_id(seq: usize) -> String {
    format!("toolu_fake_{seq}")
}

fn sse(event: &str, data: Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("event: {event}\ndata: {data}\n\n")))
}

async fn stream_reply(
    inner: &Inner,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    seq: usize,
    id: String,
    model: String,
    reply: Reply,
) {
    let mut events = vec![sse(
        "message_start",
        json!({
            "type": "message_start",
            "message": {
                "id": id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": usage(inner, 1),
            }
        }),
    )];
    let text_block = |events: &mut Vec<_>, index: usize, pieces: &[String]| {
        events.push(sse(
            "content_block_start",
            json!({ "type": "content_block_start", "index": index,
                    "content_block": { "type": "text", "text": "" } }),
        ));
        for piece in pieces {
            events.push(sse(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": index,
                        "delta": { "type": "text_delta", "text": piece } }),
            ));
        }
    };
    let stop_block = |events: &mut Vec<_>, index: usize| {
        events.push(sse(
            "content_block_stop",
            json!({ "type": "content_block_stop", "index": index }),
        ));
    };
    let stop_reason = match &reply {
        Reply::Text(text) => {
            text_block(&mut events, 0, &chunks(text));
            stop_block(&mut events, 0);
            "end_turn"
        }
        Reply::Thinking { thinking, text } => {
            events.push(sse(
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0,
                        "content_block": { "type": "thinking", "thinking": "", "signature": "" } }),
            ));
            for piece in chunks(thinking) {
                events.push(sse(
                    "content_block_delta",
                    json!({ "type": "content_block_delta", "index": 0,
                            "delta": { "type": "thinking_delta", "thinking": piece } }),
                ));
            }
            events.push(sse(
                "content_block_delta",
                json!({ "type": "content_block_delta", "index": 0,
                        "delta": { "type": "signature_delta", "signature": "fake-signature" } }),
            ));
            stop_block(&mut events, 0);
            text_block(&mut events, 1, &chunks(text));
            stop_block(&mut events, 1);
            "end_turn"
        }
        Reply::ToolUse { name, input } => {
            events.push(sse(
                "content_block_start",
                json!({ "type": "content_block_start", "index": 0,
                        "content_block": { "type": "tool_use", "id": tool_use_id(seq),
                                           "name": name, "input": {} } }),
            ));
            for piece in halves(&input.to_string()) {
                events.push(sse(
                    "content_block_delta",
                    json!({ "type": "content_block_delta", "index": 0,
                            "delta": { "type": "input_json_delta", "partial_json": piece } }),
                ));
            }
            stop_block(&mut events, 0);
            "tool_use"
        }
        Reply::Hang => {
            text_block(&mut events, 0, &["Working on it".to_string()]);
            for event in events {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            inner.hangs.send_modify(|s| s.started += 1);
            let mut ping = tokio::time::interval(PING_EVERY);
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = ping.tick() => {
                        if tx.send(sse("ping", json!({ "type": "ping" }))).await.is_err() {
                            break;
                        }
                    }
                }
            }
            inner.hangs.send_modify(|s| s.disconnected += 1);
            return;
        }
    };
    events.push(sse(
        "message_delta",
        json!({ "type": "message_delta",
                "delta": { "stop_reason": stop_reason, "stop_sequence": null },
                "usage": { "output_tokens": 5 } }),
    ));
    events.push(sse("message_stop", json!({ "type": "message_stop" })));
    for event in events {
        if tx.send(event).await.is_err() {
            return;
        }
        // Lets each piece go out as its own write.
        tokio::task::yield_now().await;
    }
}
