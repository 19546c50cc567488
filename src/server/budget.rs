//! The memory budget: request bodies in flight, what is decoded from them, the responses built
//! from them, and the connections' buffers are bounded together, so no load, hostile or not,
//! can push arcguard past its container's memory limit.
//!
//! Anyone who may create pods in one namespace can make the apiserver send reviews of nearly
//! 3 MiB each (its request size limit), as many at once as they like; buffered together they
//! would exceed a 128 Mi container limit and get every replica OOM-killed, which stops pod
//! creation in the whole cluster. Anyone who can reach the webhook port can open connections
//! and streams and send bodies slowly. So:
//!
//! - every connection slot is set aside [`PER_CONNECTION`] bytes of the budget (its TLS and
//!   HTTP buffers: HTTP/2 flow-control windows are kept that small), and the number of slots is
//!   derived from the budget ([`super::Limits::connection_slots`]);
//! - a request's body is charged as it arrives, twice its bytes (the body, and its copy while
//!   the pieces are joined): a client that declares 4 MiB and sends 64 KiB holds 128 KiB, and
//!   only until the body deadline ([`super::Limits::body_timeout`]);
//! - once the body is complete, it is charged what decoding and deciding it can cost:
//!   `2 × body + TOKEN_COST × structural tokens` ([`cost`]), measured with a counting allocator
//!   on the costliest shapes (many labels, many affinity values, many containers each with its
//!   own violation): a review of many tiny values is charged far more than its size;
//! - the charge is held until the connection has taken the response's last piece for writing
//!   (at most 16 KiB: answers are sent in pieces, `batching::LARGE_FRAME`) or has dropped it,
//!   and by the decision itself when the request times out before it ends.
//!
//! - the budget is the process's [`MemoryPool`], which registry reads share (each charged
//!   the most it can hold, [`crate::oci::slots`]): with imageProvenance, reads of images never
//!   seen before take room from requests instead of adding to them.
//!
//! A charge that does not fit waits up to [`Budget::wait`] for others to finish, then gets 503
//! with a message saying why; a review whose charge alone exceeds the whole budget gets 413.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::time::Instant;

use crate::memory::{MemoryCharge, MemoryPool, Refusal, UNIT};
use crate::metrics::Metrics;

/// The share of the container's memory limit that requests in flight may use; the rest is the
/// process's baseline (caches, policies, TLS) and allocator slack.
pub const LIMIT_SHARE: f64 = 0.5;

/// The in-flight budget when no memory limit is known: 512 MiB.
pub const UNLIMITED_BUDGET: usize = 512 * 1024 * 1024;

/// What one connection's buffers may hold: the HTTP/2 connection window (128 KiB, see
/// [`super::tls`]) or the HTTP/1.1 read buffer (64 KiB), with rustls's buffers, HPACK tables
/// and frame buffers. `tests/hostile.rs`
/// (`connections_that_stall_their_bodies_buffer_no_more_than_their_share`) measured about
/// 25 KiB per stalled connection; the reservation is the window, so a connection can never
/// buffer more than it was set aside, and the slots stay many enough for an apiserver that
/// opens one HTTP/1.1 connection per concurrent webhook call (128 at a 128 Mi limit).
pub const PER_CONNECTION: usize = 128 * 1024;

/// Bytes charged per structural JSON token (`{`, `[`, `,`, `:` outside strings) of a body: the
/// most that decoding and deciding allocates per token, measured with a counting allocator
/// (`tests/hostile.rs`, `dense_reviews_use_no_more_than_they_are_charged`, debug build): about
/// 91 for labels, 45 for node affinity values, 198 for containers each with its own violation
/// (some 930 bytes a container), with headroom.
pub const TOKEN_COST: usize = 256;

/// The in-flight budget for a container memory limit of `limit` bytes (`None`: no limit known).
pub fn budget_for(limit: Option<u64>) -> usize {
    match limit {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        // A limit is far below 2^52 bytes, and the share is in (0, 1).
        Some(limit) => ((limit as f64) * LIMIT_SHARE) as usize,
        None => UNLIMITED_BUDGET,
    }
}

/// The memory limit of the cgroup this process runs in (cgroup v2 `memory.max`), if any.
pub fn cgroup_memory_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok()?;
    text.trim().parse().ok()
}

/// The structural tokens of a JSON text: `{`, `[`, `,` and `:` outside strings. Every decoded
/// value (a string, a number, an object, a map entry) sits next to at least one, so what
/// decoding allocates is bounded by a cost per token. One linear pass, no allocation; the text
/// need not be valid JSON: an unterminated string ends the count, and a backslash escapes the
/// byte after it even outside strings (invalid JSON, rejected by the decoder at that byte, so
/// nothing after it is decoded).
///
/// This runs on every request before it is decoded, and counted byte by byte it was about a
/// tenth of a realistic /validate request's CPU (BENCHMARKS.md, issue 14), so it classifies 64
/// bytes at a time with bit masks, the way simdjson's first stage finds structural characters
/// outside strings (Langdale and Lemire, "Parsing Gigabytes of JSON per Second", 2019):
/// backslash runs decide which quotes are escaped, a prefix XOR of the other quotes marks the
/// bytes inside strings, and the structural bytes outside them are counted with `popcnt`. No
/// crate exposes that stage on its own; a property test holds it to the byte-by-byte count.
pub fn structural_tokens(body: &[u8]) -> usize {
    let mut scan = TokenScan::default();
    let mut blocks = body.chunks_exact(64);
    for block in &mut blocks {
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(block);
        scan.block(&bytes);
    }
    let rest = blocks.remainder();
    if !rest.is_empty() {
        // Padding with spaces changes no count.
        let mut bytes = [b' '; 64];
        bytes[..rest.len()].copy_from_slice(rest);
        scan.block(&bytes);
    }
    scan.tokens
}

/// The state [`structural_tokens`] carries from one 64-byte block to the next.
#[derive(Default)]
struct TokenScan {
    tokens: usize,
    /// Whether the last byte of the previous block was inside a string (all ones) or not.
    in_string: u64,
    /// Whether the first byte of this block is escaped by a backslash ending the previous one.
    escaped: u64,
}

impl TokenScan {
    fn block(&mut self, bytes: &[u8; 64]) {
        let Masks { quotes, backslashes, structural } = masks(bytes);
        let escaped = self.escaped_bytes(backslashes);
        let unescaped_quotes = quotes & !escaped;
        // Bit i: an odd number of unescaped quotes at or before i, i.e. inside a string.
        let inside = prefix_xor(unescaped_quotes) ^ self.in_string;
        // The last bit broadcast: 0 or all ones.
        self.in_string = 0u64.wrapping_sub(inside >> 63);
        self.tokens += (structural & !inside & !escaped).count_ones() as usize;
    }

    /// The bytes escaped by a backslash (simdjson's `find_escaped_branchless`): in a run of
    /// backslashes every other one escapes the next byte, starting with the run's first.
    fn escaped_bytes(&mut self, backslashes: u64) -> u64 {
        const EVEN: u64 = 0x5555_5555_5555_5555;
        let backslashes = backslashes & !self.escaped;
        let follows_escape = (backslashes << 1) | self.escaped;
        let odd_starts = backslashes & !EVEN & !follows_escape;
        let (even_starts, overflow) = odd_starts.overflowing_add(backslashes);
        self.escaped = u64::from(overflow);
        let invert = even_starts << 1;
        (EVEN ^ invert) & follows_escape
    }
}

/// Bit i set where byte i of a 64-byte block is a quote, a backslash, or one of `{`, `[`, `,`
/// and `:` (whether inside a string or not).
#[derive(Debug, PartialEq, Eq)]
struct Masks {
    quotes: u64,
    backslashes: u64,
    structural: u64,
}

/// [`Masks`] of a block, 16 bytes at a time with SSE2, which every x86-64 CPU has (no runtime
/// detection), through safe_arch's safe wrappers of the intrinsics: the realistic review's
/// count takes 1.2 µs against 3.7 µs with `masks_swar` (`budget/cost`, BENCHMARKS.md "Issue
/// 14, step 4").
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
fn masks(bytes: &[u8; 64]) -> Masks {
    use safe_arch::{
        bitor_m128i, cmp_eq_mask_i8_m128i, m128i, move_mask_i8_m128i, set_splat_i8_m128i,
    };
    // The byte values as `i8`, as the intrinsics take them (all ASCII).
    let splat = |byte: u8| set_splat_i8_m128i(i8::from_ne_bytes([byte]));
    let (quote, backslash, brace) = (splat(b'"'), splat(b'\\'), splat(b'{'));
    let (comma, colon, case_bit) = (splat(b','), splat(b':'), splat(0x20));
    // A byte mask's top bits, one per byte: bits 0..16 only, so never negative.
    let bits = |mask: m128i| u64::try_from(move_mask_i8_m128i(mask)).unwrap_or_default();
    let mut found = Masks { quotes: 0, backslashes: 0, structural: 0 };
    for (i, chunk) in bytes.chunks_exact(16).enumerate() {
        let mut lanes = [0i8; 16];
        for (lane, byte) in lanes.iter_mut().zip(chunk) {
            *lane = i8::from_ne_bytes([*byte]);
        }
        let v = m128i::from(lanes);
        let shift = 16 * i;
        found.quotes |= bits(cmp_eq_mask_i8_m128i(v, quote)) << shift;
        found.backslashes |= bits(cmp_eq_mask_i8_m128i(v, backslash)) << shift;
        // `{` and `[` differ only in bit 0x20.
        let brackets = cmp_eq_mask_i8_m128i(bitor_m128i(v, case_bit), brace);
        let separators =
            bitor_m128i(cmp_eq_mask_i8_m128i(v, comma), cmp_eq_mask_i8_m128i(v, colon));
        found.structural |= bits(bitor_m128i(brackets, separators)) << shift;
    }
    found
}

/// [`Masks`] of a block elsewhere (and on x86-64 targets built without SSE2).
#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
fn masks(bytes: &[u8; 64]) -> Masks {
    masks_swar(bytes)
}

/// [`Masks`] of a block, eight bytes at a time in a u64 (SWAR): portable, and about twice as
/// fast as testing byte by byte.
#[cfg(any(not(all(target_arch = "x86_64", target_feature = "sse2")), test))]
fn masks_swar(bytes: &[u8; 64]) -> Masks {
    /// The high bit of each byte of `word` that equals `byte`, exactly (no borrow crosses bytes,
    /// unlike the shorter `haszero` trick).
    fn bytes_equal(word: u64, byte: u8) -> u64 {
        const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
        let zero_where_equal = word ^ (u64::from(byte) * 0x0101_0101_0101_0101);
        !(((zero_where_equal & LOW7).wrapping_add(LOW7)) | zero_where_equal | LOW7)
    }

    /// The high bits of a word's eight bytes (as `bytes_equal` sets them) packed into its low
    /// eight bits, byte k's at bit k: the multiplier moves bit 8k+7 to bit 56+k, and its other
    /// products land below bit 56 without overlapping, so no carry reaches the result.
    fn pack(high_bits: u64) -> u64 {
        ((high_bits >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
    }

    let mut found = Masks { quotes: 0, backslashes: 0, structural: 0 };
    for (i, word) in bytes.chunks_exact(8).enumerate() {
        let mut le = [0u8; 8];
        le.copy_from_slice(word);
        let word = u64::from_le_bytes(le);
        let shift = 8 * i;
        found.quotes |= pack(bytes_equal(word, b'"')) << shift;
        found.backslashes |= pack(bytes_equal(word, b'\\')) << shift;
        // `{` and `[` differ only in bit 0x20.
        let brackets = bytes_equal(word | 0x2020_2020_2020_2020, b'{');
        let separators = bytes_equal(word, b',') | bytes_equal(word, b':');
        found.structural |= pack(brackets | separators) << shift;
    }
    found
}

/// Bit i of the result is the XOR of bits 0..=i of `bits`.
fn prefix_xor(mut bits: u64) -> u64 {
    for shift in [1, 2, 4, 8, 16, 32] {
        bits ^= bits << shift;
    }
    bits
}

/// What deciding a complete body can cost, in bytes: the body, its decoded view and the
/// response (twice the body), and [`TOKEN_COST`] per structural token.
pub fn cost(body: &[u8]) -> usize {
    cost_of(body.len(), structural_tokens(body))
}

/// [`cost`] of a body of `len` bytes and `tokens` structural tokens.
fn cost_of(len: usize, tokens: usize) -> usize {
    len.saturating_mul(2).saturating_add(tokens.saturating_mul(TOKEN_COST))
}

/// The budget shared by every webhook request of one server: admission to the process's
/// [`MemoryPool`] (which registry reads share), with the waits and limits of HTTP requests.
#[derive(Debug)]
pub struct Budget {
    pool: MemoryPool,
    /// How long a request waits for room before it is refused.
    wait: Duration,
    /// The body limit (larger bodies get 413).
    max_body_bytes: usize,
    /// How long a body may take to arrive (then 408).
    body_timeout: Duration,
    metrics: Arc<Metrics>,
}

/// A charge held against the budget; released when the last holder drops it. The webhook
/// handlers take a clone into the decision, so that a decision outliving its request (timed
/// out) stays charged until it ends.
#[derive(Clone, Debug)]
pub struct Charge {
    _permit: Arc<MemoryCharge>,
    tokens: usize,
}

impl Charge {
    /// The structural JSON tokens of the body charged: what decoding it costs, which the
    /// handlers use to decide where to decode it.
    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

impl Budget {
    /// Admission to `pool` for webhook requests.
    pub fn new(
        pool: MemoryPool,
        max_body_bytes: usize,
        wait: Duration,
        body_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self { pool, wait, max_body_bytes, body_timeout, metrics }
    }

    fn refuse(&self, refusal: &Refusal, bytes: usize) -> Response {
        self.metrics.record_budget_rejection();
        let mib = |bytes: f64| bytes / (1024.0 * 1024.0);
        #[allow(clippy::cast_precision_loss)]
        let total = mib(self.pool.total_bytes() as f64);
        #[allow(clippy::cast_precision_loss)]
        let wanted = mib(bytes as f64);
        match refusal {
            Refusal::Full => {
                let message = format!(
                    "arcguard is at its memory budget ({total:.0} MiB for requests and registry \
                     reads in flight, from its container's memory limit) and could not take this request \
                     ({wanted:.1} MiB to read and decide) within {}s; retry\n",
                    self.wait.as_secs_f64()
                );
                (StatusCode::SERVICE_UNAVAILABLE, message).into_response()
            }
            Refusal::TooLarge => {
                let message = format!(
                    "this review would take {wanted:.1} MiB to decode and decide, more than \
                     arcguard's whole memory budget ({total:.0} MiB, from its container's memory \
                     limit): the object has too many values\n"
                );
                (StatusCode::PAYLOAD_TOO_LARGE, message).into_response()
            }
        }
    }
}

/// Reads a webhook request's body under the budget (charged as it arrives, within the body
/// deadline), charges what deciding it can cost, and holds the charge until the response has
/// been written. Answers 413 for a body over the limit or a review over the whole budget, 408
/// for a body that does not arrive in time, and 503 when the budget has no room within the
/// wait.
pub async fn admit(State(budget): State<Arc<Budget>>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let wait_until = start + budget.wait;
    let body_until = start + budget.body_timeout;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > budget.max_body_bytes) {
        return too_large_body(budget.max_body_bytes);
    }
    let (parts, body) = request.into_parts();
    let mut held = None;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0usize;
    let mut stream = body.into_data_stream();
    loop {
        let next_chunk = tokio::time::timeout_at(body_until, stream.next()).await;
        let chunk = match next_chunk {
            Err(_) => {
                let message = format!(
                    "the request body did not arrive within {}s\n",
                    budget.body_timeout.as_secs_f64()
                );
                return (StatusCode::REQUEST_TIMEOUT, message).into_response();
            }
            Ok(None) => break,
            Ok(Some(Err(error))) => {
                return (StatusCode::BAD_REQUEST, format!("failed to read the body: {error}\n"))
                    .into_response();
            }
            Ok(Some(Ok(chunk))) => chunk,
        };
        received = received.saturating_add(chunk.len());
        if received > budget.max_body_bytes {
            return too_large_body(budget.max_body_bytes);
        }
        chunks.push(chunk);
        // In steps of 64 KiB, so that a body of small frames does not take the lock for each.
        let charge = received.saturating_mul(2).next_multiple_of(64 * UNIT);
        if let Err(refusal) = budget.pool.grow(&mut held, charge, wait_until).await {
            return budget.refuse(&refusal, received.saturating_mul(2));
        }
    }
    let body = join(chunks, received);
    let tokens = structural_tokens(&body);
    let cost = cost_of(body.len(), tokens);
    if let Err(refusal) = budget.pool.grow(&mut held, cost, wait_until).await {
        return budget.refuse(&refusal, cost);
    }
    let permit = match held {
        Some(permit) => permit,
        // An empty body: charged the least there is.
        None => match budget.pool.try_charge_least() {
            Ok(permit) => permit,
            Err(refusal) => return budget.refuse(&refusal, UNIT),
        },
    };
    run(next, parts, body, Charge { _permit: Arc::new(permit), tokens }).await
}

/// Runs the request and keeps `charge` until its response body is dropped (written, or the
/// connection gone).
async fn run(
    next: Next,
    mut parts: axum::http::request::Parts,
    body: Bytes,
    charge: Charge,
) -> Response {
    parts.extensions.insert(charge.clone());
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    response.map(|body| Body::new(Charged { inner: body, _charge: charge }))
}

fn too_large_body(limit: usize) -> Response {
    let message = format!("request body larger than the limit of {limit} bytes\n");
    (StatusCode::PAYLOAD_TOO_LARGE, message).into_response()
}

/// The body's pieces joined (without a copy when it arrived in one).
fn join(mut chunks: Vec<Bytes>, len: usize) -> Bytes {
    if chunks.len() == 1 {
        return chunks.pop().unwrap_or_default();
    }
    let mut joined = Vec::with_capacity(len);
    for chunk in chunks {
        joined.extend_from_slice(&chunk);
    }
    Bytes::from(joined)
}

/// A response body that holds its request's charge until it is dropped.
struct Charged {
    inner: Body,
    _charge: Charge,
}

impl hyper::body::Body for Charged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_half_the_limit() {
        assert_eq!(budget_for(Some(128 * 1024 * 1024)), 64 * 1024 * 1024);
        assert_eq!(budget_for(None), UNLIMITED_BUDGET);
    }

    #[test]
    fn structural_tokens_are_counted_outside_strings_only() {
        assert_eq!(structural_tokens(b""), 0);
        assert_eq!(structural_tokens(b"\"a\""), 0);
        assert_eq!(structural_tokens(br#"{"a":1,"b":[1,2]}"#), 6);
        // Inside strings, escaped quotes included, nothing counts.
        assert_eq!(structural_tokens(br#"{"a{[,:":"x\",:{[","b":"\\"}"#), 4);
        assert_eq!(structural_tokens(&[b','; 1000]), 1000);
    }

    /// The count byte by byte: the reference the block-wise one must agree with. A backslash
    /// escapes the byte after it, inside strings or not: outside them it is invalid JSON, which
    /// the decoder rejects at that byte, so what is counted after it is never decoded.
    fn structural_tokens_bytewise(body: &[u8]) -> usize {
        let (mut tokens, mut in_string, mut escaped) = (0, false, false);
        for &byte in body {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = !in_string;
            } else if !in_string && matches!(byte, b'{' | b'[' | b',' | b':') {
                tokens += 1;
            }
        }
        tokens
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn block_masks_agree_with_the_portable_ones(
            block in proptest::collection::vec(proptest::prop_oneof![
                proptest::sample::select(b"{}[],:\"\\ax".to_vec()),
                proptest::prelude::any::<u8>(),
            ], 64)
        ) {
            let mut bytes = [0u8; 64];
            bytes.copy_from_slice(&block);
            proptest::prop_assert_eq!(masks(&bytes), masks_swar(&bytes));
        }
    }

    proptest::proptest! {
        // Runs across block boundaries (64 bytes) are where carries can go wrong.
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]
        #[test]
        fn structural_tokens_agree_with_the_bytewise_count(
            body in proptest::collection::vec(proptest::prop_oneof![
                proptest::sample::select(b"{}[],:\"\\\\\\ax".to_vec()),
                proptest::prelude::any::<u8>(),
            ], 0..300)
        ) {
            proptest::prop_assert_eq!(structural_tokens(&body), structural_tokens_bytewise(&body));
        }
    }

    #[test]
    fn structural_tokens_of_the_realistic_review_match_the_bytewise_count() {
        let body = include_bytes!("../../tests/fixtures/pod-create-trusted.json");
        assert_eq!(structural_tokens(body), structural_tokens_bytewise(body));
        assert!(structural_tokens(body) > 100);
    }

    #[test]
    fn a_body_of_tiny_values_costs_far_more_than_its_size() {
        let labels: Vec<String> = (0..1000).map(|i| format!("\"k{i}\":\"v\"")).collect();
        let dense = format!("{{{}}}", labels.join(","));
        assert_eq!(structural_tokens(dense.as_bytes()), 2000);
        assert_eq!(cost(dense.as_bytes()), 2 * dense.len() + 2000 * TOKEN_COST);
        let sparse = format!("{{\"a\":\"{}\"}}", "x".repeat(dense.len()));
        assert_eq!(cost(sparse.as_bytes()), 2 * sparse.len() + 2 * TOKEN_COST);
    }
}
