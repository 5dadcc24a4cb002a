//! HTTP/1.1 to backends: the request writer and response reader the pool drives.
//!
//! The gateway's upstream side needs a small, fixed part of HTTP/1.1: write one request
//! whose body is already buffered (so always `Content-Length` framed), read the response
//! head, and relay a body framed by `Content-Length`, `chunked` or the connection's close.
//! This module does that on `httparse` (the parser hyper itself uses) inside the request's
//! own task. There is no connection task, no channel between it and the request, and the
//! response head is built once, straight from the parsed bytes; that is what made
//! hyper's client the largest single cost of a proxied request (see `bench/RESULTS.md`).
//! hyper still serves clients (HTTP/1.1 and h2c) and speaks HTTP/2 to backends.
//!
//! Where the framing is decided it follows RFC 9112 §6.3 strictly, and anything it cannot
//! frame with certainty is an error or ends the connection's reuse, never a guess:
//! - interim `1xx` answers are skipped (`101` is refused: the gateway never asks to upgrade);
//!   answers to `HEAD`, `204` and `304` have no body;
//! - `Transfer-Encoding` ending in `chunked` frames the body and overrides `Content-Length`,
//!   which is then removed and the connection not reused; any other transfer coding is read
//!   to the connection's close;
//! - `Content-Length` must be digits, and repeated values must agree;
//! - heads over [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields, obsolete line folding, bad
//!   chunk sizes (non-hex, overflow, over-long lines) and missing chunk CRLFs are errors;
//! - a connection is reused only when its response was HTTP/1.1 without `Connection: close`,
//!   its body ended exactly where its framing said, and no byte follows it.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::proxy::pool::Home;

/// Largest response head (status line and header fields) accepted.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head.
pub const MAX_HEADERS: usize = 128;
/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// The first read on a connection reserves this much: a usual response head, or a few
/// Server-Sent Events.
const READ_START: usize = 4 * 1024;
/// Reads never reserve less than this (an SSE event of a chat stream is a few hundred
/// bytes)...
const READ_MIN: usize = 1024;
/// ...nor more: a read that fills its reservation doubles the next one up to this.
const READ_MAX: usize = 16 * 1024;
/// Bodies up to this size are written in the same buffer as the head (one write).
const COALESCE_BODY: usize = 16 * 1024;

/// Why a response could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed before a response")]
    ClosedBeforeHead,
    #[error("connection closed in the middle of the response head")]
    IncompleteHead,
    #[error("connection closed before the end of the response body")]
    IncompleteBody,
    #[error("malformed response head: {0}")]
    Parse(#[from] httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid response header {0}")]
    Header(String),
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("unexpected 101 Switching Protocols")]
    Upgrade,
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("I/O")]
    Io(#[from] io::Error),
}

/// An upstream byte stream: plain TCP or TLS over it.
pub enum Io {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One HTTP/1.1 connection to a backend and the bytes read from it but not yet used.
///
/// The read buffer follows what arrives, so that thousands of open streams hold next to
/// nothing while they wait: each read reserves [`READ_START`] at first, twice as much after a
/// read that filled its reservation (a large body), half as much after one that used less
/// than an eighth (small events), between [`READ_MIN`] and [`READ_MAX`]. Frames are split off
/// the buffer without a copy and share its allocation until the client's connection has
/// written them; whenever a read must wait with nothing left unread, the buffer is let go, so
/// an idle stream or an idle pooled connection keeps no allocation of its own, and with
/// plain TCP the next one is only taken once the socket is readable.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// Bytes the next read reserves.
    read_size: usize,
}

impl Conn {
    pub fn new(io: Io) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            read_size: READ_START,
        }
    }

    /// Let the read buffer go when nothing in it is left to use (frames split off it keep
    /// their bytes until they are dropped).
    fn release(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// Whether this idle connection can carry a request: the backend has neither closed it
    /// nor sent anything since its last response ended (a TLS close_notify counts). Costs
    /// no system call when the last read drained the socket (tokio then clears its read
    /// readiness) and nothing arrived since; otherwise one read finds out. A close that
    /// the reactor has not yet seen is missed (as with any pool); see the pool's docs.
    pub fn is_open(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        let mut cx = Context::from_waker(Waker::noop());
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }

    /// Write a request. A backend may answer before it has read the whole body (a 413 or
    /// 429 to a large upload) and stop reading: when the socket cannot take more and the
    /// backend has sent response bytes, writing stops and [`Written::Cut`] says the answer
    /// is ready to read (and that the connection must not carry another request). The check
    /// reads through the stream, so TLS records that carry no data (TLS 1.3 session tickets
    /// after the handshake) do not count as an answer. A close meanwhile is a write error.
    pub async fn write_request(&mut self, req: &Encoded) -> io::Result<Written> {
        let mut at = 0;
        let total = req.head.len() + req.body.len();
        std::future::poll_fn(|cx| {
            while at < total {
                let part = if at < req.head.len() {
                    &req.head[at..]
                } else {
                    &req.body[at - req.head.len()..]
                };
                match Pin::new(&mut self.io).poll_write(cx, part) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => at += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Also woken when the backend sends: an early answer ends the write.
                        return match self.poll_fill(cx) {
                            Poll::Pending => Poll::Pending,
                            Poll::Ready(Ok(0)) => {
                                Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
                            }
                            Poll::Ready(Ok(_)) => Poll::Ready(Ok(Written::Cut)),
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                        };
                    }
                }
            }
            Pin::new(&mut self.io)
                .poll_flush(cx)
                .map_ok(|()| Written::All)
        })
        .await
    }

    /// Read what the backend sent into the buffer; `Ok(0)` when it closed the connection.
    /// The buffer grows by the current read size when less than a quarter of that is free
    /// (so a few small events share one allocation while they keep coming), and is let go
    /// when the read has to wait on an empty buffer; see [`Conn`].
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == 0 {
            if let Io::Tcp(s) = &self.io {
                // Nothing to read into yet: wait for the socket before taking memory.
                ready!(s.poll_read_ready(cx))?;
            }
        }
        let free = self.buf.capacity() - self.buf.len();
        let free = if free < self.read_size / 4 {
            self.buf.reserve(self.read_size);
            self.buf.capacity() - self.buf.len()
        } else {
            free
        };
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
            Poll::Ready(Ok(n)) => {
                if n >= free {
                    self.read_size = (self.read_size * 2).min(READ_MAX);
                } else if n < self.read_size / 8 {
                    self.read_size = (self.read_size / 2).max(READ_MIN);
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => {
                self.release();
                Poll::Pending
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        }
    }

    /// Read the final response head of the request just written (interim `1xx` answers
    /// are skipped). `head_request`: the request was `HEAD`, so the answer has no body.
    /// Also says whether the connection may carry another request after this one.
    pub async fn read_head(
        &mut self,
        head_request: bool,
    ) -> Result<(Response<()>, Framing, bool), Error> {
        loop {
            if let Some(parsed) = parse_head(&mut self.buf, head_request)? {
                match parsed {
                    Parsed::Interim => continue,
                    Parsed::Final(resp, framing, reuse) => return Ok((resp, framing, reuse)),
                }
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
            if std::future::poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                return Err(if self.buf.is_empty() {
                    Error::ClosedBeforeHead
                } else {
                    Error::IncompleteHead
                });
            }
        }
    }
}

/// How much of a request went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    All,
    /// The backend answered before taking the whole body.
    Cut,
}

/// A request ready to be written (and written again on a fresh connection if a reused
/// one turns out closed): its head, with the body appended when that is small.
pub struct Encoded {
    head: Vec<u8>,
    /// The body when it is not in `head`.
    body: Bytes,
}

/// Encode a request; see [`encode_head`] for the header rules.
pub fn encode_request(
    method: &Method,
    target: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    traceparent: Option<&[u8; 55]>,
    body: Bytes,
) -> Encoded {
    let coalesce = body.len() <= COALESCE_BODY;
    let mut head = Vec::with_capacity(256 + if coalesce { body.len() } else { 0 });
    encode_head(
        method,
        target,
        host,
        headers,
        traceparent,
        body.len(),
        &mut head,
    );
    if coalesce {
        head.extend_from_slice(&body);
        return Encoded {
            head,
            body: Bytes::new(),
        };
    }
    Encoded { head, body }
}

/// Append a request head for `method target` to `out`. `host` replaces any `Host` in
/// `headers`; the body's framing is always `Content-Length: body_len` (written when the
/// body is not empty or `headers` asked for one), never a `Transfer-Encoding` from `headers`.
/// A `traceparent` (visible ASCII, see [`crate::telemetry::TraceparentValue`]) is written
/// after `headers`, which then hold none.
pub fn encode_head(
    method: &Method,
    target: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
    traceparent: Option<&[u8; 55]>,
    body_len: usize,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length = body_len > 0;
    for (name, value) in headers {
        match *name {
            header::HOST | header::TRANSFER_ENCODING => continue,
            header::CONTENT_LENGTH => {
                length = true;
                continue;
            }
            _ => {}
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(v) = traceparent {
        out.extend_from_slice(b"traceparent: ");
        out.extend_from_slice(v);
        out.extend_from_slice(b"\r\n");
    }
    if length {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
enum Parsed {
    /// A `1xx` answer, already consumed; the final one follows.
    Interim,
    /// The final head, its body's framing, and whether the connection may be reused.
    Final(Response<()>, Framing, bool),
}

/// Parse one response head from the front of `buf`, consuming it; `None` if incomplete.
///
/// The connection-level fields (`Connection` and what it names, `Keep-Alive`,
/// `Transfer-Encoding`, and the other hop-by-hop fields) decide the framing and reuse here
/// and are not in the returned head: they describe this connection, not the response.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, Error> {
    let (len, status, http11, mut fields, conn) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
            Err(e) => return Err(e.into()),
        };
        if len > MAX_HEAD {
            return Err(Error::HeadTooLarge);
        }
        let status =
            StatusCode::from_u16(resp.code.unwrap_or(0)).map_err(|_| httparse::Error::Status)?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Upgrade);
        }
        if status.is_informational() {
            (len, status, false, Vec::new(), ConnectionFields::default())
        } else {
            // Values are sliced out of the head's bytes below, not copied.
            let base = buf.as_ptr() as usize;
            let mut conn = ConnectionFields::default();
            let mut fields = Vec::with_capacity(resp.headers.len());
            for h in resp.headers.iter() {
                let name = HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| Error::Header(format!("name {:?}", h.name)))?;
                if conn.note(&name, h.value)? {
                    let start = h.value.as_ptr() as usize - base;
                    fields.push((name, start..start + h.value.len()));
                }
            }
            (len, status, resp.version == Some(1), fields, conn)
        }
    };
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(Parsed::Interim));
    }
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Length(0)
        } else if let Some(chunked) = conn.chunked {
            if chunked {
                Framing::Chunked(Chunked::Size)
            } else {
                Framing::Close
            }
        } else if let Some(n) = conn.length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
    // With a transfer coding, a Content-Length is wrong (and a smuggling shape): dropped,
    // and the connection is not trusted with another request.
    let both = conn.chunked.is_some() && conn.length.is_some();
    if both || !conn.named.is_empty() {
        fields.retain(|(name, _)| {
            let dropped_length = both && name == header::CONTENT_LENGTH;
            !(dropped_length || conn.named.contains(name))
        });
    }
    let reuse = http11 && !conn.close && !both && framing != Framing::Close;
    let head = buf.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(fields.len());
    for (name, span) in fields {
        let value = HeaderValue::from_maybe_shared(head.slice(span))
            .map_err(|_| Error::Header(format!("value of {name}")))?;
        headers.append(name, value);
    }
    let mut out = Response::new(());
    *out.status_mut() = status;
    *out.version_mut() = if http11 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    *out.headers_mut() = headers;
    Ok(Some(Parsed::Final(out, framing, reuse)))
}

/// What a response head's connection-level fields say.
#[derive(Default)]
struct ConnectionFields {
    /// `Connection: close`.
    close: bool,
    /// Other fields `Connection` names (hop-by-hop too, so not passed on).
    named: Vec<HeaderName>,
    /// With `Transfer-Encoding`: whether its last coding is `chunked`.
    chunked: Option<bool>,
    /// `Content-Length`, every repeated value equal.
    length: Option<u64>,
}

impl ConnectionFields {
    /// Take in one field; true if it is end-to-end (to be passed on).
    fn note(&mut self, name: &HeaderName, value: &[u8]) -> Result<bool, Error> {
        if *name == header::CONNECTION {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    self.close = true;
                } else if token.is_empty() || token.eq_ignore_ascii_case(b"keep-alive") {
                } else if let Ok(named) = HeaderName::from_bytes(token) {
                    self.named.push(named);
                }
            }
            return Ok(false);
        }
        if *name == header::TRANSFER_ENCODING {
            // Codings accumulate across repeated fields: the last one seen is the last.
            let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            return Ok(false);
        }
        if *name == header::CONTENT_LENGTH {
            for part in value.split(|&b| b == b',') {
                let n = digits(part.trim_ascii()).ok_or(Error::ContentLength)?;
                match self.length {
                    Some(m) if m != n => return Err(Error::ContentLength),
                    _ => self.length = Some(n),
                }
            }
            return Ok(true);
        }
        Ok(!super::is_hop_by_hop(name))
    }
}

/// A decimal number of at most 18 digits (no sign, no spaces).
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 18 || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(s.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How a response body is delimited, and how much of it is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes remain.
    Length(u64),
    Chunked(Chunked),
    /// Until the backend closes the connection.
    Close,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many data bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields until an empty line.
    Trailers,
    Done,
}

/// What [`Framing::decode`] found in the buffer.
#[derive(Debug, PartialEq, Eq)]
enum Decoded {
    Data(Bytes),
    /// The body has ended.
    End,
    /// More bytes must be read first.
    More,
}

impl Framing {
    fn is_done(&self) -> bool {
        matches!(self, Framing::Length(0) | Framing::Chunked(Chunked::Done))
    }

    /// Take the next piece of body from `buf`, consuming framing bytes as it goes. After
    /// a piece of data, any framing that follows it in `buf` is consumed too, so the end
    /// of a body is seen together with its last data.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        let data = match self {
            Framing::Length(0) => return Ok(Decoded::End),
            Framing::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                let n = (*left).min(buf.len() as u64);
                *left -= n;
                buf.split_to(n as usize).freeze()
            }
            Framing::Close => {
                if buf.is_empty() {
                    return Ok(Decoded::More);
                }
                buf.split().freeze()
            }
            Framing::Chunked(state) => {
                let data = chunked(state, buf)?;
                if data.is_empty() {
                    return Ok(if *state == Chunked::Done {
                        Decoded::End
                    } else {
                        Decoded::More
                    });
                }
                // Consume what follows the data (CRLF, the next size line, the end).
                chunked_framing(state, buf)?;
                data
            }
        };
        Ok(Decoded::Data(data))
    }

    /// The connection closed: fine only for a body delimited by the close.
    fn eof(&mut self) -> Result<(), Error> {
        match self {
            Framing::Close => {
                *self = Framing::Length(0);
                Ok(())
            }
            _ if self.is_done() => Ok(()),
            _ => Err(Error::IncompleteBody),
        }
    }
}

/// Advance a chunked decoder over framing bytes in `buf` up to the next data; returns that
/// data (empty when the buffer holds no data yet, or the body is done).
fn chunked(state: &mut Chunked, buf: &mut BytesMut) -> Result<Bytes, Error> {
    chunked_framing(state, buf)?;
    if let Chunked::Data(left) = state {
        if buf.is_empty() {
            return Ok(Bytes::new());
        }
        let n = (*left).min(buf.len() as u64);
        *left -= n;
        if *left == 0 {
            *state = Chunked::DataEnd;
        }
        return Ok(buf.split_to(n as usize).freeze());
    }
    Ok(Bytes::new())
}

/// Consume framing (not data) while `buf` has enough of it.
fn chunked_framing(state: &mut Chunked, buf: &mut BytesMut) -> Result<(), Error> {
    loop {
        match state {
            Chunked::Data(_) | Chunked::Done => return Ok(()),
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(());
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Chunked("missing CRLF after chunk data"));
                }
                buf.advance(2);
                *state = Chunked::Size;
            }
            Chunked::Size => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(());
                };
                let size = chunk_size(&line)?;
                *state = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
            }
            Chunked::Trailers => {
                let Some(line) = take_line(buf, MAX_HEAD)? else {
                    return Ok(());
                };
                if line.is_empty() {
                    *state = Chunked::Done;
                }
            }
        }
    }
}

/// Take one CRLF-terminated line (without the CRLF) from `buf`; `None` if incomplete.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, Error> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && buf[i - 1] == b'\r' => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i - 1);
            Ok(Some(line))
        }
        Some(_) => Err(Error::Chunked("bare LF")),
        None if buf.len() > max => Err(Error::Chunked("line too long")),
        None => Ok(None),
    }
}

/// A chunk-size line: hex digits, then optional whitespace and `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::Chunked("chunk size is not hex"));
    }
    if digits > 15 {
        return Err(Error::Chunked("chunk size too large"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(Error::Chunked("junk after chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &d| {
        n * 16 + u64::from((d as char).to_digit(16).unwrap_or(0))
    }))
}

/// A response body read from an HTTP/1.1 connection. When it has been read exactly to
/// its end, the connection goes back to its pool (if reusable); dropped before that, the
/// connection is closed, which is how a client's disconnect cancels the backend's work.
pub struct Body {
    conn: Option<Conn>,
    framing: Framing,
    reuse: bool,
    home: Option<Home>,
}

impl Body {
    /// The body of the response just read on `conn`.
    pub fn new(conn: Conn, framing: Framing, reuse: bool, home: Home) -> Self {
        let mut body = Self {
            conn: Some(conn),
            framing,
            reuse,
            home: Some(home),
        };
        if body.framing.is_done() {
            body.finish();
        }
        body
    }

    /// The body ended cleanly: give the connection back if it can carry another request.
    fn finish(&mut self) {
        let conn = self.conn.take();
        if let (Some(mut conn), Some(home), true) = (conn, self.home.take(), self.reuse) {
            if conn.buf.is_empty() && self.framing != Framing::Close {
                conn.release();
                home.put(conn);
            }
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.framing.is_done()
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }

    /// The first frame, if the bytes read with the head already hold one (or show the body
    /// is malformed), without reading more: `None` when more must be read first.
    pub fn take_buffered(&mut self) -> Option<Result<Frame<Bytes>, Error>> {
        let conn = self.conn.as_mut()?;
        if conn.buf.is_empty() {
            return None;
        }
        match self.framing.decode(&mut conn.buf) {
            Ok(Decoded::Data(data)) => {
                if self.framing.is_done() {
                    self.finish();
                }
                Some(Ok(Frame::data(data)))
            }
            Ok(Decoded::End) => {
                self.finish();
                None
            }
            Ok(Decoded::More) => None,
            Err(e) => {
                self.conn = None;
                Some(Err(e))
            }
        }
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.framing.decode(&mut conn.buf) {
                Ok(Decoded::Data(data)) => {
                    if self.framing.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    // Closed: the end only for a body delimited by the close.
                    self.conn = None;
                    return Poll::Ready(self.framing.eof().err().map(Err));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

/// Fuzzing entry point (feature `fuzzing`): parse `data` as a backend's answer to a GET
/// (heads, interim answers, then the body by its framing), once whole and once split at
/// `split`, and check the two readings agree; never panics on any input.
#[cfg(feature = "fuzzing")]
pub fn fuzz_response(data: &[u8], split: usize) {
    fn read(pieces: &[&[u8]]) -> Result<(u16, Vec<u8>, bool), String> {
        let mut buf = BytesMut::new();
        let mut pieces = pieces.iter();
        let (head, mut framing) = loop {
            match parse_head(&mut buf, false).map_err(|e| e.to_string())? {
                Some(Parsed::Interim) => continue,
                Some(Parsed::Final(r, f, _)) => break (r, f),
                None => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => return Err("incomplete head".into()),
                },
            }
        };
        let mut body = Vec::new();
        loop {
            match framing.decode(&mut buf).map_err(|e| e.to_string())? {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => return Ok((head.status().as_u16(), body, true)),
                Decoded::More => match pieces.next() {
                    Some(p) => buf.extend_from_slice(p),
                    None => {
                        let clean = framing.eof().is_ok();
                        return Ok((head.status().as_u16(), body, clean));
                    }
                },
            }
        }
    }
    let split = split.min(data.len());
    let whole = read(&[data]);
    let parts = read(&[&data[..split], &data[split..]]);
    if let (Ok(w), Ok(p)) = (&whole, &parts) {
        assert_eq!(
            w, p,
            "the same bytes read differently when split at {split}"
        );
        assert!(w.1.len() <= data.len(), "more body than input");
    }
    // A head complete in the first piece must parse the same either way; a body error may
    // show in only one reading when the split cuts it (then it is only more input).
    if whole.is_ok() && split == data.len() {
        assert!(parts.is_ok());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    type Head = (Response<()>, Framing, bool);

    fn head(raw: &str, head_request: bool) -> Result<Option<Head>, Error> {
        let mut buf = BytesMut::from(raw.as_bytes());
        loop {
            match parse_head(&mut buf, head_request)? {
                None => return Ok(None),
                Some(Parsed::Interim) => continue,
                Some(Parsed::Final(r, f, reuse)) => return Ok(Some((r, f, reuse))),
            }
        }
    }

    fn final_head(raw: &str) -> Head {
        head(raw, false).unwrap().unwrap()
    }

    /// Decode a whole body from `raw` fed in pieces of `step` bytes.
    fn body(mut framing: Framing, raw: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), Error> {
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match framing.decode(&mut buf)? {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End => return Ok((out, buf)),
                Decoded::More if fed < raw.len() => {
                    let n = step.min(raw.len() - fed);
                    buf.extend_from_slice(&raw[fed..fed + n]);
                    fed += n;
                }
                Decoded::More => {
                    framing.eof()?;
                    return Ok((out, buf));
                }
            }
        }
    }

    #[test]
    fn a_request_head_carries_the_gateways_host_and_length_only() {
        let host = HeaderValue::from_static("backend:8080");
        let head = |method: Method, target: &str, h: &HeaderMap, tp: Option<&[u8; 55]>, len| {
            let mut out = Vec::new();
            encode_head(&method, target, &host, h, tp, len, &mut out);
            String::from_utf8(out).unwrap()
        };
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("client.example"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("content-length", HeaderValue::from_static("999"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        assert_eq!(
            head(Method::POST, "/p?q=1", &h, None, 12),
            "POST /p?q=1 HTTP/1.1\r\nhost: backend:8080\r\nx-a: 1\r\nx-a: 2\r\ncontent-length: 12\r\n\r\n"
        );
        // A traced attempt's `traceparent` is written with the other fields.
        let tp = *b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert_eq!(
            head(Method::GET, "/", &HeaderMap::new(), Some(&tp), 0),
            "GET / HTTP/1.1\r\nhost: backend:8080\r\ntraceparent: \
             00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\r\n"
        );
        // No body and no length asked for: none written. An explicit empty length is kept.
        assert_eq!(
            head(Method::GET, "/", &HeaderMap::new(), None, 0),
            "GET / HTTP/1.1\r\nhost: backend:8080\r\n\r\n"
        );
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("0"));
        assert!(head(Method::POST, "/", &h, None, 0).ends_with("content-length: 0\r\n\r\n"));
    }

    #[test]
    fn heads_are_parsed_with_their_framing() {
        let (r, f, reuse) = final_head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Ratelimit-Remaining-Requests: 9\r\nx-m: a\r\nx-m: b\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nUpgrade: h2c\r\n\r\nhello");
        assert_eq!(r.status(), 200);
        assert_eq!(f, Framing::Length(5));
        assert_eq!(r.headers()["content-length"], "5");
        for hop in ["connection", "keep-alive", "x-hop", "upgrade"] {
            assert!(
                r.headers().get(hop).is_none(),
                "{hop} is about the connection"
            );
        }
        assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "9");
        assert_eq!(r.headers().get_all("x-m").iter().count(), 2);
        assert!(reuse);

        let (_, f, reuse) = final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(f, Framing::Chunked(Chunked::Size));
        assert!(reuse);

        // Incomplete heads wait for more.
        assert!(head("HTTP/1.1 200 OK\r\nContent-Len", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn interim_answers_are_skipped_and_upgrades_refused() {
        let (r, f, _) = final_head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(r.status(), 201);
        assert!(r.headers().get("link").is_none());
        assert_eq!(f, Framing::Length(0));
        assert!(matches!(
            head(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
                false
            ),
            Err(Error::Upgrade)
        ));
    }

    #[test]
    fn bodiless_answers_have_no_body_whatever_they_say() {
        for raw in [
            "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(final_head(raw).1, Framing::Length(0), "{raw}");
        }
        let (_, f, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(f, Framing::Length(0), "answer to HEAD");
    }

    #[test]
    fn transfer_encoding_wins_over_content_length_and_ends_reuse() {
        // A smuggling-shaped answer: chunked framing is used, the length dropped.
        let (r, f, reuse) = final_head(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert_eq!(f, Framing::Chunked(Chunked::Size));
        assert!(r.headers().get("content-length").is_none());
        assert!(!reuse);
        // Chunked not last: read to the close.
        let (_, f, reuse) =
            final_head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n");
        assert_eq!(f, Framing::Close);
        assert!(!reuse);
        let (_, f, _) = final_head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n",
        );
        assert_eq!(f, Framing::Chunked(Chunked::Size));
    }

    #[test]
    fn content_length_must_be_digits_and_agree() {
        let (_, f, _) =
            final_head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n");
        assert_eq!(f, Framing::Length(7));
        let (_, f, _) = final_head("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n");
        assert_eq!(f, Framing::Length(7));
        for bad in [
            "7, 8",
            "+7",
            "-1",
            "0x10",
            "",
            "1 2",
            "99999999999999999999",
        ] {
            let raw =
                format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\nContent-Length: 7\r\n\r\n");
            let raw = if bad == "7, 8" {
                "HTTP/1.1 200 OK\r\nContent-Length: 7, 8\r\n\r\n".to_owned()
            } else {
                raw
            };
            assert!(
                matches!(head(&raw, false), Err(Error::ContentLength)),
                "{bad:?}"
            );
        }
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n";
        assert!(matches!(head(raw, false), Err(Error::ContentLength)));
    }

    #[test]
    fn connection_close_and_http10_end_reuse_and_unframed_bodies_read_to_close() {
        let (_, f, reuse) = final_head(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 1\r\n\r\n",
        );
        assert_eq!(f, Framing::Length(1));
        assert!(!reuse);
        let (r, _, reuse) = final_head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n");
        assert!(!reuse);
        assert_eq!(r.version(), Version::HTTP_10);
        let (_, f, reuse) = final_head("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(f, Framing::Close);
        assert!(!reuse);
    }

    #[test]
    fn malformed_heads_are_errors() {
        for raw in [
            "HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/2 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            assert!(head(raw, false).is_err(), "{raw:?}");
        }
        let many = format!(
            "HTTP/1.1 200 OK\r\n{}\r\n",
            "x: 1\r\n".repeat(MAX_HEADERS + 1)
        );
        assert!(matches!(head(&many, false), Err(Error::HeadTooLarge)));
    }

    #[test]
    fn length_bodies_end_at_their_length() {
        for step in [1, 3, 100] {
            let (out, rest) = body(Framing::Length(5), b"hello", step).unwrap();
            assert_eq!(out, b"hello");
            assert!(rest.is_empty());
        }
        // Bytes after the body stay in the buffer (so the connection is not reused).
        let (out, rest) = body(Framing::Length(2), b"hello", 100).unwrap();
        assert_eq!(out, b"he");
        assert_eq!(&rest[..], b"llo");
        // Closed early: an error, not a short body.
        assert!(matches!(
            body(Framing::Length(9), b"hello", 2),
            Err(Error::IncompleteBody)
        ));
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let raw = b"5\r\nhello\r\n1;ext=1\r\n \r\nA \r\n0123456789\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in 1..raw.len() {
            let (out, rest) = body(Framing::Chunked(Chunked::Size), raw, step).unwrap();
            assert_eq!(out, b"hello 0123456789", "step {step}");
            assert!(rest.is_empty(), "step {step}");
        }
        // The end is seen with the last data when it arrives in the same read.
        let mut f = Framing::Chunked(Chunked::Size);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n0\r\n\r\n"[..]);
        assert_eq!(
            f.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert!(f.is_done());
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for raw in [
            &b"z\r\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloXX0\r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
            b"1000000000000000\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhel",
            b"0\r\n",
        ] {
            assert!(
                body(Framing::Chunked(Chunked::Size), raw, 4).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(body(Framing::Chunked(Chunked::Size), &long, 10_000).is_err());
    }

    #[test]
    fn close_delimited_bodies_end_at_the_close() {
        let (out, _) = body(Framing::Close, b"all of it", 4).unwrap();
        assert_eq!(out, b"all of it");
    }
}
