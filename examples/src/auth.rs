//! A token interceptor on both sides, built from tower's own layers: the server filters requests
//! without the right `authorization` metadata (UNAUTHENTICATED, handler never runs: it fails with
//! `rpc_server::Refused`, so the client is told "not executed"), the client adds it to every
//! request.

use bytes::Bytes;
use rpc_core::{Request, Status};
use rpc_server::Refused;
use tower::filter::FilterLayer;
use tower::util::MapRequestLayer;

/// Server layer: requests must carry `authorization: Bearer <token>`.
pub fn require_bearer(
    token: &'static str,
) -> FilterLayer<impl Fn(Request<Bytes>) -> Result<Request<Bytes>, Refused> + Clone + Send + Sync + 'static> {
    FilterLayer::new(move |req: Request<Bytes>| {
        let ok = req
            .metadata()
            .get_str("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            == Some(token);
        if ok {
            Ok(req)
        } else {
            Err(Refused(Status::unauthenticated("missing or wrong bearer token")))
        }
    })
}

/// Client layer: adds `authorization: Bearer <token>` to every request.
pub fn with_bearer(
    token: &'static str,
) -> MapRequestLayer<impl Fn(Request<Bytes>) -> Request<Bytes> + Clone + Send + Sync + 'static> {
    MapRequestLayer::new(move |mut req: Request<Bytes>| {
        req.metadata_mut().insert("authorization", format!("Bearer {token}"));
        req
    })
}
