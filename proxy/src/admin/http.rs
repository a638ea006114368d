//! The HTTP endpoint: Prometheus metrics, Kubernetes-style health probes, and a small JSON API
//! over the same commands as the console.
//!
//! - `GET /metrics` — Prometheus text ([`super::metrics`]);
//! - `GET /healthz` — the process answers;
//! - `GET /readyz` — upstream reachable and guard connected, else 503 with the reason;
//! - `GET /api/clients`, `GET /api/events`, `GET /api/rules` — `SHOW CLIENTS` / `SHOW
//!   EVENTS` / `SHOW RULES` as JSON;
//! - `POST /api/clients/{id}/kill` — `KILL <id>`;
//! - `GET /api/locks` — the wait-for graph of the protected tables ([`super::locks_view`]);
//! - `GET /ui` (and `/`, redirected) — the operator's web page over this API ([`super::ui`]).
//!
//! With `admin.api_token` set, every `/api/` request needs `Authorization: Bearer <token>`
//! (401 without one, 403 with a wrong one). Without a token the API is read-only: kill is 403,
//! and every route but `/healthz` answers only requests whose `Host` names an IP address or
//! `localhost` ([`check_host`]), so a web page cannot read it through DNS rebinding.
//!
//! At most [`MAX_HTTP_CONNECTIONS`] connections are served at once (the next gets 503), and a
//! connection has `proxy.startup_timeout` to send each request's head.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::accept::{serve_connections, Admission};
use super::commands::{AdminError, Command, KillResult, KillTarget};
use super::{metrics, ui, Admin, Login};

type Shared = State<Arc<Admin>>;

/// The routes, over `admin`. The Host check is a layer over all of them (routes added later
/// included), not a step of each handler.
pub fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/metrics", get(get_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/clients", get(api_clients))
        .route("/api/events", get(api_events))
        .route("/api/rules", get(api_rules))
        .route("/api/clients/{id}/kill", post(api_kill))
        .route("/api/locks", get(api_locks))
        .merge(ui::routes())
        .layer(middleware::from_fn_with_state(
            Arc::clone(&admin),
            check_host,
        ))
        // Outermost, so refusals carry the headers too.
        .layer(middleware::from_fn(ui::security_headers))
        .with_state(admin)
}

/// The one route the Host check leaves open: it answers a constant, so a page that reaches
/// it learns nothing, and liveness probes keep working whatever name they use.
const HOST_CHECK_EXEMPT: &str = "/healthz";

/// DNS rebinding: a web page in a browser that can reach the endpoint (the operator's own
/// machine, a jump host) points its own host name at the endpoint's address and reads the
/// answers as same-origin. Without a token nothing else stops it, so without one a request
/// must be addressed to the endpoint by IP address or as `localhost` — names an attacker
/// cannot point elsewhere — and anything else gets 421 Misdirected Request. Browsers always
/// send Host, so a request without one is let through. With a token the API needs the
/// token, which such a page does not have.
async fn check_host(State(admin): Shared, request: Request, next: Next) -> Response {
    if admin.credentials().api_token().is_some() || request.uri().path() == HOST_CHECK_EXEMPT {
        return next.run(request).await;
    }
    match request.headers().get(header::HOST) {
        Some(host) if !host_is_an_address(host.as_bytes()) => {
            debug!(host = ?host, path = request.uri().path(), "admin HTTP request refused: Host is a name");
            (
                StatusCode::MISDIRECTED_REQUEST,
                Json(json!({
                    "error": "lockguard: without admin.api_token the admin HTTP endpoint answers \
                              only requests addressed to an IP address or localhost"
                })),
            )
                .into_response()
        }
        _ => next.run(request).await,
    }
}

/// Whether a Host header names an IP literal (`10.0.0.5`, `[::1]`) or `localhost`, with or
/// without a port.
fn host_is_an_address(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    // (the name unless it is a bracketed IPv6 literal, then ":port" or nothing)
    let (name, port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if v6.parse::<Ipv6Addr>().is_ok() => (None, port),
            _ => return false,
        },
        None => match host.find(':') {
            Some(colon) => (Some(&host[..colon]), &host[colon..]),
            None => (Some(host), ""),
        },
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    let name_ok = name.is_none_or(|name| {
        name.eq_ignore_ascii_case("localhost") || name.parse::<Ipv4Addr>().is_ok()
    });
    port_ok && name_ok
}

/// Whether the read API (clients, their statements, events) answers anyone who can reach
/// the address: no token is configured and the address is not loopback-only.
pub fn anonymous_reads_exposed(listen: SocketAddr, has_token: bool) -> bool {
    !has_token && !listen.ip().is_loopback()
}

/// HTTP connections served at once; the next one gets 503 and is closed. Scrapers and probes
/// need a few; the bound keeps a flood of connections from piling up.
pub const MAX_HTTP_CONNECTIONS: usize = 64;

/// How long requests under way may take to finish once shutdown began.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, stop: CancellationToken) {
    if let Ok(listen) = listener.local_addr() {
        if anonymous_reads_exposed(listen, admin.credentials().api_token().is_some()) {
            warn!(
                %listen,
                "admin HTTP API is anonymous: without admin.api_token anyone who can reach \
                 {listen} reads /api/clients (with their last statements) and /api/events; \
                 set admin.api_token or listen on a loopback address"
            );
        }
    }
    let admission = Admission {
        name: "admin HTTP",
        limit: MAX_HTTP_CONNECTIONS,
        refusal: too_many_connections(),
    };
    let app = router(Arc::clone(&admin));
    let stopping = stop.clone();
    serve_connections(listener, admission, stop, move |socket, peer| {
        // Like the proxy's clients: this long to send a request's head. The timer also runs
        // while a kept-alive connection waits for its next request, so idle ones are closed.
        let header_timeout = admin.config().proxy.startup_timeout;
        let service = TowerToHyperService::new(app.clone());
        let stop = stopping.clone();
        async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let connection = builder.serve_connection(TokioIo::new(socket), service);
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                _ = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(SHUTDOWN_GRACE, connection).await.unwrap_or(Ok(()))
                }
            };
            if let Err(e) = served {
                debug!(%peer, error = %e, "admin HTTP connection ended with an error");
            }
        }
    })
    .await;
}

/// The complete answer to a connection over [`MAX_HTTP_CONNECTIONS`].
fn too_many_connections() -> Vec<u8> {
    let body = json!({
        "error": format!("lockguard: too many admin HTTP connections (at most {MAX_HTTP_CONNECTIONS})")
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn get_metrics(State(admin): Shared) -> Response {
    (
        [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
        metrics::render(&admin),
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

async fn readyz(State(admin): Shared) -> Response {
    let readiness = admin.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let reason = match (&readiness.upstream_error, &readiness.guard_error) {
        (Some(e), _) => Some(e.clone()),
        (None, Some(e)) => Some(format!("guard connection: {e}")),
        (None, None) => None,
    };
    let body = json!({
        "ready": readiness.ready,
        "reason": reason,
        "upstream_error": readiness.upstream_error,
        "guard_enabled": readiness.guard_enabled,
        "guard_error": readiness.guard_error,
    });
    (status, Json(body)).into_response()
}

/// Why an API request is refused before it runs.
enum Refusal {
    Unauthorized(&'static str),
    Forbidden(&'static str),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Unauthorized(reason) => (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                Json(json!({ "error": reason })),
            )
                .into_response(),
            Refusal::Forbidden(reason) => {
                (StatusCode::FORBIDDEN, Json(json!({ "error": reason }))).into_response()
            }
        }
    }
}

/// Checks the bearer token. `Ok(Some(login))` when the token was presented and matches,
/// `Ok(None)` when no token is configured (read-only access).
fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<Option<Login>, Refusal> {
    let credentials = admin.credentials();
    let Some(expected) = credentials.api_token() else {
        return Ok(None);
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(Refusal::Unauthorized(
            "this endpoint needs an Authorization: Bearer <admin.api_token> header",
        ))?;
    if crate::secret::secret_eq(expected.as_bytes(), presented.as_bytes()) {
        Ok(Some(Login::http_token()))
    } else {
        Err(Refusal::Forbidden(
            "the bearer token is not admin.api_token",
        ))
    }
}

/// A caller without a token (none configured) runs SHOW commands as a monitor.
fn reader(login: Option<Login>) -> Login {
    login.unwrap_or_else(|| Login {
        user: "anonymous".to_owned(),
        role: lockguard_config::AdminRole::Monitor,
        origin: super::Origin::Http,
    })
}

fn error_response(e: &AdminError) -> Response {
    let status = match e {
        AdminError::Syntax(_) => StatusCode::BAD_REQUEST,
        AdminError::PermissionDenied { .. } => StatusCode::FORBIDDEN,
        AdminError::Unavailable(_) => StatusCode::CONFLICT,
        AdminError::Reload(_) => StatusCode::UNPROCESSABLE_ENTITY,
    };
    (
        status,
        Json(json!({ "error": e.to_string(), "sqlstate": e.sqlstate() })),
    )
        .into_response()
}

async fn show(admin: &Admin, headers: &HeaderMap, command: Command) -> Response {
    let login = match authorize(admin, headers) {
        Ok(login) => reader(login),
        Err(refusal) => return refusal.into_response(),
    };
    match admin.execute(&command, &login).await {
        Ok(table) => Json(table.to_json()).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn api_clients(State(admin): Shared, headers: HeaderMap) -> Response {
    show(&admin, &headers, Command::ShowClients).await
}

async fn api_events(State(admin): Shared, headers: HeaderMap) -> Response {
    show(&admin, &headers, Command::ShowEvents).await
}

async fn api_rules(State(admin): Shared, headers: HeaderMap) -> Response {
    show(&admin, &headers, Command::ShowRules).await
}

async fn api_locks(State(admin): Shared, headers: HeaderMap) -> Response {
    match authorize(&admin, &headers) {
        Ok(_) => Json(admin.locks_view().await).into_response(),
        Err(refusal) => refusal.into_response(),
    }
}

async fn api_kill(State(admin): Shared, headers: HeaderMap, Path(id): Path<u64>) -> Response {
    let login = match authorize(&admin, &headers) {
        Ok(Some(login)) => login,
        Ok(None) => {
            return Refusal::Forbidden(
                "the HTTP API is read-only: configure admin.api_token to allow kills",
            )
            .into_response()
        }
        Err(refusal) => return refusal.into_response(),
    };
    info!(client_id = id, "kill requested over HTTP");
    let report = match admin.kill(KillTarget::Client(id), &login).await {
        Ok(report) => report,
        Err(e) => return error_response(&e),
    };
    let status = match &report.result {
        KillResult::Audited(guard_core::Outcome::Error) | KillResult::Failed => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        KillResult::Audited(_) => StatusCode::OK,
        KillResult::NotFound => StatusCode::NOT_FOUND,
        KillResult::NoBackend | KillResult::InProgress => StatusCode::CONFLICT,
    };
    let body = json!({
        "client_id": report.client_id,
        "backend_pid": report.backend_pid,
        "outcome": report.result.as_str(),
        "detail": report.detail,
    });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ip_literals_and_localhost_count_as_addresses() {
        for good in [
            "127.0.0.1",
            "127.0.0.1:9930",
            "10.1.2.3:80",
            "[::1]",
            "[::1]:9930",
            "[fe80::1]:1",
            "localhost",
            "LocalHost:9930",
        ] {
            assert!(host_is_an_address(good.as_bytes()), "{good}");
        }
        for bad in [
            "attacker.example",
            "attacker.example:9930",
            "localhost.attacker.example",
            "127.0.0.1.nip.io",
            "localhost.",
            "127.0.0.1:",
            "127.0.0.1:99x",
            "[::1",
            "[nonsense]:1",
            "::1",
            "user@127.0.0.1",
            "",
            "1.2.3.4:5:6",
        ] {
            assert!(!host_is_an_address(bad.as_bytes()), "{bad}");
        }
        assert!(!host_is_an_address(&[0xff, b'1']));
    }

    #[test]
    fn only_a_token_less_api_on_a_non_loopback_address_is_exposed() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(anonymous_reads_exposed(addr("0.0.0.0:9930"), false));
        assert!(anonymous_reads_exposed(addr("[::]:9930"), false));
        assert!(anonymous_reads_exposed(addr("10.1.2.3:9930"), false));
        assert!(!anonymous_reads_exposed(addr("0.0.0.0:9930"), true));
        assert!(!anonymous_reads_exposed(addr("127.0.0.1:9930"), false));
        assert!(!anonymous_reads_exposed(addr("[::1]:9930"), false));
    }
}
