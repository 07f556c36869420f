//! A scripted fake of the OpenAI Responses API on `127.0.0.1`, for driving the real Codex
//! agent (`codex-acp`) offline.
//!
//! [`FakeOpenAi::start`] binds `127.0.0.1:0` and serves every request on one catch-all
//! handler:
//!
//! | request | answer | [`RequestKind`] |
//! | --- | --- | --- |
//! | `POST …/responses` | the next scripted [`Reply`] (or the default reply), as server-sent events | `Model` |
//! | `CONNECT host:port`, or an absolute-form URI naming another host | `502`, nothing forwarded | `Proxy` |
//! | anything else | `404` | `Other` |
//!
//! A reply streams the way the Responses API does: `response.created`, then per output item
//! `response.output_item.added`, its deltas (`response.output_text.delta` for a message,
//! `response.function_call_arguments.delta` for a function call) and
//! `response.output_item.done` with the whole item, then `response.completed` with the
//! response's `usage`. Codex's shell tool is the function `exec_command` (`{"cmd": …}`); a call
//! that asks to run outside Codex's sandbox (`sandbox_permissions: "require_escalated"`) is the
//! one Codex asks the client about.
//!
//! Point `HTTPS_PROXY`/`HTTP_PROXY` at [`FakeOpenAi::base_url`] (with
//! `NO_PROXY=127.0.0.1,localhost`) to have every attempt to reach another host recorded as a
//! `Proxy` request and refused.
//!
//! Every request is recorded as a [`RecordedRequest`] (path, query, headers without
//! `authorization`, JSON body) before it is answered.

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

/// How often a [`Reply::Hang`] stream sends another delta; a write to a closed connection is
/// what makes the server notice the disconnect.
const PING_EVERY: Duration = Duration::from_millis(100);

/// Token counts every reply reports in `response.completed`.
pub const INPUT_TOKENS: i64 = 25;
pub const OUTPUT_TOKENS: i64 = 5;

/// One scripted answer to a `Model` request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// An assistant message, streamed as the pieces of
    /// [`chunks`](super::fake_anthropic::chunks).
    Text(String),
    /// A `function_call` output item: `name` with JSON `arguments`.
    Function { name: String, arguments: Value },
    /// A `custom_tool_call` output item (a freeform tool such as Codex's `apply_patch`):
    /// `name` with its raw `input`.
    Custom { name: String, input: String },
    /// Starts an assistant message ("Working on it"), then streams a `.` delta every
    /// [`PING_EVERY`] until the client disconnects: a model that never finishes. (Codex only
    /// notices that it stopped wanting a stream when the next event arrives, so the stream
    /// must keep sending events, not just SSE comments, for the disconnect to show.)
    Hang,
}

impl Reply {
    pub fn text(text: impl Into<String>) -> Self {
        Reply::Text(text.into())
    }

    /// Codex's shell tool, `exec_command`, run outside Codex's own sandbox, which Codex asks
    /// the client about first (`justification` is the question it shows).
    pub fn escalated_exec(cmd: impl Into<String>, justification: impl Into<String>) -> Self {
        Reply::Function {
            name: "exec_command".into(),
            arguments: json!({
                "cmd": cmd.into(),
                "sandbox_permissions": "require_escalated",
                "justification": justification.into(),
            }),
        }
    }
}

impl Reply {
    /// Codex's `apply_patch` adding the file `path` (relative to the session's cwd) with
    /// `content`, one `+` line per line.
    pub fn add_file(path: &str, content: &str) -> Self {
        let lines: String = content.lines().map(|l| format!("+{l}\n")).collect();
        Reply::Custom {
            name: "apply_patch".into(),
            input: format!("*** Begin Patch\n*** Add File: {path}\n{lines}*** End Patch\n"),
        }
    }
}

/// How a request was classified (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Model,
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
    /// Lower-case header names; `authorization` is left out.
    pub headers: BTreeMap<String, String>,
    /// Whether the request carried an `authorization` header.
    pub authorized: bool,
    /// The JSON body, or `Value::Null` for an empty or non-JSON body.
    pub body: Value,
    /// The reply used for a `Model` request.
    pub reply: Option<Reply>,
}

impl RecordedRequest {
    /// The `input` array of a Responses API body, serialised, for substring checks.
    pub fn input_json(&self) -> String {
        self.body
            .get("input")
            .map(Value::to_string)
            .unwrap_or_default()
    }

    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    /// The names of the function tools offered.
    pub fn tool_names(&self) -> Vec<String> {
        self.body
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .filter_map(|t| t.get("name").and_then(Value::as_str))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    }
}

struct Inner {
    queue: Mutex<VecDeque<Reply>>,
    default_reply: Mutex<Reply>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Bumped after every recorded request.
    recorded: watch::Sender<usize>,
    hangs: watch::Sender<HangState>,
    own_authority: String,
}

/// A running fake server; stopped when dropped.
pub struct FakeOpenAi {
    addr: SocketAddr,
    inner: Arc<Inner>,
    task: JoinHandle<()>,
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOpenAi {
    /// Binds `127.0.0.1:0` and serves on the current tokio runtime.
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let inner = Arc::new(Inner {
            queue: Mutex::new(VecDeque::new()),
            default_reply: Mutex::new(Reply::text("ok")),
            requests: Mutex::new(Vec::new()),
            recorded: watch::channel(0).0,
            hangs: watch::channel(HangState::default()).0,
            own_authority: addr.to_string(),
        });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("fake openai server stopped: {e}");
            }
        });
        Self { addr, inner, task }
    }

    /// `http://127.0.0.1:<port>`, for the proxy variables.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:<port>/v1`, a model provider's `base_url`.
    pub fn api_url(&self) -> String {
        format!("{}/v1", self.base_url())
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

    /// Waits until `done` holds for the recorded requests; returns them. Panics after `limit`.
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
                "fake openai: no {what} within {limit:?}; requests: {:#?}",
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
                "fake openai: hang state {:?} did not reach the condition within {limit:?}",
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

/// The `call_id` of the function call answering the `Model` request number `seq`.
pub fn call_id(seq: usize) -> String {
    format!("call_fake_{seq}")
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
    let kind = if parts.method == Method::CONNECT || absolute_foreign {
        RequestKind::Proxy
    } else if parts.method == Method::POST && path.ends_with("/responses") {
        RequestKind::Model
    } else {
        RequestKind::Other
    };
    let (headers, authorized) = record_headers(&parts.headers);
    let reply = (kind == RequestKind::Model).then(|| {
        inner
            .queue
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| inner.default_reply.lock().unwrap().clone())
    });
    let seq = {
        let mut requests = inner.requests.lock().unwrap();
        let seq = requests.len() + 1;
        requests.push(RecordedRequest {
            seq,
            kind,
            method: parts.method.to_string(),
            path,
            query: parts.uri.query().map(str::to_string),
            headers,
            authorized,
            body: body.clone(),
            reply: reply.clone(),
        });
        seq
    };
    inner.recorded.send_modify(|n| *n += 1);

    match (kind, reply) {
        (RequestKind::Model, Some(reply)) => {
            let model = body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or("gpt-fake")
                .to_string();
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
            let inner = inner.clone();
            tokio::spawn(async move { stream_reply(&inner, tx, seq, model, reply).await });
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "text/event-stream")
                .header(header::CACHE_CONTROL, "no-cache")
                .header("x-request-id", format!("req_fake_{seq}"))
                .body(Body::from_stream(ReceiverStream::new(rx)))
                .unwrap()
        }
        (RequestKind::Proxy, _) => Response::builder()
            .status(StatusCode::BAD_GATEWAY)
            .body(Body::empty())
            .unwrap(),
        _ => Response::builder()
            .status(StatusCode::NOT_FOUND)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(
                json!({ "error": { "message": "not served by the fake", "type": "invalid_request_error" } })
                    .to_string(),
            ))
            .unwrap(),
    }
}

fn record_headers(headers: &HeaderMap) -> (BTreeMap<String, String>, bool) {
    let mut out = BTreeMap::new();
    let mut authorized = false;
    for (name, value) in headers {
        let name = name.as_str().to_ascii_lowercase();
        if name == "authorization" {
            authorized = true;
            continue;
        }
        out.insert(name, String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    (out, authorized)
}

fn sse(data: Value) -> Result<Bytes, Infallible> {
    let kind = data["type"].as_str().unwrap_or_default().to_string();
    Ok(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")))
}

/// The whole `response` object, as `response.created` (no output yet) and
/// `response.completed` carry it.
fn response_object(seq: usize, model: &str, status: &str, output: Vec<Value>) -> Value {
    let mut response = json!({
        "id": format!("resp_fake_{seq}"),
        "object": "response",
        "created_at": 1_700_000_000,
        "status": status,
        "model": model,
        "output": output,
    });
    if status == "completed" {
        response["usage"] = json!({
            "input_tokens": INPUT_TOKENS,
            "input_tokens_details": { "cached_tokens": 0 },
            "output_tokens": OUTPUT_TOKENS,
            "output_tokens_details": { "reasoning_tokens": 0 },
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        });
    }
    response
}

fn message_item(seq: usize, status: &str, text: Option<&str>) -> Value {
    let content = match text {
        Some(text) => json!([{ "type": "output_text", "text": text, "annotations": [] }]),
        None => json!([]),
    };
    json!({
        "type": "message",
        "id": format!("msg_fake_{seq}"),
        "status": status,
        "role": "assistant",
        "content": content,
    })
}

async fn stream_reply(
    inner: &Inner,
    tx: mpsc::Sender<Result<Bytes, Infallible>>,
    seq: usize,
    model: String,
    reply: Reply,
) {
    let mut events = vec![sse(json!({
        "type": "response.created",
        "response": response_object(seq, &model, "in_progress", Vec::new()),
    }))];
    let item_id = format!("msg_fake_{seq}");
    let text_deltas = |events: &mut Vec<_>, pieces: &[String]| {
        for piece in pieces {
            events.push(sse(json!({
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "delta": piece,
            })));
        }
    };
    events.push(sse(json!({
        "type": "response.output_item.added",
        "output_index": 0,
        "item": match &reply {
            Reply::Function { name, .. } => json!({
                "type": "function_call",
                "id": format!("fc_fake_{seq}"),
                "call_id": call_id(seq),
                "name": name,
                "arguments": "",
                "status": "in_progress",
            }),
            Reply::Custom { name, .. } => json!({
                "type": "custom_tool_call",
                "id": format!("ctc_fake_{seq}"),
                "call_id": call_id(seq),
                "name": name,
                "input": "",
                "status": "in_progress",
            }),
            _ => message_item(seq, "in_progress", None),
        },
    })));
    let done = match &reply {
        Reply::Text(text) => {
            text_deltas(&mut events, &super::fake_anthropic::chunks(text));
            events.push(sse(json!({
                "type": "response.output_text.done",
                "item_id": item_id,
                "output_index": 0,
                "content_index": 0,
                "text": text,
            })));
            message_item(seq, "completed", Some(text))
        }
        Reply::Function { name, arguments } => {
            let arguments = arguments.to_string();
            events.push(sse(json!({
                "type": "response.function_call_arguments.delta",
                "item_id": format!("fc_fake_{seq}"),
                "output_index": 0,
                "delta": arguments,
            })));
            events.push(sse(json!({
                "type": "response.function_call_arguments.done",
                "item_id": format!("fc_fake_{seq}"),
                "output_index": 0,
                "arguments": arguments,
            })));
            json!({
                "type": "function_call",
                "id": format!("fc_fake_{seq}"),
                "call_id": call_id(seq),
                "name": name,
                "arguments": arguments,
                "status": "completed",
            })
        }
        Reply::Custom { name, input } => {
            events.push(sse(json!({
                "type": "response.custom_tool_call_input.delta",
                "item_id": format!("ctc_fake_{seq}"),
                "output_index": 0,
                "delta": input,
            })));
            json!({
                "type": "custom_tool_call",
                "id": format!("ctc_fake_{seq}"),
                "call_id": call_id(seq),
                "name": name,
                "input": input,
                "status": "completed",
            })
        }
        Reply::Hang => {
            text_deltas(&mut events, &["Working on it".to_string()]);
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
                        let more = sse(json!({
                            "type": "response.output_text.delta",
                            "item_id": item_id,
                            "output_index": 0,
                            "content_index": 0,
                            "delta": ".",
                        }));
                        if tx.send(more).await.is_err() {
                            break;
                        }
                    }
                }
            }
            inner.hangs.send_modify(|s| s.disconnected += 1);
            return;
        }
    };
    events.push(sse(json!({
        "type": "response.output_item.done",
        "output_index": 0,
        "item": done,
    })));
    events.push(sse(json!({
        "type": "response.completed",
        "response": response_object(seq, &model, "completed", vec![done]),
    })));
    for event in events {
        if tx.send(event).await.is_err() {
            return;
        }
        // Lets each piece go out as its own write.
        tokio::task::yield_now().await;
    }
}
