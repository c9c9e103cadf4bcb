//! The lb's own answers: the response body type every lb answer has (proxied,
//! status page, error pages) and the small HTML pages the lb writes itself.
//!
//! ```text
//!  backend response (hyper Incoming) ──boxed──▶ ProxyBody ◀── html() ◀── error_page()
//!                                                   │              ◀── status page, landing page
//!                                                   ▼
//!                                      client (through client::ClientBody)
//! ```
//!
//! A leaf: it imports no other lb file, so the proxy, the status page and the
//! client connection code can all use it without importing one another.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};

/// The error of a response body: a backend's answer that broke off.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every response the lb sends.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// An HTML answer with `status`, never cached.
pub fn html(status: StatusCode, body: impl Into<Bytes>) -> Response<ProxyBody> {
    let mut resp = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// The lb's error page: `status` with a one-line `message` (written as given).
pub fn error_page(status: StatusCode, message: &str) -> Response<ProxyBody> {
    html(
        status,
        format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>{code}</title></head>\
             <body><h1>{code} {reason}</h1><p>{message}</p><hr><p>wayfinder</p></body></html>\n",
            code = status.as_u16(),
            reason = status.canonical_reason().unwrap_or(""),
        ),
    )
}
