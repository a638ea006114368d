//! The operator's web page: a live wait-for graph of the protected tables, the clients, the
//! guard's events and a kill button, drawn by a small script from the JSON API. The files are
//! compiled into the binary (no CDN, works offline) and served from the HTTP endpoint, under
//! the same Host check and connection cap as the API.
//!
//! The page itself holds no data, so it loads without the API token; the script asks for the
//! data with the token the operator types (kept in the page's memory only), and without one
//! the page is read-only. Every response of the endpoint carries [`security_headers`]: the
//! page runs only its own script and style (no inline code), cannot be framed, and the API's
//! JSON cannot be sniffed as anything else.

use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// Where the page lives; `/` redirects here.
pub const PAGE_PATH: &str = "/ui";

/// Only the endpoint's own script, style and API; no inline code, plugins, frames, forms
/// or `<base>`.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// The page's routes, to merge into the endpoint's router (whose layers then cover them).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|| async { Redirect::to(PAGE_PATH) }))
        .route(
            PAGE_PATH,
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The page and the binary change together: a browser must not keep an old script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// Sets the browser-facing security headers on every response of the endpoint (the API's
/// JSON and the refusals included): a content security policy without inline code, no
/// framing (clickjacking a kill button), no MIME sniffing, no referrer.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}
