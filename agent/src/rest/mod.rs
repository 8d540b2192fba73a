//! The REST edge of the agent: ZStack's `zstack/v1/...` URLs, envelopes and asynchronous
//! API jobs, beside gRPC, over the same core.
//!
//! A request goes: session check (`Authorization: OAuth <session>`, the gRPC listener's
//! sessions) -> [`routes`] (which API the method and URL name, and its request JSON from
//! URL, query string and body) -> [`calls`] (the gRPC edge's own service runs it, in
//! process) -> [`json`] (the reply as ZStack writes it). Queries answer at once (200, or
//! 503 with the error); every other call answers 202 with the location of its API job
//! ([`jobs`]). Malformed requests answer 400, bad sessions 401, unknown URLs 404, always
//! with ZStack's `{"error": {...}}` body.
//!
//! Request bodies are bounded (axum's 2 MiB default); bodies are never logged (an
//! AddImageStoreBackupStorage carries the store's token).

pub mod calls;
pub mod jobs;
pub mod json;
pub mod query;
pub mod routes;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State as AxumState;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::State;
use crate::api::auth::Refused;
use crate::error::{AgentError, ErrorKind};
use calls::Failure;
use jobs::{ApiJobs, Begin, Outcome};
use routes::Api;

/// What the REST handler shares.
#[derive(Debug)]
struct Rest {
    state: State,
    jobs: ApiJobs,
    scheme: &'static str,
    local: SocketAddr,
}

/// Serves the REST API on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: State,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    let ttl = Duration::from_secs(state.config.rest.job_ttl_seconds);
    let rest =
        Arc::new(Rest { state, jobs: ApiJobs::new(ttl), scheme: if tls.is_some() { "https" } else { "http" }, local });
    let app = axum::Router::new().fallback(handle).with_state(rest);
    match tls {
        Some(config) => {
            axum::serve(tls::TlsListener::new(listener, config)?, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await?
        }
        None => axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await?,
    }
    Ok(())
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json;charset=UTF-8")], body.to_string()).into_response()
}

fn failure_response(f: &Failure) -> Response {
    let status = match f.code {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    json_response(status, &f.body())
}

fn refuse(e: &AgentError) -> Response {
    failure_response(&Failure::of(e))
}

async fn handle(
    AxumState(rest): AxumState<Arc<Rest>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = dispatch(&rest, &method, &uri, &headers, &body).await;
    tracing::info!(method = %method, path = %uri.path(), status = response.status().as_u16(), "REST call");
    response
}

async fn dispatch(rest: &Rest, method: &Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Response {
    let Some(under) = uri.path().strip_prefix("/zstack/v1/") else {
        return refuse(&AgentError::new(
            ErrorKind::NotFound,
            format!("no API at {}; APIs are under /zstack/v1/", uri.path()),
        ));
    };
    if let Err(e) = authenticate(rest, headers) {
        return refuse(&e);
    }
    let segments: Vec<&str> = under.split('/').filter(|s| !s.is_empty()).collect();
    let Some(mut route) = routes::route(method.as_str(), &segments) else {
        return refuse(&AgentError::new(ErrorKind::NotFound, format!("no API at {method} {}", uri.path())));
    };
    let query: Vec<(String, String)> =
        form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect();
    if route.api == Api::ApiJob {
        return poll(rest, headers, route.path_param("uuid").unwrap_or(""));
    }
    if route.api.is_query() {
        return run_query(rest, &route, &query).await;
    }
    let request = match route.request(&query, body) {
        Ok(r) => r,
        Err(e) => return refuse(&e),
    };
    if let Err(f) = calls::check(route.api, &request) {
        return failure_response(&f);
    }
    start_job(rest, route.api, method, uri, headers, request)
}

fn authenticate(rest: &Rest, headers: &HeaderMap) -> Result<(), AgentError> {
    let unauthenticated = |m: String| AgentError::new(ErrorKind::Unauthenticated, m);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthenticated("missing header \"Authorization: OAuth <session-uuid>\"".into()))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("OAuth "))
        .ok_or_else(|| unauthenticated("the Authorization header must be \"OAuth <session-uuid>\"".into()))?;
    match rest.state.sessions.verify(token.trim(), SystemTime::now()) {
        Ok(()) => Ok(()),
        Err(Refused::Unknown) => Err(unauthenticated("unknown session".into())),
        Err(Refused::Expired(at)) => {
            Err(unauthenticated(format!("session expired at {}", crate::config::format_rfc3339(at))))
        }
    }
}

async fn run_query(rest: &Rest, route: &routes::Route, query: &[(String, String)]) -> Response {
    let parsed = if route.api.takes_conditions() {
        query::request(query, route.path_param("uuid"))
    } else if let Some((k, _)) = query.first() {
        Err(AgentError::invalid("query", format!("unknown query parameter {k:?}")))
    } else {
        Ok((Value::Object(serde_json::Map::new()), Vec::new()))
    };
    let (request, fields) = match parsed {
        Ok(r) => r,
        Err(e) => return refuse(&e),
    };
    match calls::invoke(&rest.state, route.api, request).await {
        Ok(reply) => json_response(StatusCode::OK, &query::reply(reply, &fields)),
        // A query that ran and failed (a condition on an unknown field too) is ZStack's 503.
        Err(f) => json_response(StatusCode::SERVICE_UNAVAILABLE, &f.body()),
    }
}

/// The job uuid: `X-Job-UUID` (32 hex digits) or a new one.
fn job_uuid(headers: &HeaderMap) -> Result<String, AgentError> {
    let Some(v) = headers.get("x-job-uuid") else {
        return Ok(uuid::Uuid::new_v4().simple().to_string());
    };
    let v = v.to_str().unwrap_or("");
    if v.len() != 32 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AgentError::invalid(
            "X-Job-UUID",
            format!("{} is not a uuid of 32 hex digits", crate::validate::shorten(v)),
        ));
    }
    Ok(v.to_ascii_lowercase())
}

fn start_job(rest: &Rest, api: Api, method: &Method, uri: &Uri, headers: &HeaderMap, mut request: Value) -> Response {
    let uuid = match job_uuid(headers) {
        Ok(u) => u,
        Err(e) => return refuse(&e),
    };
    let webhook = match headers.get("x-web-hook").map(|v| v.to_str().map(str::to_string)) {
        None => None,
        Some(Ok(url)) => match jobs::check_webhook(&url) {
            Ok(()) => Some(url),
            Err(m) => return refuse(&AgentError::invalid("X-Web-Hook", m)),
        },
        Some(Err(_)) => return refuse(&AgentError::invalid("X-Web-Hook", "is not ASCII")),
    };
    let fingerprint = format!("{method} {}\n{request}", uri.path());
    // A backup's job is known at once by the API job's uuid: a create without a
    // resourceUuid gets this one, so the group, the agent's job and the API job share it.
    if api == Api::CreateVmBackup
        && let Value::Object(m) = &mut request
        && m.get("resourceUuid").and_then(Value::as_str).is_none_or(str::is_empty)
    {
        m.insert("resourceUuid".into(), Value::String(uuid.clone()));
    }
    match rest.jobs.begin(&uuid, fingerprint.as_bytes()) {
        Begin::Conflict => {
            return refuse(&AgentError::invalid(
                "X-Job-UUID",
                format!("job {uuid} is another request's; use a new X-Job-UUID"),
            ));
        }
        Begin::Replay => {}
        Begin::New => {
            let (state, jobs, job) = (rest.state.clone(), rest.jobs.clone(), uuid.clone());
            tokio::spawn(async move {
                let (success, body) = match calls::invoke(&state, api, request).await {
                    Ok(reply) => (true, reply),
                    Err(f) => (false, f.body()),
                };
                if !success {
                    tracing::warn!(job = %job, api = ?api, error = %body["error"]["details"], "REST call failed");
                }
                jobs.finish(&job, success, body.clone());
                if let Some(url) = webhook {
                    jobs::deliver(url, job, success, body).await;
                }
            });
        }
    }
    json_response(StatusCode::ACCEPTED, &serde_json::json!({ "location": location(rest, headers, &uuid) }))
}

/// `<scheme>://<host>/zstack/v1/api-jobs/<uuid>`, with the host the client used when it
/// is a plain host[:port].
fn location(rest: &Rest, headers: &HeaderMap, uuid: &str) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map_or_else(|| rest.local.to_string(), str::to_string);
    format!("{}://{host}/zstack/v1/api-jobs/{uuid}", rest.scheme)
}

fn poll(rest: &Rest, headers: &HeaderMap, uuid: &str) -> Response {
    let unknown = || {
        refuse(&AgentError::new(
            ErrorKind::NotFound,
            format!("API job {} is unknown or expired", crate::validate::shorten(uuid)),
        ))
    };
    match rest.jobs.get(&uuid.to_ascii_lowercase()) {
        None => unknown(),
        Some(Outcome::Running) => {
            json_response(StatusCode::ACCEPTED, &serde_json::json!({ "location": location(rest, headers, uuid) }))
        }
        Some(Outcome::Done { success: true, body }) => json_response(StatusCode::OK, &body),
        Some(Outcome::Done { success: false, body }) => json_response(StatusCode::SERVICE_UNAVAILABLE, &body),
    }
}
