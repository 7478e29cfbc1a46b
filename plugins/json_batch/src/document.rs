//! The JSON document of a batch. Kept apart from the plugin's bindings so that the
//! benchmarks can compile this same file natively and compare it with the component.
//!
//! Written for WebAssembly's costs, which differ from a native build's:
//! - a copy whose length is known only at run time is a `memory.copy`, which wasmtime
//!   runs as a call out of the sandbox: short strings are copied here in fixed-size
//!   pieces of 8, 4, 2 or 1 bytes, which compile to plain loads and stores;
//! - WebAssembly has no 64-bit multiply-high, so a 64-bit division by a constant is a
//!   real division: numbers are split into 32-bit pieces by a multiplication written
//!   out in halves, and each piece's eight digits are computed together in one 64-bit
//!   word and stored at once (no loop, no division);
//! - a call costs far more than natively (stack and interruption checks, registers
//!   saved), and a loop costs an interruption check per turn: the common paths are
//!   inlined and loop-free, the rare ones out of line;
//! - state kept in memory is loaded and stored at every step: a reading is written
//!   through a [`Cursor`] over room made for it once, whose position the compiler
//!   keeps in a register, rather than through the growing buffer;
//! - a bounds check is a comparison, a branch and often a length reloaded from the
//!   stack: the room is checked once per reading, and the writes inside it are not
//!   (each `*_ROOM` bounds what its piece writes; debug builds, which run the tests,
//!   check every write against the room).

use std::fmt::Write as _;

use super::{Readings, Strings};

/// Bytes per reading reserved up front: a typical reading takes 120 to 160.
const RESERVE_PER_READING: usize = 160;

/// Room for a number written by [`Cursor::u64`] or [`Cursor::i64`]: a sign, 20 digits,
/// and the 8 bytes its last store may reach past them.
pub(crate) const NUMBER_ROOM: usize = 32;

/// Room for a value written by [`Cursor::f64`]: `Display` writes up to 327 characters
/// (`-0.000…` for the smallest values).
pub(crate) const VALUE_ROOM: usize = 336;

/// Room for a string of `n` bytes: its quotes, and each byte escaped as `\u00XX`.
pub(crate) const fn string_room(n: usize) -> usize {
    2 + 6 * n
}

/// Room for a reading's fixed text (field names and punctuation, 88 bytes), its
/// numbers and `n` bytes of strings.
const fn reading_room(n: usize) -> usize {
    96 + 2 * NUMBER_ROOM + VALUE_ROOM + string_room(n) + 3 * string_room(0)
}

/// Writes the JSON document for one batch; an error when the columns do not hold
/// together (a column of the wrong length, a string end out of place).
pub fn encode_document(
    batch_id: &str,
    site_id: &str,
    readings: &Readings,
) -> Result<Vec<u8>, String> {
    let n = readings.ids.len();
    let meter_ids = Column::new("meter-ids", &readings.meter_ids, n)?;
    let channels = Column::new("channels", &readings.channels, n)?;
    let units = Column::new("units", &readings.units, n)?;
    let qualities = Column::new("qualities", &readings.qualities, n)?;
    let pairs = readings.attribute_ends.last().map_or(0, |&e| e as usize);
    let keys = Column::new("attribute-keys", &readings.attribute_keys, pairs)?;
    let values = Column::new("attribute-values", &readings.attribute_values, pairs)?;
    if readings.timestamps_ms.len() != n
        || readings.values.len() != n
        || readings.attribute_ends.len() != n
    {
        return Err(format!(
            "the batch's columns differ in length: {n} ids, {} timestamps, {} values, {} attribute ends",
            readings.timestamps_ms.len(),
            readings.values.len(),
            readings.attribute_ends.len()
        ));
    }

    let mut out = Writer::with_capacity(64 + n * RESERVE_PER_READING);
    // SAFETY (of each room made below): the room covers the piece written in it, its
    // fixed text and the most each of its numbers and strings can take.
    let head = 64 + string_room(batch_id.len()) + string_room(site_id.len());
    unsafe {
        out.write(head, |c| {
            c.literal(b"{\"batch_id\":");
            c.string(batch_id.as_bytes());
            c.literal(b",\"site_id\":");
            c.string(site_id.as_bytes());
            c.literal(b",\"readings\":[");
        })
    };
    // Text in which no character needs escaping (the common case, checked for each
    // column as a whole by `Column::new`) is copied without looking for any.
    let columns = [&meter_ids, &channels, &units, &qualities, &keys, &values];
    if columns.iter().all(|c| c.plain) {
        write_readings::<false>(&mut out, readings, &columns, pairs)?;
    } else {
        write_readings::<true>(&mut out, readings, &columns, pairs)?;
    }
    unsafe {
        out.write(4, |c| {
            if n > 0 {
                c.literal(b"}}");
            }
            c.literal(b"]}");
        })
    };
    Ok(out.into_bytes())
}

/// Writes every reading of the batch, the columns checked to hold together (see
/// [`encode_document`]). `ESCAPES`: whether the strings may hold characters to escape;
/// `false` only when no column's text holds any.
#[inline(always)]
fn write_readings<const ESCAPES: bool>(
    out: &mut Writer,
    readings: &Readings,
    [meter_ids, channels, units, qualities, keys, values]: &[&Column<'_>; 6],
    pairs: usize,
) -> Result<(), String> {
    let n = readings.ids.len();
    // The readings are read by index, one for every column, rather than through an
    // iterator each: one counter kept instead of a pointer per column (WebAssembly code
    // runs short of registers first, and spills the rest to the stack).
    let mut pair = 0;
    for i in 0..n {
        // SAFETY: `i < n`, and every one of these columns holds `n` entries (checked
        // above).
        let (id, timestamp, value, end) = unsafe {
            (
                *readings.ids.get_unchecked(i),
                *readings.timestamps_ms.get_unchecked(i),
                *readings.values.get_unchecked(i),
                *readings.attribute_ends.get_unchecked(i) as usize,
            )
        };
        // SAFETY: `i < n`, these columns' length.
        let (meter_id, channel, unit, quality) = unsafe {
            (
                meter_ids.get(i),
                channels.get(i),
                units.get(i),
                qualities.get(i),
            )
        };
        let text = meter_id.len() + channel.len() + unit.len() + quality.len();
        // Written straight through a cursor, not in a closure: the compiler keeps a
        // closure this size out of line, and its cursor in memory.
        let mut c = unsafe { out.room(reading_room(text)) };
        if i > 0 {
            // The end of the reading before.
            c.literal(b"}},");
        }
        c.literal(b"{\"id\":");
        c.u64(id);
        c.literal(b",\"meter_id\":");
        c.text::<ESCAPES>(meter_id);
        c.literal(b",\"channel\":");
        c.text::<ESCAPES>(channel);
        c.literal(b",\"timestamp\":");
        c.i64(timestamp);
        c.literal(b",\"value\":");
        c.f64(value);
        c.literal(b",\"unit\":");
        c.text::<ESCAPES>(unit);
        c.literal(b",\"quality\":");
        c.text::<ESCAPES>(quality);
        c.literal(b",\"attributes\":{");
        let written = c.at;
        out.advance(written);
        if end < pair {
            return Err(format!("attribute ends decrease at reading {i}"));
        }
        if end > pairs {
            // Past the last reading's end: a later one decreases.
            return Err(format!("attribute ends decrease after reading {i}"));
        }
        for j in pair..end {
            // SAFETY: `j < end <= pairs`, the attribute columns' length.
            let (key, value) = unsafe { (keys.get(j), values.get(j)) };
            let mut c = unsafe { out.room(2 + string_room(key.len()) + string_room(value.len())) };
            if j > pair {
                c.byte(b',');
            }
            c.text::<ESCAPES>(key);
            c.byte(b':');
            c.text::<ESCAPES>(value);
            let written = c.at;
            out.advance(written);
        }
        pair = end;
    }
    Ok(())
}

/// One column of strings, checked to hold `len` of them, each in place: its end not
/// before its start (the end before it, 0 for the first), within the text, and on a
/// character boundary. Read by index without further checks. It keeps no position of
/// its own: string `i` starts where string `i - 1` ends, read again from `ends`, which
/// costs a load where a position kept would cost a register (or, once they run out, a
/// store and a load).
struct Column<'a> {
    text: &'a [u8],
    ends: &'a [u32],
    /// Whether no character of the text needs escaping in JSON.
    plain: bool,
}

impl<'a> Column<'a> {
    // WebAssembly's SIMD for the scan of the text (`Scan::of`, inlined here); wasmtime
    // compiles it for any x86-64 (SSE2) and ARM64.
    #[cfg_attr(target_family = "wasm", target_feature(enable = "simd128"))]
    fn new(name: &'static str, strings: &'a Strings, len: usize) -> Result<Self, String> {
        if strings.ends.len() != len {
            return Err(format!(
                "column {name} holds {} strings for {len} entries",
                strings.ends.len()
            ));
        }
        let text = strings.text.as_bytes();
        let scan = Scan::of(text);
        if !in_place(text, &strings.ends, scan.ascii) {
            return Err(first_out_of_place(name, &strings.text, &strings.ends));
        }
        Ok(Self {
            text,
            ends: &strings.ends,
            plain: scan.plain,
        })
    }

    /// String `i`'s bytes.
    ///
    /// # Safety
    /// `i` is under the column's `len`.
    #[inline(always)]
    unsafe fn get(&self, i: usize) -> &'a [u8] {
        // SAFETY: `i` and `i - 1` are in the column (the caller's promise), and its ends
        // do not decrease and lie within the text (checked by `new`).
        unsafe {
            let start = match i {
                0 => 0,
                _ => *self.ends.get_unchecked(i - 1) as usize,
            };
            let end = *self.ends.get_unchecked(i) as usize;
            self.text.get_unchecked(start..end)
        }
    }
}

/// Whether every end of `ends` is in place in `text` (see [`Column`]), `ascii` telling
/// whether the text is ASCII only (the common case, where every end within it is a
/// character boundary). One pass over the ends without a branch per end, four a turn (a
/// loop costs an interruption check per turn in WebAssembly).
fn in_place(text: &[u8], ends: &[u32], ascii: bool) -> bool {
    let mut decreases = false;
    let mut start = 0;
    let mut fours = ends.chunks_exact(4);
    for four in &mut fours {
        let [a, b, c, d] = [four[0], four[1], four[2], four[3]];
        decreases |= (a < start) | (b < a) | (c < b) | (d < c);
        start = d;
    }
    for &end in fours.remainder() {
        decreases |= end < start;
        start = end;
    }
    if decreases || start as usize > text.len() {
        return false;
    }
    ascii || ends.iter().all(|&end| boundary(text, end as usize))
}

/// What one pass over a column's text finds: whether it is ASCII only, and whether no
/// character of it needs escaping in JSON. Read 32 bytes a turn, with no branch but the
/// loop's.
#[derive(Debug, PartialEq)]
pub(crate) struct Scan {
    pub(crate) ascii: bool,
    pub(crate) plain: bool,
}

impl Scan {
    /// Always inlined: `Column::new` is where the plugin's build enables SIMD, and only
    /// code compiled inside it gets it.
    #[inline(always)]
    pub(crate) fn of(text: &[u8]) -> Self {
        // Byte by byte in lanes of 32, which the compiler turns into vector operations
        // (SSE2 natively, WebAssembly's SIMD in the plugin: see `Column::new`): each
        // lane or-ed with its bytes, and marked by any byte to escape (the bytes
        // `escaped` writes otherwise; `needs_escape` is the same test eight at a time).
        const LANES: usize = 32;
        let (mut any, mut special) = ([0u8; LANES], [0u8; LANES]);
        let mut turn = |chunk: &[u8; LANES]| {
            for ((a, s), &b) in any.iter_mut().zip(&mut special).zip(chunk) {
                *a |= b;
                *s |= u8::from(b < 0x20) | u8::from(b == b'"') | u8::from(b == b'\\');
            }
        };
        let (chunks, rest) = text.as_chunks::<LANES>();
        for chunk in chunks {
            turn(chunk);
        }
        // The rest after spaces, which are ASCII and need no escaping.
        let mut last = [b' '; LANES];
        last[..rest.len()].copy_from_slice(rest);
        turn(&last);
        Self {
            ascii: any.iter().fold(0, |x, &a| x | a) < 0x80,
            plain: special.iter().all(|&s| s == 0),
        }
    }
}

/// Whether `at` (at most the text's length) starts a character or ends the text.
#[inline(always)]
fn boundary(text: &[u8], at: usize) -> bool {
    // A character starts with any byte but 0b10xxxxxx.
    text.get(at).is_none_or(|&b| (b as i8) >= -0x40)
}

/// The error for the first string of a column out of place (the rare case).
#[cold]
#[inline(never)]
fn first_out_of_place(name: &str, text: &str, ends: &[u32]) -> String {
    let mut start = 0;
    for (i, &end) in ends.iter().enumerate() {
        let end = end as usize;
        if end < start || !text.is_char_boundary(end) {
            return out_of_place(name, i);
        }
        start = end;
    }
    unreachable!("a column found out of place has a string out of place")
}

/// The error for string `i` of column `name` out of place.
#[cold]
#[inline(never)]
fn out_of_place(name: &str, i: usize) -> String {
    format!("string {i} of column {name} is out of place")
}

/// The document as it is written: a zero-filled buffer longer than what has been
/// written (`len`), so that every write is a copy into a slice already there.
pub(crate) struct Writer {
    buf: Vec<u8>,
    len: usize,
}

impl Writer {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity.max(64)],
            len: 0,
        }
    }

    /// What has been written.
    pub(crate) fn into_bytes(mut self) -> Vec<u8> {
        self.buf.truncate(self.len);
        self.buf
    }

    /// Writes a piece of at most `room` bytes through a cursor over room made for it.
    ///
    /// # Safety
    /// `piece` writes at most `room` bytes (see [`Cursor`]).
    #[inline(always)]
    pub(crate) unsafe fn write(&mut self, room: usize, piece: impl FnOnce(&mut Cursor<'_>)) {
        // SAFETY: passed on to the caller.
        let mut cursor = unsafe { self.room(room) };
        piece(&mut cursor);
        let written = cursor.at;
        self.advance(written);
    }

    /// A cursor over `room` bytes after what is written; [`Writer::advance`] by what it
    /// wrote once done with it.
    ///
    /// # Safety
    /// What is written through the cursor fits in `room` bytes (see [`Cursor`]).
    #[inline(always)]
    pub(crate) unsafe fn room(&mut self, room: usize) -> Cursor<'_> {
        if self.buf.len() - self.len < room {
            self.grow(room);
        }
        // SAFETY: passed on to the caller.
        unsafe { Cursor::new(&mut self.buf[self.len..self.len + room]) }
    }

    /// Counts `n` more bytes as written (what a cursor from [`Writer::room`] wrote).
    #[inline(always)]
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    #[cold]
    #[inline(never)]
    fn grow(&mut self, room: usize) {
        let wanted = (self.len + room).max(self.buf.len() * 2);
        self.buf.resize(wanted, 0);
    }
}

/// Room for one piece of the document, and how much of it is written. Its writes are
/// not checked against the room in release builds: whoever makes a cursor promises
/// that the piece fits (see the `*_ROOM`s). Debug builds check every write.
pub(crate) struct Cursor<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `out`.
    ///
    /// # Safety
    /// Everything written through the cursor fits in `out`.
    #[inline(always)]
    unsafe fn new(out: &'a mut [u8]) -> Self {
        Self { out, at: 0 }
    }

    /// Stores `bytes` at the cursor, which does not move.
    #[inline(always)]
    fn put<const N: usize>(&mut self, bytes: [u8; N]) {
        debug_assert!(
            self.at + N <= self.out.len(),
            "a piece larger than its room"
        );
        // SAFETY: within the room, as the cursor's maker promised (`Cursor::new`).
        unsafe {
            self.out
                .as_mut_ptr()
                .add(self.at)
                .cast::<[u8; N]>()
                .write_unaligned(bytes);
        }
    }

    /// The next `n` bytes of the room, to be written.
    #[inline(always)]
    fn ahead(&mut self, n: usize) -> &mut [u8] {
        debug_assert!(
            self.at + n <= self.out.len(),
            "a piece larger than its room"
        );
        // SAFETY: within the room, as the cursor's maker promised (`Cursor::new`); the
        // bytes are initialised (the room is part of a slice).
        unsafe { std::slice::from_raw_parts_mut(self.out.as_mut_ptr().add(self.at), n) }
    }

    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.put([b]);
        self.at += 1;
    }

    /// Appends a fixed piece of the document (its length is a constant).
    #[inline(always)]
    fn literal<const N: usize>(&mut self, bytes: &[u8; N]) {
        self.put(*bytes);
        self.at += N;
    }

    /// Stores the eight bytes of `word` and moves on by `n` of them (the rest is
    /// written over next, or lies past the end of the document).
    #[inline(always)]
    fn word(&mut self, word: u64, n: usize) {
        self.put(word.to_le_bytes());
        self.at += n;
    }

    /// Appends the text `bytes` (UTF-8) as a JSON string literal.
    #[inline(always)]
    pub(crate) fn string(&mut self, bytes: &[u8]) {
        self.text::<true>(bytes);
    }

    /// Appends the text `bytes` (UTF-8) as a JSON string literal, looking for
    /// characters to escape only if `ESCAPES` (`false` for a text known to hold none).
    #[inline(always)]
    fn text<const ESCAPES: bool>(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        let room = self.ahead(n + 2);
        room[0] = b'"';
        if copy_plain::<ESCAPES>(bytes, &mut room[1..n + 1]) {
            room[n + 1] = b'"';
            self.at += n + 2;
        } else {
            self.at += 1 + escaped(bytes, &mut self.out[self.at + 1..]);
            self.byte(b'"');
        }
    }

    /// Appends `v` in decimal.
    #[inline(always)]
    pub(crate) fn u64(&mut self, v: u64) {
        if v < 100_000_000 {
            self.up_to_eight_digits(v as u32);
        } else {
            // What is above the last eight digits, then those eight.
            let high = div_1e8(v);
            if high < 100_000_000 {
                self.up_to_eight_digits(high as u32);
            } else {
                self.at += above_eight_digits(high, &mut self.out[self.at..]);
            }
            self.eight_digits((v - high * 100_000_000) as u32);
        }
    }

    /// Appends `v` in decimal.
    #[inline(always)]
    pub(crate) fn i64(&mut self, v: i64) {
        if v < 0 {
            self.byte(b'-');
        }
        self.u64(v.unsigned_abs());
    }

    /// Appends `v` (under 10⁸) in decimal, without leading zeros.
    #[inline(always)]
    fn up_to_eight_digits(&mut self, v: u32) {
        // The length comes from the value, not from its digits, so that where the next
        // piece goes is known before the digits are.
        let n = v.checked_ilog10().map_or(1, |d| d + 1);
        self.word(ASCII_ZEROS | digits8(v) >> ((8 - n) * 8), n as usize);
    }

    /// Appends `v` (under 10⁸) as exactly eight digits.
    #[inline(always)]
    fn eight_digits(&mut self, v: u32) {
        self.word(ASCII_ZEROS | digits8(v), 8);
    }

    /// Appends `v` as Rust's `Display` writes it (the shortest decimal that reads back
    /// as `v`, without an exponent). Meter values mostly have at most three decimals:
    /// those are written with integer arithmetic, the rest by `Display`.
    #[inline(always)]
    pub(crate) fn f64(&mut self, v: f64) {
        if v == 0.0 {
            if v.is_sign_negative() {
                self.literal(b"-0");
            } else {
                self.byte(b'0');
            }
            return;
        }
        if v.abs() < SHORT_DECIMAL_LIMIT {
            // Ties cannot matter: a value halfway between two thousandths has more than
            // three decimals, and fails the check below whichever way it rounded.
            let thousandths = (v.abs() * 1000.0).round_ties_even();
            if thousandths / 1000.0 == v.abs() {
                if v < 0.0 {
                    self.byte(b'-');
                }
                // Exact: both are integers below 2⁵², and the quotient's truncation
                // cannot reach the next integer (see SHORT_DECIMAL_LIMIT). Signed
                // conversions: cheaper than unsigned ones, natively and in WASM.
                let whole = (thousandths / 1000.0) as i64;
                let fraction = (thousandths as i64 - whole * 1000) as u32;
                self.u64(whole as u64);
                if fraction != 0 {
                    self.fraction(fraction);
                }
                return;
            }
        }
        self.at += displayed(v, &mut self.out[self.at..]);
    }

    /// Appends `.` and thousandths `f` (1 to 999) without trailing zeros.
    #[inline(always)]
    fn fraction(&mut self, f: u32) {
        // The last three of eight digits, after the point.
        let digits = ((ASCII_ZEROS | digits8(f)) >> 40) as u32;
        let n = match (f % 100, f % 10) {
            (0, _) => 2,
            (_, 0) => 3,
            _ => 4,
        };
        self.put((u32::from(b'.') | digits << 8).to_le_bytes());
        self.at += n;
    }
}

/// Writes `bytes` into `out` with the characters JSON requires escaped (the rare
/// case); returns how many bytes it wrote.
#[cold]
#[inline(never)]
fn escaped(bytes: &[u8], out: &mut [u8]) -> usize {
    // Checked writes: this path is rare.
    let mut at = 0;
    let mut put = |piece: &[u8]| {
        out[at..at + piece.len()].copy_from_slice(piece);
        at += piece.len();
    };
    for &b in bytes {
        match b {
            b'"' => put(b"\\\""),
            b'\\' => put(b"\\\\"),
            b'\n' => put(b"\\n"),
            b'\r' => put(b"\\r"),
            b'\t' => put(b"\\t"),
            0..=0x1f => put(format!("\\u{b:04x}").as_bytes()),
            b => put(&[b]),
        }
    }
    at
}

/// Writes `v` (10⁸ or more, under 2⁶⁴ / 10⁸) into `out` in decimal; returns how many
/// digits it wrote (it may store up to 8 bytes past them).
#[inline(never)]
fn above_eight_digits(v: u64, out: &mut [u8]) -> usize {
    // SAFETY: at most 4 digits (v is under 2⁶⁴ / 10⁸, its part above eight digits under
    // 10⁴) and then eight; each stored as a word of 8 bytes: 12 bytes at most.
    let mut c = unsafe { Cursor::new(&mut out[..16]) };
    let high = div_1e8(v);
    c.up_to_eight_digits(high as u32);
    c.eight_digits((v - high * 100_000_000) as u32);
    c.at
}

/// Writes `v` into `out` through `Display` (the rare case); returns how many bytes it
/// wrote.
#[cold]
#[inline(never)]
fn displayed(v: f64, out: &mut [u8]) -> usize {
    let mut text = String::with_capacity(32);
    let _ = write!(text, "{v}");
    out[..text.len()].copy_from_slice(text.as_bytes());
    text.len()
}

/// Below this magnitude, a value with at most three decimals is the only such decimal
/// that reads back as it (an f64's spacing there is under 0.001), and dividing its
/// thousandths by 1000 never rounds up to the next integer.
const SHORT_DECIMAL_LIMIT: f64 = (1u64 << 42) as f64;

/// `v / 100_000_000` by a multiplication: WebAssembly has no 64-bit multiply-high, so
/// the compiler would otherwise emit a real 64-bit division. Exact for every `u64`
/// (the multiplier is 2⁹⁰ / 10⁸ rounded up, and its error stays under 2²⁶).
#[inline(always)]
pub(crate) fn div_1e8(v: u64) -> u64 {
    mul_high(v, 0xABCC_7711_8461_CEFD) >> 26
}

/// The high 64 bits of `a × b`, from 32-bit halves.
#[inline(always)]
fn mul_high(a: u64, b: u64) -> u64 {
    let (a0, a1) = (a & 0xFFFF_FFFF, a >> 32);
    let (b0, b1) = (b & 0xFFFF_FFFF, b >> 32);
    let (low, cross1, cross2) = (a0 * b0, a0 * b1, a1 * b0);
    let middle = (low >> 32) + (cross1 & 0xFFFF_FFFF) + (cross2 & 0xFFFF_FFFF);
    a1 * b1 + (cross1 >> 32) + (cross2 >> 32) + (middle >> 32)
}

/// ASCII `0` in each of eight bytes.
const ASCII_ZEROS: u64 = 0x3030_3030_3030_3030;

/// The eight decimal digits of `v` (under 10⁸) as the byte values 0 to 9, the first
/// digit in the lowest byte (the order of a little-endian store), computed in all
/// eight bytes at once: split in halves of four digits, each half in pairs, each pair
/// in digits. A quotient by 100 or by 10 is a multiplication and a shift, exact for the
/// values each lane can hold (under 10⁴ and under 10²).
#[inline(always)]
fn digits8(v: u32) -> u64 {
    let high = v / 10_000;
    // Two lanes of 32 bits: digits 1-4, digits 5-8.
    let x = u64::from(high) | u64::from(v - high * 10_000) << 32;
    let hundreds = ((x * 10_486) >> 20) & 0x0000_007F_0000_007F;
    // Four lanes of 16 bits, two digits each.
    let x = hundreds | (x - hundreds * 100) << 16;
    let tens = ((x * 103) >> 10) & 0x000F_000F_000F_000F;
    // Eight lanes of 8 bits, a digit each.
    tens | (x - tens * 10) << 8
}

/// Copies `from` into `to` (of the same length) if none of its bytes needs escaping
/// in JSON, in pieces of fixed size; `false` when one does (`to` is then garbage).
/// Without `ESCAPES` it copies and looks at nothing: the caller knows `from` holds no
/// byte to escape.
#[inline(always)]
fn copy_plain<const ESCAPES: bool>(from: &[u8], to: &mut [u8]) -> bool {
    let needs_escape = |word| ESCAPES && needs_escape(word);
    let n = from.len();
    if n > 16 {
        let mut i = 0;
        while i + 8 <= n {
            let word = word8(from, i);
            if needs_escape(word) {
                return false;
            }
            to[i..i + 8].copy_from_slice(&word.to_le_bytes());
            i += 8;
        }
        if i < n {
            // The last eight bytes, overlapping what is already copied.
            let word = word8(from, n - 8);
            if needs_escape(word) {
                return false;
            }
            to[n - 8..].copy_from_slice(&word.to_le_bytes());
        }
        true
    } else if n >= 8 {
        // The first eight and the last eight, overlapping when n < 16: no loop (a loop
        // costs an interruption check per turn in WebAssembly).
        let (first, last) = (word8(from, 0), word8(from, n - 8));
        to[..8].copy_from_slice(&first.to_le_bytes());
        to[n - 8..].copy_from_slice(&last.to_le_bytes());
        !needs_escape(first) && !needs_escape(last)
    } else if n >= 4 {
        // The first four and the last four, overlapping when n < 8.
        let first = u32::from_le_bytes([from[0], from[1], from[2], from[3]]);
        let last = u32::from_le_bytes([from[n - 4], from[n - 3], from[n - 2], from[n - 1]]);
        to[..4].copy_from_slice(&first.to_le_bytes());
        to[n - 4..].copy_from_slice(&last.to_le_bytes());
        !needs_escape(u64::from(first) | u64::from(last) << 32)
    } else if n >= 2 {
        let first = u16::from_le_bytes([from[0], from[1]]);
        let last = u16::from_le_bytes([from[n - 2], from[n - 1]]);
        to[..2].copy_from_slice(&first.to_le_bytes());
        to[n - 2..].copy_from_slice(&last.to_le_bytes());
        // Spaces in the unused half: they need no escaping.
        !needs_escape(u64::from(first) | u64::from(last) << 16 | SPACES << 32)
    } else if n == 1 {
        to[0] = from[0];
        !needs_escape(u64::from(from[0]) | SPACES << 8)
    } else {
        true
    }
}

/// Eight spaces, shifted in where fewer than eight bytes are checked.
const SPACES: u64 = 0x2020_2020_2020_2020;

#[inline(always)]
fn word8(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Whether any of the eight bytes of `word` is a control character, `"` or `\`.
#[inline(always)]
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS != 0;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS != 0;
    below_space
        || zero_byte(word ^ (ONES * u64::from(b'"')))
        || zero_byte(word ^ (ONES * u64::from(b'\\')))
}
