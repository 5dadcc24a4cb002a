//! Watching a relayed Server-Sent Events stream for what it cost, without delaying it.
//!
//! [`SseTap`] is fed the stream's frames as they are relayed. It splits them into events
//! (lines end in `\n`, `\r\n` or `\r`; an event ends at a blank line; any byte may fall on a
//! frame boundary) and records the usage the backend reports — a chat/completions chunk whose
//! top-level `usage` is an object, or the `response.usage` of a Responses API
//! `response.completed` / `response.incomplete` / `response.failed` event — whether
//! `data: [DONE]` came, and the text streamed so far (bounded), so that a stream cut before its
//! usage can still be charged by counting that text.
//!
//! In [`Mode::Observe`] the caller forwards its own frames unchanged. In [`Mode::Strip`] (the
//! gateway set `stream_options.include_usage` on the client's behalf, see
//! [`inject_include_usage`]) the tap returns the bytes to forward: each event as soon as it is
//! complete, the usage chunk removed and the `"usage":null` member removed from the other
//! chunks, so the client sees the stream it asked for; everything else byte for byte.
//!
//! Per event the work is one linear pass over its `data` that reads only the members that
//! matter (`choices`, `usage`, `type`, `delta`, `response`); serde_json reads a usage object
//! only when one is there.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use super::usage::Usage;

/// The most text [`SseTap`] keeps; what streams past it is counted in `dropped`.
pub const MAX_TEXT_BYTES: usize = 4 * 1024 * 1024;

/// The longest event [`SseTap`] holds while waiting for its end. A longer one is passed on
/// (in strip mode: as it arrives) and not read: no backend sends chunks anywhere near this.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// A buffer emptied after an event keeps its allocation for the next one only up to this
/// size (a chat chunk is a few hundred bytes); a larger one is let go, so a stream waiting
/// between events does not hold what its largest event needed.
const KEEP_BYTES: usize = 2 * 1024;

/// `held`, emptied, if it is small enough to keep; see [`KEEP_BYTES`].
fn kept(held: BytesMut) -> BytesMut {
    if held.capacity() <= KEEP_BYTES {
        held
    } else {
        BytesMut::new()
    }
}

/// What the tap does with the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read only: the caller forwards the original frames.
    Observe,
    /// Remove the usage the gateway asked for: forward what [`SseTap::feed`] returns.
    Strip,
}

/// What the tap found in a stream, at its end or so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary<'a> {
    /// The last usage the backend reported.
    pub usage: Option<Usage>,
    /// `data: [DONE]` was seen (chat and completions streams; the Responses API sends none).
    pub done: bool,
    /// The generated text streamed so far, up to the tap's text limit.
    pub delta_text: &'a str,
    /// Bytes of generated text past the limit, not kept.
    pub dropped: u64,
}

/// What happens to a complete event in strip mode.
#[derive(Debug)]
enum Verdict {
    Keep,
    /// Remove the whole event (the usage chunk).
    Drop,
    /// Remove these bytes of the event (a `usage` member).
    Cut(Range<usize>),
}

/// What a line feed starting a frame means when the last frame ended in a carriage return:
/// it is the second half of that line's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PendingLf {
    None,
    /// The carriage return ended a line of the event being read: the feed is part of it.
    InEvent,
    /// It ended an event already passed on: forward the feed.
    Forward,
    /// It ended an event that was removed: remove the feed too.
    Swallow,
}

/// An SSE stream's usage, end and text; see the module docs.
#[derive(Debug)]
pub struct SseTap {
    mode: Mode,
    /// The next byte starts a line.
    line_start: bool,
    pending_lf: PendingLf,
    /// The bytes of the event being read, when it started in an earlier frame.
    held: BytesMut,
    /// The event being read grew past [`MAX_EVENT_BYTES`]: passed on unread.
    oversize: bool,
    /// Joined `data` lines of an event that has several.
    scratch: Vec<u8>,
    usage_name: memmem::Finder<'static>,
    usage: Option<Usage>,
    done: bool,
    text: Text,
    /// Whether the stream's `model` is read (for traces), and the first non-empty one.
    want_model: bool,
    model: Option<String>,
}

impl SseTap {
    /// A tap keeping up to [`MAX_TEXT_BYTES`] of streamed text.
    pub fn new(mode: Mode) -> Self {
        Self::with_text_limit(mode, MAX_TEXT_BYTES)
    }

    /// A tap keeping up to `limit` bytes of streamed text.
    pub fn with_text_limit(mode: Mode, limit: usize) -> Self {
        Self {
            mode,
            line_start: true,
            pending_lf: PendingLf::None,
            held: BytesMut::new(),
            oversize: false,
            scratch: Vec::new(),
            usage_name: memmem::Finder::new(b"\"usage\""),
            usage: None,
            done: false,
            text: Text {
                kept: String::new(),
                limit,
                dropped: 0,
            },
            want_model: false,
            model: None,
        }
    }

    /// Also read the model the stream names: the first non-empty top-level `model` of a
    /// chunk (Azure's first chunk has an empty one), or the Responses API's
    /// `response.model`.
    pub fn with_model(mut self) -> Self {
        self.want_model = true;
        self
    }

    /// The model the stream named, when [`SseTap::with_model`] asked for it.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    /// The same, handed over.
    pub fn take_model(&mut self) -> Option<String> {
        self.model.take()
    }

    fn note_model(&mut self, raw: &[u8]) {
        if self.model.is_none() {
            self.model = super::usage::model_as_written(raw);
        }
    }

    /// A tap that only reads.
    pub fn observe() -> Self {
        Self::new(Mode::Observe)
    }

    /// A tap that removes the usage chunks the gateway asked for.
    pub fn strip() -> Self {
        Self::new(Mode::Strip)
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Read the next frame. Returns the bytes to forward: in observe mode `frame` itself; in
    /// strip mode the events this frame completes, less what is removed, and nothing of an
    /// event still incomplete (held until it ends; see [`SseTap::flush`] for a stream that
    /// stops inside one). The bytes returned are a slice of `frame`, with no copy, whenever
    /// this frame neither completes a held event nor has anything removed. They may be empty:
    /// an empty frame need not be forwarded.
    pub fn feed(&mut self, frame: Bytes) -> Bytes {
        let len = frame.len();
        if len == 0 {
            return frame;
        }
        let mut out = Out::new(self.mode == Mode::Strip);
        let mut pos = 0;
        // Where the event being read starts in this frame (0 when it began earlier).
        let mut start = 0;
        let f = &frame[..];
        match std::mem::replace(&mut self.pending_lf, PendingLf::None) {
            _ if f[0] != b'\n' => {}
            PendingLf::None => {}
            PendingLf::InEvent => pos = 1,
            PendingLf::Forward => {
                (pos, start) = (1, 1);
                out.keep_to(1);
            }
            PendingLf::Swallow => {
                (pos, start) = (1, 1);
                out.replace(f, 0, 1, &[]);
            }
        }
        while pos < len {
            if self.line_start {
                let b = f[pos];
                if b == b'\n' || b == b'\r' {
                    // A blank line: the event ends with it.
                    let mut end = pos + 1;
                    let cr_at_end = b == b'\r' && end == len;
                    if b == b'\r' && f.get(end) == Some(&b'\n') {
                        end += 1;
                    }
                    let removed = self.complete(f, start, end, &mut out);
                    if cr_at_end {
                        self.pending_lf = if removed {
                            PendingLf::Swallow
                        } else {
                            PendingLf::Forward
                        };
                    }
                    (pos, start) = (end, end);
                    continue;
                }
                self.line_start = false;
            }
            match memchr::memchr2(b'\n', b'\r', &f[pos..]) {
                Some(k) => {
                    let t = pos + k;
                    pos = t + 1;
                    if f[t] == b'\r' {
                        if f.get(pos) == Some(&b'\n') {
                            pos += 1;
                        } else if pos == len {
                            self.pending_lf = PendingLf::InEvent;
                        }
                    }
                    self.line_start = true;
                }
                None => pos = len,
            }
        }
        // The rest of the frame starts (or continues) an event still incomplete.
        if start < len {
            if self.oversize {
                out.keep_to(len);
            } else if self.held.len() + (len - start) > MAX_EVENT_BYTES {
                // Too long to hold: passed on as it comes, unread.
                self.oversize = true;
                let held = std::mem::take(&mut self.held);
                out.replace(f, start, start, &[&held]);
                out.keep_to(len);
            } else {
                self.held.extend_from_slice(&f[start..]);
            }
        }
        if out.strip {
            out.finish(&frame)
        } else {
            frame
        }
    }

    /// The event from `start` (after the bytes held from earlier frames) to `end` in `f` is
    /// complete: read it and, in strip mode, decide what of it goes on. Returns whether it
    /// was removed.
    fn complete(&mut self, f: &[u8], start: usize, end: usize, out: &mut Out) -> bool {
        self.line_start = true;
        if std::mem::take(&mut self.oversize) {
            out.keep_to(end);
            return false;
        }
        if self.held.is_empty() {
            let ev = &f[start..end];
            let verdict = self.read_event(ev);
            match &verdict {
                Verdict::Keep => out.keep_to(end),
                Verdict::Drop => out.replace(f, start, end, &[]),
                Verdict::Cut(r) => out.replace(f, start, end, &[&ev[..r.start], &ev[r.end..]]),
            }
            return matches!(verdict, Verdict::Drop);
        }
        let mut held = std::mem::take(&mut self.held);
        held.extend_from_slice(&f[start..end]);
        let verdict = self.read_event(&held);
        match &verdict {
            Verdict::Keep => out.replace(f, start, end, &[&held]),
            Verdict::Drop => out.replace(f, start, end, &[]),
            Verdict::Cut(r) => out.replace(f, start, end, &[&held[..r.start], &held[r.end..]]),
        }
        held.clear();
        self.held = kept(held);
        matches!(verdict, Verdict::Drop)
    }

    /// Read one complete event: its lines and the blank line ending it.
    fn read_event(&mut self, raw: &[u8]) -> Verdict {
        let mut name: &[u8] = b"";
        let mut data: Option<Range<usize>> = None;
        let mut lines = 0usize;
        self.scratch.clear();
        let mut i = 0;
        while i < raw.len() {
            let end = memchr::memchr2(b'\n', b'\r', &raw[i..]).map_or(raw.len(), |k| i + k);
            let (line, at) = (&raw[i..end], i);
            i = end + 1;
            if raw.get(end) == Some(&b'\r') && raw.get(i) == Some(&b'\n') {
                i += 1;
            }
            if line.is_empty() {
                break;
            }
            // `field: value` (one space after the colon is not part of the value); a line
            // starting with a colon is a comment; a line without one is a field name alone.
            let (field, value_at) = match memchr::memchr(b':', line) {
                Some(0) => continue,
                Some(c) => (
                    &line[..c],
                    at + c + 1 + usize::from(line.get(c + 1) == Some(&b' ')),
                ),
                None => (line, end),
            };
            let value = value_at..end;
            match field {
                b"data" => {
                    lines += 1;
                    match (lines, &data) {
                        (1, _) => data = Some(value),
                        (2, Some(first)) => {
                            self.scratch.extend_from_slice(&raw[first.clone()]);
                            self.scratch.push(b'\n');
                            self.scratch.extend_from_slice(&raw[value]);
                        }
                        _ => {
                            self.scratch.push(b'\n');
                            self.scratch.extend_from_slice(&raw[value]);
                        }
                    }
                }
                b"event" => name = &raw[value],
                _ => {}
            }
        }
        let Some(first) = data else {
            return Verdict::Keep;
        };
        if lines > 1 {
            // Several data lines (no OpenAI-style backend sends them): read, never edited.
            let joined = std::mem::take(&mut self.scratch);
            self.inspect(name, &joined);
            if joined.capacity() <= KEEP_BYTES {
                self.scratch = joined;
            }
            return Verdict::Keep;
        }
        match self.inspect(name, &raw[first.clone()]) {
            Verdict::Cut(r) => Verdict::Cut(first.start + r.start..first.start + r.end),
            v => v,
        }
    }

    /// Read one event's data: record what it says, and say what strip mode does with it.
    fn inspect(&mut self, name: &[u8], data: &[u8]) -> Verdict {
        if data == b"[DONE]" {
            self.done = true;
            return Verdict::Keep;
        }
        let Some(top) = Top::read(data, Some(&mut self.text)) else {
            return Verdict::Keep;
        };
        if self.want_model && self.model.is_none() {
            if let Some(m) = &top.model {
                self.note_model(&data[m.clone()]);
            }
        }
        // The Responses API names its events twice: `event:` and the data's `type`.
        let kind = match (name, &top.kind) {
            (b"", Some(r)) => &data[r.clone()],
            _ => name,
        };
        if let Some(delta) = &top.delta {
            if matches!(
                kind,
                b"response.output_text.delta" | b"response.function_call_arguments.delta"
            ) {
                self.text.push_json_str(&data[delta.clone()]);
            }
        }
        if let (Some(resp), true) = (
            &top.response,
            matches!(
                kind,
                b"response.completed" | b"response.incomplete" | b"response.failed"
            ),
        ) {
            let resp = &data[resp.clone()];
            if self.usage_name.find(resp).is_some() || (self.want_model && self.model.is_none()) {
                let inner = Top::read(resp, None);
                if let Some(m) = inner.as_ref().and_then(|t| t.model.clone()) {
                    if self.want_model {
                        self.note_model(&resp[m]);
                    }
                }
                if let Some(u) = inner
                    .and_then(|t| t.usage)
                    .and_then(|m| Usage::from_json(&resp[m.value]))
                {
                    self.usage = Some(u);
                }
            }
        }
        let Some(member) = top.usage else {
            return Verdict::Keep;
        };
        let verdict = match data.get(member.value.start) {
            Some(b'{') => {
                if let Some(u) = Usage::from_json(&data[member.value.clone()]) {
                    self.usage = Some(u);
                }
                // The usage chunk has no choices; a backend that puts its usage on a chunk
                // with content keeps the content.
                if top.choices_empty {
                    Verdict::Drop
                } else {
                    Verdict::Cut(member.removal)
                }
            }
            Some(b'n') => Verdict::Cut(member.removal),
            _ => Verdict::Keep,
        };
        if self.mode == Mode::Strip {
            verdict
        } else {
            Verdict::Keep
        }
    }

    /// At the end of the stream: in strip mode, the bytes of an event that never ended
    /// (forward them last, so the client gets every byte the backend sent); empty in observe
    /// mode, where the caller forwarded them already.
    pub fn flush(&mut self) -> Bytes {
        let held = std::mem::take(&mut self.held).freeze();
        if self.mode == Mode::Strip {
            held
        } else {
            Bytes::new()
        }
    }

    /// What the stream showed so far.
    pub fn finish(&self) -> Summary<'_> {
        Summary {
            usage: self.usage,
            done: self.done,
            delta_text: &self.text.kept,
            dropped: self.text.dropped,
        }
    }
}

/// The bytes strip mode forwards for one frame: a slice of it while nothing changes, else a
/// buffer of the pieces. Every byte of the frame is either in the current run (forwarded as
/// it is), replaced, or held; runs and replacements come in the frame's order.
struct Out {
    strip: bool,
    /// The run of the frame's bytes forwarded unchanged, not yet copied into `buf`.
    run: Range<usize>,
    buf: Option<BytesMut>,
}

impl Out {
    fn new(strip: bool) -> Self {
        Self {
            strip,
            run: 0..0,
            buf: None,
        }
    }

    /// Forward the frame's bytes up to `end` as they are (they follow the run).
    fn keep_to(&mut self, end: usize) {
        self.run.end = end;
    }

    /// Forward `pieces` instead of the frame's bytes `start..end` (which follow the run).
    fn replace(&mut self, f: &[u8], start: usize, end: usize, pieces: &[&[u8]]) {
        if !self.strip {
            return;
        }
        debug_assert_eq!(self.run.end, start);
        let buf = self.buf.get_or_insert_with(BytesMut::new);
        buf.extend_from_slice(&f[self.run.clone()]);
        for p in pieces {
            buf.extend_from_slice(p);
        }
        self.run = end..end;
    }

    fn finish(self, frame: &Bytes) -> Bytes {
        match self.buf {
            None => frame.slice(self.run),
            Some(mut buf) => {
                buf.extend_from_slice(&frame[self.run]);
                buf.freeze()
            }
        }
    }
}

/// The generated text a stream carried, bounded.
#[derive(Debug)]
struct Text {
    kept: String,
    limit: usize,
    dropped: u64,
}

impl Text {
    fn push(&mut self, s: &str) {
        let room = self.limit.saturating_sub(self.kept.len());
        if self.dropped == 0 && s.len() <= room {
            self.kept.push_str(s);
            return;
        }
        // Once text is dropped, all that follows is: what is kept stays a prefix.
        let mut cut = if self.dropped == 0 { room } else { 0 };
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        self.kept.push_str(&s[..cut]);
        self.dropped += (s.len() - cut) as u64;
    }

    /// Push a JSON string's contents, given as written between its quotes.
    fn push_json_str(&mut self, raw: &[u8]) {
        let mut i = 0;
        while i < raw.len() {
            let k = memchr::memchr(b'\\', &raw[i..]).map_or(raw.len(), |k| i + k);
            // Escapes are ASCII: the bytes between them are whole UTF-8 sequences.
            match std::str::from_utf8(&raw[i..k]) {
                Ok(s) => self.push(s),
                Err(_) => return,
            }
            if k == raw.len() {
                return;
            }
            let Some((c, next)) = unescape(raw, k) else {
                return;
            };
            self.push(c.encode_utf8(&mut [0; 4]));
            i = next;
        }
    }
}

/// The character the escape at `raw[at]` (a backslash) stands for, and where the text goes
/// on. A lone surrogate reads as U+FFFD, as serde_json's lossy reading does.
fn unescape(raw: &[u8], at: usize) -> Option<(char, usize)> {
    let c = match raw.get(at + 1)? {
        b'"' => '"',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        b'u' => {
            let hi = hex4(raw.get(at + 2..at + 6)?)?;
            if (0xD800..0xDC00).contains(&hi) && raw.get(at + 6..at + 8) == Some(b"\\u") {
                let lo = hex4(raw.get(at + 8..at + 12)?)?;
                if (0xDC00..0xE000).contains(&lo) {
                    let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    return Some((char::from_u32(c)?, at + 12));
                }
            }
            return Some((char::from_u32(hi).unwrap_or('\u{FFFD}'), at + 6));
        }
        _ => return None,
    };
    Some((c, at + 2))
}

fn hex4(h: &[u8]) -> Option<u32> {
    std::str::from_utf8(h)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
}

/// A top-level member: its value, and the bytes to remove to remove it (with a comma).
#[derive(Debug)]
struct Member {
    value: Range<usize>,
    removal: Range<usize>,
}

/// What one pass over a chunk's top-level object found (ranges into its text).
#[derive(Debug)]
struct Top {
    /// `type`'s contents (the Responses API).
    kind: Option<Range<usize>>,
    /// `delta`'s contents when it is a string (the Responses API).
    delta: Option<Range<usize>>,
    /// `response`'s value (the Responses API).
    response: Option<Range<usize>>,
    /// `model`'s contents when it is a string.
    model: Option<Range<usize>>,
    usage: Option<Member>,
    /// `choices` is absent, `null` or `[]`.
    choices_empty: bool,
}

impl Top {
    /// Read `data` as a JSON object, pushing the text of its `choices` into `text` when given.
    /// `None` when it is not one (the pass stops at the first byte that does not fit).
    fn read(data: &[u8], mut text: Option<&mut Text>) -> Option<Self> {
        let mut top = Self {
            kind: None,
            delta: None,
            response: None,
            model: None,
            usage: None,
            choices_empty: true,
        };
        let mut w = Walk { b: data, i: 0 };
        w.eat(b'{')?;
        w.ws();
        if w.peek()? == b'}' {
            return Some(top);
        }
        // The comma before the current member, if it is not the first.
        let mut comma = None;
        loop {
            w.ws();
            let key_start = w.i;
            let key = w.key()?;
            w.eat(b':')?;
            w.ws();
            let value_start = w.i;
            match &*key {
                b"choices" if w.peek()? == b'[' => {
                    let mut n = 0usize;
                    w.array(|w| {
                        n += 1;
                        choice(w, text.as_deref_mut())
                    })?;
                    top.choices_empty = n == 0;
                }
                b"choices" => {
                    top.choices_empty = w.peek()? == b'n';
                    w.skip()?;
                }
                b"type" | b"delta" | b"model" if w.peek()? == b'"' => {
                    let s = w.string()?;
                    match &*key {
                        b"type" => top.kind = Some(s),
                        b"delta" => top.delta = Some(s),
                        _ => top.model = Some(s),
                    }
                }
                _ => w.skip()?,
            }
            let value = value_start..w.i;
            w.ws();
            let next = w.peek()?;
            match &*key {
                b"usage" => {
                    let removal = match (comma, next) {
                        (Some(c), _) => c..value.end,
                        (None, b',') => key_start..w.i + 1,
                        (None, _) => key_start..value.end,
                    };
                    top.usage = Some(Member { value, removal });
                }
                b"response" => top.response = Some(value),
                _ => {}
            }
            match next {
                b',' => {
                    comma = Some(w.i);
                    w.i += 1;
                }
                b'}' => return Some(top),
                _ => return None,
            }
        }
    }
}

/// One of `choices`: `delta.content`, `delta.tool_calls[].function.arguments` (chat) and
/// `text` (completions) are generated text.
fn choice(w: &mut Walk<'_>, mut text: Option<&mut Text>) -> Option<()> {
    w.object(|w, key| match key {
        b"text" => w.text(text.as_deref_mut()),
        b"delta" if w.peek() == Some(b'{') => w.object(|w, key| match key {
            b"content" => w.text(text.as_deref_mut()),
            b"tool_calls" if w.peek() == Some(b'[') => w.array(|w| {
                w.object(|w, key| match key {
                    b"function" if w.peek() == Some(b'{') => w.object(|w, key| match key {
                        b"arguments" => w.text(text.as_deref_mut()),
                        _ => w.skip(),
                    }),
                    _ => w.skip(),
                })
            }),
            _ => w.skip(),
        }),
        _ => w.skip(),
    })
}

/// A forward-only reader of JSON text: each call consumes one piece (whitespace before
/// it included) or returns `None` where the text does not fit.
struct Walk<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walk<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// At a string: its contents as written (escapes not decoded).
    fn string(&mut self) -> Option<Range<usize>> {
        self.eat(b'"')?;
        let start = self.i;
        let mut j = start;
        loop {
            let k = j + memchr::memchr2(b'"', b'\\', self.b.get(j..)?)?;
            if self.b[k] == b'\\' {
                j = k + 2;
            } else {
                self.i = k + 1;
                return Some(start..k);
            }
        }
    }

    /// At a member name: the name, escapes decoded when it has any.
    fn key(&mut self) -> Option<std::borrow::Cow<'a, [u8]>> {
        let r = self.string()?;
        let b: &'a [u8] = self.b;
        let raw = &b[r];
        if !raw.contains(&b'\\') {
            return Some(raw.into());
        }
        let mut t = Text {
            kept: String::new(),
            limit: usize::MAX,
            dropped: 0,
        };
        t.push_json_str(raw);
        Some(t.kept.into_bytes().into())
    }

    /// A string value's text pushed into `text`; any other value skipped.
    fn text(&mut self, text: Option<&mut Text>) -> Option<()> {
        if self.peek()? != b'"' {
            return self.skip();
        }
        let r = self.string()?;
        if let Some(t) = text {
            t.push_json_str(&self.b[r]);
        }
        Some(())
    }

    /// Any value.
    fn skip(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0u32;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                let start = self.i;
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
                (self.i > start).then_some(())
            }
        }
    }

    /// At an object: `f` reads each member's value, given its name.
    fn object(&mut self, mut f: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        self.ws();
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            let key = self.key()?;
            self.eat(b':')?;
            self.ws();
            f(self, &key)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// At an array: `f` reads each element.
    fn array(&mut self, mut f: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        self.ws();
        if self.peek()? == b']' {
            self.i += 1;
            return Some(());
        }
        loop {
            self.ws();
            f(self)?;
            self.ws();
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }
}

/// A streaming chat/completions request body with `stream_options.include_usage` set to
/// `true`, when the client did not set it: `"stream": true` and `stream_options` absent,
/// `null`, or an object whose `include_usage` is absent, `null` or `false`. Every other byte
/// is the client's. `None` when nothing needs to change, and for a body that is not such a
/// request (not a JSON object, not streaming, a member given twice, values of other types).
/// The caller decides which operations take `stream_options` (chat and text completions).
pub fn inject_include_usage(body: &[u8]) -> Option<Bytes> {
    const OPTIONS: &[u8] = br#"{"include_usage":true}"#;
    // `"stream": true` needs the literal `true`, which no escape spells: a body without it
    // (most requests that do not stream) has nothing to change, and is not parsed.
    memchr::memmem::find(body, b"true")?;
    let text = std::str::from_utf8(body).ok()?;
    let top = members(text)?;
    let one = |name: &str| {
        let mut found = top.iter().filter(|(k, _)| k == name);
        match (found.next(), found.next()) {
            (_, Some(_)) => Err(()),
            (m, None) => Ok(m.map(|(_, span)| span.clone())),
        }
    };
    let stream = one("stream").ok()??;
    if &text[stream.clone()] != "true" {
        return None;
    }
    let edit = |at: Range<usize>, with: &[&[u8]]| {
        let mut out = Vec::with_capacity(body.len() + 40);
        out.extend_from_slice(&body[..at.start]);
        for w in with {
            out.extend_from_slice(w);
        }
        out.extend_from_slice(&body[at.end..]);
        Some(Bytes::from(out))
    };
    let Some(options) = one("stream_options").ok()? else {
        // Right after `"stream": true`.
        return edit(stream.end..stream.end, &[br#","stream_options":"#, OPTIONS]);
    };
    match &text[options.clone()] {
        "null" => return edit(options, &[OPTIONS]),
        o if !o.starts_with('{') => return None,
        _ => {}
    }
    let inner = members(&text[options.clone()])?;
    let mut found = inner.iter().filter(|(k, _)| k == "include_usage");
    match (found.next(), found.next()) {
        (None, _) => {
            // First in the object, after its `{`.
            let open = options.start + 1;
            let comma: &[u8] = if inner.is_empty() { b"" } else { b"," };
            edit(open..open, &[br#""include_usage":true"#, comma])
        }
        (Some((_, span)), None) => {
            let at = options.start + span.start..options.start + span.end;
            match &text[at.clone()] {
                "false" | "null" => edit(at, &[b"true"]),
                _ => None,
            }
        }
        (Some(_), Some(_)) => None,
    }
}

/// The members of the JSON object `text`: each name (decoded) and the byte range of its
/// value in `text`. `None` when `text` is not exactly one JSON object.
fn members(text: &str) -> Option<Vec<(String, Range<usize>)>> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;

    struct Members {
        base: usize,
        len: usize,
    }
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, Range<usize>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                let raw: &'de RawValue = map.next_value()?;
                let v = raw.get();
                // A borrowed raw value is a slice of the text itself.
                let at = (v.as_ptr() as usize)
                    .checked_sub(self.base)
                    .filter(|at| at + v.len() <= self.len)
                    .ok_or_else(|| serde::de::Error::custom("value outside the text"))?;
                out.push((key.into_owned(), at..at + v.len()));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_str(text);
    let visitor = Members {
        base: text.as_ptr() as usize,
        len: text.len(),
    };
    let out = (&mut de).deserialize_map(visitor).ok()?;
    de.end().ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// What a whole run gives: the bytes forwarded and the summary's parts.
    #[derive(Debug, PartialEq, Eq)]
    struct Run {
        out: Vec<u8>,
        usage: Option<Usage>,
        done: bool,
        text: String,
        dropped: u64,
    }

    fn run(mode: Mode, limit: usize, pieces: &[&[u8]]) -> Run {
        let mut tap = SseTap::with_text_limit(mode, limit);
        let mut out = Vec::new();
        for p in pieces {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(p)));
        }
        out.extend_from_slice(&tap.flush());
        let s = tap.finish();
        Run {
            out,
            usage: s.usage,
            done: s.done,
            text: s.delta_text.to_owned(),
            dropped: s.dropped,
        }
    }

    /// Feed `stream` whole, byte by byte, split in two at every position and in random
    /// pieces: every way gives the same result, which is returned.
    fn all_ways(mode: Mode, stream: &[u8]) -> Run {
        all_ways_limit(mode, MAX_TEXT_BYTES, stream)
    }

    fn all_ways_limit(mode: Mode, limit: usize, stream: &[u8]) -> Run {
        let whole = run(mode, limit, &[stream]);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(mode, limit, &bytes), whole, "byte by byte");
        for at in 0..=stream.len() {
            let (a, b) = stream.split_at(at);
            assert_eq!(run(mode, limit, &[a, b]), whole, "split at {at}");
        }
        for seed in 0..50u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut pieces = Vec::new();
            let mut rest = stream;
            while !rest.is_empty() {
                let n = rng.usize(0..=rest.len().min(40));
                pieces.push(&rest[..n]);
                rest = &rest[n..];
            }
            assert_eq!(run(mode, limit, &pieces), whole, "pieces, seed {seed}");
        }
        if mode == Mode::Observe {
            assert!(
                whole.out == stream,
                "observe hands back every frame as it is"
            );
        }
        whole
    }

    fn usage(prompt: u64, cached: u64, completion: u64, reasoning: u64) -> Option<Usage> {
        Some(Usage {
            prompt,
            cached,
            completion,
            reasoning,
        })
    }

    /// A chat stream as OpenAI sends it, with or without `include_usage`.
    fn chat_stream(include_usage: bool) -> String {
        let u = if include_usage {
            r#","usage":null"#
        } else {
            ""
        };
        let mut s = String::new();
        for delta in [
            r#"{"role":"assistant","content":""}"#,
            r#"{"content":"Hel"}"#,
            r#"{"content":"lo \"usage\": {\n} \u00e9\ud83d\ude00"}"#,
            r#"{}"#,
        ] {
            s += &format!(
                "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]{u}}}\n\n"
            );
        }
        if include_usage {
            s += r#"data: {"id":"c1","object":"chat.completion.chunk","created":1,"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14,"prompt_tokens_details":{"cached_tokens":3},"completion_tokens_details":{"reasoning_tokens":0}}}"#;
            s += "\n\n";
        }
        s + "data: [DONE]\n\n"
    }

    const CHAT_TEXT: &str = "Hello \"usage\": {\n} \u{e9}\u{1f600}";

    #[test]
    fn reads_the_streamed_model_when_asked() {
        // Azure's first chunk names no model (its prompt filter results).
        let stream = "data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\"}\n\ndata: {\"id\":\"c1\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: {\"id\":\"c1\",\"model\":\"later\",\"choices\":[]}\n\ndata: [DONE]\n\n";
        for at in 0..=stream.len() {
            let mut t = SseTap::observe().with_model();
            t.feed(Bytes::copy_from_slice(&stream.as_bytes()[..at]));
            t.feed(Bytes::copy_from_slice(&stream.as_bytes()[at..]));
            assert_eq!(t.model(), Some("gpt-4o-2024-08-06"), "split at {at}");
        }
        let mut t = SseTap::observe();
        t.feed(Bytes::from(stream));
        assert_eq!(t.model(), None, "not read unless asked");
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"r1\",\"model\":\"gpt-4o\",\"usage\":{\"input_tokens\":5,\"output_tokens\":6}}}\n\n";
        let mut t = SseTap::observe().with_model();
        t.feed(Bytes::from(responses));
        assert_eq!(t.model(), Some("gpt-4o"));
        assert_eq!(t.finish().usage.map(|u| u.completion), Some(6));
    }

    #[test]
    fn observe_reads_usage_done_and_text() {
        let r = all_ways(Mode::Observe, chat_stream(true).as_bytes());
        assert_eq!(r.usage, usage(9, 3, 5, 0));
        assert!(r.done);
        assert_eq!(r.text, CHAT_TEXT);
        let r = all_ways(Mode::Observe, chat_stream(false).as_bytes());
        assert_eq!((r.usage, r.done, r.text.as_str()), (None, true, CHAT_TEXT));
    }

    #[test]
    fn every_line_ending_reads_the_same() {
        let lf = chat_stream(true);
        for ending in ["\r\n", "\r"] {
            let stream = lf.replace('\n', ending);
            // (The `\n` escapes inside JSON strings are two bytes, not line feeds.)
            let r = all_ways(Mode::Observe, stream.as_bytes());
            assert_eq!(
                (r.usage, r.done, r.text.as_str()),
                (usage(9, 3, 5, 0), true, CHAT_TEXT),
                "{ending:?}"
            );
            let stripped = all_ways(Mode::Strip, stream.as_bytes());
            assert_eq!(
                stripped.out,
                chat_stream(false).replace('\n', ending).as_bytes(),
                "{ending:?}"
            );
            assert_eq!(stripped.usage, usage(9, 3, 5, 0));
        }
    }

    #[test]
    fn strip_gives_the_stream_without_include_usage() {
        let r = all_ways(Mode::Strip, chat_stream(true).as_bytes());
        assert_eq!(
            String::from_utf8(r.out).unwrap(),
            chat_stream(false),
            "usage chunk and usage:null members removed"
        );
        assert_eq!((r.usage, r.done), (usage(9, 3, 5, 0), true));
        assert_eq!(r.text, CHAT_TEXT);
        // A stream that has no usage passes byte for byte.
        let r = all_ways(Mode::Strip, chat_stream(false).as_bytes());
        assert_eq!(String::from_utf8(r.out).unwrap(), chat_stream(false));
    }

    #[test]
    fn strip_removes_usage_null_wherever_it_is_and_keeps_everything_else() {
        for (chunk, want) in [
            (r#"{"usage":null,"a":1}"#, r#"{"a":1}"#),
            (r#"{"a":1, "usage" : null ,"b":2}"#, r#"{"a":1 ,"b":2}"#),
            (r#"{ "usage": null }"#, r#"{  }"#),
            (
                r#"{"a":{"usage":null},"usage":null}"#,
                r#"{"a":{"usage":null}}"#,
            ),
            (r#"{"a":"\"usage\":null"}"#, r#"{"a":"\"usage\":null"}"#),
        ] {
            let stream = format!(": keep-alive\nevent: chunk\nid: 7\ndata: {chunk}\nretry: 5\n\n");
            let want = format!(": keep-alive\nevent: chunk\nid: 7\ndata: {want}\nretry: 5\n\n");
            let r = all_ways(Mode::Strip, stream.as_bytes());
            assert_eq!(String::from_utf8(r.out).unwrap(), want, "{chunk}");
        }
    }

    #[test]
    fn azure_first_chunk_passes() {
        let first = r#"{"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]"#;
        let with_null = format!("data: {first},\"usage\":null}}\n\ndata: [DONE]\n\n");
        let without = format!("data: {first}}}\n\ndata: [DONE]\n\n");
        let r = all_ways(Mode::Strip, with_null.as_bytes());
        assert_eq!(String::from_utf8(r.out).unwrap(), without);
        let r = all_ways(Mode::Strip, without.as_bytes());
        assert_eq!(String::from_utf8(r.out).unwrap(), without);
        assert_eq!(r.usage, None);
    }

    #[test]
    fn usage_on_a_chunk_with_content_keeps_the_content() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n";
        let r = all_ways(Mode::Strip, stream.as_bytes());
        assert_eq!(
            String::from_utf8(r.out).unwrap(),
            "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n"
        );
        assert_eq!((r.usage, r.text.as_str()), (usage(2, 0, 1, 0), "x"));
    }

    #[test]
    fn tool_call_arguments_and_completions_text_count() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"text\":\" and\",\"index\":0},{\"text\":\" more\",\"index\":1}]}\n\n",
        );
        let r = all_ways(Mode::Observe, stream.as_bytes());
        assert_eq!(r.text, "{\"a\":1} and more");
        assert!(!r.done, "no [DONE]");
    }

    fn responses_stream() -> String {
        let mut s = String::new();
        let mut ev = |kind: &str, data: &str| {
            s += &format!("event: {kind}\ndata: {{\"type\":\"{kind}\",{data}}}\n\n");
        };
        ev(
            "response.created",
            r#""response":{"id":"r1","status":"in_progress","usage":null}"#,
        );
        ev(
            "response.output_text.delta",
            r#""item_id":"m1","delta":"Hi"}"#.trim_end_matches('}'),
        );
        ev("response.output_text.delta", r#""delta":" there\n""#);
        ev("response.output_text.done", r#""text":"Hi there\n""#);
        ev(
            "response.completed",
            r#""response":{"id":"r1","status":"completed","output":[{"content":[{"text":"usage"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":4},"output_tokens":20,"output_tokens_details":{"reasoning_tokens":16},"total_tokens":32}}"#,
        );
        s
    }

    #[test]
    fn responses_stream_usage_and_text() {
        let stream = responses_stream();
        let r = all_ways(Mode::Observe, stream.as_bytes());
        assert_eq!(r.usage, usage(12, 4, 20, 16));
        assert_eq!(r.text, "Hi there\n");
        assert!(!r.done);
        // Strip mode leaves a Responses stream alone (its usage is not top-level).
        let r = all_ways(Mode::Strip, stream.as_bytes());
        assert_eq!(String::from_utf8(r.out).unwrap(), stream);
        // Without `event:` lines the data's `type` says what each event is.
        let bare: String = stream
            .lines()
            .filter(|l| !l.starts_with("event:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let r = all_ways(Mode::Observe, bare.as_bytes());
        assert_eq!(
            (r.usage, r.text.as_str()),
            (usage(12, 4, 20, 16), "Hi there\n")
        );
    }

    #[test]
    fn a_cut_stream_keeps_its_text_and_strip_forwards_its_last_bytes() {
        let full = chat_stream(true);
        let cut = &full[..full.find("{}").unwrap()];
        let r = all_ways(Mode::Observe, cut.as_bytes());
        assert_eq!((r.usage, r.done), (None, false));
        assert_eq!(r.text, CHAT_TEXT, "the text of the events that ended");
        let r = all_ways(Mode::Strip, cut.as_bytes());
        // Every byte goes on (the incomplete event last, from `flush`); the complete events
        // lose their usage:null.
        let complete = &cut[..cut.rfind("\n\n").unwrap() + 2];
        let tail = &cut[complete.len()..];
        assert_eq!(
            String::from_utf8(r.out).unwrap(),
            complete.replace(r#","usage":null"#, "") + tail
        );
    }

    #[test]
    fn text_is_bounded_and_the_rest_counted() {
        let r = all_ways_limit(Mode::Observe, 8, chat_stream(false).as_bytes());
        assert_eq!(r.text, "Hello \"u");
        assert_eq!(r.dropped, (CHAT_TEXT.len() - 8) as u64);
        // Never half a character: the 4-byte emoji does not fit in 3 bytes.
        let r = all_ways_limit(
            Mode::Observe,
            CHAT_TEXT.len() - 1,
            chat_stream(false).as_bytes(),
        );
        assert_eq!(r.text, CHAT_TEXT.trim_end_matches('\u{1f600}'));
        assert_eq!(r.dropped, 4);
    }

    #[test]
    fn complete_events_go_on_at_once_without_copies() {
        let mut tap = SseTap::strip();
        let frame = Bytes::from(chat_stream(false));
        let out = tap.feed(frame.clone());
        assert_eq!(out, frame);
        assert_eq!(
            out.as_ptr(),
            frame.as_ptr(),
            "a slice of the frame, not a copy"
        );
        // An incomplete event is held; the complete ones before it go on at once.
        let mut tap = SseTap::strip();
        let out = tap.feed(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"b\""));
        assert_eq!(out, "data: {\"a\":1}\n\n");
        let out = tap.feed(Bytes::from_static(b":2}\n\n"));
        assert_eq!(out, "data: {\"b\":2}\n\n");
    }

    #[test]
    fn an_oversized_event_passes_unread() {
        let big = "x".repeat(2 * MAX_EVENT_BYTES);
        let stream = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{big}\"}}}}],\"usage\":null}}\n\ndata: {{\"usage\":null}}\n\n"
        );
        let mut tap = SseTap::strip();
        let mut out = Vec::new();
        for piece in stream.as_bytes().chunks(4096) {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
        }
        out.extend_from_slice(&tap.flush());
        // The big event went on untouched; the small one after it was stripped.
        let out = String::from_utf8(out).unwrap();
        let want = stream.replace("data: {\"usage\":null}", "data: {}");
        assert_eq!(
            out.len(),
            want.len(),
            "{}",
            &out[out.len().saturating_sub(80)..]
        );
        assert!(out == want);
        assert_eq!(tap.finish().delta_text, "");
    }

    #[test]
    fn include_usage_is_injected_only_where_needed() {
        let inject = |b: &str| {
            inject_include_usage(b.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        assert_eq!(
            inject(r#"{"model":"m", "stream" : true ,"messages":[]}"#).as_deref(),
            Some(
                r#"{"model":"m", "stream" : true,"stream_options":{"include_usage":true} ,"messages":[]}"#
            )
        );
        assert_eq!(
            inject(r#"{"stream":true,"stream_options":null}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        assert_eq!(
            inject(r#"{"stream":true,"stream_options":{ }}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true }}"#)
        );
        assert_eq!(
            inject(r#"{"stream":true,"stream_options":{"x":1}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#)
        );
        assert_eq!(
            inject(r#"{"stream_options":{"include_usage": false},"stream":true}"#).as_deref(),
            Some(r#"{"stream_options":{"include_usage": true},"stream":true}"#)
        );
        for unchanged in [
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":false}"#,
            r#"{"messages":[]}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream":true}"#,
            r#"{"stream":true,"stream_options":5}"#,
            r#"{"stream":true,"stream_options":{"include_usage":1}}"#,
            r#"{"stream":true,"stream_options":{"include_usage":false,"include_usage":false}}"#,
            r#"[{"stream":true}]"#,
            r#"{"stream":true} {}"#,
            "not json",
        ] {
            assert_eq!(inject(unchanged), None, "{unchanged}");
        }
        // The result reads as the same request with include_usage set.
        let body = r#"{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi \"stream\""}],"temperature":0.5}"#;
        let out: serde_json::Value = serde_json::from_str(&inject(body).unwrap()).unwrap();
        let mut want: serde_json::Value = serde_json::from_str(body).unwrap();
        want["stream_options"] = serde_json::json!({ "include_usage": true });
        assert_eq!(out, want);
    }

    /// A measurement, not a check: `cargo test --release --lib account::tap::tests::throughput
    /// -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement; run in release"]
    fn throughput() {
        let stream = chat_stream(true).repeat(2000);
        let events = stream.matches("\n\n").count();
        let frames: Vec<Bytes> = stream
            .split_inclusive("\n\n")
            .map(|e| Bytes::copy_from_slice(e.as_bytes()))
            .collect();
        for mode in [Mode::Observe, Mode::Strip] {
            let start = std::time::Instant::now();
            let rounds = 20;
            for _ in 0..rounds {
                let mut tap = SseTap::new(mode);
                for f in &frames {
                    std::hint::black_box(tap.feed(f.clone()));
                }
                std::hint::black_box(tap.finish());
            }
            let t = start.elapsed().as_secs_f64() / f64::from(rounds);
            eprintln!(
                "{mode:?}: {:.0} ns/event, {:.0} MB/s",
                t * 1e9 / events as f64,
                stream.len() as f64 / t / 1e6
            );
        }
        let mut doc = String::from(r#"{"object":"list","data":[{"embedding":["#);
        for i in 0..200_000 {
            doc += &format!("0.{i:06},");
        }
        doc += r#"0.1]}],"usage":{"prompt_tokens":5,"total_tokens":5}}"#;
        let start = std::time::Instant::now();
        let mut scan = crate::account::usage::JsonUsage::new();
        for piece in doc.as_bytes().chunks(16 * 1024) {
            scan.feed(piece);
        }
        assert!(scan.finish().is_some());
        let t = start.elapsed().as_secs_f64();
        eprintln!("JsonUsage: {:.0} MB/s", doc.len() as f64 / t / 1e6);
    }

    /// Against the simulator: what it sends, read as the gateway would read it.
    mod with_sim {
        use super::*;
        use crate::account::usage::JsonUsage;
        use crate::sim::tests::{post, ANSWER, AZURE_CHAT};
        use crate::sim::{SimHandle, SimOptions};

        fn strip_frames(frames: &[Bytes]) -> Vec<u8> {
            let mut tap = SseTap::strip();
            let mut out = Vec::new();
            for f in frames {
                out.extend_from_slice(&tap.feed(f.clone()));
            }
            out.extend_from_slice(&tap.flush());
            out
        }

        #[tokio::test]
        async fn strip_gives_the_client_the_stream_it_asked_for() {
            let sim = SimHandle::start(SimOptions::default()).await.unwrap();
            for (path, body) in [
                (
                    AZURE_CHAT,
                    r#"{"messages":[{"role":"user","content":"hi"}],"stream":true}"#,
                ),
                (
                    "/v1/chat/completions",
                    r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream": true,"stream_options":{"include_usage":false}}"#,
                ),
                (
                    "/v1/completions",
                    r#"{"model":"m","prompt":"Once","stream":true}"#,
                ),
            ] {
                let seed = [("x-sim-seed", "41")];
                let asked = post(&sim, path, &seed, body.as_bytes()).await;
                let injected = inject_include_usage(body.as_bytes()).unwrap();
                let sent = post(&sim, path, &seed, &injected).await;
                assert_ne!(
                    sent.body(),
                    asked.body(),
                    "{path}: the usage is there to strip"
                );
                assert_eq!(
                    String::from_utf8(strip_frames(&sent.frames)).unwrap(),
                    asked.text(),
                    "{path}"
                );
                let r = all_ways(Mode::Strip, &sent.body());
                assert_eq!(r.out, asked.body(), "{path}: however the frames fall");
                let reported = sent.events().pop().unwrap();
                assert_eq!(r.usage, Usage::from_value(&reported["usage"]), "{path}");
                assert!(r.usage.unwrap().completion > 0);
                assert_eq!((r.done, r.text.as_str()), (true, ANSWER), "{path}");
            }
        }

        #[tokio::test]
        async fn responses_stream_and_cut_stream() {
            let sim = SimHandle::start(SimOptions::default()).await.unwrap();
            let body = br#"{"model":"o3","input":"Say hello","stream":true}"#;
            let a = post(&sim, "/openai/v1/responses", &[], body).await;
            let r = all_ways(Mode::Observe, &a.body());
            let completed = a.events().pop().unwrap();
            assert_eq!(r.usage, Usage::from_value(&completed["response"]["usage"]));
            assert_eq!(r.usage.unwrap().reasoning, 16);
            assert_eq!((r.done, r.text.as_str()), (false, ANSWER));

            let body = br#"{"messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true}}"#;
            let a = post(
                &sim,
                AZURE_CHAT,
                &[("x-sim-behavior", "cut-stream:4")],
                body,
            )
            .await;
            assert!(a.failed);
            let mut tap = SseTap::observe();
            for f in &a.frames {
                tap.feed(f.clone());
            }
            let s = tap.finish();
            assert_eq!((s.usage, s.done), (None, false));
            assert_eq!(s.delta_text, "Portcullis is relaying this ");
            assert_eq!(s.dropped, 0);
        }

        #[tokio::test]
        async fn json_usage_reads_the_sims_answers_frame_by_frame() {
            let sim = SimHandle::start(SimOptions::default()).await.unwrap();
            for (path, body) in [
                (
                    AZURE_CHAT,
                    r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                ),
                ("/v1/embeddings", r#"{"model":"e","input":["usage","x"]}"#),
                ("/v1/responses", r#"{"model":"o1","input":"hi"}"#),
            ] {
                let a = post(&sim, path, &[("x-sim-cached-tokens", "3")], body.as_bytes()).await;
                let want = Usage::from_value(&a.json()["usage"]);
                assert!(want.is_some_and(|u| u.prompt > 0), "{path}");
                let mut scan = JsonUsage::new();
                for f in &a.frames {
                    scan.feed(f);
                }
                assert_eq!(scan.finish(), want, "{path}");
                let mut scan = JsonUsage::new();
                for b in a.body().chunks(3) {
                    scan.feed(b);
                }
                assert_eq!(scan.finish(), want, "{path}: in 3-byte pieces");
            }
        }
    }
}
