//! ICAP's wire format (RFC 3507 §4): the request head, the HTTP heads it encapsulates, the
//! `Encapsulated` offsets, and chunked bodies read in bounded pieces.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// An ICAP response head may be no longer than this (c-icap's are a few hundred bytes).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A chunk's data is handed on in pieces of at most this, whatever size the chunk declares.
const PIECE_BYTES: usize = 64 * 1024;

fn invalid(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

/// An ICAP response's status line and headers.
#[derive(Debug)]
pub struct Head {
    pub status: u16,
    pub reason: String,
    headers: Vec<(String, String)>,
}

impl Head {
    /// The first value of header `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether the server closes the connection after this response.
    pub fn closes(&self) -> bool {
        self.get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// Reads a response head up to its blank line. `Ok(None)`: the connection was closed before a
/// single byte (a pooled connection the server had given up on).
pub async fn read_head<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<Option<Head>> {
    let mut raw = Vec::with_capacity(256);
    loop {
        let before = raw.len();
        let n = (&mut *r).take((MAX_HEAD_BYTES + 1 - raw.len()) as u64).read_until(b'\n', &mut raw).await?;
        if n == 0 {
            return match raw.is_empty() {
                true => Ok(None),
                false => Err(invalid("the ICAP server closed the connection inside a response head")),
            };
        }
        if raw.len() > MAX_HEAD_BYTES {
            return Err(invalid("ICAP response head too long"));
        }
        if matches!(&raw[before..], b"\r\n" | b"\n") {
            break;
        }
    }
    // httparse reads HTTP status lines; ICAP's differs only in its protocol name.
    if !raw.starts_with(b"ICAP/1.0 ") {
        let start = String::from_utf8_lossy(&raw[..raw.len().min(40)]).into_owned();
        return Err(invalid(format!("not an ICAP response: {start:?}")));
    }
    raw[..4].copy_from_slice(b"HTTP");
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    // X-Violations-Found (RFC 3507 §4.3.2 extensions, c-icap) folds its values onto
    // continuation lines.
    let mut config = httparse::ParserConfig::default();
    config.allow_obsolete_multiline_headers_in_responses(true);
    match config.parse_response(&mut response, &raw) {
        Ok(httparse::Status::Complete(_)) => Ok(Some(Head {
            status: response.code.unwrap_or_default(),
            reason: response.reason.unwrap_or_default().to_string(),
            headers: response
                .headers
                .iter()
                .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).trim().to_string()))
                .collect(),
        })),
        _ => Err(invalid("malformed ICAP response head")),
    }
}

/// The sections of an encapsulated message, from `Encapsulated: req-hdr=0, res-hdr=…, res-body=…`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Encapsulated {
    /// (start, end) of the HTTP request head within the encapsulated bytes.
    pub req_hdr: Option<(usize, usize)>,
    pub res_hdr: Option<(usize, usize)>,
    /// Where the heads end: a body follows (chunked) unless `null_body`.
    pub heads_end: usize,
    pub has_body: bool,
}

impl Encapsulated {
    pub fn parse(value: &str) -> io::Result<Self> {
        let mut entries = Vec::new();
        for entry in value.split(',') {
            let (name, offset) =
                entry.trim().split_once('=').ok_or_else(|| invalid(format!("Encapsulated: {value:?}")))?;
            let offset: usize = offset.trim().parse().map_err(|_| invalid(format!("Encapsulated: {value:?}")))?;
            entries.push((name.trim().to_ascii_lowercase(), offset));
        }
        let Some((last, heads_end)) = entries.last().cloned() else { return Err(invalid("empty Encapsulated")) };
        if !matches!(last.as_str(), "req-body" | "res-body" | "null-body" | "opt-body") {
            return Err(invalid(format!("Encapsulated does not end with a body entry: {value:?}")));
        }
        if entries.windows(2).any(|w| w[0].1 > w[1].1) || heads_end > MAX_HEAD_BYTES {
            return Err(invalid(format!("Encapsulated offsets out of order or too large: {value:?}")));
        }
        let mut sections = Self { heads_end, has_body: last != "null-body", ..Self::default() };
        for (i, (name, start)) in entries.iter().enumerate().take(entries.len() - 1) {
            let end = entries[i + 1].1;
            match name.as_str() {
                "req-hdr" => sections.req_hdr = Some((*start, end)),
                "res-hdr" => sections.res_hdr = Some((*start, end)),
                other => return Err(invalid(format!("unexpected Encapsulated entry {other:?}"))),
            }
        }
        Ok(sections)
    }
}

/// The ICAP request head: `METHOD url ICAP/1.0`, then `headers` (each ending in CRLF), then the
/// blank line.
pub fn request_head(method: &str, url: &str, host: &str, headers: &str) -> Vec<u8> {
    format!("{method} {url} ICAP/1.0\r\nHost: {host}\r\nUser-Agent: tollgate\r\n{headers}\r\n").into_bytes()
}

/// An HTTP request head to encapsulate: absolute URI, headers as they will be sent.
pub fn http_request_head(method: &http::Method, uri: &str, headers: &http::HeaderMap) -> Vec<u8> {
    let mut out = format!("{method} {uri} HTTP/1.1\r\n").into_bytes();
    write_headers(&mut out, headers);
    out
}

/// An HTTP response head to encapsulate.
pub fn http_response_head(status: http::StatusCode, headers: &http::HeaderMap) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status.as_u16(), status.canonical_reason().unwrap_or("")).into_bytes();
    write_headers(&mut out, headers);
    out
}

fn write_headers(out: &mut Vec<u8>, headers: &http::HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Parses an encapsulated HTTP request head.
pub fn parse_request_head(raw: &[u8]) -> io::Result<http::request::Parts> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Request::new(&mut headers);
    if !matches!(parsed.parse(raw), Ok(httparse::Status::Complete(_))) {
        return Err(invalid("the scanner returned a malformed HTTP request head"));
    }
    let mut builder = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(http::Version::HTTP_11);
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(()).map(|r| r.into_parts().0).map_err(|e| invalid(format!("scanner's request head: {e}")))
}

/// Parses an encapsulated HTTP response head.
pub fn parse_response_head(raw: &[u8]) -> io::Result<http::response::Parts> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut parsed = httparse::Response::new(&mut headers);
    if !matches!(parsed.parse(raw), Ok(httparse::Status::Complete(_))) {
        return Err(invalid("the scanner returned a malformed HTTP response head"));
    }
    let mut builder = http::Response::builder().status(parsed.code.unwrap_or(500));
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(()).map(|r| r.into_parts().0).map_err(|e| invalid(format!("scanner's response head: {e}")))
}

/// Writes one chunk (nothing for empty data: an empty chunk would end the body).
pub async fn write_chunk<W: AsyncWrite + Unpin>(w: &mut W, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    w.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
    w.write_all(data).await?;
    w.write_all(b"\r\n").await
}

/// The end of a chunked body; `ieof` after a preview that holds the whole body.
pub fn last_chunk(ieof: bool) -> &'static [u8] {
    if ieof { b"0; ieof\r\n\r\n" } else { b"0\r\n\r\n" }
}

/// Reads a chunked body in pieces of bounded size.
#[derive(Default)]
pub struct Chunks {
    /// Bytes left in the current chunk.
    remaining: usize,
    /// Whether the current chunk's trailing CRLF is still to be read.
    in_chunk: bool,
    done: bool,
}

impl Chunks {
    /// The next piece of data; `None` once the last chunk (and its trailer) was read.
    pub async fn next<R: AsyncBufRead + Unpin>(&mut self, r: &mut R) -> io::Result<Option<Bytes>> {
        if self.done {
            return Ok(None);
        }
        if self.remaining == 0 {
            if self.in_chunk {
                expect_crlf(r).await?;
                self.in_chunk = false;
            }
            let line = read_line(r).await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailer lines up to the blank one.
                while !read_line(r).await?.is_empty() {}
                self.done = true;
                return Ok(None);
            }
            (self.remaining, self.in_chunk) = (size, true);
        }
        let mut piece = BytesMut::zeroed(self.remaining.min(PIECE_BYTES));
        r.read_exact(&mut piece).await?;
        self.remaining -= piece.len();
        Ok(Some(piece.freeze()))
    }
}

async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<String> {
    let mut line = Vec::new();
    (&mut *r).take(4096).read_until(b'\n', &mut line).await?;
    if !line.ends_with(b"\n") {
        return Err(invalid("chunked body: line missing or too long"));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}

async fn expect_crlf<R: AsyncBufRead + Unpin>(r: &mut R) -> io::Result<()> {
    match read_line(r).await?.is_empty() {
        true => Ok(()),
        false => Err(invalid("chunked body: data longer than its chunk size")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encapsulated_offsets_become_sections() {
        let e = Encapsulated::parse("req-hdr=0, res-hdr=45, res-body=120").unwrap();
        assert_eq!((e.req_hdr, e.res_hdr, e.heads_end, e.has_body), (Some((0, 45)), Some((45, 120)), 120, true));
        let e = Encapsulated::parse("res-hdr=0, null-body=77").unwrap();
        assert_eq!((e.req_hdr, e.res_hdr, e.has_body), (None, Some((0, 77)), false));
        for bad in ["", "res-hdr=0", "res-hdr=50, res-body=10", "x=0, res-body=4", "res-hdr=zero, res-body=4"] {
            assert!(Encapsulated::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn heads_and_chunks_are_read_in_bounded_pieces() {
        let big = "a".repeat(PIECE_BYTES + 10);
        let wire = format!(
            "ICAP/1.0 200 OK\r\nISTag: \"x1\"\r\nX-Violations-Found: 1\r\n\tfile\r\n\tThreat\r\nEncapsulated: res-hdr=0, res-body=10\r\n\r\n\
             3\r\nabc\r\n{:x}; ext=1\r\n{big}\r\n0\r\nTrailer: t\r\n\r\nNEXT",
            big.len()
        );
        let mut r = tokio::io::BufReader::new(wire.as_bytes());
        let head = read_head(&mut r).await.unwrap().unwrap();
        assert_eq!((head.status, head.get("istag")), (200, Some("\"x1\"")));
        let mut chunks = Chunks::default();
        let mut pieces = Vec::new();
        while let Some(piece) = chunks.next(&mut r).await.unwrap() {
            pieces.push(piece.len());
        }
        assert_eq!(pieces, vec![3, PIECE_BYTES, 10]);
        let mut rest = String::new();
        r.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "NEXT");
        assert!(read_head(&mut tokio::io::BufReader::new(&b""[..])).await.unwrap().is_none());
        let garbage = read_head(&mut tokio::io::BufReader::new(&b"HTTP/1.1 200 OK\r\n\r\n"[..])).await;
        assert!(garbage.unwrap_err().to_string().contains("not an ICAP response"));
    }
}
