//! Media parts of a prompt: image sizes read from the first bytes of a base64 `data:` URL
//! (PNG, JPEG, GIF, WebP headers; only the base64 groups covering the header fields are
//! decoded), OpenAI's image tile formula, and a duration-based estimate for audio parts.

use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::{alphabet, Engine};

/// Tokens of an image sent with `detail: "low"`, and the base of every high-detail image.
pub(super) const LOW_DETAIL_TOKENS: u64 = 85;
/// Tokens of each 512 px tile of a high-detail image.
const TILE_TOKENS: u64 = 170;
/// Audio tokens per second of input audio (one per 100 ms).
const AUDIO_TOKENS_PER_SECOND: u64 = 10;
/// Bytes per second assumed for compressed audio whose length cannot be read from a header
/// (128 kbit/s).
const COMPRESSED_AUDIO_BYTES_PER_SECOND: u64 = 16_000;
/// JPEG segments walked before giving up on finding the frame header.
const MAX_JPEG_SEGMENTS: usize = 256;

/// OpenAI's documented cost of a high (or auto) detail image of `width` x `height` pixels:
/// scaled to fit in 2048 x 2048, then so that its shortest side is 768 px (images are only
/// ever scaled down), then 170 tokens per 512 px tile plus 85.
pub(super) fn tile_tokens(width: u64, height: u64) -> u64 {
    let (mut w, mut h) = (width, height);
    let long = w.max(h);
    if long > 2048 {
        w = (w * 2048 / long).max(1);
        h = (h * 2048 / long).max(1);
    }
    let short = w.min(h);
    if short > 768 {
        w = (w * 768 / short).max(1);
        h = (h * 768 / short).max(1);
    }
    let tiles = w.div_ceil(512) * h.div_ceil(512);
    LOW_DETAIL_TOKENS + TILE_TOKENS * tiles
}

/// Width and height of the image in a `data:image/{png,jpeg,gif,webp};base64,...` URL, read
/// from its header; `None` for any other URL or an unreadable header.
pub(super) fn data_url_dimensions(url: &str) -> Option<(u64, u64)> {
    let data = base64_payload(url, |mime| {
        matches!(
            mime,
            "image/png" | "image/jpeg" | "image/jpg" | "image/gif" | "image/webp"
        )
    })?;
    let b64 = Base64(data.as_bytes());
    let (w, h) = match &b64.read::<4>(0)? {
        [0x89, b'P', b'N', b'G'] => png(&b64)?,
        [0xff, 0xd8, _, _] => jpeg(&b64)?,
        b"GIF8" => gif(&b64)?,
        b"RIFF" => webp(&b64)?,
        _ => return None,
    };
    (w > 0 && h > 0).then_some((w, h))
}

/// Estimated tokens of an audio part (`{"data": base64, "format": "wav" | "mp3" | ...}`):
/// ten per second, the duration read from a WAV header's byte rate, or from the size at
/// 128 kbit/s for other formats.
pub(super) fn audio_tokens(data: &str, format: Option<&str>) -> u64 {
    let b64 = Base64(data.as_bytes());
    let bytes = (data.len() as u64) / 4 * 3;
    let wav_rate = format
        .is_some_and(|f| f.eq_ignore_ascii_case("wav"))
        .then(|| wav_byte_rate(&b64))
        .flatten();
    let rate = wav_rate.unwrap_or(COMPRESSED_AUDIO_BYTES_PER_SECOND);
    (bytes * AUDIO_TOKENS_PER_SECOND).div_ceil(rate)
}

/// The base64 text of a `data:` URL whose media type `accept`s, if it is base64.
fn base64_payload(url: &str, accept: impl Fn(&str) -> bool) -> Option<&str> {
    let head = url.get(..5)?;
    if !head.eq_ignore_ascii_case("data:") {
        return None;
    }
    // The media type and parameters are short: look for the comma near the start only.
    let comma = url.bytes().take(256).position(|b| b == b',')?;
    let meta = url.get(5..comma)?.to_ascii_lowercase();
    let mut params = meta.split(';');
    let mime = params.next()?;
    (accept(mime.trim()) && params.any(|p| p.trim() == "base64")).then(|| &url[comma + 1..])
}

/// Random access to the bytes encoded in base64 text, decoding only the groups needed.
struct Base64<'a>(&'a [u8]);

/// Standard alphabet; padding optional, as some clients leave it out.
const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

impl Base64<'_> {
    /// The `N` decoded bytes at `offset`, if the text holds them.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let first = offset / 3;
        let end_group = offset.checked_add(N)?.div_ceil(3);
        let start = first.checked_mul(4)?;
        let end = end_group.checked_mul(4)?.min(self.0.len());
        let chars = self.0.get(start..end)?;
        let mut buf = [0u8; 64];
        let n = ENGINE.decode_slice(chars, &mut buf).ok()?;
        let skip = offset - first * 3;
        buf.get(skip..skip + N)
            .filter(|_| skip + N <= n)
            .and_then(|b| b.try_into().ok())
    }
}

fn be16(b: &[u8]) -> u64 {
    b.iter().take(2).fold(0, |a, &x| a << 8 | u64::from(x))
}

fn le(b: &[u8]) -> u64 {
    b.iter().rev().fold(0, |a, &x| a << 8 | u64::from(x))
}

fn png(b64: &Base64<'_>) -> Option<(u64, u64)> {
    let h: [u8; 24] = b64.read(0)?;
    if h[..8] != *b"\x89PNG\r\n\x1a\n" || h[12..16] != *b"IHDR" {
        return None;
    }
    let be32 = |b: &[u8]| b.iter().fold(0u64, |a, &x| a << 8 | u64::from(x));
    Some((be32(&h[16..20]), be32(&h[20..24])))
}

fn gif(b64: &Base64<'_>) -> Option<(u64, u64)> {
    let h: [u8; 10] = b64.read(0)?;
    if h[..6] != *b"GIF87a" && h[..6] != *b"GIF89a" {
        return None;
    }
    Some((le(&h[6..8]), le(&h[8..10])))
}

fn webp(b64: &Base64<'_>) -> Option<(u64, u64)> {
    let h: [u8; 30] = b64.read(0)?;
    if h[8..12] != *b"WEBP" {
        return None;
    }
    match &h[12..16] {
        // Lossy: a key frame's start code, then 14-bit width and height.
        b"VP8 " if h[23..26] == [0x9d, 0x01, 0x2a] => {
            Some((le(&h[26..28]) & 0x3fff, le(&h[28..30]) & 0x3fff))
        }
        // Lossless: a signature byte, then width - 1 and height - 1 in 14 bits each.
        b"VP8L" if h[20] == 0x2f => {
            let bits = le(&h[21..25]);
            Some(((bits & 0x3fff) + 1, ((bits >> 14) & 0x3fff) + 1))
        }
        // Extended: canvas width - 1 and height - 1 in 24 bits each.
        b"VP8X" => Some((le(&h[24..27]) + 1, le(&h[27..30]) + 1)),
        _ => None,
    }
}

fn jpeg(b64: &Base64<'_>) -> Option<(u64, u64)> {
    let mut pos = 2usize;
    for _ in 0..MAX_JPEG_SEGMENTS {
        let [ff, marker, len_hi, len_lo]: [u8; 4] = b64.read(pos)?;
        if ff != 0xff {
            return None;
        }
        match marker {
            0xff => pos += 1, // fill byte
            0x01 | 0xd0..=0xd7 => pos += 2,
            // Start of frame (every kind but DHT, JPG and DAC): precision, height, width.
            0xc0..=0xcf if !matches!(marker, 0xc4 | 0xc8 | 0xcc) => {
                let f: [u8; 4] = b64.read(pos + 5)?;
                return Some((be16(&f[2..4]), be16(&f[0..2])));
            }
            0xd9 | 0xda => return None, // end of image, start of scan: no frame header
            _ => pos += 2 + usize::from(u16::from_be_bytes([len_hi, len_lo])),
        }
    }
    None
}

/// The byte rate of a canonical WAV header (`RIFF` .. `WAVE` `fmt `).
fn wav_byte_rate(b64: &Base64<'_>) -> Option<u64> {
    let h: [u8; 32] = b64.read(0)?;
    if h[..4] != *b"RIFF" || h[8..16] != *b"WAVEfmt " {
        return None;
    }
    Some(le(&h[28..32])).filter(|&r| r > 0)
}
