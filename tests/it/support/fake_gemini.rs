//! A scripted fake of the Gemini API (`generativelanguage.googleapis.com`) on `127.0.0.1`,
//! for driving the real Gemini CLI (`gemini --acp`) offline.
//!
//! [`FakeGemini::start`] binds `127.0.0.1:0` and serves every request on one catch-all
//! handler:
//!
//! | request | answer | [`RequestKind`] |
//! | --- | --- | --- |
//! | `POST /v1beta/models/<model>:streamGenerateContent?alt=sse` | the next scripted [`Reply`] (or the default reply), as server-sent events | `Model` |
//! | `POST …:generateContent` (the CLI's own side requests) | one candidate with [`FakeGemini::set_side_text`] | `Side` |
//! | `POST …:countTokens` | `{"totalTokens": body length / 4}` | `CountTokens` |
//! | `CONNECT host:port`, or an absolute-form URI naming another host | `502`, nothing forwarded | `Proxy` |
//! | anything else | `404` | `Other` |
//!
//! A streamed reply is a sequence of `data: <GenerateContentResponse>` events: a text in
//! pieces (one candidate part each), or one `functionCall` part; the last event carries
//! `finishReason: STOP` and `usageMetadata`.
//!
//! Point `HTTPS_PROXY`/`HTTP_PROXY` at [`FakeGemini::base_url`] (with
//! `NO_PROXY=127.0.0.1,localhost`) to have every attempt to reach another host recorded as a
//! `Proxy` request and refused.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

pub use super::fake_anthropic::HangState;

/// How often a [`Reply::Hang`] stream sends an SSE comment; a write to a closed connection is
/// what makes the server notice the disconnect.
const PING_EVERY: Duration = Duration::from_millis(100);

/// Token counts every reply reports in `usageMetadata`.
pub const PROMPT_TOKENS: i64 = 25;
pub const CANDIDATE_TOKENS: i64 = 5;

/// One scripted answer to a `Model` request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// A text, streamed as the pieces of [`chunks`](super::fake_anthropic::chunks).
    Text(String),
    /// One `functionCall` part: a tool of the CLI (`run_shell_command`, `write_file`, …) with
    /// its `args`.
    Call { name: String, args: Value },
    /// Sends one text piece, then only SSE comments until the client disconnects.
    Hang,
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Reply::Text(text.into())
    }

    pub fn call(name: impl Into<String>, args: Value) -> Self {
        Reply::Call {
            name: name.into(),
            args,
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
    pub kind: RequestKind,
    pub method: String,
    /// Path without the query (for `CONNECT`, the `host:port` target; for an absolute-form
    /// URI, the whole URI).
    pub path: String,
    pub query: Option<String>,
    /// Lower-case header names; `x-goog-api-key` and `authorization` are left out.
    pub headers: BTreeMap<String, String>,
    /// Whether the request carried an API key (`x-goog-api-key`).
    pub keyed: bool,
    /// The JSON body, or `Value::Null` for an empty or non-JSON body.
    pub body: Value,
    /// The reply used for a `Model` request.
    pub reply: Option<Reply>,
}

impl RecordedRequest {
    /// The `contents` array of a request, serialised, for substring checks.
    pub fn contents_json(&self) -> String {
        self.body
            .get("contents")
            .map(Value::to_string)
            .unwrap_or_default()
    }

    /// The model named in the path (`/v1beta/models/<model>:…`).
    pub fn model(&self) -> Option<&str> {
        let rest = self.path.split("/models/").nth(1)?;
        rest.split(':').next()
    }
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
}

/// A running fake server; stopped when dropped.
pub struct FakeGemini {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for FakeGemini {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeGemini {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            default_reply: Mutex::new(Reply::text("ok")),
            side_text: Mutex::new("{}".to_string()),
            requests: Mutex::new(Vec::new()),
            recorded: watch::channel(0).0,
            hangs: watch::channel(HangState::default()).0,
            own_authority: addr.to_string(),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake gemini server stopped: {e}");
            }
        });
        Self { addr, inner, task }
    }

    /// `http://127.0.0.1:<port>`, for `GOOGLE_GEMINI_BASE_URL` and the proxy variables.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Appends a scripted reply for the next `Model` request.
    pub fn push(&self, reply: Reply) {
        self.inner.queue.lock().unwrap().push_back(reply);
    }

    /// Number of scripted replies not used yet.
    pub fn pending_replies(&self) -> usize {
        self.inner.queue.lock().unwrap().len()
    }

    /// The reply for a `Model` request when the queue is empty (default: text `ok`).
    pub fn set_default_reply(&self, reply: Reply) {
        *self.inner.default_reply.lock().unwrap() = reply;
    }

    /// The text of every side request's answer (default `{}`).
    pub fn set_side_text(&self, text: impl Into<String>) {
        *self.inner.side_text.lock().unwrap() = text.into();
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
                "fake gemini: hang state {:?} did not reach the condition within {limit:?}",
                self.hangs()
            ),
        }
    }

    /// One line per request: `seq kind METHOD path`.
    pub fn summary(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| format!("{} {:?} {} {}", r.seq, r.kind, r.method, r.path))
            .collect()
    }
}

async fn handle(State(inner): State<Arc<Inner>>, req: Request) -> Response {
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
    let post = parts.method == Method::POST;
    let kind = if parts.method == Method::CONNECT || absolute_foreign {
        RequestKind::Proxy
    } else if post && path.ends_with(":streamGenerateContent") {
        RequestKind::Model
    } else if post && path.ends_with(":generateContent") {
        RequestKind::Side
    } else if post && path.ends_with(":countTokens") {
        RequestKind::CountTokens
    } else {
        RequestKind::Other
    };
    let (headers, keyed) = record_headers(&parts.headers);
    let reply = (kind == RequestKind::Model).then(|| {
        inner
            .queue
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| inner.default_reply.lock().unwrap().clone())
    });
    {
        let mut requests = inner.requests.lock().unwrap();
        let seq = requests.len() + 1;
        requests.push(RecordedRequest {
            seq,
            kind,
            method: parts.method.to_string(),
            path,
            query: parts.uri.query().map(str::to_string),
            headers,
            keyed,
            body,
            reply: reply.clone(),
        });
    }
    inner.recorded.send_modify(|n| *n += 1);

    match (kind, reply) {
        (RequestKind::Model, Some(reply)) => {
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
            let inner = inner.clone();
            tokio::spawn(async move { stream_reply(&inner, tx, reply).await });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .body(Body::from_stream(ReceiverStream::new(rx)))
                .unwrap()
        }
        (RequestKind::Side, _) => {
            let text = inner.side_text.lock().unwrap().clone();
            json_response(
                StatusCode::OK,
                response_chunk(vec![json!({ "text": text })], true),
            )
        }
        (RequestKind::CountTokens, _) => json_response(
            StatusCode::OK,
            json!({ "totalTokens": (bytes.len() / 4).max(1) }),
        ),
        (RequestKind::Proxy, _) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::empty())
            .unwrap(),
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({ "error": { "code": 404, "message": "not served by the fake", "status": "NOT_FOUND" } }),
        ),
    }
}

fn record_headers(headers: &HeaderMap) -> (BTreeMap<String, String>, bool) {
    let mut out = BTreeMap::new();
    let mut keyed = false;
    for (name, value) in headers {
        let name = name.as_str().to_ascii_lowercase();
        if name == "x-goog-api-key" || name == "authorization" {
            keyed |= name == "x-goog-api-key" && !value.is_empty();
            continue;
        }
        out.insert(name, String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    (out, keyed)
}

fn json_response(status: StatusCode, value: Value) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(value.to_string()))
        .unwrap()
}

/// One `GenerateContentResponse` with one candidate of `parts`; the `last` one finishes the
/// turn and reports usage.
fn response_chunk(parts: Vec<Value>, last: bool) -> Value {
    let mut candidate = json!({ "content": { "role": "model", "parts": parts }, "index": 0 });
    let mut chunk = json!({ "modelVersion": "gemini-fake" });
    if last {
        candidate["finishReason"] = json!("STOP");
        chunk["usageMetadata"] = json!({
            "promptTokenCount": PROMPT_TOKENS,
            "candidatesTokenCount": CANDIDATE_TOKENS,
            "totalTokenCount": PROMPT_TOKENS + CANDIDATE_TOKENS,
        });
    }
    chunk["candidates"] = json!([candidate]);
    chunk
}

fn sse(data: Value) -> Result<Bytes, Infallible> {
    Ok(Bytes::from(format!("data: {data}\r\n\r\n")))
}

async fn stream_reply(inner: &Inner, tx: mpsc::Sender<Result<Bytes, Infallible>>, reply: Reply) {
    let events: Vec<_> = match reply {
        Reply::Text(text) => {
            let pieces = super::fake_anthropic::chunks(&text);
            let n = pieces.len();
            pieces
                .into_iter()
                .enumerate()
                .map(|(i, piece)| sse(response_chunk(vec![json!({ "text": piece })], i + 1 == n)))
                .collect()
        }
        Reply::Call { name, args } => vec![sse(response_chunk(
            vec![json!({ "functionCall": { "name": name, "args": args } })],
            true,
        ))],
        Reply::Hang => {
            let first = sse(response_chunk(
                vec![json!({ "text": "Working on it" })],
                false,
            ));
            if tx.send(first).await.is_err() {
                return;
            }
            inner.hangs.send_modify(|s| s.started += 1);
            let mut ping = tokio::time::interval(PING_EVERY);
            loop {
                tokio::select! {
                    _ = tx.closed() => break,
                    _ = ping.tick() => {
                        if tx.send(Ok(Bytes::from_static(b": keep-alive\r\n\r\n"))).await.is_err() {
                            break;
                        }
                    }
                }
            }
            inner.hangs.send_modify(|s| s.disconnected += 1);
            return;
        }
    };
    for event in events {
        if tx.send(event).await.is_err() {
            return;
        }
        tokio::task::yield_now().await;
    }
}
