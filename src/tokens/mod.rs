//! Tokens: offline BPE token counting and per-request token estimates, for token-based
//! admission (issue 14). The admit stage reserves an [`Estimate`] before a request is
//! forwarded and reconciles it with the backend's `usage` afterwards; the account stage
//! counts streamed delta text with [`count`] when a backend cuts a stream. A leaf module: of
//! the pipeline it knows only [`Operation`](crate::route::Operation).
//!
//! # Tokenizers
//! `cl100k_base` and `o200k_base` from the `bpe-openai` crate, whose tables are embedded in
//! the binary at build time: nothing is downloaded, ever. Each table is deserialised on first
//! use into a process-wide static (a `LazyLock` in the crate), after which access is a static
//! reference. That first use costs about 30 ms (cl100k) and 65 ms (o200k) of one core in a
//! release build on the 2-core development machine, and the tables then stay resident: about
//! 32 MB (cl100k) and 65 MB (o200k) of RSS. [`warm_up`] loads o200k (the encoding of every
//! current model, and of names it does not recognise) at startup, or at the reload, of a
//! configuration that estimates requests (`Snapshot::estimates_tokens`), instead of on the
//! first request; a configuration that estimates nothing loads no table unless an answer
//! must be counted (a cut stream, a success without `usage`). cl100k is loaded by the first
//! request for an older model. [`encoding_for`] picks the table from a model or deployment
//! name.
//!
//! # Bounded work
//! Measured on that machine (release build, one core, 64 KiB to 1 MiB inputs): counting time
//! is linear in the input for every case tried — one repeated character, random letters with
//! no whitespace, random letters in short words, random printable ASCII, random Unicode,
//! prose — with throughput between ~9 MB/s (random letters, random Unicode) and ~160 MB/s
//! (one repeated punctuation character); prose runs at ~50 MB/s. So 1 MiB can cost ~120 ms of
//! CPU, too long to hold a worker thread that serves other connections. Work is therefore
//! capped: at most [`EXACT_BYTES`] (256 KiB) of text are tokenized exactly per call of
//! [`count`], and per request (across all its strings) in [`estimate`]. The cap is applied
//! between the pre-tokenizer's pieces: every piece that would cross it, and everything after
//! it, counts one token per byte. No text has more tokens than bytes (every token is at least
//! one byte) and a text's count is the sum of its pieces' counts, so a capped count is an
//! over-estimate bound, never an under-count: past the cap ~4-5x for prose, ~2x for random
//! letters, 8x for one repeated letter. Worst case measured per call: ~30 ms (256 KiB of random
//! letters in short words, then the cap); a 1 MiB run with no whitespace is one piece, so it
//! costs only the pre-tokenizer's scan (~4 ms). Prose of up to ~50k tokens is counted exactly;
//! a 32k-token chat prompt estimates in ~3 ms, a 1k-token one in ~0.1 ms.

mod estimate;
mod image;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use std::sync::OnceLock;

use bpe_openai::Tokenizer;

pub use estimate::{estimate, estimate_body, is_form, Estimate, EstimateOptions, ReserveOutput};

/// Bytes of text tokenized exactly per [`count`] call or per [`estimate`]; the rest counts
/// one token per byte (see the module docs).
pub const EXACT_BYTES: usize = 256 * 1024;

/// A BPE vocabulary of OpenAI's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `cl100k_base`: gpt-4, gpt-3.5-turbo, text-embedding-ada-002 / -3-*, davinci-002...
    Cl100k,
    /// `o200k_base`: gpt-4o, gpt-4.1, gpt-4.5, gpt-5, o1, o3, o4, gpt-oss...
    O200k,
}

impl Encoding {
    /// The encoding's name as tiktoken spells it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Cl100k => "cl100k_base",
            Self::O200k => "o200k_base",
        }
    }

    fn tokenizer(self) -> &'static Tokenizer {
        match self {
            Self::Cl100k => bpe_openai::cl100k_base(),
            Self::O200k => bpe_openai::o200k_base(),
        }
    }
}

/// Load the o200k table now (about 65 ms of one core and 65 MB, once per process) so that no
/// request pays for it. Idempotent and cheap after the first call.
pub fn warm_up() {
    let _ = Encoding::O200k.tokenizer();
}

/// The encoding a model or Azure deployment name most likely uses.
///
/// Matched in lowercase (with `_` and spaces read as `-`) by family substrings, so that
/// deployment names such as `prod-gpt-4o-mini` or `GPT4_turbo` are recognised:
/// o200k for the gpt-4o / gpt-4.1 / gpt-4.5 / gpt-5 / o1 / o3 / o4 families, `chatgpt-4o*`,
/// `gpt-oss*` and `computer-use*`; cl100k for older ones (gpt-4, gpt-3.5, text-embedding-*,
/// davinci, babbage, curie, ada).
///
/// Anything unrecognised is o200k: Azure deployment names are arbitrary (`chat-prod`), and
/// a deployment made today runs an o200k model — every OpenAI model since gpt-4o uses it.
/// The error of a wrong guess is small for English (the two encodings differ by a few
/// percent) and is corrected when the estimate is reconciled with the backend's usage.
pub fn encoding_for(model: &str) -> Encoding {
    // Only ASCII bytes change, so the result is UTF-8 still; short names (all real ones)
    // are normalised on the stack.
    let normal = |b: &u8| match b {
        b'_' | b' ' => b'-',
        b => b.to_ascii_lowercase(),
    };
    let mut stack = [0u8; 128];
    let heap: Vec<u8>;
    let bytes: &[u8] = if model.len() <= stack.len() {
        for (d, b) in stack.iter_mut().zip(model.as_bytes()) {
            *d = normal(b);
        }
        &stack[..model.len()]
    } else {
        heap = model.as_bytes().iter().map(normal).collect();
        &heap
    };
    let name = std::str::from_utf8(bytes).unwrap_or_default();
    const O200K: [&str; 15] = [
        "gpt-4o",
        "gpt4o",
        "gpt-4.1",
        "gpt-41",
        "gpt4.1",
        "gpt41",
        "gpt-4.5",
        "gpt-45",
        "gpt4.5",
        "gpt45",
        "gpt-5",
        "gpt5",
        "gpt-oss",
        "gptoss",
        "computer-use",
    ];
    const CL100K: [&str; 8] = [
        "gpt-4",
        "gpt4",
        "gpt-3",
        "gpt3",
        "text-embedding",
        "davinci",
        "babbage",
        "curie",
    ];
    if O200K.iter().any(|f| name.contains(f)) || o_series(name) {
        Encoding::O200k
    } else if CL100K.iter().any(|f| name.contains(f)) || name.split('-').any(|s| s == "ada") {
        Encoding::Cl100k
    } else {
        Encoding::O200k
    }
}

/// Whether a segment of the name is an o-series model: `o1`, `o3-mini`, `my-o4mini`, but not
/// `o365` or `gpt-4-0613`.
fn o_series(name: &str) -> bool {
    name.split(['-', '.', ':', '/']).any(|s| {
        let b = s.as_bytes();
        b.first() == Some(&b'o')
            && matches!(b.get(1), Some(b'1' | b'3' | b'4'))
            && !b.get(2).is_some_and(u8::is_ascii_digit)
    })
}

/// Tokens of `text` in `enc`: exact up to [`EXACT_BYTES`], an over-estimate bound past it.
pub fn count(enc: Encoding, text: &str) -> u64 {
    Counter::new(enc).text(text)
}

/// Chat roles: nearly every message has one, so their counts are kept (see [`Counter::text`]).
const ROLES: [&str; 6] = [
    "user",
    "assistant",
    "system",
    "developer",
    "tool",
    "function",
];

/// The tokens of each of [`ROLES`] in `enc`, counted on first use.
fn role_tokens(enc: Encoding) -> &'static [u64; ROLES.len()] {
    static CL100K: OnceLock<[u64; ROLES.len()]> = OnceLock::new();
    static O200K: OnceLock<[u64; ROLES.len()]> = OnceLock::new();
    let cell = match enc {
        Encoding::Cl100k => &CL100K,
        Encoding::O200k => &O200K,
    };
    cell.get_or_init(|| ROLES.map(|r| enc.tokenizer().count(r) as u64))
}

/// Counts text against one budget of exactly tokenized bytes (see the module docs).
struct Counter {
    enc: Encoding,
    tok: &'static Tokenizer,
    left: usize,
}

impl Counter {
    fn new(enc: Encoding) -> Self {
        Self {
            enc,
            tok: enc.tokenizer(),
            left: EXACT_BYTES,
        }
    }

    /// Tokens of `text`, the same as `Tokenizer::count` (both tables need no normalisation)
    /// while the budget lasts; past it, one per byte.
    fn text(&mut self, text: &str) -> u64 {
        if text.len() <= self.left {
            // A text that fits the budget whole is counted exactly and uses its length, so
            // a role's kept count is what counting it would give.
            if let Some(i) = ROLES.iter().position(|r| *r == text) {
                self.left -= text.len();
                return role_tokens(self.enc)[i];
            }
        }
        let mut tokens = 0u64;
        let mut done = 0usize;
        if self.left > 0 {
            // The pre-tokenizer's pieces are contiguous from the start of the text.
            for piece in self.tok.split(text) {
                if piece.len() > self.left {
                    self.left = 0;
                    break;
                }
                self.left -= piece.len();
                done += piece.len();
                tokens = tokens.saturating_add(self.piece(piece.as_bytes()));
            }
        }
        tokens.saturating_add(text.len().saturating_sub(done) as u64)
    }

    /// Tokens of one pre-tokenizer piece: short pieces (words, mostly) from this thread's
    /// [`PieceCache`], others counted.
    fn piece(&self, piece: &[u8]) -> u64 {
        if piece.len() > PIECE_BYTES {
            return self.tok.bpe.count(piece) as u64;
        }
        PIECES.with(|cache| {
            let mut cache = cache.borrow_mut();
            let slot = cache.slot(self.enc, piece);
            if slot.enc == Some(self.enc) && &slot.bytes[..usize::from(slot.len)] == piece {
                return u64::from(slot.count);
            }
            let count = self.tok.bpe.count(piece);
            *slot = Piece {
                enc: Some(self.enc),
                len: piece.len() as u8,
                bytes: {
                    let mut b = [0u8; PIECE_BYTES];
                    b[..piece.len()].copy_from_slice(piece);
                    b
                },
                count: count as u32,
            };
            count as u64
        })
    }
}

/// Longest piece [`PieceCache`] keeps.
const PIECE_BYTES: usize = 22;

/// Slots of a thread's [`PieceCache`] (about 28 KiB).
const PIECE_SLOTS: usize = 1024;

/// One kept piece and its tokens.
#[derive(Clone, Copy)]
struct Piece {
    enc: Option<Encoding>,
    len: u8,
    bytes: [u8; PIECE_BYTES],
    count: u32,
}

/// Token counts of short pre-tokenizer pieces recently counted on this thread: a
/// direct-mapped table (a piece goes to one slot, by hash; a new piece there replaces the
/// old one), so a lookup costs one hash and one comparison instead of a BPE count. Words
/// recur across prompts; the counts are exact either way. Per thread: no lock, no sharing.
struct PieceCache {
    slots: Box<[Piece; PIECE_SLOTS]>,
}

impl PieceCache {
    fn new() -> Self {
        Self {
            slots: Box::new(
                [Piece {
                    enc: None,
                    len: 0,
                    bytes: [0; PIECE_BYTES],
                    count: 0,
                }; PIECE_SLOTS],
            ),
        }
    }

    /// The piece's slot, by FNV-1a of its bytes (a collision only costs a count).
    fn slot(&mut self, enc: Encoding, piece: &[u8]) -> &mut Piece {
        let mut h: u32 = 0x811c_9dc5 ^ enc as u32;
        for &b in piece {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        &mut self.slots[(h ^ (h >> 16)) as usize % PIECE_SLOTS]
    }
}

thread_local! {
    static PIECES: std::cell::RefCell<PieceCache> = std::cell::RefCell::new(PieceCache::new());
}
