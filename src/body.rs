//! The HTTP body type every part of the data plane hands on: relayed from an upstream or a
//! client, made by tollgate, or streamed from a content scanner.

/// Body type of everything tollgate sends, relayed or its own. Its error is boxed: a body may
/// come from an upstream (hyper) or from a content scanner (ICAP), and a failure of either must
/// reach the client as a broken body, never as a silently shortened one.
pub type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, BoxError>;

/// Any error a body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// `body` as a `Body`.
pub fn boxed<B>(body: B) -> Body
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    body.map_err(Into::into).boxed_unsync()
}
